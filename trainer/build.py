"""Builders: each component of a run from the config's sections (the Trainer calls them in order).

``build_loader`` (and the one-time checks of the dataset's labels), ``build_backbone``,
``build_head`` (the Partial FC head, its margin and its optimizer), ``build_run_engine``
(DDP or DeepSpeed around the backbone) and ``build_scheduler`` (one schedule for both
optimizers). Each turns a configuration error into a :class:`ConfigError` naming the key.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Tuple

import numpy as np
import torch

from trainer.backbones import get_backbone
from trainer.config import Config, ConfigError
from trainer.elastic import check_world_size
from trainer.engine import Engine, build_engine
from trainer.heads import STATE_DTYPES, UNPG, PartialFC, PartialFCSGD, build_margin
from trainer.optim import LRScheduler, optimizer_factory
from trainer.runtime.process_group import DistInfo

log = logging.getLogger("trainer")

LoaderFactory = Callable[[Config, DistInfo], Any]


def default_loader_factory(cfg: Config, d: DistInfo):
    from trainer.data import build_train_loader

    if not cfg.data.train_dir:
        raise ConfigError("config key 'data.train_dir' is empty: set it to the dataset folder")
    return build_train_loader(cfg.data.train_dir, cfg.data.batch_size, rank=d.rank,
                              world_size=d.world_size, device=d.device, backend=cfg.data.backend,
                              num_threads=cfg.data.num_threads, seed=cfg.run.seed,
                              augment=cfg.data.augment, shuffle=True, shuffle_mode=cfg.data.shuffle_mode,
                              block_bytes=cfg.data.block_bytes, shuffle_buffer=cfg.data.shuffle_buffer,
                              lock_timeout=cfg.data.lock_timeout)


def build_loader(cfg: Config, d: DistInfo, factory: LoaderFactory):
    """The training loader, after the checks that need the dataset (class count, batch size, labels)."""
    loader = factory(cfg, d)
    num_classes = int(loader.num_classes)
    check_world_size(num_classes, d.world_size, cfg.data.train_dir)  # every rank holds a class
    log.info("data: %s, %d images, %d classes, %d batches of %d per rank per epoch",
             type(loader).__name__, int(loader.num_images), num_classes, len(loader), cfg.data.batch_size)
    if len(loader) == 0:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} x {d.world_size} ranks is larger than "
                          f"the dataset ({loader.num_images} images): no full batch per epoch")
    if cfg.data.num_classes is not None and cfg.data.num_classes != num_classes:
        raise ConfigError(f"config key 'data.num_classes' = {cfg.data.num_classes} but the dataset "
                          f"{cfg.data.train_dir} has {num_classes} classes")
    check_labels(cfg, loader, num_classes)
    return loader


def check_labels(cfg: Config, loader, num_classes: int) -> None:
    """Once at startup, from the dataset's labels: at least 2 identities (with one, every
    global batch has one class and the loss is 0), and a class count (``property``) not
    larger than the labels' range unless ``data.num_classes`` says so (classes that never
    appear would be trained as negatives only)."""
    labels = getattr(loader, "labels", None)
    if labels is None:
        return
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if labels.size == 0:
        return
    where = cfg.data.train_dir or "the dataset"
    present = int(np.unique(labels).size)
    if present < 2:
        raise ConfigError(f"{where}: {present} identity in the labels; training needs at least 2 classes in "
                          "the global batch (with one the loss is 0 and nothing is learnt)")
    top = int(labels.max()) + 1
    if top < num_classes and cfg.data.num_classes is None:
        raise ConfigError(f"{where}: the class count is {num_classes} (property file) but the labels stop "
                          f"at {top - 1}: classes {top}..{num_classes - 1} have no image. Fix the property "
                          f"file, or set data.num_classes={num_classes} to train with them anyway")


def build_backbone(cfg: Config, device: torch.device) -> torch.nn.Module:
    m = cfg.model
    try:
        return get_backbone(m.backbone, num_features=m.embedding_size, dropout=m.dropout or None,
                            grad_checkpointing=m.grad_checkpointing or None, width=m.width,
                            norm=m.norm).to(device)
    except ValueError as e:
        raise ConfigError(f"model.backbone={m.backbone}: {e}") from e


def build_head(cfg: Config, num_classes: int, device: torch.device) -> Tuple[PartialFC, PartialFCSGD, float]:
    """(head, its optimizer, its base learning rate)."""
    lc, oc = cfg.loss, cfg.optim
    m1, m2, m3 = lc.margin_list  # three values: checked by LossConfig
    margin = build_margin(lc.margin, s=lc.s, m=lc.m, margin_list=(m1, m2, m3), h=lc.h,
                          t_alpha=lc.t_alpha, l_a=lc.l_a, u_a=lc.u_a, l_m=lc.l_m, u_m=lc.u_m, lambda_g=lc.lambda_g)
    head = PartialFC(margin=margin,
                     embedding_size=cfg.model.embedding_size, num_classes=num_classes,
                     sample_rate=lc.sample_rate,
                     unpg=UNPG(wisk=lc.wisk, negatives=lc.negatives, sharded=lc.unpg_sharded) if lc.unpg else None,
                     dtype=STATE_DTYPES[lc.state_dtype], device=device)
    head_lr = oc.head_lr if oc.head_lr is not None else oc.lr
    return head, PartialFCSGD(head, lr=head_lr, momentum=oc.momentum, weight_decay=oc.weight_decay), head_lr


def build_run_engine(cfg: Config, backbone: torch.nn.Module, head: PartialFC, head_opt: PartialFCSGD,
                     d: DistInfo, accum: Optional[int] = None) -> Engine:
    """The engine of ``cfg.engine`` around the backbone; it builds the backbone optimizer.
    ``accum``: micro-batches per step when it differs from ``optim.grad_accum``
    (``data.keep_global_batch`` at another world size, :mod:`trainer.elastic`)."""
    engine = build_engine(cfg.engine, optimizer_factory(cfg.optim), cfg.optim.clip_grad_norm, backbone,
                          head, head_opt, d, accum or cfg.optim.grad_accum, cfg.data.batch_size,
                          compile=cfg.model.compile)
    engine.bn_frozen = cfg.model.bn_mode == "frozen"
    return engine


def build_scheduler(cfg: Config, engine: Engine, head_opt: PartialFCSGD, head_lr: float,
                    total_steps: int) -> LRScheduler:
    """Warmup + decay for both optimizers (the backbone's at ``optim.lr x backbone_lr_scale``)."""
    return LRScheduler([engine.backbone_opt, head_opt], [cfg.optim.lr * cfg.optim.backbone_lr_scale, head_lr],
                       total_steps, cfg.optim)


__all__ = ["LoaderFactory", "build_backbone", "build_head", "build_loader", "build_run_engine", "build_scheduler",
           "check_labels", "default_loader_factory"]

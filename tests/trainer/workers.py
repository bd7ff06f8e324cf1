"""Module-level worker functions for tests/distributed.run_world."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from tests.trainer.synthetic import MemoryLoader, make_dataset
from trainer.config import load_config
from trainer.loop import Trainer

BASE = [
    "model.backbone=tiny",
    "model.embedding_size=32",
    "model.width=8",
    "loss.s=32",
    "loss.m=0.3",
    "optim.lr=0.1",
    "logging.log_every=5",
    "validation.every=0",
    "checkpoint.save_every=0",
    "logging.image_grid=false",
    "logging.progress_bar=off",
    "logging.hist_every=5",
]


def tiny_config(out: Path, overrides: List[str], val: bool = False):
    ov = [f"run.output={out}"] + BASE
    if val:
        ov += ["validation.targets=[val]", f"validation.val_dir={out.parent}"]
    else:
        ov += ["validation.at_start=false"]
    return load_config(None, ov + list(overrides))


def train_worker(rank: int, world: int, out: str, overrides: List[str], data: Dict[str, Any],
                 val: bool = False, nan_at_batch: Optional[int] = None, return_weights: bool = False,
                 head_init_seed: Optional[int] = None, record: bool = False):
    out = Path(out)
    cfg = tiny_config(out, overrides, val)
    imgs, labels = make_dataset(**data)

    def factory(c, d):
        return MemoryLoader(imgs, labels, c.data.batch_size, d.rank, d.world_size, c.run.seed,
                            nan_at_batch=nan_at_batch)

    t = Trainer(cfg, factory).setup()
    if head_init_seed is not None:  # identical class centres whatever the world size
        g = torch.Generator().manual_seed(head_init_seed)
        full = torch.randn(t.num_classes, cfg.model.embedding_size, generator=g) * 0.1
        s, e = t.head.class_range
        with torch.no_grad():
            t.head.weight.copy_(full[s:e])
    start_step = t.step
    lrs, served = [], []
    if record:  # lr per optimizer step (as the loop reads it) and this rank's served labels
        orig_get_lr, orig_next = t.scheduler.get_lr, t._next_batch

        def get_lr():
            lrs.append(orig_get_lr())
            return lrs[-1]

        def next_batch():
            x, y = orig_next()
            served.append(y.clone())
            return x, y
        t.scheduler.get_lr, t._next_batch = get_lr, next_batch
    if return_weights:
        init_bb = {k: v.detach().clone() for k, v in t.backbone.state_dict().items()}
        init_head = t.head.weight.detach().clone()
    res = t.train()
    res["start_step"] = start_step
    res["class_range"] = tuple(t.head.class_range)
    res["accum"], res["total_steps"] = t.accum, t.total_steps
    if record:
        res["lr"], res["served"] = lrs, served
    if return_weights:
        res["backbone"] = {k: v.detach().clone() for k, v in t.backbone.state_dict().items()}
        res["head"] = t.head.weight.detach().clone()
        res["init_backbone"], res["init_head"] = init_bb, init_head
    return res


def phases_worker(rank: int, world: int, root: str, phases: List[Dict[str, Any]], data: Dict[str, Any]):
    """Several trainings in ONE process group (saves process start-up time). A phase is
    {"out": subdir, "overrides": [...], optional "copy": checkpoint dir to copy into
    <out>/checkpoints first, "remove": paths to delete, "corrupt": files to overwrite
    with garbage (file operations by rank 0 before the phase), "kw": extra train_worker
    keywords, "expect_error": True to return (type name, message) instead of raising}."""
    import shutil

    import torch.distributed as dist

    results = []
    for ph in phases:
        out = Path(root) / ph["out"]
        if rank == 0:
            if ph.get("copy"):
                src = Path(root) / ph["copy"]
                shutil.copytree(src, out / "checkpoints" / src.name)
            for rel in ph.get("remove", ()):
                shutil.rmtree(Path(root) / rel)
            for rel in ph.get("corrupt", ()):
                (Path(root) / rel).write_bytes(b"\x00 not a checkpoint")
        dist.barrier()
        try:
            results.append(train_worker(rank, world, str(out), ph["overrides"], data, **ph.get("kw", {})))
        except Exception as e:
            if not ph.get("expect_error"):
                raise
            results.append((type(e).__name__, str(e)))
        dist.barrier()
    return results


def sync_count_worker(rank: int, world: int, out: str, overrides: List[str], data: Dict[str, Any],
                      first: int = 3, last: int = 5):
    """Train with the host-sync counter active over steps ``first``..``last`` (steady state:
    no logging, validation or checkpoint in them), loop body included; returns the counts."""
    from tests.syncs import SyncCounter

    cfg = tiny_config(Path(out), ["logging.log_every=100", "logging.hist_every=0"] + list(overrides))
    imgs, labels = make_dataset(**data)

    def factory(c, d):
        return MemoryLoader(imgs, labels, c.data.batch_size, d.rank, d.world_size, c.run.seed)

    t = Trainer(cfg, factory).setup()
    counter = SyncCounter()
    original = t._one_step

    def one_step():
        if t.step + 1 == first:
            counter.__enter__()
        if t.step + 1 == last + 1:
            counter.__exit__(None, None, None)
        return original()

    t._one_step = one_step
    t.train()
    return {"total": counter.total, "report": counter.report()}

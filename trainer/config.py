"""Typed training configuration: dataclasses loaded from YAML.

- ``load_config(path, overrides)``: YAML file, optional ``_base_: file | [files]``
  (paths relative to the including file, merged in order, then this file on top;
  nested mappings merge key by key), then dotted CLI overrides ``key.sub=value``
  (value parsed as YAML: ``optim.lr=0.02``, ``data.val_targets=[lfw,cfp_fp]``).
- Unknown keys and wrong types raise :class:`ConfigError` naming the key and
  listing the valid ones. Nothing is silently ignored.
- Sections, one per component: ``run`` (output, seed, length, NaN policy),
  ``model``, ``loss``, ``data`` (with a typed ``augment``), ``optim``,
  ``engine`` (DDP/DeepSpeed, precision), ``checkpoint``, ``logging``,
  ``validation``. Every field is typed; there is no free-form dict.
- Every numeric field is range-checked (step counts >= 1, intervals >= 0, rates
  in their ranges, ``loss.s`` > 0, margins >= 0, ...); a float field also takes a
  string that spells a number (``optim.lr=1e-3`` on the command line: YAML 1.1
  reads ``1e-3`` as a string).
- ``to_yaml(cfg)`` gives the resolved config (saved in the run folder once the
  run's checks passed).
"""
from __future__ import annotations

import dataclasses
import math
import re
import signal
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import yaml

from trainer.data.augment import AugmentConfig


class ConfigError(ValueError):
    """A config file or override is invalid (unknown key, wrong type, bad value)."""


@dataclass
class RunConfig:
    output: str = "work_dirs/run"
    seed: int = 2048
    num_epochs: int = 20
    max_steps: Optional[int] = None    # optimizer steps; overrides num_epochs
    nan_policy: str = "stop"           # stop | skip (both engines)
    max_skips: int = 10                # nan_policy=skip: give up after this many in a row
    # signals that stop the run with a checkpoint at the current step (trainer.preemption);
    # [] disables: the signal then acts as the default (the process ends at once)
    preempt_signals: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])


@dataclass
class ModelConfig:
    backbone: str = "r50"              # a name of trainer.backbones.available_backbones()
    embedding_size: int = 512
    dropout: float = 0.0               # before the embedding layer (iresnet, tiny)
    width: Optional[int] = None        # channel width where the backbone has one (tiny); None: its default
    norm: Optional[str] = None         # tiny: "batch" | "none"; None: the backbone's default
    grad_checkpointing: bool = False   # recompute iresnet stages in backward (memory for time)
    compile: bool = False              # torch.compile the backbone
    # fine-tuning (docs/finetune.md): backbone weights at step 0 (never on resume: a checkpoint wins)
    init_from: str = ""                # state dict (insightface keys) / export file / run folder; "": random
    init_strict: bool = True           # False: differing layers (e.g. embedding_size) start fresh, listed
    bn_mode: str = "train"             # train | frozen (running stats fixed) | recalibrate (re-estimated first)
    bn_recalibrate_batches: int = 50   # bn_mode=recalibrate: batches of the new data before step 1


@dataclass
class LossConfig:
    margin: str = "arcface"            # trainer.heads.MARGINS
    s: float = 64.0
    m: float = 0.5                     # ArcFace angular / CosFace additive margin
    margin_list: List[float] = field(default_factory=lambda: [1.0, 0.5, 0.0])  # combined (m1, m2, m3)
    unpg: bool = False                 # add UNPG metric negatives (docs/design.md, the loss)
    wisk: float = 1.5                  # box-and-whisker width w
    negatives: str = "global"          # UNPG pairs over the gathered global batch | "local" (per rank)
    unpg_sharded: Optional[bool] = None  # global pairs split over ranks (None: when world size > 1)
    sample_rate: float = 1.0           # Partial FC sampling rate (docs/design.md, sharding)
    state_dtype: str = "fp32"          # fp32 | bf16: storage of the class centres and their momentum
    h: float = 0.333                   # adaface: margin scaler width (uses s and m too)
    t_alpha: float = 0.01              # adaface: EMA rate of the global-batch norm statistics
    l_a: float = 10.0                  # magface: norm range [l_a, u_a] ...
    u_a: float = 110.0
    l_m: float = 0.45                  # magface: ... mapped linearly to margins [l_m, u_m]
    u_m: float = 0.8
    lambda_g: float = 35.0             # magface: weight of the norm regulariser g(a)
    head_init: str = "random"          # random | imprint (class centres = normalised mean embeddings)
    imprint_max_per_class: Optional[int] = None  # imprint: the first N images of each class (None: all)


@dataclass
class DataConfig:
    train_dir: str = ""                # folder with train.rec/train.idx/property
    num_classes: Optional[int] = None  # if set, must equal the dataset's class count
    batch_size: int = 128              # per rank, per micro-step
    backend: str = "auto"              # auto | dali | torch (trainer.data.BACKENDS)
    num_threads: int = 4
    shuffle_mode: str = "block"        # block: permuted file blocks read in order + buffer | global
    block_bytes: Optional[int] = None  # block size in bytes of .rec (None: the loader's default, 4 MiB)
    shuffle_buffer: Optional[int] = None  # images in the mixing buffer (None: the loader's default)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # all off by default: flip only
    # seconds a rank waits on the node's label-scan / index lock while its holder shows no
    # progress (the holder marks progress at every piece it scans); then a clear error
    lock_timeout: float = 300.0


@dataclass
class OptimConfig:
    optimizer: str = "sgd"             # sgd | adamw (backbone); the head uses PartialFCSGD
    lr: float = 0.1
    head_lr: Optional[float] = None    # default: lr
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    scheduler: str = "poly"            # poly | cosine | constant
    power: float = 2.0                 # polynomial decay power (arcface_torch uses 2)
    warmup_steps: int = 0              # linear warmup, in optimizer steps
    min_lr: float = 0.0
    grad_accum: int = 1                # micro-batches per optimizer step
    clip_grad_norm: float = 5.0        # backbone only; 0 disables
    backbone_lr_scale: float = 1.0     # backbone lr = lr x scale (the head keeps head_lr); fine-tuning
    freeze_backbone_steps: int = 0     # the first N optimizer steps train the head only (BN untouched)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1                # ZeRO stage 0/1/2
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000


@dataclass
class EngineConfig:
    name: str = "ddp"                  # ddp | deepspeed (trainer.engine)
    precision: str = "auto"            # auto | fp32 | bf16 | fp16 (auto: fp16 on CUDA, fp32 on CPU)
    # fp16 loss scaling (GradScaler / DeepSpeed's dynamic scaler; docs/training.md, fp16): the first
    # scale and the overflow-free steps before it doubles; an overflow halves it and skips the step.
    # The run stops when the scale falls below min_scale or after max_overflows overflows in a row.
    init_scale: float = 65536.0
    growth_interval: int = 2000
    min_scale: float = 1.0
    max_overflows: int = 20
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


@dataclass
class CheckpointConfig:
    save_every: int = 2000             # optimizer steps; 0: only at the end
    keep_last: int = 3
    resume: str = "auto"               # auto | none (start over, old files moved aside) | path
    allow_config_change: bool = False  # resume although model/loss/data/optim keys changed


@dataclass
class LoggingConfig:
    log_every: int = 50
    hist_every: int = 500              # negative-similarity histograms; 0: never
    image_grid: bool = True            # TensorBoard grid of the first batch
    progress_bar: Optional[bool] = None  # None: when stdout is a terminal


@dataclass
class ValidationConfig:
    targets: List[str] = field(default_factory=list)  # .bin sets, e.g. [lfw, cfp_fp, agedb_30]
    val_dir: str = ""                  # folder of <target>.bin; default: data.train_dir
    every: int = 2000                  # optimizer steps; 0: only at the end
    at_start: bool = True              # accuracy of the untrained/resumed model first


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)


#: keys of the flat layout before the sections (v0.1) -> where they live now; used to
#: turn an old key into a clear error (the shipped YAML files are migrated)
MOVED_KEYS = {
    "output": "run.output", "seed": "run.seed", "num_epochs": "run.num_epochs", "max_steps": "run.max_steps",
    "nan_policy": "run.nan_policy", "max_skips": "run.max_skips",
    "precision": "engine.precision", "engine": "engine.name", "zero_stage": "engine.deepspeed.zero_stage",
    "deepspeed": "engine.deepspeed",
    "log_every": "logging.log_every", "hist_every": "logging.hist_every", "image_grid": "logging.image_grid",
    "progress_bar": "logging.progress_bar",
    "verify_every": "validation.every", "verify_at_start": "validation.at_start",
    "data.val_targets": "validation.targets", "data.val_dir": "validation.val_dir",
    "save_every": "checkpoint.save_every", "keep_last": "checkpoint.keep_last", "resume": "checkpoint.resume",
    "model.backbone_kwargs": "model.width / model.norm / model.dropout",
}


def _choices() -> Dict[str, tuple]:
    """Valid values of the keys with a fixed set, each from the module that owns it."""
    from trainer.batchnorm import BN_MODES
    from trainer.data import BACKENDS
    from trainer.data.plan import MODES as SHUFFLE_MODES
    from trainer.engine import ENGINES, PRECISIONS
    from trainer.heads.margins import MARGINS
    from trainer.heads.optim import STATE_DTYPES
    from trainer.heads.unpg import NEGATIVE_MODES
    from trainer.optim import OPTIMIZERS, SCHEDULERS

    return {
        "run.nan_policy": ("stop", "skip"),
        "engine.name": ENGINES,
        "engine.precision": PRECISIONS,
        "engine.deepspeed.zero_stage": (0, 1, 2),
        "loss.margin": MARGINS,
        "loss.negatives": NEGATIVE_MODES,
        "loss.state_dtype": tuple(STATE_DTYPES),
        "data.backend": BACKENDS,
        "data.shuffle_mode": SHUFFLE_MODES,
        "optim.optimizer": OPTIMIZERS,
        "optim.scheduler": SCHEDULERS,
        "model.bn_mode": BN_MODES,
        "loss.head_init": ("random", "imprint"),
    }


# ---------------------------------------------------------------- YAML + _base_
class _DecimalLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``0x10`` as 16, ``010`` as 8, ``1:30`` as 90 and ``1_000`` as 1000: in a
    config those are typos far more often than intent, so only decimal integers are numbers."""


def _decimal_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = str(node.value)
    if not re.fullmatch(r"[-+]?(0|[1-9][0-9]*)", text):
        raise ConfigError(f"{text!r} is not a decimal number (YAML would read it as "
                          f"{yaml.SafeLoader.construct_yaml_int(loader, node)}); write it in decimal")
    return int(text)


_DecimalLoader.add_constructor("tag:yaml.org,2002:int", _decimal_int)


def _yaml_load(text: Any) -> Any:
    return yaml.load(text, Loader=_DecimalLoader)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml_with_bases(path: Union[str, Path], _stack: Sequence[Path] = ()) -> dict:
    """Read ``path``; merge its ``_base_`` files first (recursively)."""
    path = Path(path).resolve()
    if path in _stack:
        raise ConfigError(f"{path}: circular _base_ chain: {' -> '.join(map(str, _stack))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = _yaml_load(f) or {}
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    merged: dict = {}
    for b in bases:
        merged = _deep_merge(merged, load_yaml_with_bases(path.parent / b, (*_stack, path)))
    return _deep_merge(merged, data)


# --------------------------------------------------------------- typed building
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check(value, inner[0], key)
    if tp is Any:
        return value
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_check(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (bool, str) and isinstance(value, tp):
        return value
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"section '{prefix[:-1]}'" if prefix else "top level"
        key = f"{prefix}{unknown[0]}"
        moved = f" (moved to '{MOVED_KEYS[key]}')" if key in MOVED_KEYS else ""
        raise ConfigError(f"unknown config key '{key}'{moved} ({where}); valid keys: {', '.join(names)}")
    kwargs = {}
    for k, v in data.items():
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            if not isinstance(v, dict):
                if f"{prefix}{k}" in MOVED_KEYS:
                    raise ConfigError(f"config key '{prefix}{k}' is now a section; the old key moved to "
                                      f"'{MOVED_KEYS[prefix + k]}'")
                raise ConfigError(f"config key '{prefix}{k}' is a section, expected a mapping, got {v!r}")
            kwargs[k] = _build(tp, v, f"{prefix}{k}.")
        else:
            kwargs[k] = _check(v, tp, prefix + k)
    return cls(**kwargs)


def _validate(cfg: Config) -> None:
    for key, choices in _choices().items():
        obj: Any = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        if obj not in choices:
            raise ConfigError(f"config key '{key}': {obj!r} is not one of {list(choices)}")
    _check_ranges(cfg)
    if not 0 < cfg.loss.sample_rate <= 1:
        raise ConfigError(f"config key 'loss.sample_rate' must be in (0, 1], got {cfg.loss.sample_rate}")
    if len(cfg.loss.margin_list) != 3:
        raise ConfigError("config key 'loss.margin_list' needs 3 values (m1, m2, m3)")
    from trainer.backbones import available_backbones

    if cfg.model.backbone.lower() not in available_backbones():
        raise ConfigError(f"config key 'model.backbone': unknown {cfg.model.backbone!r}; "
                          f"valid: {', '.join(available_backbones())}")


#: the largest learning rate accepted (optim.lr, optim.head_lr)
MAX_LR = 10.0

#: configuration keys holding paths: compared as resolved paths on resume
PATH_KEYS = ("data.train_dir", "model.init_from")


def _same_path(a: Any, b: Any) -> bool:
    import os

    if not (isinstance(a, str) and isinstance(b, str) and a and b):
        return a == b
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def _check_ranges(cfg: Config) -> None:
    """Every numeric field's range; the message names the key and the value."""
    r, m, lo, d, o, c, lg, v = cfg.run, cfg.model, cfg.loss, cfg.data, cfg.optim, cfg.checkpoint, cfg.logging, cfg.validation

    def need(key: str, value: Any, ok: bool, what: str) -> None:
        if value is not None and not ok:
            raise ConfigError(f"config key '{key}' must be {what}, got {value!r}")

    for key, val in {"run.num_epochs": r.num_epochs, "run.max_steps": r.max_steps, "data.batch_size": d.batch_size,
                     "data.num_threads": d.num_threads, "data.num_classes": d.num_classes,
                     "optim.grad_accum": o.grad_accum, "model.embedding_size": m.embedding_size,
                     "model.width": m.width, "checkpoint.keep_last": c.keep_last, "logging.log_every": lg.log_every,
                     "engine.deepspeed.reduce_bucket_size": cfg.engine.deepspeed.reduce_bucket_size,
                     "engine.deepspeed.allgather_bucket_size": cfg.engine.deepspeed.allgather_bucket_size,
                     "data.block_bytes": d.block_bytes, "data.shuffle_buffer": d.shuffle_buffer,
                     "model.bn_recalibrate_batches": m.bn_recalibrate_batches,
                     "loss.imprint_max_per_class": lo.imprint_max_per_class}.items():
        need(key, val, val is None or val >= 1, ">= 1")
    need("data.num_classes", d.num_classes, d.num_classes is None or d.num_classes >= 2,
         ">= 2 (a classifier needs at least two identities)")
    for key, val in {"run.max_skips": r.max_skips, "checkpoint.save_every": c.save_every,
                     "logging.hist_every": lg.hist_every, "validation.every": v.every,
                     "optim.warmup_steps": o.warmup_steps,
                     "optim.freeze_backbone_steps": o.freeze_backbone_steps}.items():
        need(key, val, val >= 0, ">= 0 (0: never/off)")
    floats = {"loss.s": lo.s, "loss.m": lo.m, "loss.wisk": lo.wisk, "model.dropout": m.dropout, "optim.lr": o.lr,
              "optim.head_lr": o.head_lr, "optim.momentum": o.momentum, "optim.weight_decay": o.weight_decay,
              "optim.power": o.power, "optim.min_lr": o.min_lr, "optim.clip_grad_norm": o.clip_grad_norm,
              "optim.backbone_lr_scale": o.backbone_lr_scale}
    for key, val in floats.items():
        need(key, val, val is None or math.isfinite(val), "a finite number")
    need("loss.s", lo.s, lo.s > 0, "> 0 (the logit scale)")
    for key in ("loss.m", "loss.wisk", "optim.weight_decay", "optim.min_lr", "optim.clip_grad_norm", "optim.power",
                "optim.backbone_lr_scale"):
        need(key, floats[key], floats[key] >= 0, ">= 0")
    need("model.dropout", m.dropout, 0 <= m.dropout < 1, "in [0, 1)")
    for key, val in {"loss.h": lo.h, "loss.lambda_g": lo.lambda_g, "loss.l_m": lo.l_m}.items():
        need(key, val, math.isfinite(val) and val >= 0, "a finite number >= 0")
    need("loss.t_alpha", lo.t_alpha, 0 < lo.t_alpha <= 1, "in (0, 1]")
    need("loss.l_a", lo.l_a, math.isfinite(lo.l_a) and lo.l_a > 0, "> 0")
    need("loss.u_a", lo.u_a, math.isfinite(lo.u_a) and lo.u_a > lo.l_a, f"> loss.l_a ({lo.l_a})")
    need("loss.u_m", lo.u_m, math.isfinite(lo.u_m) and lo.u_m >= lo.l_m, f">= loss.l_m ({lo.l_m})")
    need("optim.momentum", o.momentum, 0 <= o.momentum < 1, "in [0, 1)")
    need("optim.lr", o.lr, o.lr > 0, "> 0")
    for key, val in {"optim.lr": o.lr, "optim.head_lr": o.head_lr}.items():
        need(key, val, val is None or val <= MAX_LR, f"<= {MAX_LR:g} (a learning rate above that diverges at once; "
             "face recognition recipes use 0.02-0.4)")
    need("run.output", r.output, r.output.strip() != "",
         "a folder (empty: an unset shell variable would put the run into the current directory)")
    need("data.lock_timeout", d.lock_timeout, math.isfinite(d.lock_timeout) and d.lock_timeout > 0,
         "a finite number of seconds > 0")
    need("optim.head_lr", o.head_lr, o.head_lr is None or o.head_lr > 0, "> 0")
    need("optim.min_lr", o.min_lr, o.min_lr <= o.lr, f"<= optim.lr ({o.lr})")
    if len(o.betas) != 2 or not all(math.isfinite(b) and 0 <= b < 1 for b in o.betas):
        raise ConfigError(f"config key 'optim.betas' must be two numbers in [0, 1) (Adam's beta1, beta2), "
                          f"got {o.betas!r}")
    if len(lo.margin_list) == 3:
        m1, m2, m3 = lo.margin_list
        need("loss.margin_list", lo.margin_list, all(math.isfinite(x) for x in lo.margin_list) and m1 > 0
             and m2 >= 0 and m3 >= 0, "(m1, m2, m3) with m1 > 0, m2 >= 0, m3 >= 0")
    if o.freeze_backbone_steps and cfg.engine.name == "deepspeed":
        raise ConfigError("config key 'optim.freeze_backbone_steps' is supported with engine.name=ddp only "
                          f"(got {o.freeze_backbone_steps} with deepspeed)")
    need("run.seed", r.seed, 0 <= r.seed < 2**31, "an integer in [0, 2**31)")
    e = cfg.engine  # fp16 loss scaling
    need("engine.growth_interval", e.growth_interval, e.growth_interval >= 1, ">= 1")
    need("engine.max_overflows", e.max_overflows, e.max_overflows >= 1, ">= 1")
    for key, val in {"engine.init_scale": e.init_scale, "engine.min_scale": e.min_scale}.items():
        need(key, val, math.isfinite(val) and val > 0, "a finite number > 0")
    need("engine.init_scale", e.init_scale, e.init_scale >= e.min_scale, f">= engine.min_scale ({e.min_scale})")
    for name in r.preempt_signals:
        sig = getattr(signal, name, None) if name.startswith("SIG") and not name.startswith("SIG_") else None
        if not isinstance(sig, signal.Signals) or sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ConfigError(f"config key 'run.preempt_signals': {name!r} is not a signal that can be caught "
                              "(e.g. SIGTERM, SIGUSR1, SIGUSR2, SIGINT)")


#: configuration keys a resumed run must share with its checkpoint (a section name covers
#: all its keys); anything else (batch size, loader, logging, engine, lengths) may change
RESUME_KEYS = ("model.backbone", "model.embedding_size", "model.dropout", "model.width", "model.norm",
               "model.init_from", "model.init_strict", "model.bn_mode", "optim.backbone_lr_scale",
               "optim.freeze_backbone_steps",
               "loss", "data.train_dir", "data.num_classes", "optim.optimizer", "optim.lr", "optim.head_lr",
               "optim.momentum", "optim.weight_decay", "optim.betas", "optim.scheduler", "optim.power",
               "optim.warmup_steps", "optim.min_lr", "optim.clip_grad_norm")


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


#: keys inside RESUME_KEYS that a resume converts instead of refusing (with a warning)
RESUME_CONVERTED = ("loss.state_dtype",)


def config_diff(saved: dict, current: dict, keys: Sequence[str] = RESUME_KEYS) -> List[tuple]:
    """[(key, saved value, current value)] of the ``keys`` that differ; keys the saved
    config does not have (an older version) and ``RESUME_CONVERTED`` are not compared."""
    a, b = _flatten(saved), _flatten(current)
    out = []
    for k in sorted(b):
        if k in RESUME_CONVERTED:
            continue
        if not any(k == p or k.startswith(p + ".") for p in keys) or k not in a:
            continue
        x, y = a[k], b[k]
        if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
            x, y = list(x), list(y)
        if k in PATH_KEYS and _same_path(x, y):
            continue  # the same folder spelled differently (relative / absolute / a link)
        if x != y:
            out.append((k, a[k], b[k]))
    return out


def parse_override(text: str) -> tuple:
    """``"a.b=1"`` -> (["a", "b"], 1); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = _yaml_load(raw) if raw.strip() != "" else ""
    except ConfigError as e:
        raise ConfigError(f"override {text!r}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse value: {e}") from e
    return key.split("."), value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    data = _deep_merge({}, data)
    for ov in overrides:
        parts, value = parse_override(ov)
        node = data
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {ov!r}: '{p}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def config_from_dict(data: dict) -> Config:
    cfg = _build(Config, data)
    _validate(cfg)
    return cfg


def load_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> Config:
    """Load, inherit, override, type-check and validate a training config."""
    data = load_yaml_with_bases(path) if path is not None else {}
    return config_from_dict(apply_overrides(data, overrides))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)

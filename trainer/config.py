"""Typed training configuration: dataclasses loaded from YAML.

- ``load_config(path, overrides)``: YAML file, optional ``_base_: file | [files]``
  (paths relative to the including file, merged in order, then this file on top;
  nested mappings merge key by key), then dotted CLI overrides ``key.sub=value``
  (value parsed as YAML: ``optim.lr=0.02``, ``data.val_targets=[lfw,cfp_fp]``).
- Unknown keys and wrong types raise :class:`ConfigError` naming the key and
  listing the valid ones. Nothing is silently ignored.
- Sections, one per component, each defined and checked beside its component
  (a dataclass whose ``__post_init__`` checks its choices and ranges; none imports
  torch): ``run``, ``checkpoint``, ``logging``, ``validation`` (trainer.section),
  ``model`` (trainer.backbones.config), ``loss`` (trainer.heads.config), ``data``
  with a typed ``augment`` (trainer.data.config), ``optim`` (trainer.optim),
  ``engine`` (trainer.engine.config). This module only composes them (plus the
  rules between sections, :meth:`Config.__post_init__`) and loads YAML. Every
  field is typed; there is no free-form dict.
- Every numeric field is range-checked by its section (step counts >= 1, intervals
  >= 0, rates in their ranges, ``loss.s`` > 0, margins >= 0, ...); a float field
  also takes a string that spells a number (``optim.lr=1e-3`` on the command line:
  YAML 1.1 reads ``1e-3`` as a string).
- ``to_yaml(cfg)`` gives the resolved config (saved in the run folder once the
  run's checks passed).
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union, cast

import yaml

from trainer.backbones.config import ModelConfig
from trainer.data.augment import AugmentConfig
from trainer.data.config import DataConfig
from trainer.engine.config import DeepSpeedConfig, EngineConfig
from trainer.heads.config import LossConfig
from trainer.optim import MAX_LR, OptimConfig
from trainer.section import (
    CheckpointConfig,
    ConfigError,
    LoggingConfig,
    RunConfig,
    ValidationConfig,
)

#: the sections, re-exported: ``from trainer.config import OptimConfig`` keeps working
__all__ = ["AugmentConfig", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DeepSpeedConfig",
           "EngineConfig", "LoggingConfig", "LossConfig", "MAX_LR", "ModelConfig", "OptimConfig", "RunConfig",
           "ValidationConfig", "config_diff", "config_from_dict", "load_config", "to_dict", "to_yaml"]


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

    def __post_init__(self) -> None:
        """The rules between sections (each section checks its own fields)."""
        o = self.optim
        if o.freeze_backbone_steps and self.engine.name == "deepspeed":
            raise ConfigError("config key 'optim.freeze_backbone_steps' is supported with engine.name=ddp only "
                              f"(got {o.freeze_backbone_steps} with deepspeed)")


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


# ---------------------------------------------------------------- YAML + _base_
class _DecimalLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``0x10`` as 16, ``010`` as 8, ``1:30`` as 90 and ``1_000`` as 1000: in a
    config those are typos far more often than intent, so only decimal integers are numbers."""


def _decimal_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
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
            kwargs[k] = _build(cast(type, tp), v, f"{prefix}{k}.")
        else:
            kwargs[k] = _check(v, tp, prefix + k)
    return cls(**kwargs)


#: configuration keys holding paths: compared as resolved paths on resume
PATH_KEYS = ("data.train_dir", "model.init_from")


def _same_path(a: Any, b: Any) -> bool:
    import os

    if not (isinstance(a, str) and isinstance(b, str) and a and b):
        return a == b
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


#: configuration keys a resumed run must share with its checkpoint (a section name covers
#: all its keys); anything else (batch size, loader, logging, engine, lengths) may change
RESUME_KEYS = ("model.backbone", "model.embedding_size", "model.dropout", "model.width", "model.norm",
               "model.init_from", "model.init_strict", "model.bn_mode", "optim.backbone_lr_scale",
               "optim.freeze_backbone_steps",
               "loss", "data.train_dir", "data.num_classes", "optim.optimizer", "optim.lr", "optim.head_lr",
               "optim.momentum", "optim.weight_decay", "optim.betas", "optim.scheduler", "optim.power",
               "optim.warmup_steps", "optim.min_lr", "optim.clip_grad_norm",
               # the epoch's data order (trainer.data.plan): a change mid-run would switch it half-way
               "run.seed", "data.shuffle_mode", "data.block_bytes", "data.shuffle_buffer")


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
    return _build(Config, data)


def load_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> Config:
    """Load, inherit, override, type-check and validate a training config."""
    data = load_yaml_with_bases(path) if path is not None else {}
    return config_from_dict(apply_overrides(data, overrides))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)

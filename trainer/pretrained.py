"""``model.init_from``: start a run's backbone from pretrained weights (step 0 only).

Sources, told apart by what the path holds (every file is read with
``torch.load(weights_only=True)`` through :func:`trainer.checkpoint.load_file`, so a
file that would run code is refused, naming it):

- a plain state dict in insightface's key names: insightface's zoo / arcface_torch
  ``backbone.pth`` and ``model.pt`` (iresnet18-200, mbf), our ``model.pt`` and
  ``model_best.pt``; a ``module.`` prefix (a DDP-wrapped save) is stripped;
- a ``python -m trainer.checkpoint export`` file (``{"backbone": ..., "head_weight": ...}``);
- an arcface_torch training checkpoint (``checkpoint_gpu_0.pt``: ``state_dict_backbone``);
- a run folder (its newest complete checkpoint's ``trainer.pt``, else its ``model.pt``)
  or one complete checkpoint folder ``step_XXXXXXXX``.

Keys and shapes are compared with the backbone the config builds. ``strict``: any
missing, unexpected or mis-shaped key is an error listing them all (both shapes for a
mis-shaped one). Not strict (``model.init_strict: false``): mis-shaped and missing
tensors keep their fresh initialisation (e.g. another ``embedding_size``: the last
layers) and unexpected ones are ignored, each listed in the log; still an error when
fewer than half of the backbone's tensors would load (that is another network).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from trainer import checkpoint as ckpt
from trainer.section import ConfigError

log = logging.getLogger("trainer.pretrained")


class InitFromError(ConfigError):
    """``model.init_from`` names no usable weights (missing, unsafe, wrong keys/shapes)."""


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _from_folder(path: Path) -> Path:
    """The weights file a folder stands for: a complete checkpoint folder's trainer.pt; a
    run folder's newest complete checkpoint (else its model.pt)."""
    if (path / ckpt.MARKER).is_file():
        return path / ckpt.TRAINER_FILE
    done = ckpt.list_checkpoints(path / ckpt.CHECKPOINTS_DIR)
    if done:
        return done[-1][1] / ckpt.TRAINER_FILE
    if (path / "model.pt").is_file():
        return path / "model.pt"
    raise InitFromError(f"model.init_from={path}: a folder with no complete checkpoint "
                        f"({ckpt.CHECKPOINTS_DIR}/step_*/{ckpt.MARKER}) and no model.pt")


def backbone_state_from(obj: Any, where: Path) -> Dict[str, torch.Tensor]:
    """The backbone state dict inside a loaded file (any of the module docstring's kinds)."""
    if isinstance(obj, dict):
        for key in ("backbone", "state_dict_backbone"):  # export / trainer.pt; arcface_torch checkpoint
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not _is_state_dict(obj):
        kind = type(obj).__name__
        keys = f" with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else ""
        raise InitFromError(f"model.init_from={where}: not backbone weights (a {kind}{keys}); expected a state "
                            "dict of tensors (insightface backbone.pth / our model.pt), an export file, "
                            "an arcface_torch checkpoint or a run folder")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def load_source(path_str: str) -> Tuple[Dict[str, torch.Tensor], Path]:
    """(backbone state dict, the file it came from) for ``model.init_from``."""
    path = Path(path_str).expanduser()
    if not path.exists():
        raise InitFromError(f"model.init_from={path_str}: no such file or folder")
    f = _from_folder(path) if path.is_dir() else path
    try:
        obj = ckpt.load_file(f)
    except ckpt.UnsafeCheckpointError as e:
        raise InitFromError(f"model.init_from: {e}") from None
    except Exception as e:  # noqa: BLE001 - truncated file, TorchScript archive, not a torch file
        raise InitFromError(f"model.init_from={f}: cannot be read as weights ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:300]})") from None
    return backbone_state_from(obj, f), f


def compare(model: nn.Module, src: Dict[str, torch.Tensor]) -> Tuple[List[str], List[str], List[str]]:
    """(missing, unexpected, mis-shaped lines) of ``src`` against ``model.state_dict()``."""
    own = model.state_dict()
    missing = [k for k in own if k not in src]
    unexpected = [k for k in src if k not in own]
    shaped = [f"{k}: file {tuple(src[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in src and tuple(src[k].shape) != tuple(own[k].shape)]
    return missing, unexpected, shaped


def _listing(missing: List[str], unexpected: List[str], shaped: List[str], limit: int = 20) -> str:
    parts = []
    for name, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped)):
        if items:
            more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {name}: " + "; ".join(items[:limit]) + more)
    return " | ".join(parts)


def init_backbone(model: nn.Module, path_str: str, strict: bool = True) -> Dict[str, Any]:
    """Load ``model.init_from`` into ``model`` in place; returns what was loaded and skipped."""
    src, f = load_source(path_str)
    missing, unexpected, shaped = compare(model, src)
    own = model.state_dict()
    if strict and (missing or unexpected or shaped):
        raise InitFromError(f"model.init_from={f}: the weights do not fit the backbone "
                            f"({_listing(missing, unexpected, shaped)}); use the matching model.backbone / "
                            "model.embedding_size, or model.init_strict=false to start differing layers fresh")
    bad = {line.split(":")[0] for line in shaped}
    take = {k: src[k].to(dtype=own[k].dtype) for k in own if k in src and k not in bad}
    if len(take) * 2 < len(own):
        raise InitFromError(f"model.init_from={f}: only {len(take)} of the backbone's {len(own)} tensors fit "
                            f"(another network?): {_listing(missing, unexpected, shaped)}")
    with torch.no_grad():
        for k, v in take.items():
            own[k].copy_(v)
    log.info("model.init_from: loaded %d of %d backbone tensors from %s", len(take), len(own), f)
    if missing or unexpected or shaped:
        log.warning("model.init_from (init_strict=false): layers that start fresh or are ignored: %s",
                    _listing(missing, unexpected, shaped, limit=1000))
    return {"file": str(f), "loaded": len(take), "missing": missing, "unexpected": unexpected, "mis_shaped": shaped}

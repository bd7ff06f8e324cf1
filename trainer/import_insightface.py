"""Continue an insightface arcface_torch run here, at any number of GPUs.

    python -m trainer.import_insightface --src ARCFACE_OUTPUT_DIR --out RUN_DIR [--network NAME]

Reads arcface_torch's output folder:

- ``checkpoint_gpu_{rank}.pt`` (one per rank, written with ``save_all_states``):
  ``epoch`` (epochs done), ``global_step``, ``state_dict_backbone``,
  ``state_dict_softmax_fc`` (its ``weight`` rows are that rank's classes, split
  as ``class_range`` splits them: contiguous, the first ``C % R`` ranks one
  more), ``state_optimizer`` (ONE SGD: group 0 the backbone parameters, group 1
  the head weight, with momentum buffers), ``state_lr_scheduler``;
- ``model.pt`` (backbone state_dict only), used when there are no checkpoints
  (then ``--num-classes`` is required and the head starts fresh, N(0, 0.01)).

Writes ONE checkpoint of ours, ``RUN_DIR/checkpoints/step_<global_step>/``,
through ``trainer.checkpoint``'s functions: the shards concatenated in rank
order and re-sliced into our class ranges (one shard per source rank, so the
training run re-slices again to its own world size on ``resume: auto``),
backbone and head momentum carried, step and epoch carried. Every file is read
with ``torch.load(weights_only=True)``: a crafted file cannot run code.

Validated like a checkpoint before anything is written: every field's type and
range (``global_step`` an integer in [0, :data:`MAX_STEP`], ``epoch`` an integer
in [0, max(step, 1)], the softmax weight a finite 2-D float tensor, the optimizer's
groups), one ``global_step`` across files; the class count comes from
``--num-classes`` or, without it, from arcface_torch's ``training.log`` config dump
(``num_classes``), never from the files' rows, so a missing rank file (the last
one too) is an error: the world size is the number of files, and their rows must
be arcface_torch's split of the class count over it. Errors name the file and the
field. The import holds ``RUN_DIR``'s lock (``trainer.runtime.run_lock``) while it
writes and refuses a folder in use by a training job.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from trainer import checkpoint as ck
from trainer.collectives import class_range

_CKPT_RE = re.compile(r"^checkpoint_gpu_(\d+)\.pt$")
_KEYS = ("epoch", "global_step", "state_dict_backbone", "state_dict_softmax_fc", "state_optimizer")
#: the largest ``global_step`` taken as real (arcface_torch runs are 10^5-10^7 steps): a
#: larger one is a corrupt field, and would "resume" a run past its end and train nothing
MAX_STEP = 10 ** 9
_LOG_CLASSES = re.compile(r"^Training: .*?-: num_classes\s+(\d+)\s*$", re.M)


class InsightfaceImportError(ValueError):
    """The source folder is not a usable arcface_torch output."""


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, or one holding more than tensors and plain values
        raise InsightfaceImportError(f"{path}: cannot be read with torch.load(weights_only=True): {e}") from e


def _int_field(d: Dict[str, Any], key: str, where: Path, lo: int, hi: int) -> int:
    v = d[key]
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point() and v.dtype != torch.bool:
        v = int(v.item())
    if isinstance(v, bool) or not isinstance(v, int):
        raise InsightfaceImportError(f"{where}: field '{key}' must be an integer, got {v!r} ({type(v).__name__})")
    if not lo <= v <= hi:
        raise InsightfaceImportError(f"{where}: field '{key}' = {v} is out of range [{lo}, {hi}]")
    return v


def _check_fields(d: Any, f: Path) -> Dict[str, Any]:
    """One rank file's fields, type and range, naming the file and the field."""
    if not isinstance(d, dict) or any(k not in d for k in _KEYS):
        have = sorted(map(str, d)) if isinstance(d, dict) else type(d).__name__
        raise InsightfaceImportError(f"{f}: not an arcface_torch checkpoint (needs keys {list(_KEYS)}, has {have})")
    step = _int_field(d, "global_step", f, 0, MAX_STEP)
    _int_field(d, "epoch", f, 0, max(step, 1))
    fc = d["state_dict_softmax_fc"]
    if not isinstance(fc, dict):
        raise InsightfaceImportError(f"{f}: field 'state_dict_softmax_fc' must be a state_dict (a mapping), "
                                     f"got {type(fc).__name__}")
    w = fc.get("weight")
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point() or w.shape[1] < 1:
        raise InsightfaceImportError(f"{f}: field 'state_dict_softmax_fc.weight' must be a 2-D float tensor, got "
                                     f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    if not bool(torch.isfinite(w).all()):
        raise InsightfaceImportError(f"{f}: field 'state_dict_softmax_fc.weight' holds non-finite values")
    bb = d["state_dict_backbone"]
    if not isinstance(bb, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in bb.items()):
        raise InsightfaceImportError(f"{f}: field 'state_dict_backbone' must map parameter names to tensors")
    opt = d["state_optimizer"]
    groups = opt.get("param_groups") if isinstance(opt, dict) else None
    if (not isinstance(groups, list) or len(groups) < 2 or not isinstance(opt.get("state", {}), dict)
            or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
        raise InsightfaceImportError(f"{f}: field 'state_optimizer' is not arcface_torch's SGD state (param_groups: "
                                     "[backbone, head], each with a 'params' list)")
    return d


def _class_count(src: Path, num_classes: Optional[int]) -> int:
    """--num-classes, else the last ``num_classes`` of arcface_torch's training.log."""
    if num_classes is not None:
        if num_classes < 2:
            raise InsightfaceImportError(f"--num-classes must be >= 2, got {num_classes}")
        return num_classes
    log_file = src / "training.log"
    try:
        found = _LOG_CLASSES.findall(log_file.read_text(errors="replace"))
    except OSError:
        found = []
    if not found:
        raise InsightfaceImportError(f"{src}: the class count is unknown (no 'num_classes' in {log_file.name}): pass "
                                     "--num-classes (the dataset's, first number of its property file), so that a "
                                     "missing rank file cannot go unnoticed")
    return int(found[-1])


def _rank_files(src: Path) -> List[Path]:
    found = {int(m.group(1)): p for p in src.iterdir() if (m := _CKPT_RE.match(p.name))}
    if not found:
        return []
    world = max(found) + 1
    missing = [f"checkpoint_gpu_{r}.pt" for r in range(world) if r not in found]
    if missing:
        raise InsightfaceImportError(f"{src}: rank files missing: {', '.join(missing)} (found ranks {sorted(found)})")
    return [found[r] for r in range(world)]


def _check_rows(files: Sequence[Path], rows: Sequence[int], num_classes: Optional[int]) -> int:
    total = sum(rows)
    counts = ", ".join(f"{f.name}: {n}" for f, n in zip(files, rows))
    if num_classes is not None and total != num_classes:
        hint = (f": a rank file is missing ({len(files)} found, checkpoint_gpu_0..{len(files) - 1}.pt)"
                if total < num_classes else "")
        raise InsightfaceImportError(f"head rows of the rank files add up to {total}, not the class count "
                                     f"{num_classes}{hint} ({counts})")
    world = len(files)
    expect = [class_range(total, r, world) for r in range(world)]
    if [e - s for s, e in expect] != list(rows):
        raise InsightfaceImportError(f"head rows per rank ({counts}) are not arcface_torch's split of {total} classes "
                           f"over {world} ranks ({[e - s for s, e in expect]}): the files do not belong "
                           "to one run, or one is missing or foreign")
    return total


def _backbone_momentum(opt: Dict[str, Any], n_backbone: int, where: Path) -> Optional[Dict[str, Any]]:
    """Group 0 of arcface_torch's SGD as a state_dict of our backbone SGD (None: no momentum)."""
    groups = opt.get("param_groups", [])
    if len(groups) < 1:
        return None
    g0 = dict(groups[0])
    ids = list(g0.pop("params"))
    if len(ids) != n_backbone and n_backbone >= 0:
        raise InsightfaceImportError(f"{where}: state_optimizer group 0 has {len(ids)} parameters, "
                           f"the backbone {n_backbone}")
    state = {}
    for new_id, old_id in enumerate(ids):
        st = opt.get("state", {}).get(old_id)
        if st is not None and "momentum_buffer" in st and st["momentum_buffer"] is not None:
            state[new_id] = {"momentum_buffer": st["momentum_buffer"]}
    if not state:
        return None
    return {"state": state, "param_groups": [{**g0, "params": list(range(len(ids)))}]}


def _head_momentum(opt: Dict[str, Any], rows: int, where: Path) -> Optional[torch.Tensor]:
    groups = opt.get("param_groups", [])
    if len(groups) < 2 or len(groups[1]["params"]) != 1:
        raise InsightfaceImportError(f"{where}: state_optimizer has no head group (expected group 1 with the "
                           "softmax weight, as arcface_torch builds its SGD)")
    st = opt.get("state", {}).get(groups[1]["params"][0])
    if not st or st.get("momentum_buffer") is None:
        return None
    buf = st["momentum_buffer"]
    if buf.dim() != 2 or buf.shape[0] != rows:
        raise InsightfaceImportError(f"{where}: head momentum has shape {tuple(buf.shape)}, the weight {rows} rows")
    return buf


def _check_network(name: str, backbone: Dict[str, torch.Tensor], embedding_size: int, where: Path) -> int:
    """Our backbone ``name`` must take the state_dict as is; returns its parameter count."""
    from trainer.backbones import get_backbone

    model = get_backbone(name, num_features=embedding_size)
    try:
        model.load_state_dict(backbone)
    except RuntimeError as e:
        raise InsightfaceImportError(f"{where}: backbone does not match --network {name}: {e}") from e
    return sum(1 for p in model.parameters() if p.requires_grad)


def _head_state(weight: torch.Tensor) -> Dict[str, Any]:
    return {"weight": weight}


def _head_opt_state(momentum: Optional[torch.Tensor], group: Dict[str, Any]) -> Dict[str, Any]:
    from trainer.heads.sparse_sgd import PartialFCSGD

    hp = {k: group[k] for k in ("lr", "momentum", "weight_decay") if k in group}
    dummy = torch.nn.Parameter(torch.zeros(1, 1))
    sd = PartialFCSGD([dummy], **hp).state_dict()
    if momentum is None:
        sd["state"] = {}
    else:
        sd["state"] = {0: {"momentum_buffer": momentum}}
    return sd


def import_run(src: Path, out: Path, network: Optional[str] = None,
               num_classes: Optional[int] = None) -> Path:
    """Write our checkpoint for the arcface_torch output ``src`` under ``out``; returns its folder.
    Holds ``out``'s run-folder lock meanwhile (:class:`trainer.runtime.run_lock.RunLockedError` if in use)."""
    from trainer.runtime.run_lock import RunLock

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise InsightfaceImportError(f"--src {src}: not a folder")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        lock = RunLock(out).acquire(wait_s=0.0)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    try:
        return _import_run(src, out, network, num_classes)
    except BaseException:
        if created:  # nothing of ours is left behind in a folder we made
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        lock.release()


def _import_run(src: Path, out: Path, network: Optional[str], num_classes: Optional[int]) -> Path:
    files = _rank_files(src)
    if files:
        num_classes = _class_count(src, num_classes)
        parts = [_check_fields(_load(f), f) for f in files]
        rows = [p["state_dict_softmax_fc"]["weight"].shape[0] for p in parts]
        dims = {p["state_dict_softmax_fc"]["weight"].shape[1] for p in parts}
        if len(dims) != 1:
            raise InsightfaceImportError(f"{src}: rank files disagree on the embedding size {sorted(dims)}")
        steps = {int(p["global_step"]) for p in parts}  # checked integers
        if len(steps) != 1:
            raise InsightfaceImportError(f"{src}: rank files are from different steps {sorted(steps)}")
        total = _check_rows(files, rows, num_classes)
        first = parts[0]
        step, epoch = int(first["global_step"]), int(first["epoch"])
        backbone = first["state_dict_backbone"]
        weight = torch.cat([p["state_dict_softmax_fc"]["weight"] for p in parts])
        moms = [_head_momentum(p["state_optimizer"], n, f) for p, n, f in zip(parts, rows, files)]
        have = [m for m in moms if m is not None]
        momentum = torch.cat(have) if len(have) == len(moms) else None
        opt = first["state_optimizer"]
        head_group = opt["param_groups"][1]
        n_bb = len(opt["param_groups"][0]["params"])
        if network is not None:
            n_net = _check_network(network, backbone, weight.shape[1], files[0])
            if n_net != n_bb:
                raise InsightfaceImportError(f"{files[0]}: optimizer holds {n_bb} backbone parameters, --network "
                                   f"{network} has {n_net}")
        bb_opt = _backbone_momentum(opt, n_bb, files[0])
        world = len(files)
    else:
        model = src / "model.pt"
        if num_classes is not None and num_classes < 2:
            raise InsightfaceImportError(f"--num-classes must be >= 2, got {num_classes}")
        if not model.is_file():
            raise InsightfaceImportError(f"{src}: neither checkpoint_gpu_*.pt nor model.pt found")
        if num_classes is None:
            raise InsightfaceImportError(f"{src}: only model.pt (no checkpoint_gpu_*.pt): pass --num-classes to "
                               "start a fresh head on this backbone")
        backbone = _load(model)
        if not isinstance(backbone, dict):
            raise InsightfaceImportError(f"{model}: not a state_dict")
        dim = _embedding_size(backbone, model)
        if network is not None:
            _check_network(network, backbone, dim, model)
        total, step, epoch, world = num_classes, 0, 0, 1
        weight = torch.empty(total, dim).normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
        momentum, bb_opt, head_group = None, None, {}

    ranges = [class_range(total, r, world) for r in range(world)]
    ckpt = ck.checkpoint_dir(out / "checkpoints", step)
    if ckpt.exists() and (ckpt / ck.MARKER).exists():
        raise InsightfaceImportError(f"{ckpt} exists already: import into a fresh --out")
    ck.begin_save(ckpt)
    for r, (s, e) in enumerate(ranges):
        ck.write_shard(ckpt, r, {
            "class_range": (s, e), "num_classes": total, "head": _head_state(weight[s:e].clone()),
            "optimizer": _head_opt_state(None if momentum is None else momentum[s:e].clone(), head_group)})
    state = {
        "backbone": backbone, "optimizer": bb_opt,
        "scheduler": {"step_num": step, "total_steps": None}, "scaler": None,
        "step": step, "epoch": epoch, "batch": 0, "world_size": world, "num_classes": total,
        "best": {}, "config": {"imported_from": str(src), "network": network},
    }
    from trainer.io.atomic import atomic_torch_save

    atomic_torch_save(state, ckpt / ck.TRAINER_FILE)
    ck.finish_save(ckpt, step, world, ranges, keep_last=1 << 30)
    return ckpt


def _embedding_size(backbone: Dict[str, torch.Tensor], where: Path) -> int:
    for key in ("features.weight", "fc.weight"):
        if key in backbone and isinstance(backbone[key], torch.Tensor):
            return int(backbone[key].shape[0])
    raise InsightfaceImportError(f"{where}: cannot tell the embedding size (no features.weight / fc.weight)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.import_insightface",
                                description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--src", required=True, help="arcface_torch output folder (checkpoint_gpu_*.pt, model.pt)")
    p.add_argument("--out", required=True, help="our run folder (config output:); resume: auto continues it")
    p.add_argument("--network", default=None, help="our backbone name (e.g. r100): checks the weights fit it")
    p.add_argument("--num-classes", type=int, default=None,
                   help="class count to check the shards against (default: num_classes in the source's "
                        "training.log; required with model.pt only)")
    a = p.parse_args(argv)
    from trainer.runtime.run_lock import RunLockedError

    try:
        ckpt = import_run(Path(a.src), Path(a.out), a.network, a.num_classes)
    except InsightfaceImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunLockedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    meta = ck.read_marker(ckpt)
    print(f"wrote {ckpt}: step {meta['step']}, {meta['class_ranges'][-1][1]} classes in "
          f"{meta['world_size']} source shards; train with output: {a.out} and resume: auto")
    return 0


if __name__ == "__main__":
    sys.exit(main())

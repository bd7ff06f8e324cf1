"""Sharded, atomic, resumable checkpoints (also at a different world size).

Layout of one checkpoint ``<run>/checkpoints/step_XXXXXXXX/``::

    trainer.pt        rank 0: backbone state_dict, backbone optimizer, scheduler,
                      step, data position (epoch, batch), resolved config
    shard_RRRRR.pt    rank R: Partial FC shard (head + its optimizer state),
                      class range, RNG states of that rank
    deepspeed/        engine.save_checkpoint output (engine: deepspeed only)
    COMPLETE          JSON written LAST by rank 0 after every rank finished:
                      step, world size, class ranges

Every file goes through trainer.io.atomic (temp file + rename), so a crash
while saving leaves at most a folder without COMPLETE, which is ignored; the
previous checkpoint stays loadable. Pruning removes a checkpoint's COMPLETE
first, so a half-deleted folder is never a resume candidate. Re-sharding
(docs/design.md, class ranges): row-aligned tensors of the old shards are
concatenated in class order and the new rank's range is sliced out (head and
optimizer state alike).

Loading runs no code: every file is read with ``torch.load(weights_only=True)``
(:func:`load_file`). What we write is tensors, numbers, strings, None, dicts,
lists and tuples only (RNG states included: numpy's state is stored as a tensor
and a dict). Checkpoints of earlier versions stored numpy's RNG state as an
``ndarray``; those load through a narrow allow-list (``numpy.ndarray``,
``numpy.dtype`` and its array reconstructor, nothing that can call a function).
Any other object in a file is refused with :class:`UnsafeCheckpointError`
naming the file and the object; the file is never unpickled with
``weights_only=False``. (DeepSpeed's own files under ``deepspeed/`` are read
by DeepSpeed's loader; :func:`trainer.engine.deepspeed.check_deepspeed_files`
checks their pickles against an allow-list first.)
"""
from __future__ import annotations

import importlib
import json
import logging
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from trainer.io.atomic import atomic_open, atomic_torch_save

log = logging.getLogger("trainer.checkpoint")

# The layout, in one place (eval reads run folders through these too).
MARKER = "COMPLETE"             # JSON, written last: the checkpoint is complete
TRAINER_FILE = "trainer.pt"     # rank 0's state
SHARD_PREFIX = "shard_"         # shard_RRRRR.pt: rank R's head shard
CHECKPOINTS_DIR = "checkpoints"  # <run>/checkpoints/step_XXXXXXXX/
_STEP_RE = re.compile(r"^step_(\d+)$")


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def shard_file(ckpt: Path, rank: int) -> Path:
    return Path(ckpt) / f"{SHARD_PREFIX}{rank:05d}.pt"


# ------------------------------------------------------------------------ RNG
def rng_state() -> Dict[str, Any]:
    """This process's RNG states as plain values (tensors, ints, floats, strings, lists)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    st: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": [int(version), [int(x) for x in internal], gauss],
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: Dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    npst = st["numpy"]
    if isinstance(npst, dict):
        np.random.set_state((npst["name"], np.asarray(npst["keys"].numpy(), dtype=np.uint32), int(npst["pos"]),
                             int(npst["has_gauss"]), float(npst["cached_gaussian"])))
    else:  # checkpoints of earlier versions: numpy's own tuple (an ndarray inside)
        np.random.set_state(npst)
    version, internal, gauss = st["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


# ----------------------------------------------------------------------- load
class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds objects that only an unrestricted unpickler would build."""


def _legacy_globals() -> list:
    """What checkpoints of earlier versions hold besides plain values: numpy's RNG state
    (an ``ndarray`` of uint32). Building an array runs no user code."""
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 2
        multiarray = importlib.import_module("numpy.core.multiarray")
    out = [multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [dtypes.UInt32DType, dtypes.Int64DType, dtypes.Float64DType]
    return out


def load_file(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; an object outside the allow-list
    is refused (:class:`UnsafeCheckpointError` naming the file and the object)."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_legacy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except RuntimeError as e:
        if "TorchScript" in str(e):
            raise UnsafeCheckpointError(f"{path}: a TorchScript archive (a model with its code), not a checkpoint "
                                        "of this trainer; it is not loaded") from None
        raise ValueError(f"{path}: not a readable checkpoint file: {' '.join(str(e).split())}") from None
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise
        m = re.search(r"GLOBAL (\S+)", str(e))
        what = f" ({m.group(1)})" if m else ""
        raise UnsafeCheckpointError(
            f"{path}: refused to load: it holds an object{what} that is not a tensor or a plain value, "
            "and loading it would run code (torch.load(weights_only=False)). This trainer never writes "
            "such files: delete it or move it out of the run folder if you did not put it there") from None


# ----------------------------------------------------------------------- save
def write_shard(ckpt: Path, rank: int, shard: Dict[str, Any]) -> None:
    """Every rank: its head shard (``class_range``, ``head``, ``optimizer``) + RNG states."""
    atomic_torch_save({**shard, "rng": rng_state()}, shard_file(ckpt, rank))


def begin_save(ckpt: Path) -> None:
    """Rank 0, before anyone writes: an old marker must not vouch for new files."""
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / MARKER).unlink(missing_ok=True)


def finish_save(ckpt: Path, step: int, world_size: int, class_ranges: Sequence[Tuple[int, int]],
                keep_last: int) -> None:
    """Rank 0, after a barrier that follows every rank's writes: marker, then pruning."""
    meta = {"step": step, "world_size": world_size, "class_ranges": [list(r) for r in class_ranges]}
    with atomic_open(ckpt / MARKER, "w") as f:
        json.dump(meta, f)
    prune(ckpt.parent, keep_last)


def remove_checkpoint(path: Path) -> None:
    """Marker first (the folder stops being a candidate at once), then the files."""
    (Path(path) / MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints; drop incomplete ones older than those."""
    done = list_checkpoints(root)
    for _step, path in done[:-keep_last] if keep_last > 0 else []:
        remove_checkpoint(path)
    if done:
        newest = done[-1][0]
        for step, path in _all_step_dirs(root):
            if step < newest and not (path / MARKER).exists():
                shutil.rmtree(path, ignore_errors=True)


def _all_step_dirs(root: Path) -> List[Tuple[int, Path]]:
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def list_checkpoints(root: Path) -> List[Tuple[int, Path]]:
    """Complete checkpoints (marker present), oldest first."""
    return [(s, p) for s, p in _all_step_dirs(root) if (p / MARKER).is_file()]


def read_marker(ckpt: Path) -> Dict[str, Any]:
    with open(Path(ckpt) / MARKER) as f:
        meta = json.load(f)
    for k in ("step", "world_size", "class_ranges"):
        if k not in meta:
            raise ValueError(f"{ckpt / MARKER}: missing '{k}'")
    return meta


# ---------------------------------------------------------------- re-sharding
def _reshard_tree(parts: List[Tuple[Tuple[int, int], Any]], lo: int, hi: int, where: str) -> Any:
    """Merge the same node of several shards: row-aligned tensors are concatenated
    (parts are ordered by class start and together cover [parts[0].start, ...))
    and rows [lo, hi) taken; everything else is taken from the first part."""
    first = parts[0][1]
    if isinstance(first, torch.Tensor):
        rows = [r[1] - r[0] for r, _ in parts]
        if first.dim() >= 1 and all(isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == n
                                    for (_, t), n in zip(parts, rows)) and sum(rows) > 0:
            full = torch.cat([t for _, t in parts], 0)
            base = parts[0][0][0]
            return full[lo - base:hi - base].clone()
        return first
    if isinstance(first, dict):
        for _, d in parts[1:]:
            if not isinstance(d, dict) or set(d) != set(first):
                raise ValueError(f"shards disagree on the keys of {where or 'the state'}")
        return {k: _reshard_tree([(r, d[k]) for r, d in parts], lo, hi, f"{where}.{k}") for k in first}
    if isinstance(first, (list, tuple)):
        out = [_reshard_tree([(r, d[i]) for r, d in parts], lo, hi, f"{where}[{i}]") for i in range(len(first))]
        return type(first)(out) if isinstance(first, tuple) else out
    return first


def load_shard_for_range(ckpt: Path, new_range: Tuple[int, int],
                         old_ranges: Sequence[Sequence[int]]) -> Dict[str, Any]:
    """State for class rows ``new_range`` from old shard files (only overlapping ones are read)."""
    lo, hi = new_range
    parts = []
    for r, (s, e) in enumerate(old_ranges):
        overlaps = s < hi and e > lo
        if overlaps or (lo == hi and not parts and s <= lo <= e):  # empty range: structure only
            d = load_file(shard_file(ckpt, r))
            if tuple(d["class_range"]) != (s, e):
                raise ValueError(f"{shard_file(ckpt, r)}: class_range {d['class_range']} != marker {(s, e)}")
            parts.append(((s, e), d))
    if not parts:
        raise ValueError(f"{ckpt}: no shard covers classes {new_range}")
    # every state in the shard file (the head and its optimizer, and any class-sharded state
    # registered with the checkpointer); not the file's own bookkeeping
    keys = [k for k in parts[0][1] if k not in ("class_range", "num_classes", "rng")]
    merged = {k: _reshard_tree([(rng, d[k]) for rng, d in parts], lo, hi, k) for k in keys}
    merged["class_range"] = (lo, hi)
    return merged


# ------------------------------------------------------------- load a rank
def load_for_rank(ckpt: Path, rank: int, world_size: int, class_range: Tuple[int, int]
                  ) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
    """(marker, trainer state, shard state) for this rank; raises on any unreadable file.

    Same world size: the rank's own file (with its RNG state). Otherwise the
    shard is re-sliced from the overlapping old shards (RNG not restored)."""
    meta = read_marker(ckpt)
    state = load_file(Path(ckpt) / TRAINER_FILE)
    if meta["world_size"] == world_size and tuple(meta["class_ranges"][rank]) == tuple(class_range):
        shard = load_file(shard_file(ckpt, rank))
        if tuple(shard["class_range"]) != tuple(class_range):
            raise ValueError(f"{shard_file(ckpt, rank)}: class_range {shard['class_range']} != {class_range}")
    else:
        total_old = meta["class_ranges"][-1][1] if meta["class_ranges"] else 0
        if total_old < class_range[1]:
            raise ValueError(f"{ckpt}: checkpoint has {total_old} classes, this run needs {class_range[1]}")
        shard = load_shard_for_range(ckpt, class_range, meta["class_ranges"])
    return meta, state, shard


def find_resume_candidates(resume: str, ckpt_root: Path) -> List[Path]:
    """Checkpoint folders to try, best first: ``auto`` = complete ones newest first;
    a path = that folder (it must be complete)."""
    if resume == "none":
        return []
    if resume == "auto":
        return [p for _, p in reversed(list_checkpoints(ckpt_root))]
    p = Path(resume)
    if not (p / MARKER).is_file():
        raise FileNotFoundError(f"resume={resume}: not a complete checkpoint folder (no {MARKER})")
    return [p]


def try_load(candidates: List[Path], loader: Callable[[Path], Any],
             all_ok: Callable[[bool], bool]) -> Tuple[Optional[Path], Any, List[Tuple[Path, str]]]:
    """Try candidates in order; ``loader`` loads this rank's part, ``all_ok`` agrees
    across ranks. A failing candidate is skipped with a warning naming it. Returns
    (path, result, [(candidate, why it failed on this rank)]); path is None when none loaded."""
    failures: List[Tuple[Path, str]] = []
    for path in candidates:
        err = None
        try:
            result = loader(path)
        except Exception as e:  # noqa: BLE001 - corrupt/truncated/missing file, unsafe pickle, wrong class count: try the next
            err, result = e, None
        if all_ok(err is None):
            return path, result, failures
        why = (f"{type(err).__name__}: {err}" if err is not None else "another rank failed to load its part")
        why = " ".join(why.split())
        failures.append((path, why))
        log.warning("checkpoint %s is unreadable (%s); falling back to the previous one", path, why)
    return None, None, failures


# --------------------------------------------------------------------- export
def export(run_dir: Path, out: Path) -> Dict[str, Any]:
    """One file from the newest complete checkpoint of ``run_dir``: ``{"backbone": state_dict,
    "head_weight": [C, D] float32 (every shard, class order; a bf16 state widened exactly),
    "num_classes": C, "step": S}``, written
    atomically and loadable with ``torch.load(..., weights_only=True)``."""
    root = Path(run_dir) / "checkpoints"
    done = list_checkpoints(root)
    if not done:
        raise FileNotFoundError(f"{root}: no complete checkpoint (folder step_* with {MARKER})")
    step, ckpt = done[-1]
    meta = read_marker(ckpt)
    ranges = meta["class_ranges"]
    num_classes = int(ranges[-1][1]) if ranges else 0
    state = load_file(Path(ckpt) / TRAINER_FILE)
    weight = load_shard_for_range(ckpt, (0, num_classes), ranges)["head"]["weight"]
    obj = {"backbone": {k: v.detach().cpu() for k, v in state["backbone"].items()},
           "head_weight": weight.detach().cpu().float(),  # float32 (a bf16 state widens exactly)
           "num_classes": num_classes, "step": int(meta["step"])}
    atomic_torch_save(obj, out)
    return obj


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m trainer.checkpoint")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="merge the newest complete checkpoint's shards into one file")
    e.add_argument("run_dir", help="run folder (config output:) holding checkpoints/")
    e.add_argument("--out", required=True, help="file to write (.pt)")
    a = p.parse_args(argv)
    try:
        obj = export(Path(a.run_dir), Path(a.out))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}: step {obj['step']}, head_weight {tuple(obj['head_weight'].shape)}, "
          f"{len(obj['backbone'])} backbone tensors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training data: RecordIO reader/writer, DALI pipeline, torch fallback loader.

    from trainer.data import build_train_loader
    loader = build_train_loader(data_dir, batch_size, rank=0, world_size=1,
                                device=torch.device("cpu"), backend="auto",
                                num_threads=2, seed=0, augment=None, shuffle=True)

See docs/data.md. Nothing heavy is imported at import time (DALI is imported
only when the DALI backend is built).
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Union

from trainer.data.config import BACKENDS, SHUFFLE_MODES, DataConfig

if TYPE_CHECKING:  # torch-free at import time: the loaders import on use
    from trainer.data.augment import AugmentConfig

__all__ = ["BACKENDS", "SHUFFLE_MODES", "DataConfig", "build_train_loader", "resolve_backend"]


#: backend="auto" on CPU-only runs: DALI's CPU pipeline beat the torch fallback
#: 1.2-2x in bench/data.py on the 2-core development machine (docs/data.md).
DEFAULT_CPU_BACKEND = "dali"


def resolve_backend(backend: str, device) -> str:
    """'auto' -> 'dali' when DALI imports (and is preferred for the device), else 'torch'."""
    from trainer.data.dali_loader import dali_available

    if backend not in BACKENDS:
        raise ValueError(f"data backend must be 'auto', 'dali' or 'torch', got {backend!r}")
    if backend == "torch":
        return "torch"
    ok = dali_available()
    if backend == "dali":
        if not ok:
            raise RuntimeError(
                "data backend 'dali' requested but nvidia-dali cannot be imported; install the pinned "
                "nvidia-dali-cuda120 from requirements.txt or use backend='torch'"
            )
        return "dali"
    if not ok:
        return "torch"
    is_cuda = getattr(device, "type", str(device)) == "cuda"
    return "dali" if is_cuda else DEFAULT_CPU_BACKEND


def build_train_loader(data_dir, batch_size: int, rank: int = 0, world_size: int = 1,
                       device=None, backend: str = "auto", num_threads: int = 2, seed: int = 0,
                       augment: Union[None, Mapping[str, Any], AugmentConfig] = None,
                       shuffle: bool = True, flip: bool = True, shuffle_buffer: Optional[int] = None,
                       shuffle_mode: str = "block", block_bytes: Optional[int] = None,
                       lock_timeout: Optional[float] = None):
    """Build the training loader for ``data_dir`` (train.rec, train.idx, property).

    Returns an object with ``num_classes``, ``num_images``, ``len()`` (batches per
    epoch per rank, equal on every rank, partial tail dropped), ``set_epoch(epoch,
    start_batch=0)`` and iteration yielding ``(images uint8 [B,112,112,3] RGB, flipped
    where drawn, labels int64 [B])`` on ``device``; :func:`trainer.data.model_input.to_model_input` turns the
    images into the model's float input on the device. ``flip``, ``shuffle_buffer``
    (local shuffle size, images), ``shuffle_mode`` ("block": permuted blocks of
    ``block_bytes`` of file read in order, then the shuffle buffer; "global": a
    permutation of all images, random reads) are extensions of the contract. ``lock_timeout``:
    seconds to wait on the node's scan/index lock without progress by its holder
    (None: ``trainer.data.node_cache.DEFAULT_LOCK_TIMEOUT``).
    """
    import torch

    from trainer.data.augment import AugmentConfig
    from trainer.data.face_rec import FaceRecDataset

    device = torch.device("cpu") if device is None else torch.device(device)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from trainer.data.plan import MODES

    if shuffle_mode not in MODES:
        raise ValueError(f"shuffle_mode must be one of {MODES}, got {shuffle_mode!r}")
    if block_bytes is not None and block_bytes <= 0:
        raise ValueError(f"block_bytes must be > 0, got {block_bytes}")
    aug = AugmentConfig.coerce(augment)
    ds = FaceRecDataset(data_dir, lock_timeout=lock_timeout)
    chosen = resolve_backend(backend, device)
    common: Dict[str, Any] = dict(batch_size=batch_size, rank=rank, world_size=world_size, device=device,
                  num_threads=num_threads, seed=seed, augment=aug, shuffle=shuffle, flip=flip,
                  shuffle_buffer=shuffle_buffer, shuffle_mode=shuffle_mode, block_bytes=block_bytes)
    if chosen == "dali":
        from trainer.data.dali_loader import DaliFaceLoader

        return DaliFaceLoader(ds, **common)
    if backend == "auto" and getattr(device, "type", "cpu") == "cuda":
        warnings.warn("nvidia-dali is not installed: using the slower torch DataLoader fallback", stacklevel=2)
    from trainer.data.torch_loader import TorchFaceLoader

    return TorchFaceLoader(ds, **common)

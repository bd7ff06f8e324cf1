"""Verification on insightface ``.bin`` sets (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW, ...).

Public contract (used by the trainer)::

    images, issame = load_bin(path, image_size=112)   # uint8 [2P,3,S,S] RGB, bool [P]
    emb = embed_images(model, images, batch_size=128, device=None)  # float32 [2P,D] CPU
    res = verify_embeddings(emb, issame, nfolds=10)   # accuracy, accuracy_std, threshold, auc, tar_at_far

Embeddings are emb(x) + emb(flip(x)), L2-normalised; the model sees RGB scaled to
[-1, 1] ((x - 127.5) / 127.5), as insightface's backbones do.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm import tqdm

from eval.bin_io import read_bin
from eval.images import decode_rgb, resize_rgb
from eval.metrics import DEFAULT_FARS, evaluate_scores, pair_scores

DeviceLike = Union[str, torch.device, None]


def load_bin(path: Union[str, Path], image_size: int = 112) -> Tuple[torch.Tensor, np.ndarray]:
    """Read a verification ``.bin`` (restricted unpickler) and decode it.

    Returns ``images`` (uint8 tensor [2P, 3, image_size, image_size], RGB) and ``issame``
    (bool numpy [P]). Images of another size are resized (bilinear).
    """
    bins, issame = read_bin(path)
    out = torch.empty((len(bins), 3, image_size, image_size), dtype=torch.uint8)
    for i, data in enumerate(bins):
        img = decode_rgb(data, where=f"{path}: image {i}")
        img = resize_rgb(img, image_size)
        out[i] = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
    return out, np.asarray(issame, dtype=bool)


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB [N,3,H,W] -> float32 in [-1, 1] (insightface's (x - 127.5) / 127.5)."""
    return images.float().sub_(127.5).div_(127.5)


@torch.no_grad()
def embed_images(
    model: torch.nn.Module,
    images: torch.Tensor,
    batch_size: int = 128,
    device: DeviceLike = None,
    *,
    progress: Optional[bool] = None,
    desc: str = "embed",
) -> torch.Tensor:
    """Flip-augmented, L2-normalised embeddings ``float32 [N, D]`` on the CPU.

    ``images`` is uint8 RGB [N, 3, H, W]. The model runs in eval mode under no_grad on
    ``device`` (default: where its parameters are); its train/eval mode is restored
    afterwards. ``progress``: tqdm bar (None = only on a terminal).
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images [N,3,H,W], got {images.dtype} {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    chunks = []
    try:
        starts = range(0, images.shape[0], batch_size)
        for s in tqdm(starts, desc=desc, disable=(None if progress is None else not progress), leave=False):
            x = to_model_input(images[s : s + batch_size].to(device, non_blocking=True))
            n = x.shape[0]
            out = model(torch.cat([x, torch.flip(x, dims=[3])], dim=0))
            if isinstance(out, (tuple, list)):
                out = out[0]
            out = out.float()
            if out.ndim != 2 or out.shape[0] != 2 * n:
                raise ValueError(f"model returned shape {tuple(out.shape)} for a batch of {2 * n}; expected [N, D]")
            emb = out[:n] + out[n:]
            chunks.append(torch.nn.functional.normalize(emb, dim=1).cpu())
    finally:
        model.train(was_training)
    if not chunks:
        return torch.empty((0, 0), dtype=torch.float32)
    emb = torch.cat(chunks)
    if not torch.isfinite(emb).all():
        raise ValueError("model produced NaN/inf embeddings")
    return emb


def verify_embeddings(
    emb: Union[torch.Tensor, np.ndarray],
    issame: Sequence[bool],
    nfolds: int = 10,
    fars: Sequence[float] = DEFAULT_FARS,
) -> Dict[str, object]:
    """The standard protocol on embeddings of pairs (2k, 2k+1).

    Returns accuracy / accuracy_std (10 contiguous folds, threshold from a grid chosen on
    the other 9), threshold, auc, tar_at_far {far: tar} (incl. 1e-3 and 1e-4), plus
    fold details and pair counts. Scores are cosine similarities of the embeddings
    (they are L2-normalised again here, so raw features are fine too).
    """
    emb = emb.detach().cpu().numpy() if isinstance(emb, torch.Tensor) else np.asarray(emb)
    emb = emb.astype(np.float64)
    issame = np.asarray(issame, dtype=bool)
    if emb.ndim != 2 or emb.shape[0] != 2 * issame.size:
        raise ValueError(f"{emb.shape[0] if emb.ndim else 0} embeddings for {issame.size} pairs")
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = emb / np.maximum(norms, 1e-12)
    return evaluate_scores(pair_scores(emb), issame, nfolds=nfolds, fars=fars)


class BinVerifier:
    """Loads a list of ``.bin`` sets once and evaluates a model on all of them.

    The trainer calls ``verifier(model)`` every N steps; the result maps set name
    (file stem) to the ``verify_embeddings`` dict plus ``scores``/``issame`` arrays
    when ``keep_scores`` is set (for plots).
    """

    def __init__(self, paths: Sequence[Union[str, Path]], image_size: int = 112):
        self.sets = []
        for p in paths:
            images, issame = load_bin(p, image_size=image_size)
            self.sets.append((Path(p).stem, images, issame))

    def __call__(
        self,
        model: torch.nn.Module,
        batch_size: int = 128,
        device: DeviceLike = None,
        nfolds: int = 10,
        keep_scores: bool = False,
        progress: Optional[bool] = None,
    ) -> Dict[str, Dict[str, object]]:
        results = {}
        for name, images, issame in self.sets:
            emb = embed_images(model, images, batch_size=batch_size, device=device, progress=progress, desc=name)
            res = verify_embeddings(emb, issame, nfolds=nfolds)
            if keep_scores:
                res["scores"] = pair_scores(emb.numpy())
                res["issame"] = issame
            results[name] = res
        return results

"""What the studies share: a training run, the tiny model's evaluation, loss statistics, L0.

* :func:`train`: one run of ``trainer.train`` on 2 ranks (torchrun), the arm's ``loss.*``
  keys as overrides;
* :func:`val_accuracy`, :func:`gallery_metrics`: 10-fold ``val.bin`` accuracy; TAR@FAR on
  every pair of a held-out gallery and on genuine + within-family impostor pairs (the
  look-alikes of :func:`synth_gallery`);
* :func:`loss_stats`, :func:`orthogonal_loss`: does a run train, has its loss flattened, and
  its L0, the loss of embeddings orthogonal to every centre and to each other:

  .. math::  L_0 = \\log(C - 1 + P + e^{-s \\sin m}) + s \\sin m

* :func:`sd` (sample std over seeds), :func:`save_grid` (a PNG of pictures in rows).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
BACKBONE, EMB = "tiny", 128  # the studies' model (configs/experiment*.yaml, configs/finetune_bench.yaml)
#: a run trains when its final loss (mean of the last 10 % of steps) < TRAINS x its start (first 10 steps)
TRAINS = 0.9
#: ... and has flattened when that mean is within FLAT (relative) of the mean of the 10 % before
FLAT = 0.02


def train(run: Path, data_dir: Path, seed: int, loss: dict, config: str = "configs/experiment.yaml",
          extra: Sequence[str] = ()) -> None:
    """``trainer.train config`` on 2 ranks into ``run`` (stdout.log there); ``loss`` -> ``loss.*`` keys."""
    overrides = [f"run.output={run}", f"data.train_dir={data_dir}", f"run.seed={seed}", *extra]
    overrides += [f"loss.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in loss.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "trainer.train", config, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "stdout.log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)


def load_model(model_file: Path) -> torch.nn.Module:
    """The studies' backbone with the weights of ``model_file`` (a state dict)."""
    from trainer.backbones import get_backbone

    model = get_backbone(BACKBONE, num_features=EMB)
    model.load_state_dict(torch.load(model_file, weights_only=True))
    return model


def val_accuracy(model: torch.nn.Module, data_dir: Path) -> float:
    """10-fold accuracy on ``data_dir/val.bin`` (the insightface protocol)."""
    from eval.metrics import verify_embeddings
    from trainer.verification_protocol import embed_images, load_bin

    images, issame = load_bin(data_dir / "val.bin")
    return float(verify_embeddings(embed_images(model, images, progress=False), issame)["accuracy"])


def synth_gallery(path: Path, seed: int, first: int, identities: int, images: int, family: dict,
                  domain: str = "A") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 NCHW images, identities, families) of a held-out synthetic gallery: identities
    ``first ..`` (never trained on), ``images`` each (indices 10,000 on), JPEG round trip as
    in the training files; built once, cached at ``path``."""
    if not path.is_file():
        from data_tools.synth import encode, family_of, make_pixels
        from trainer.io.atomic import atomic_torch_save
        from trainer.io.images import decode_rgb

        pics, labels = [], []
        for ident in range(first, first + identities):
            for k in range(images):
                jpg = encode(make_pixels(seed, ident, 10_000 + k, domain=domain, **family))
                pics.append(torch.from_numpy(decode_rgb(jpg)).permute(2, 0, 1))
                labels.append(ident)
        lab = torch.tensor(labels)
        atomic_torch_save({"images": torch.stack(pics), "labels": lab,
                           "families": torch.from_numpy(np.asarray(family_of(lab.numpy(), family["family_size"])))},
                          path)
    g = torch.load(path, weights_only=True)
    return g["images"], g["labels"], g["families"]


def gallery_metrics(model: torch.nn.Module, gallery, fars: Sequence[float]) -> dict:
    """TAR@FAR on all pairs of ``gallery`` (images, identities, families) and, where it has
    look-alikes, on genuine + within-family impostor pairs; the pair counts."""
    from eval.metrics import tar_at_far
    from trainer.verification_protocol import embed_images

    g_images, g_labels, g_fams = gallery
    emb = torch.nn.functional.normalize(embed_images(model, g_images, progress=False).float(), dim=1).numpy()
    iu = np.triu_indices(len(g_labels), k=1)
    scores = (emb @ emb.T)[iu]
    lab, fam = g_labels.numpy(), g_fams.numpy()
    same = lab[iu[0]] == lab[iu[1]]
    within = ~same & (fam[iu[0]] == fam[iu[1]])
    del iu
    res: Dict[str, Any] = {
        "tar_at_far": {str(k): v for k, v in tar_at_far(scores, same, fars).items()},
        "pairs": {"genuine": int(same.sum()), "impostor": int((~same).sum()), "within_family": int(within.sum())}}
    if within.any():
        keep = same | within
        res["tar_at_far_within_family"] = {str(k): v for k, v in tar_at_far(scores[keep], same[keep], fars).items()}
    return res


def history(summary: Path) -> dict:
    """A run's per-step ``loss`` and UNPG ``kept_fraction`` from its ``summary.json``, with :func:`loss_stats`."""
    hist = json.loads(summary.read_text())["history"]
    res = {"loss": [h["loss"] for h in hist], "kept_fraction": [h.get("kept_fraction") for h in hist]}
    res.update(loss_stats(res["loss"]))
    return res


def loss_stats(loss: Sequence[float]) -> dict:
    """Start (mean of the first 10 steps), end (mean of the last 10 %), the 10 % before, trains / flat."""
    arr = np.asarray(loss, dtype=np.float64)
    w = max(1, len(arr) // 10)
    start, end, before = arr[:10].mean(), arr[-w:].mean(), arr[-2 * w:-w].mean()
    return {"start": float(start), "end": float(end), "trains": bool(end < TRAINS * start),
            "flat": bool(before - end < FLAT * abs(before))}


def orthogonal_loss(classes: int, s: float, m: float, pairs: float = 0.0) -> float:
    """L0: the ArcFace (+ UNPG) loss of embeddings orthogonal to every centre and to each other.

    Every cosine is 0: the target logit is s cos(pi/2 + m) = -s sin m, each of the C - 1
    other centres and each of the P kept negative pairs adds exp(0) = 1 to the denominator:
    L0 = log(C - 1 + P + exp(-s sin m)) + s sin m.
    """
    sm = s * math.sin(m)
    return math.log(classes - 1 + pairs + math.exp(-sm)) + sm


def kept_pairs(kept_fraction: Optional[Sequence[Optional[float]]], pairs_per_step: int) -> Optional[float]:
    """Mean kept negative pairs per step over a run's last 10 % of steps (None: no UNPG statistics)."""
    kept = [k for k in kept_fraction or [] if k is not None]
    if not kept:
        return None
    w = max(1, len(kept) // 10)
    return pairs_per_step * float(np.mean(kept[-w:]))


def sd(vals) -> float:
    """Sample standard deviation over seeds (ddof 1; 0 for a single value)."""
    return float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def save_grid(path: Path, rows: List[List[np.ndarray]]) -> Path:
    """A PNG of pictures (uint8 HxWx3): each row's pictures side by side, the rows stacked."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)).save(path)
    return path

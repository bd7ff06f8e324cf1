"""IJB-B / IJB-C 1:1 template verification.

Reads the release layout insightface's IJB evaluation uses (``<root>`` = e.g. ``IJB_release/IJBC``)::

    <root>/loose_crop/<image>                          loose face crops
    <root>/meta/<t>_name_5pts_score.txt                 "<image> x1 y1 ... x5 y5 <faceness>" (5 landmarks, detector score)
    <root>/meta/<t>_face_tid_mid.txt                    "<image> <template_id> <media_id>"
    <root>/meta/<t>_template_pair_label.txt             "<template_1> <template_2> <0|1>"

with ``<t>`` = ``ijbb`` or ``ijbc``. Each image is aligned to 112x112 with the 5-point
similarity transform (eval/align.py), embedded as emb(x) + emb(flip x) and
L2-normalised (trainer/verification.py); optionally multiplied by its faceness score.
Image features are averaged within a media (video / still), media features summed
within a template, the template feature L2-normalised; a pair's score is the cosine of
its two templates. Reported: TAR at FAR 1e-6 .. 1e-1 (eval/metrics.py::tar_at_far,
never interpolated) and the ROC.

    python -m eval.ijb --model model.pt --network r50 --root IJB_release/IJBC --out ijbc_out
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm import tqdm

from eval import report
from eval.align import norm_crop
from trainer.io.images import decode_rgb
from eval.metrics import DEFAULT_FARS, roc, tar_at_far
from eval.models import add_model_args, model_from_args
from trainer.verification import embed_images

IJB_FARS: Tuple[float, ...] = DEFAULT_FARS  # 1e-6 .. 1e-1


@dataclass
class IJBMeta:
    """Everything read from ``<root>/meta`` (arrays aligned with ``names``)."""

    root: Path
    target: str
    names: List[str]  # image file names under loose_crop/
    landmarks: np.ndarray  # float [N, 5, 2]
    faceness: np.ndarray  # float [N]
    templates: np.ndarray  # int64 [N]
    medias: np.ndarray  # int64 [N]
    pairs: np.ndarray  # int64 [P, 2] template ids
    labels: np.ndarray  # bool [P]


def _meta_path(root: Path, target: str, suffix: str) -> Path:
    p = root / "meta" / f"{target.lower()}_{suffix}"
    if not p.is_file():
        raise FileNotFoundError(f"IJB meta file not found: {p}")
    return p


def _read_rows(path: Path, ncols: int) -> List[List[str]]:
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != ncols:
                raise ValueError(f"{path}:{lineno}: expected {ncols} columns, got {len(parts)}: {line.strip()!r}")
            rows.append(parts)
    if not rows:
        raise ValueError(f"{path}: empty")
    return rows


def read_ijb_meta(root: Union[str, Path], target: Optional[str] = None) -> IJBMeta:
    """Parse the three meta files; ``target`` defaults to the root folder's name (IJBB/IJBC)."""
    root = Path(root)
    target = (target or root.name).upper()
    tid_path = _meta_path(root, target, "face_tid_mid.txt")
    lmk_path = _meta_path(root, target, "name_5pts_score.txt")
    pair_path = _meta_path(root, target, "template_pair_label.txt")
    try:
        tid_rows = _read_rows(tid_path, 3)
        names = [r[0] for r in tid_rows]
        templates = np.array([int(r[1]) for r in tid_rows], dtype=np.int64)
        medias = np.array([int(r[2]) for r in tid_rows], dtype=np.int64)
    except ValueError as e:
        raise ValueError(f"{tid_path}: {e}") from e
    lmk = {}
    for lineno, r in enumerate(_read_rows(lmk_path, 12), 1):
        try:
            lmk[r[0]] = (np.array(r[1:11], dtype=np.float64).reshape(5, 2), float(r[11]))
        except ValueError as e:
            raise ValueError(f"{lmk_path}:{lineno}: bad number in {r!r}") from e
    missing = [n for n in names if n not in lmk]
    if missing:
        raise ValueError(f"{lmk_path}: no landmarks for {len(missing)} image(s), e.g. {missing[:3]}")
    landmarks = np.stack([lmk[n][0] for n in names])
    faceness = np.array([lmk[n][1] for n in names], dtype=np.float64)
    pair_rows = _read_rows(pair_path, 3)
    try:
        pairs = np.array([[int(r[0]), int(r[1])] for r in pair_rows], dtype=np.int64)
        labels = np.array([int(r[2]) for r in pair_rows], dtype=np.int64)
    except ValueError as e:
        raise ValueError(f"{pair_path}: {e}") from e
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{pair_path}: labels must be 0 or 1")
    unknown = np.setdiff1d(pairs.reshape(-1), templates)
    if unknown.size:
        raise ValueError(f"{pair_path}: {unknown.size} template id(s) not in {tid_path.name}, e.g. {unknown[:3].tolist()}")
    return IJBMeta(root, target, names, landmarks, faceness, templates, medias, pairs, labels.astype(bool))


def load_aligned(root: Path, name: str, landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """Read ``loose_crop/<name>`` and return the aligned RGB crop [S, S, 3]."""
    path = root / "loose_crop" / name
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FileNotFoundError(f"IJB image not readable: {path} ({e})") from e
    return norm_crop(decode_rgb(data, where=str(path), lenient=True), landmarks, image_size)


def embed_ijb(
    model: torch.nn.Module,
    meta: IJBMeta,
    batch_size: int = 128,
    device: Union[str, torch.device, None] = None,
    workers: int = 4,
    image_size: int = 112,
    progress: Optional[bool] = None,
) -> np.ndarray:
    """Flip-summed, L2-normalised features of every image [N, D] (float32), streamed in chunks."""
    n = len(meta.names)
    feats: Optional[np.ndarray] = None
    chunk = batch_size * 8

    def job(i: int) -> np.ndarray:
        return load_aligned(meta.root, meta.names[i], meta.landmarks[i], image_size)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, tqdm(
        total=n, desc=f"{meta.target} images", disable=(None if progress is None else not progress)
    ) as bar:
        for s in range(0, n, chunk):
            imgs = list(pool.map(job, range(s, min(n, s + chunk))))
            batch = torch.from_numpy(np.stack(imgs).transpose(0, 3, 1, 2).copy())
            emb = embed_images(model, batch, batch_size=batch_size, device=device, progress=False).numpy()
            if feats is None:
                feats = np.empty((n, emb.shape[1]), dtype=np.float32)
            feats[s : s + len(imgs)] = emb
            bar.update(len(imgs))
    assert feats is not None
    return feats


def aggregate_templates(
    feats: np.ndarray,
    templates: np.ndarray,
    medias: np.ndarray,
    faceness: Optional[np.ndarray] = None,
    chunk: int = 65536,
) -> Tuple[np.ndarray, np.ndarray]:
    """Template features: mean of image features per (template, media), summed per template,
    L2-normalised. ``faceness`` (optional) multiplies each image feature first.

    Returns ``(template_ids sorted, features [T, D] float64)``.
    """
    feats = np.asarray(feats)
    w = None if faceness is None else np.asarray(faceness, dtype=np.float64)
    n = feats.shape[0]
    if len(templates) != n or len(medias) != n or (w is not None and w.shape != (n,)):
        raise ValueError(f"{n} features but {len(templates)} template ids, {len(medias)} media ids"
                         + ("" if w is None else f", {w.size} faceness scores"))
    tm = np.stack([np.asarray(templates), np.asarray(medias)], axis=1)
    uniq_tm, tm_inv = np.unique(tm, axis=0, return_inverse=True)
    tm_inv = torch.as_tensor(tm_inv.reshape(-1))
    # scatter-sum with index_add_ (np.add.at is slow at IJB-C size), float64 accumulation,
    # converting the (float32) features chunk by chunk so no float64 copy of all of them exists
    media_sum = torch.zeros((uniq_tm.shape[0], feats.shape[1]), dtype=torch.float64)
    for s in range(0, n, chunk):
        part = torch.as_tensor(feats[s : s + chunk], dtype=torch.float64)
        if w is not None:
            part = part * torch.as_tensor(w[s : s + chunk])[:, None]
        media_sum.index_add_(0, tm_inv[s : s + chunk], part)
    media_cnt = torch.bincount(tm_inv, minlength=uniq_tm.shape[0]).to(torch.float64)
    media_feat = media_sum / media_cnt[:, None]
    tids, t_inv = np.unique(uniq_tm[:, 0], return_inverse=True)
    tfeat = torch.zeros((tids.size, feats.shape[1]), dtype=torch.float64)
    tfeat.index_add_(0, torch.as_tensor(t_inv.reshape(-1)), media_feat)
    tfeat = torch.nn.functional.normalize(tfeat, dim=1, eps=1e-12).numpy()
    return tids, tfeat


def score_pairs(template_ids: np.ndarray, template_feats: np.ndarray, pairs: np.ndarray, chunk: int = 20_000) -> np.ndarray:
    """Cosine score of every template pair (template ids in ``pairs``)."""
    idx = np.searchsorted(template_ids, pairs)
    idx = np.clip(idx, 0, template_ids.size - 1)
    if not np.array_equal(template_ids[idx], pairs):
        bad = pairs[template_ids[idx] != pairs]
        raise ValueError(f"pairs reference unknown template ids, e.g. {bad[:3].tolist()}")
    out = np.empty(pairs.shape[0])
    for s in range(0, pairs.shape[0], chunk):
        a = template_feats[idx[s : s + chunk, 0]]
        b = template_feats[idx[s : s + chunk, 1]]
        out[s : s + chunk] = np.einsum("ij,ij->i", a, b)
    return out


def evaluate_ijb(
    model: torch.nn.Module,
    root: Union[str, Path],
    target: Optional[str] = None,
    faceness_weight: bool = False,
    batch_size: int = 128,
    device: Union[str, torch.device, None] = None,
    workers: int = 4,
    fars: Sequence[float] = IJB_FARS,
    progress: Optional[bool] = None,
) -> Dict[str, object]:
    """Full 1:1 evaluation. Result: tar_at_far {far: tar}, auc, counts, and the raw
    ``scores``/``labels`` arrays plus ``fpr``/``tpr`` (for plots)."""
    meta = read_ijb_meta(root, target)
    feats = embed_ijb(model, meta, batch_size=batch_size, device=device, workers=workers, progress=progress)
    tids, tfeats = aggregate_templates(feats, meta.templates, meta.medias, meta.faceness if faceness_weight else None)
    scores = score_pairs(tids, tfeats, meta.pairs)
    fpr, tpr, auc = roc(scores, meta.labels)
    return {
        "target": meta.target,
        "faceness_weight": faceness_weight,
        "num_images": len(meta.names),
        "num_templates": int(tids.size),
        "num_pairs": int(scores.size),
        "num_genuine": int(meta.labels.sum()),
        "tar_at_far": tar_at_far(scores, meta.labels, fars),
        "auc": auc,
        "scores": scores,
        "labels": meta.labels,
        "fpr": fpr,
        "tpr": tpr,
    }


def ijb_markdown(res: Dict[str, object]) -> str:
    fars = list(res["tar_at_far"].keys())
    head = ["set"] + [f"TAR@FAR={f:.0e}".replace("e-0", "e-") + " (%)" for f in fars] + ["AUC"]
    row = [f"{res['target']}{' (faceness)' if res['faceness_weight'] else ''}"]
    row += [f"{100 * res['tar_at_far'][f]:.2f}" for f in fars] + [f"{res['auc']:.4f}"]
    return "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n| " + " | ".join(row) + " |\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.ijb", description="IJB-B/IJB-C 1:1 verification")
    add_model_args(p)
    p.add_argument("--root", required=True, help="release folder, e.g. IJB_release/IJBC (holds loose_crop/ and meta/)")
    p.add_argument("--target", default=None, help="IJBB or IJBC (default: the root folder's name)")
    p.add_argument("--faceness-weight", action="store_true", help="weight image features by detector faceness score")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=4, help="threads decoding/aligning images")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="ijb_out")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    from eval.verify import default_device

    device = args.device or default_device()
    model = model_from_args(args, device)
    res = evaluate_ijb(model, args.root, args.target, args.faceness_weight, args.batch_size, device, args.workers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = res["target"].lower()
    table = ijb_markdown(res)
    print(table, end="")
    report.write_text(table, out / f"{name}.md")
    summary = {k: v for k, v in res.items() if k not in ("scores", "labels", "fpr", "tpr")}
    summary["roc"] = report.downsample_curve(res["fpr"], res["tpr"])
    summary["model"] = str(args.model)
    report.write_json(summary, out / f"{name}.json")
    if not args.no_plots:
        report.plot_roc({res["target"]: (res["fpr"], res["tpr"])}, out / f"{name}_roc.png", title=f"{res['target']} 1:1")
        report.plot_score_hist(res["scores"], res["labels"], out / f"{name}_hist.png", title=res["target"])
    print(f"wrote {out / (name + '.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""IJB-B / IJB-C 1:1 template verification (and 1:N identification, eval/ijb_1n.py).

Reads the release layout insightface's IJB evaluation uses (``<root>`` = e.g. ``IJB_release/IJBC``)::

    <root>/loose_crop/<image>                 loose face crops
    <root>/meta/<t>_name_5pts_score.txt        "<image> x1 y1 ... x5 y5 <faceness>" (5 landmarks, detector score)
    <root>/meta/<t>_face_tid_mid.txt           "<image> <template_id> <media_id>"
    <root>/meta/<t>_template_pair_label.txt    "<template_1> <template_2> <0|1>"

with ``<t>`` = ``ijbb`` or ``ijbc``. The default protocol is insightface's
``recognition/arcface_torch/eval_ijbc.py`` (which every published IJB-B/C table uses),
step by step:

1. decode with OpenCV (``cv2.imdecode``, BGR, as ``cv2.imread``), align to 112x112 with
   the 5-point similarity transform and ``cv2.warpAffine`` (eval/align.py), RGB;
2. image feature f = emb(x) + emb(flip x) (``flip``; else emb(x)), NOT L2-normalised
   (``norm_score``: the feature norm stays as a quality weight; else f / ||f||);
3. f times the detector's faceness score (``faceness_weight``);
4. mean of f per (template, media), sum over a template's medias, L2-normalised;
5. a pair's score is the cosine of its two templates;
6. TAR at FAR 1e-6 .. 1e-1 read off the ROC by insightface's rule (the ROC point whose
   FPR is nearest the target; ``readout="strict"``: best TAR with FPR <= target), each
   with the FPR actually reached (eval/metrics.py::tar_fpr_at_far).

When the release has the 1:N files (``<t>_1N_gallery_G1.csv`` ...; eval/ijb_1n.py) the
same template features also give 1:N identification (TPIR@FPIR, rank-1/5/10), under the
same ``readout``: insightface's ``ijb_evals.py`` threshold rank and pooled mean rank-k by
default, ``strict`` FPIR <= target and equal-weight means.

    python -m eval.ijb --model model.pt --network r50 --root IJB_release/IJBC --out ijbc_out
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm import tqdm

from eval import report
from eval.align import norm_crop
from eval.metrics import DEFAULT_FARS, READOUTS, roc, tar_fpr_at_far
from eval.models import add_model_args, default_device, model_from_args
from trainer.io.atomic import atomic_open
from trainer.verification_protocol import embed_images

IJB_FARS: Tuple[float, ...] = DEFAULT_FARS  # 1e-6 .. 1e-1


@dataclass(frozen=True)
class IJBProtocol:
    """Which of insightface's eval_ijbc.py switches are on (all on = its published protocol)."""

    flip: bool = True  # use_flip_test (F1/F2: emb(x) + emb(flip x))
    norm_score: bool = True  # use_norm_score (N1: features not L2-normalised before pooling)
    faceness_weight: bool = True  # use_detector_score (D1: features times faceness)
    readout: str = "insightface"  # ROC point nearest the target FPR; "strict": FPR <= target

    def __post_init__(self):
        if self.readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {self.readout!r}")

    @property
    def name(self) -> str:
        """``insightface`` for the published protocol, else the switches that differ from it."""
        if self == IJBProtocol():
            return "insightface"
        off = [k for k in ("flip", "norm_score", "faceness_weight") if not getattr(self, k)]
        parts = [f"no-{k.replace('_', '-')}" for k in off]
        if self.readout != "insightface":
            parts.append(f"readout-{self.readout}")
        return "insightface+" + ",".join(parts)


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
        raise ValueError(
            f"{pair_path}: {unknown.size} template id(s) not in {tid_path.name}, e.g. {unknown[:3].tolist()}"
        )
    return IJBMeta(root, target, names, landmarks, faceness, templates, medias, pairs, labels.astype(bool))


def _cv2():
    import cv2

    return cv2


def _device_of(model: torch.nn.Module) -> torch.device:
    for t in list(model.parameters())[:1] + list(model.buffers())[:1]:
        return t.device
    return torch.device("cpu")


def load_aligned(root: Path, name: str, landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """Read ``loose_crop/<name>`` as insightface does (``cv2.imread``: OpenCV's decoder, BGR),
    align it with ``cv2.warpAffine`` and return the RGB crop [S, S, 3] uint8."""
    cv2 = _cv2()
    path = root / "loose_crop" / name
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FileNotFoundError(f"IJB image not readable: {path} ({e})") from e
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"{path}: OpenCV cannot decode this image ({len(data)} bytes)")
    return cv2.cvtColor(norm_crop(img, landmarks, image_size), cv2.COLOR_BGR2RGB)


def embed_ijb(
    model: torch.nn.Module,
    meta: IJBMeta,
    batch_size: int = 128,
    device: Union[str, torch.device, None] = None,
    workers: int = 4,
    image_size: int = 112,
    progress: Optional[bool] = None,
    flip: bool = True,
) -> np.ndarray:
    """Raw features of every image [N, D] float32: emb(x) + emb(flip x) (``flip``) or emb(x),
    NOT normalised (see :func:`image_features`); streamed in chunks."""
    n = len(meta.names)
    feats: Optional[np.ndarray] = None
    chunk = batch_size * 8
    dev = torch.device(device) if device is not None else _device_of(model)

    def job(i: int) -> np.ndarray:
        return load_aligned(meta.root, meta.names[i], meta.landmarks[i], image_size)

    was_training = model.training
    model.eval()
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, tqdm(
            total=n, desc=f"{meta.target} images", disable=(None if progress is None else not progress)
        ) as bar:
            for s in range(0, n, chunk):
                imgs = list(pool.map(job, range(s, min(n, s + chunk))))
                batch = torch.from_numpy(np.stack(imgs).transpose(0, 3, 1, 2).copy())
                emb = embed_images(model, batch, batch_size, dev, progress=False, flip=flip, normalize=False).numpy()
                if feats is None:
                    feats = np.empty((n, emb.shape[1]), dtype=np.float32)
                feats[s : s + len(imgs)] = emb
                bar.update(len(imgs))
    finally:
        model.train(was_training)
    assert feats is not None  # embed_images raised already on NaN/inf features
    return feats


def image_features(raw: np.ndarray, norm_score: bool = True, faceness: Optional[np.ndarray] = None) -> np.ndarray:
    """What enters template pooling: ``raw`` as is (``norm_score``: its norm acts as a quality
    weight, insightface's N1) or L2-normalised, then times ``faceness`` when given (D1)."""
    f = np.asarray(raw, dtype=np.float32)
    if not norm_score:
        f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), np.float32(1e-12))
    if faceness is not None:
        f = f * np.asarray(faceness, dtype=np.float32)[:, None]
    return f


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


def score_pairs(
    template_ids: np.ndarray, template_feats: np.ndarray, pairs: np.ndarray, chunk: int = 20_000
) -> np.ndarray:
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


def save_scores(scores: np.ndarray, path: Union[str, Path]) -> Path:
    """Per-pair scores (pair-file order) as a float64 ``.npy``, written atomically."""
    path = Path(path)
    with atomic_open(path, "wb") as f:
        np.save(f, np.asarray(scores, dtype=np.float64))
    return path


def evaluate_ijb(
    model: torch.nn.Module,
    root: Union[str, Path],
    target: Optional[str] = None,
    faceness_weight: bool = True,
    batch_size: int = 128,
    device: Union[str, torch.device, None] = None,
    workers: int = 4,
    fars: Sequence[float] = IJB_FARS,
    progress: Optional[bool] = None,
    *,
    norm_score: bool = True,
    flip: bool = True,
    readout: str = "insightface",
    identification: bool = True,
) -> Dict[str, Any]:
    """Full evaluation under :class:`IJBProtocol` (defaults: insightface's published one).

    Result: protocol, readout, tar_at_far {far: tar}, fpr_at_far {far: FPR reached}, auc,
    counts, the raw ``scores``/``labels`` (pair-file order) and ``fpr``/``tpr`` (plots);
    ``identification_1n`` (eval/ijb_1n.py) when the release has the 1:N files and
    ``identification`` is set.
    """
    from eval import ijb_1n

    proto = IJBProtocol(flip=flip, norm_score=norm_score, faceness_weight=faceness_weight, readout=readout)
    meta = read_ijb_meta(root, target)
    one_n = ijb_1n.read_1n_protocol(meta.root, meta.target) if identification else None
    raw = embed_ijb(model, meta, batch_size=batch_size, device=device, workers=workers, progress=progress, flip=flip)
    feats = image_features(raw, norm_score=norm_score, faceness=meta.faceness if faceness_weight else None)
    tids, tfeats = aggregate_templates(feats, meta.templates, meta.medias)
    scores = score_pairs(tids, tfeats, meta.pairs)
    fpr, tpr, auc = roc(scores, meta.labels)
    read = tar_fpr_at_far(scores, meta.labels, fars, readout=readout)
    res: Dict[str, Any] = {
        "target": meta.target,
        "protocol": proto.name,
        "protocol_switches": {**{k: v for k, v in asdict(proto).items() if k != "readout"}, "align": "cv2.warpAffine"},
        "readout": readout,
        "faceness_weight": faceness_weight,
        "num_images": len(meta.names),
        "num_templates": int(tids.size),
        "num_pairs": int(scores.size),
        "num_genuine": int(meta.labels.sum()),
        "tar_at_far": {f: t for f, (t, _) in read.items()},
        "fpr_at_far": {f: r for f, (_, r) in read.items()},
        "auc": auc,
        "scores": scores,
        "labels": meta.labels,
        "fpr": fpr,
        "tpr": tpr,
    }
    if one_n is not None:
        res["identification_1n"] = ijb_1n.evaluate_1n(tids, tfeats, one_n, readout=readout)
    return res


def _fmt_far(f: float) -> str:
    return f"{f:.0e}".replace("e-0", "e-")


def ijb_markdown(res: Dict[str, Any]) -> str:
    """1:1 table (TAR % with the FPR reached in brackets), plus the 1:N table when present."""
    fars = list(res["tar_at_far"].keys())
    out = f"{res['target']} 1:1, protocol `{res['protocol']}`, read-out `{res['readout']}` (TAR % (FPR reached))\n\n"
    head = ["set"] + [f"TAR@FAR={_fmt_far(f)}" for f in fars] + ["AUC"]
    row = [f"{res['target']}{' (faceness)' if res['faceness_weight'] else ''}"]
    row += [f"{100 * res['tar_at_far'][f]:.2f} ({res['fpr_at_far'][f]:.2e})" for f in fars] + [f"{res['auc']:.4f}"]
    out += "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n| " + " | ".join(row) + " |\n"
    if "identification_1n" in res:
        from eval import ijb_1n

        out += "\n" + ijb_1n.markdown(res["identification_1n"], res["target"])
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m eval.ijb", description="IJB-B/IJB-C 1:1 verification and 1:N identification"
    )
    add_model_args(p)
    p.add_argument("--root", required=True, help="release folder, e.g. IJB_release/IJBC (holds loose_crop/ and meta/)")
    p.add_argument("--target", default=None, help="IJBB or IJBC (default: the root folder's name)")
    fw = p.add_mutually_exclusive_group()
    fw.add_argument(
        "--faceness-weight",
        dest="faceness_weight",
        action="store_true",
        default=True,
        help="weight image features by the detector's faceness score (default; insightface use_detector_score)",
    )
    fw.add_argument("--no-faceness-weight", dest="faceness_weight", action="store_false",
                    help="do not weight by faceness")
    p.add_argument("--no-norm-score", dest="norm_score", action="store_false",
                   help="L2-normalise image features before pooling (insightface use_norm_score=False)")
    p.add_argument(
        "--no-flip", dest="flip", action="store_false", help="no flip test (insightface use_flip_test=False)"
    )
    p.add_argument("--readout", choices=READOUTS, default="insightface",
                   help="insightface (default, its scripts' numbers): 1:1 TAR at the ROC point with FPR nearest the "
                        "target; 1:N threshold nm[max(int(n*f)-1,0)] and rank-k pooled over all mated probes. "
                        "strict: best TAR/TPIR with FPR/FPIR <= target (1:N threshold nm[floor(n*f)]) and "
                        "equal-weight means over galleries")
    p.add_argument(
        "--save-scores", default=None, metavar="FILE.npy", help="write the per-pair scores (pair-file order)"
    )
    p.add_argument("--no-1n", dest="identification", action="store_false", help="skip 1:N identification")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=4, help="threads decoding/aligning images")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="ijb_out")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    device = args.device or default_device()
    model = model_from_args(args, device)
    res = evaluate_ijb(model, args.root, args.target, faceness_weight=args.faceness_weight, batch_size=args.batch_size,
                       device=device, workers=args.workers, norm_score=args.norm_score, flip=args.flip,
                       readout=args.readout, identification=args.identification)
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
    if args.save_scores:
        save_scores(res["scores"], args.save_scores)
    if not args.no_plots:
        report.plot_roc(
            {res["target"]: (res["fpr"], res["tpr"])}, out / f"{name}_roc.png", title=f"{res['target']} 1:1"
        )
        report.plot_score_hist(res["scores"], res["labels"], out / f"{name}_hist.png", title=res["target"])
    print(f"wrote {out / (name + '.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""IJB-B / IJB-C 1:N identification: closed-set CMC and open-set TPIR@FPIR.

The release's 1:N protocol files (``<root>/meta``, with ``<t>`` = ``ijbb`` / ``ijbc``)::

    <t>_1N_gallery_G1.csv, <t>_1N_gallery_G2.csv   IJB-C galleries (IJB-B: _S1, _S2)
    <t>_1N_probe_mixed.csv                         the mixed (image + video) probes

are comma-separated with a header whose first two columns are TEMPLATE_ID and SUBJECT_ID,
one row per image of a template (further columns are ignored). Template features are the
ones of the 1:1 pipeline (eval/ijb.py: same alignment, flip, norm score, faceness
weighting, media/template pooling); the template ids must be those of
``<t>_face_tid_mid.txt``.

Each gallery is evaluated on its own against all mixed probes (the standard protocol: a
probe whose subject is enrolled in that gallery is *mated*, the others are *non-mated*),
and a mean over the galleries is reported too. With S[p, s] the highest cosine between
probe p and any gallery template of subject s:

- rank of a mated probe = number of gallery subjects s with S[p, s] >= S[p, true]
  (ties count against the probe); rank-k = share of mated probes with rank <= k (CMC).
- FPIR(t) = share of non-mated probes with max_s S[p, s] > t; TPIR(t) = share of mated
  probes with rank 1 and S[p, true] > t.

TPIR@FPIR=f thresholds at a non-mated score. With the n non-mated probes' best scores
sorted from the highest, nm[0] >= nm[1] >= ... >= nm[n-1], t = nm[j] with, by read-out
(``readout``, the switch of the 1:1 part, eval/metrics.py::READOUTS):

- ``insightface`` (default; insightface's ``ijb_evals.py`` ``evaluation_1N``):
  j = max(int(n f) - 1, 0), Python's int of the float product as the script computes it
  (at f = 1e-2, 1e-1 equal to floor(n f)). FPIR reached = j / n without ties: one false
  alarm fewer than the target allows (none for n f < 2).
- ``strict``: j = floor(n f) (t = -inf when j >= n): the best TPIR of any threshold with
  FPIR <= f (the rule of eval/metrics.py::tar_at_far), FPIR reached = floor(n f) / n.

The two thresholds are equal only when n f < 1. Every TPIR comes with the FPIR reached and
the threshold.

The mean over galleries G (mated probes M_g, hits H_g(k) = #{p in M_g: rank(p) <= k}):

- ``insightface``: rank-k pooled, sum_g H_g(k) / sum_g |M_g| (insightface divides the
  summed hits by the number of mixed probes, which on IJB-B/C equals sum_g |M_g| since
  every probe's subject is enrolled in exactly one gallery); TPIR equal-weight,
  mean_g TPIR_g.
- ``strict``: equal-weight for both, mean_g rank-k_g and mean_g TPIR_g.

The FPIR reached shown for the mean is mean_g FPIR_g.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from eval.metrics import READOUTS

FPIRS: Tuple[float, ...] = (1e-2, 1e-1)
RANKS: Tuple[int, ...] = (1, 5, 10)


def read_1n_csv(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """(template ids, subject ids), one entry per template, from a ``*_1N_*.csv``."""
    rows: Dict[int, int] = {}
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if (
            not header
            or len(header) < 2
            or header[0].strip().upper() != "TEMPLATE_ID"
            or header[1].strip().upper() != "SUBJECT_ID"
        ):
            raise ValueError(f"{path}: expected a header starting TEMPLATE_ID,SUBJECT_ID, got {header!r}")
        for lineno, r in enumerate(reader, 2):
            if not r or not "".join(r).strip():
                continue
            try:
                t, s = int(r[0]), int(r[1])
            except (ValueError, IndexError) as e:
                raise ValueError(f"{path}:{lineno}: bad TEMPLATE_ID/SUBJECT_ID in {r[:2]!r}") from e
            if rows.setdefault(t, s) != s:
                raise ValueError(f"{path}:{lineno}: template {t} has subjects {rows[t]} and {s}")
    if not rows:
        raise ValueError(f"{path}: no templates")
    tids = np.array(sorted(rows), dtype=np.int64)
    return tids, np.array([rows[int(t)] for t in tids], dtype=np.int64)


def read_1n_protocol(root: Path, target: str) -> Optional[Dict[str, Tuple[np.ndarray, np.ndarray]]]:
    """``{"probe": (...), "G1": (...), "G2": (...)}`` (IJB-B: S1, S2), or None when the
    release has no 1:N files. A probe file without galleries (or the reverse) is an error."""
    meta = Path(root) / "meta"
    t = target.lower()
    probe = meta / f"{t}_1N_probe_mixed.csv"
    galleries = sorted(meta.glob(f"{t}_1N_gallery_*.csv"))
    if not probe.is_file() and not galleries:
        return None
    if not probe.is_file():
        raise FileNotFoundError(f"IJB 1:N: {probe} missing (galleries present: {[g.name for g in galleries]})")
    if not galleries:
        raise FileNotFoundError(f"IJB 1:N: no {t}_1N_gallery_*.csv in {meta} beside {probe.name}")
    out = {"probe": read_1n_csv(probe)}
    for g in galleries:
        out[g.stem.split("_1N_gallery_")[-1]] = read_1n_csv(g)
    return out


RANK_MEAN = {"insightface": "pooled", "strict": "equal-weight"}
TPIR_MEAN = "equal-weight"  # both read-outs


def _check_readout(readout: str) -> None:
    if readout not in READOUTS:
        raise ValueError(f"1:N readout must be one of {READOUTS}, got {readout!r}")


def threshold_index(n: int, fpir: float, readout: str = "insightface") -> int:
    """j of the threshold t = nm[j] (module docstring) for n non-mated probes at FPIR ``fpir``."""
    _check_readout(readout)
    if not 0.0 < float(fpir) <= 1.0:
        raise ValueError(f"FPIR target must be in (0, 1], got {fpir!r}")
    if readout == "insightface":
        return max(int(n * float(fpir)) - 1, 0)
    return int(np.floor(float(fpir) * n + 1e-9))


def _subject_scores(sim: np.ndarray, gallery_subjects: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per probe, the max score over each gallery subject's templates: (subjects, [P, U])."""
    order = np.argsort(gallery_subjects, kind="stable")
    subj_sorted = gallery_subjects[order]
    subjects, starts = np.unique(subj_sorted, return_index=True)
    return subjects, np.maximum.reduceat(sim[:, order], starts, axis=1)


def identify(
    probe_feats: np.ndarray,
    probe_subjects: np.ndarray,
    gallery_feats: np.ndarray,
    gallery_subjects: np.ndarray,
    fpirs: Sequence[float] = FPIRS,
    ranks: Sequence[int] = RANKS,
    readout: str = "insightface",
) -> Dict[str, Any]:
    """CMC rank-k and TPIR@FPIR under ``readout`` (module docstring) of L2-normalised
    template features; ``rank_hits`` holds the counts behind rank-k (for pooled means)."""
    _check_readout(readout)
    sim = np.asarray(probe_feats, dtype=np.float64) @ np.asarray(gallery_feats, dtype=np.float64).T
    subjects, ss = _subject_scores(sim, np.asarray(gallery_subjects))
    probe_subjects = np.asarray(probe_subjects)
    pos = np.searchsorted(subjects, probe_subjects)
    pos = np.clip(pos, 0, subjects.size - 1)
    mated = subjects[pos] == probe_subjects
    res: Dict[str, Any] = {
        "readout": readout,
        "num_gallery_templates": int(sim.shape[1]),
        "num_gallery_subjects": int(subjects.size),
        "num_mated": int(mated.sum()),
        "num_nonmated": int((~mated).sum()),
    }
    if not mated.any():
        raise ValueError("1:N: no probe's subject is in the gallery")
    true = ss[mated, pos[mated]]
    rank = (ss[mated] >= true[:, None]).sum(axis=1)
    res["rank_hits"] = {int(k): int(np.sum(rank <= k)) for k in ranks}
    res["rank"] = {int(k): res["rank_hits"][int(k)] / true.size for k in ranks}
    res["tpir_at_fpir"], res["fpir_at_fpir"], res["threshold_at_fpir"] = {}, {}, {}
    if (~mated).any():
        nm = np.sort(ss[~mated].max(axis=1))[::-1]
        hit1 = rank == 1
        for f in fpirs:
            j = threshold_index(nm.size, f, readout)
            thr = nm[j] if j < nm.size else -np.inf
            res["tpir_at_fpir"][float(f)] = float(np.mean(hit1 & (true > thr)))
            res["fpir_at_fpir"][float(f)] = float(np.mean(nm > thr))
            res["threshold_at_fpir"][float(f)] = float(thr)
    return res


def evaluate_1n(
    template_ids: np.ndarray,
    template_feats: np.ndarray,
    protocol: Dict[str, Tuple[np.ndarray, np.ndarray]],
    fpirs: Sequence[float] = FPIRS,
    ranks: Sequence[int] = RANKS,
    readout: str = "insightface",
) -> Dict[str, Any]:
    """Each gallery of ``protocol`` against its mixed probes, plus the mean over galleries
    (rank-k pooled under ``insightface``, equal-weight under ``strict``; module docstring)."""
    _check_readout(readout)

    def feats(tids: np.ndarray, what: str) -> np.ndarray:
        idx = np.clip(np.searchsorted(template_ids, tids), 0, template_ids.size - 1)
        missing = tids[template_ids[idx] != tids]
        if missing.size:
            raise ValueError(
                f"1:N {what}: {missing.size} template id(s) not in face_tid_mid.txt, e.g. {missing[:3].tolist()}"
            )
        return template_feats[idx]

    p_t, p_s = protocol["probe"]
    pf = feats(p_t, "probe_mixed")
    out: Dict[str, Any] = {"readout": readout, "galleries": {}}
    for name, (g_t, g_s) in protocol.items():
        if name == "probe":
            continue
        out["galleries"][name] = identify(pf, p_s, feats(g_t, f"gallery {name}"), g_s, fpirs, ranks, readout)
    gals: List[Dict] = list(out["galleries"].values())
    mated = sum(g["num_mated"] for g in gals)
    if RANK_MEAN[readout] == "pooled":
        rank = {k: sum(g["rank_hits"][k] for g in gals) / mated for k in gals[0]["rank"]}
    else:
        rank = {k: float(np.mean([g["rank"][k] for g in gals])) for k in gals[0]["rank"]}
    common = [f for f in gals[0]["tpir_at_fpir"] if all(f in g["tpir_at_fpir"] for g in gals)]
    out["mean"] = {
        "rank_mean": RANK_MEAN[readout],
        "tpir_mean": TPIR_MEAN,
        "num_mated": int(mated),
        "num_probes": int(p_t.size),
        "rank": rank,
        "tpir_at_fpir": {f: float(np.mean([g["tpir_at_fpir"][f] for g in gals])) for f in common},
        "fpir_at_fpir": {f: float(np.mean([g["fpir_at_fpir"][f] for g in gals])) for f in common},
    }
    return out


def _fmt(f: float) -> str:
    return f"{f:.0e}".replace("e-0", "e-")


def markdown(res: Dict[str, Any], target: str) -> str:
    """The 1:N table: per gallery and the mean, TPIR % (FPIR reached) and rank-k %, titled
    with the read-out and followed by a line saying which mean is shown."""
    readout = res.get("readout", "strict")
    mean = res["mean"]
    rank_mean = mean.get("rank_mean", "equal-weight")
    gals = dict(res["galleries"])
    gals[f"mean ({rank_mean} rank)" if rank_mean != TPIR_MEAN else "mean (equal-weight)"] = mean
    first = next(iter(res["galleries"].values()))
    fpirs = list(first["tpir_at_fpir"])
    ranks = list(first["rank"])
    head = ["gallery"] + [f"TPIR@FPIR={_fmt(f)} (FPIR reached)" for f in fpirs] + [f"rank-{k}" for k in ranks]
    lines = [f"{target} 1:N (mixed probes), read-out `{readout}` (TPIR % (FPIR reached); rank %)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, g in gals.items():
        cells = []
        for f in fpirs:
            if f not in g["tpir_at_fpir"]:
                cells.append("-")
            elif "fpir_at_fpir" in g:
                cells.append(f"{100 * g['tpir_at_fpir'][f]:.2f} ({g['fpir_at_fpir'][f]:.2e})")
            else:
                cells.append(f"{100 * g['tpir_at_fpir'][f]:.2f}")
        cells += [f"{100 * g['rank'][k]:.2f}" for k in ranks]
        lines.append("| " + " | ".join([name] + cells) + " |")
    if rank_mean == "pooled":
        note = (
            f"mean: rank-k pooled over the galleries' {mean['num_mated']} mated probes (sum of hits / sum of mated); "
            "TPIR and FPIR reached: equal-weight mean of the galleries"
        )
    else:
        note = "mean: equal-weight mean of the galleries (rank-k, TPIR and FPIR reached)"
    return "\n".join(lines) + "\n\n" + note + "\n"

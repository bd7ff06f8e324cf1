"""CLI: verification accuracy of a model on insightface ``.bin`` sets (``python -m eval.verify``,
``unpg-eval verify``; the protocol itself is :mod:`trainer.verification_protocol`).

    python -m eval.verify --model model.pt --network r50 --bin lfw.bin cfp_fp.bin agedb_30.bin --out eval_out

Prints a markdown table and writes ``results.json``, ``results.md``, ``roc.png`` and
``hist_<set>.png`` to ``--out``. ``--model`` may be a state_dict (+ ``--network``), a
checkpoint directory, a TorchScript file, an ``.onnx`` file or a ``module:factory`` spec.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

from eval import report
from eval.metrics import insightface_val_far, roc, verify_embeddings
from eval.models import add_model_args, default_device, model_from_args
from trainer.verification_protocol import embed_images, load_bin, pair_scores

TAR_AT_FAR_NOTE = (
    "TAR@FAR here is our own definition (all pairs, best TAR with FAR <= target, not interpolated); "
    "insightface's val/far (10-fold mean, interpolated threshold, eval/verification.py calculate_val) "
    "is given separately."
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.verify", description=(__doc__ or "").split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--bin", nargs="+", required=True, help="verification .bin files")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--nfolds", type=int, default=10)
    p.add_argument("--out", default="eval_out", help="output folder for results.json/.md and plots")
    p.add_argument("--no-plots", action="store_true")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    device = args.device or default_device()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        model = model_from_args(args, device)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    results, curves = {}, {}
    for path in args.bin:
        name = Path(path).stem
        t0 = time.time()
        images, issame = load_bin(path, image_size=args.image_size)
        emb = embed_images(model, images, batch_size=args.batch_size, device=device, desc=name)
        res = verify_embeddings(emb, issame, nfolds=args.nfolds)
        res["file"] = str(path)
        res["seconds"] = round(time.time() - t0, 2)
        results[name] = res
        scores = pair_scores(emb.numpy())
        # insightface's val/far (10-fold, interpolated threshold) beside our TAR@FAR
        try:
            res["insightface_val"] = insightface_val_far(scores, issame, far_target=1e-3, nfolds=args.nfolds)
        except ValueError as e:  # a fold without genuine or impostor pairs (insightface divides by zero)
            res["insightface_val"] = {"error": f"{path}: {e}"}
        res["tar_at_far_definition"] = TAR_AT_FAR_NOTE
        fpr, tpr, _ = roc(scores, issame)
        curves[name] = (fpr, tpr)
        res["roc"] = report.downsample_curve(fpr, tpr)
        if not args.no_plots:
            report.plot_score_hist(scores, issame, out / f"hist_{name}.png", title=name, threshold=res["threshold"])
    table = report.markdown_table(results, fars=(1e-4, 1e-3))
    table += (
        "\n"
        + TAR_AT_FAR_NOTE
        + "\n\n| set | insightface val@far=1e-3 (%) | far reached |\n|---|---|---|\n"
        + "".join(
            f"| {n} | {100 * v['val']:.2f} ± {100 * v['val_std']:.2f} | {v['far']:.2e} |\n"
            if "val" in v
            else f"| {n} | - | - |\n"
            for n, v in ((n, r["insightface_val"]) for n, r in results.items())
        )
    )
    print(table, end="")
    report.write_text(table, out / "results.md")
    report.write_json({"model": str(args.model), "network": args.network, "results": results}, out / "results.json")
    if not args.no_plots:
        report.plot_roc(curves, out / "roc.png", title="verification ROC")
    print(f"wrote {out / 'results.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

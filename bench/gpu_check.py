"""The one command to run on a CUDA machine: ``make gpu-check OUT=dir [WHEELS=dir]``
(= ``bash scripts/gpu_check.sh OUT [WHEELS]`` = ``python -m bench.gpu_check --out OUT``).

Uses the torch already installed there (never installs or upgrades it); what
cannot run (no CUDA, no DALI, no DeepSpeed, no onnxruntime-gpu) is skipped with a
line saying why. Writes ``results.json`` and ``results.md`` to ``--out``:

1. environment: GPU, driver, torch, CUDA, NCCL, DALI versions;
2. GPU tests: ``pytest -m gpu tests/gpu`` (head on CUDA vs the float64 reference,
   autocast tolerances, no syncs in steady state, fp16 GradScaler with the sparse
   head, DALI mixed decode);
3. benchmarks, each side measured in this run: the head at C in {1M, 4M},
   r in {1.0, 0.1}, UNPG on/off against the dense-gradient Partial FC baseline
   (ms/step, peak GPU memory); r50/r100 forward+backward samples/s at batch 256
   in bf16 and fp16, channels_last, torch.compile on/off, MFU against the bf16
   matmul peak measured here (8192^3); end-to-end r100 + Partial FC 0.1 at
   C = 1M, batch 512, with synthetic tensors on the GPU, then with the loader.

Time budget: about 6 minutes on one H200 (``--quick`` for a smaller grid).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]


def _skip(why: str) -> Dict[str, Any]:
    print(f"  skipped: {why}", flush=True)
    return {"skipped": why}


def _guard(name: str, fn: Callable[[], Any]) -> Any:
    print(f"[gpu-check] {name}", flush=True)
    t0 = time.time()
    try:
        res = fn()
    except Exception as e:  # noqa: BLE001 - one failing part must not lose the others
        traceback.print_exc()
        res = {"error": f"{type(e).__name__}: {e}"}
    if isinstance(res, dict):
        res.setdefault("seconds", round(time.time() - t0, 1))
    return res


# ------------------------------------------------------------------ environment
def environment() -> Dict[str, Any]:
    env: Dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        try:
            env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as e:  # noqa: BLE001
            env["nccl"] = f"unavailable ({e})"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        env["driver"] = out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        env["driver"] = None
    for mod, key in (("nvidia.dali", "dali"), ("deepspeed", "deepspeed"), ("onnxruntime", "onnxruntime")):
        try:
            env[key] = __import__(mod, fromlist=["__version__"]).__version__
        except Exception:  # noqa: BLE001
            env[key] = None
    return env


# ------------------------------------------------------------------ GPU tests
def gpu_tests(out: Path) -> Dict[str, Any]:
    if not torch.cuda.is_available():
        return _skip("no CUDA device: pytest -m gpu would skip every test")
    xml = out / "gpu-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider",
           f"--junitxml={xml}", "-o", "addopts="]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    tail = (proc.stdout + proc.stderr)[-4000:]
    print(tail, flush=True)
    res: Dict[str, Any] = {"exit_code": proc.returncode, "tail": tail[-1500:]}
    if xml.is_file():
        import xml.etree.ElementTree as ET

        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        res.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
    return res


# ------------------------------------------------------------------ benchmarks
def _timeit(step: Callable[[], Any], warmup: int, iters: int) -> float:
    """Seconds per call, CUDA events around ``iters`` calls after ``warmup``."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / iters


def matmul_peak() -> Dict[str, Any]:
    if not torch.cuda.is_available():
        return _skip("no CUDA device")
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    sec = _timeit(lambda: a @ b, 5, 20)
    return {"bf16_tflops": round(2 * n**3 / sec / 1e12, 1)}


def _process_group() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        store = tempfile.mkdtemp(prefix="gpu_check_")
        dist.init_process_group("nccl", init_method=f"file://{store}/store", rank=0, world_size=1)


def head_bench(classes: List[int], quick: bool) -> Dict[str, Any]:
    if not torch.cuda.is_available():
        return _skip("no CUDA device")
    from bench.head import _DenseGradPartialFC
    from trainer.heads import UNPG, ArcFace, PartialFC, PartialFCSGD

    _process_group()
    batch, dim, dev = 512, 512, torch.device("cuda")
    rows = []
    for c in classes:
        for rate in (1.0, 0.1):
            for kind in ("dense-grad PFC", "ours UNPG off", "ours UNPG on"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                if kind == "dense-grad PFC":
                    with torch.device(dev):
                        head = _DenseGradPartialFC(c, rate, 0, 1)
                    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
                else:
                    head = PartialFC(ArcFace(s=64.0, m=0.5), dim, c, sample_rate=rate, device=dev,
                                     unpg=UNPG(wisk=1.5) if kind.endswith("on") else None)
                    opt = PartialFCSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
                emb = torch.randn(batch, dim, device=dev, requires_grad=True)
                labels = torch.randint(0, c, (batch,), device=dev)

                def step():
                    opt.zero_grad(set_to_none=True)
                    emb.grad = None
                    head(emb, labels).backward()
                    opt.step()

                ms = _timeit(step, 2, 5 if quick else 10) * 1000
                peak = (torch.cuda.max_memory_allocated() - base) / 2**30
                rows.append({"classes": c, "rate": rate, "head": kind, "ms_per_step": round(ms, 2),
                             "peak_gib": round(peak, 2)})
                print(f"  C={c:,} r={rate} {kind}: {ms:.2f} ms/step, peak {peak:.2f} GiB", flush=True)
    return {"rows": rows}


def _flops_per_step(model: torch.nn.Module, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        model(x).float().sum().backward()
    model.zero_grad(set_to_none=True)
    return float(fc.get_total_flops())


def backbone_bench(peak_tflops: float, quick: bool) -> Dict[str, Any]:
    if not torch.cuda.is_available():
        return _skip("no CUDA device")
    from trainer.backbones import get_backbone

    rows = []
    grid = [("r50", torch.bfloat16, True, False), ("r100", torch.bfloat16, True, False),
            ("r100", torch.float16, True, False), ("r100", torch.bfloat16, False, False),
            ("r100", torch.bfloat16, True, True)]
    if not quick:
        grid.insert(1, ("r50", torch.float16, True, False))
    for name, dtype, cl, comp in grid:
        model = get_backbone(name).cuda()
        fmt = torch.channels_last if cl else torch.contiguous_format
        model = model.to(memory_format=fmt)
        x = torch.randn(256, 3, 112, 112, device="cuda").to(memory_format=fmt)
        flops = _flops_per_step(model, x)
        fwd = torch.compile(model) if comp else model
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step():
            with torch.autocast("cuda", dtype=dtype):
                loss = fwd(x).float().square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        sec = _timeit(step, 5 if comp else 3, 10 if quick else 20)
        row = {"backbone": name, "dtype": str(dtype).split(".")[-1], "channels_last": cl, "compile": comp,
               "samples_per_s": round(256 / sec, 1), "tflops": round(flops / sec / 1e12, 1),
               "mfu_vs_measured_bf16_peak": round(flops / sec / 1e12 / peak_tflops, 3) if peak_tflops else None}
        rows.append(row)
        print(f"  {row}", flush=True)
        torch.cuda.empty_cache()
    return {"rows": rows}


def e2e_bench(quick: bool) -> Dict[str, Any]:
    if not torch.cuda.is_available():
        return _skip("no CUDA device")
    from trainer.backbones import get_backbone
    from trainer.heads import PartialFC, PartialFCSGD, build_margin

    dev = torch.device("cuda")
    batch, classes = 512, 1_000_000
    model = get_backbone("r100").cuda().to(memory_format=torch.channels_last)
    head = PartialFC(build_margin("arcface"), 512, classes, sample_rate=0.1, device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    hopt = PartialFCSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4)

    def train_on(images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            emb = model(images)
        head(emb, labels).backward()
        opt.step()
        hopt.step()
        opt.zero_grad(set_to_none=True)
        hopt.zero_grad(set_to_none=True)

    x = torch.randn(batch, 3, 112, 112, device=dev).to(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=dev)
    sec = _timeit(lambda: train_on(x, y), 3, 5 if quick else 10)
    res: Dict[str, Any] = {"synthetic_samples_per_s": round(batch / sec, 1)}
    print(f"  synthetic tensors on the GPU: {batch / sec:.1f} samples/s", flush=True)
    # the same step fed by the project's loader over a generated RecordIO set
    from data_tools.synth import generate_dataset
    from trainer.data import build_train_loader, to_model_input

    with tempfile.TemporaryDirectory() as tmp:
        generate_dataset(tmp, 200, 30, seed=0, val_pairs=0, val_identities=0, workers=min(8, os.cpu_count() or 1))
        loader = build_train_loader(tmp, batch, device=dev, backend="auto", num_threads=8, seed=0)
        it = iter(loader)
        images, labels = next(it)
        train_on(to_model_input(images), labels % classes)
        torch.cuda.synchronize()
        t0, n = time.time(), 0
        for images, labels in it:  # uint8 NHWC -> float NCHW (channels_last) on the GPU
            train_on(to_model_input(images), labels % classes)
            n += 1
        torch.cuda.synchronize()
        if n:
            res["loader"] = type(loader).__name__
            res["with_loader_samples_per_s"] = round(n * batch / (time.time() - t0), 1)
            res["loader_share"] = round(1 - res["with_loader_samples_per_s"] / res["synthetic_samples_per_s"], 3)
            print(f"  with {res['loader']}: {res['with_loader_samples_per_s']} samples/s", flush=True)
    return res


# ------------------------------------------------------------------ report
def markdown(r: Dict[str, Any]) -> str:
    lines = ["# gpu-check results", "", "## Environment", ""]
    lines += [f"- {k}: {v}" for k, v in r["environment"].items()]
    for key in ("gpu_tests", "matmul_peak", "head", "backbones", "end_to_end"):
        part = r.get(key, {})
        lines += ["", f"## {key}", ""]
        if "skipped" in part or "error" in part:
            lines.append(f"{'skipped' if 'skipped' in part else 'ERROR'}: {part.get('skipped') or part.get('error')}")
            continue
        rows = part.get("rows")
        if rows:
            cols = list(rows[0])
            lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(str(row[c]) for c in cols) + " |" for row in rows]
        else:
            lines += [f"- {k}: {v}" for k, v in part.items() if k != "tail"]
    head = r.get("head", {}).get("rows")
    if head:
        lines += ["", "## Head ratios (same run)", ""]
        by = {(x["classes"], x["rate"], x["head"]): x for x in head}
        for (c, rate, kind), x in sorted(by.items()):
            base = by.get((c, rate, "dense-grad PFC"))
            if kind != "dense-grad PFC" and base:
                lines.append(f"- C={c:,} r={rate} {kind}: {base['ms_per_step'] / x['ms_per_step']:.2f}x faster, "
                             f"{x['peak_gib'] / max(base['peak_gib'], 1e-9):.2f}x the baseline's peak memory")
    return "\n".join(lines) + "\n"


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="folder for results.json / results.md")
    ap.add_argument("--quick", action="store_true", help="smaller grid (C=1M only, fewer timed steps)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    r: Dict[str, Any] = {"environment": environment()}
    print(json.dumps(r["environment"], indent=1), flush=True)
    r["gpu_tests"] = _guard("GPU tests (pytest -m gpu)", lambda: gpu_tests(args.out))
    r["matmul_peak"] = _guard("bf16 matmul peak (8192^3)", matmul_peak)
    peak = r["matmul_peak"].get("bf16_tflops") if isinstance(r["matmul_peak"], dict) else None
    r["head"] = _guard("head vs dense-gradient Partial FC", lambda: head_bench(
        [1_000_000] if args.quick else [1_000_000, 4_000_000], args.quick))
    r["backbones"] = _guard("r50/r100 forward+backward", lambda: backbone_bench(peak, args.quick))
    r["end_to_end"] = _guard("end to end r100 + PFC 0.1, C=1M", lambda: e2e_bench(args.quick))
    r["seconds"] = round(time.time() - t0, 1)
    (args.out / "results.json").write_text(json.dumps(r, indent=1, default=str))
    (args.out / "results.md").write_text(markdown(r))
    print(f"[gpu-check] wrote {args.out / 'results.json'} and results.md in {r['seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

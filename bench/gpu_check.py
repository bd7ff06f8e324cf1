"""The device check: one stage per call, results kept after every row.

``scripts/device_check.sh OUT`` runs the stages below in order, each in its own
process under ``timeout`` (``python -m bench.gpu_check --out OUT --work DIR --stage NAME``);
each row runs in its own function scope and its own try/except (an out-of-memory
error is the row's result, not a lost section), and ``OUT/results.json`` +
``OUT/results.md`` are rewritten (atomically) after every row.

Stages, in order:

1. ``env``: GPU, driver, torch, CUDA, NCCL, DALI, simplejpeg, DeepSpeed versions;
2. ``data``: the synthetic RecordIO set for the loader and trainer stages, generated
   with a process pool BEFORE any stage initialises CUDA (no fork after NCCL threads);
3. ``gpu_tests``: ``pytest -m gpu tests/gpu``;
4. ``peak``: bf16 and fp16 matmul peak measured here (8192^3), and the card's datasheet
   dense peak where the card is known;
5. ``head``: Partial FC + UNPG against the dense-gradient Partial FC baseline (bench/head.py)
   at C in {1M, 4M} x r in {1.0, 0.1}: ms/step and peak memory, each row's baseline
   memory read after the previous row was freed;
6. ``backbones``: r50/r100 forward+backward samples/s in bf16/fp16, channels_last on/off,
   TFLOPs and MFU against the measured peak of the row's dtype and the datasheet peak;
7. ``e2e``: r100 + Partial FC 0.1 at C = 1M through ``Engine.train_step`` (the trainer's
   step, DDP engine) in bf16 and fp16 on synthetic tensors, then the loader alone
   (images/s over >= 50 steady-state batches) and the step fed by the loader (>= 50);
8. ``trainer``: the real trainer (``python -m trainer.train``) in fp16 on the generated set:
   100 steps with validation and a checkpoint, then resumed to 200; overflow count,
   loss scale, accuracy and wall time from its summary.json;
9. ``compile``: the torch.compile rows, last (1-3 min of compilation each).

``--dry-run``: the same code at tiny sizes on the CPU (what CI runs, in a second venv
with the device's package set, ``scripts/device_dryrun.sh``): every stage must write
its rows; only what needs CUDA hardware is skipped (CUDA events, NCCL, ``pytest -m gpu``),
and the head and end-to-end stages also build their modules on the ``meta`` device, so a
tensor created on the wrong device (a factory call that ignores ``torch.device(...)``)
fails on a CPU. A dry run exits 1 if any row has an error.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("env", "data", "gpu_tests", "peak", "head", "backbones", "e2e", "trainer", "compile")

#: dense tensor-core peak (TFLOP/s, no sparsity) from NVIDIA's datasheets, bf16 = fp16
DATASHEET_TFLOPS = {"H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.5, "H100 PCIe": 756.5,
                    "H200": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "B200": 2250.0}

#: sizes: the device's and the dry run's (tiny, CPU)
SIZES = {
    False: dict(head_classes=[1_000_000, 4_000_000], head_batch=512, dim=512, peak_n=8192, bb_batch=256,
                bb_names=("r50", "r100"), e2e_backbone="r100", e2e_batch=512, e2e_classes=1_000_000,
                timed=10, loader_batches=50, data=(400, 30, 600), trainer_backbone="r50", trainer_batch=128,
                trainer_steps=(100, 200), compile_backend="inductor"),
    True: dict(head_classes=[2_000, 5_000], head_batch=32, dim=512, peak_n=256, bb_batch=2,
               bb_names=("tiny",), e2e_backbone="tiny", e2e_batch=8, e2e_classes=500,
               timed=2, loader_batches=8, data=(20, 12, 100), trainer_backbone="tiny", trainer_batch=16,
               trainer_steps=(12, 24), compile_backend="eager"),
}


# ------------------------------------------------------------------ results
class Results:
    """OUT/results.json + results.md, rewritten after every row (atomic)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        f = out / "results.json"
        self.data: Dict[str, Any] = json.loads(f.read_text()) if f.is_file() else {}

    def put(self, stage: str, key: str, value: Any) -> None:
        self.data.setdefault(stage, {})[key] = value
        self.write()

    def add_row(self, stage: str, row: Dict[str, Any]) -> None:
        self.data.setdefault(stage, {}).setdefault("rows", []).append(row)
        print(f"  {row}", flush=True)
        self.write()

    def write(self) -> None:
        from trainer.io.atomic import atomic_open

        with atomic_open(self.out / "results.json", "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        with atomic_open(self.out / "results.md", "w") as f:
            f.write(markdown(self.data))


def _error(e: BaseException) -> str:
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
        return f"OOM: {str(e).splitlines()[0][:200]}"
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def row(res: Results, stage: str, key: Dict[str, Any], fn: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
    """Run one row in its own scope: its result or its error (OOM included) is the row;
    everything it allocated is freed before the next row reads its baseline memory."""
    t0 = time.time()
    try:
        out = dict(key, **fn())
    except Exception as e:  # noqa: BLE001 - a failing row must not lose the others
        traceback.print_exc()
        out = dict(key, error=_error(e))
        e.__traceback__ = None  # drop the frames (and their tensors) before freeing
        del e
    out["seconds"] = round(time.time() - t0, 2)
    _free()
    res.add_row(stage, out)
    return out


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timeit(step: Callable[[], Any], warmup: int, iters: int, dev: torch.device) -> float:
    """Seconds per call over ``iters`` calls after ``warmup`` (CUDA events on a GPU)."""
    for _ in range(warmup):
        step()
    _sync(dev)
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - t0) / iters


def _mem_start(dev: torch.device) -> int:
    if dev.type != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _mem_peak_gib(dev: torch.device, base: int) -> Optional[float]:
    return round((torch.cuda.max_memory_allocated() - base) / 2**30, 3) if dev.type == "cuda" else None


def _device(dry: bool) -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _on_device(module_or_tensors, dev: torch.device, what: str) -> None:
    """Every parameter/buffer (or tensor) is on ``dev``: names the first that is not."""
    items = (list(module_or_tensors.named_parameters()) + list(module_or_tensors.named_buffers())
             if isinstance(module_or_tensors, torch.nn.Module) else list(module_or_tensors))
    for name, t in items:
        if isinstance(t, torch.Tensor) and t.device.type != dev.type:
            raise RuntimeError(f"{what}: {name} was created on {t.device}, expected {dev.type} "
                               "(a factory call that ignores the device)")


@contextlib.contextmanager
def meta_autocast():
    """autocast has no ``meta`` device type; the project's ``torch.autocast(device_type=x.device.type,
    enabled=False)`` blocks then raise on meta tensors. Inside this block such a call uses the
    CPU's autocast state instead (which leaves meta tensors alone)."""
    real = torch.autocast

    class _Autocast(real):
        def __init__(self, device_type, *args, **kwargs):
            super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)

    torch.autocast = _Autocast
    try:
        yield
    finally:
        torch.autocast = real


def _process_group(dev: torch.device) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        store = tempfile.mkdtemp(prefix="gpu_check_")
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                init_method=f"file://{store}/store", rank=0, world_size=1)


# ------------------------------------------------------------------ stages
def stage_env(res: Results, a) -> None:
    env: Dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable,
                           "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                           "cuda_available": torch.cuda.is_available(), "dry_run": a.dry_run}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   capability=f"{p.major}.{p.minor}")
        with contextlib.suppress(Exception):
            env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))  # pyright: ignore[reportAttributeAccessIssue]
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        env["driver"] = q.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        env["driver"] = None
    for mod in ("numpy", "nvidia.dali", "deepspeed", "simplejpeg", "cv2", "PIL", "onnxruntime"):
        try:
            env[mod] = getattr(__import__(mod, fromlist=["__version__"]), "__version__", "present")
        except Exception:  # noqa: BLE001
            env[mod] = None
    res.data["env"] = env
    res.write()
    print(json.dumps(env, indent=1), flush=True)


def stage_data(res: Results, a) -> None:
    """Before CUDA: this process never touches it (the pool forks safely)."""
    ids, per, pairs = SIZES[a.dry_run]["data"]

    def make():
        from data_tools.synth import generate_dataset

        info = generate_dataset(a.work / "synth", ids, per, seed=0, val_identities=max(10, ids // 4),
                                val_pairs=pairs, workers=min(8, os.cpu_count() or 1))
        assert not torch.cuda.is_initialized()
        return {"images": ids * per, "dir": str(a.work / "synth"), **{k: v for k, v in (info or {}).items()
                                                                      if isinstance(v, (int, float, str))}}
    row(res, "data", {"what": "synthetic RecordIO + val.bin"}, make)


def stage_gpu_tests(res: Results, a) -> None:
    if not torch.cuda.is_available():
        res.put("gpu_tests", "skipped", "no CUDA device: every test in tests/gpu needs one")
        return
    xml = a.out / "gpu-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider",
           f"--junitxml={xml}", "-o", "addopts="]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=a.budget)
    tail = (proc.stdout + proc.stderr)[-3000:]
    print(tail, flush=True)
    r: Dict[str, Any] = {"exit_code": proc.returncode, "tail": tail[-1200:]}
    if xml.is_file():
        import xml.etree.ElementTree as ET

        suite = ET.parse(xml).getroot()
        found = suite if suite.tag == "testsuite" else suite.find("testsuite")
        if found is not None:
            r.update({k: int(found.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
    res.data["gpu_tests"] = r
    res.write()


def stage_peak(res: Results, a) -> None:
    dev, n = _device(a.dry_run), SIZES[a.dry_run]["peak_n"]
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else None
    sheet = next((v for k, v in DATASHEET_TFLOPS.items() if name and k in name), None)
    for dtype in (torch.bfloat16, torch.float16):
        def measure(dtype=dtype):
            x = torch.randn(n, n, device=dev, dtype=dtype)
            y = torch.randn(n, n, device=dev, dtype=dtype)
            sec = _timeit(lambda: x @ y, 3, 20 if dev.type == "cuda" else 2, dev)
            return {"measured_tflops": round(2 * n ** 3 / sec / 1e12, 2 if a.dry_run else 1),
                    "datasheet_tflops": sheet, "gpu": name}
        row(res, "peak", {"dtype": str(dtype).split(".")[-1], "n": n}, measure)


def _peaks(res: Results) -> Dict[str, Dict[str, Optional[float]]]:
    return {r["dtype"]: {"measured": r.get("measured_tflops"), "datasheet": r.get("datasheet_tflops")}
            for r in res.data.get("peak", {}).get("rows", [])}


def _head_row(kind: str, c: int, rate: float, dev: torch.device, sz: Dict[str, Any], timed: int) -> Dict[str, Any]:
    from bench.head import _DenseGradPartialFC
    from trainer.heads import UNPG, ArcFace, PartialFC, PartialFCSGD

    batch, dim = sz["head_batch"], sz["dim"]
    base = _mem_start(dev)  # after the previous row was freed (row())
    if kind == "dense-grad PFC":
        with torch.device(dev):
            head = _DenseGradPartialFC(c, rate, 0, 1)
        opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    else:
        head = PartialFC(ArcFace(s=64.0, m=0.5), dim, c, sample_rate=rate, device=dev,
                         unpg=UNPG(wisk=1.5) if kind.endswith("on") else None)
        opt = PartialFCSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
    _on_device(head, dev, kind)
    emb = torch.randn(batch, dim, device=dev, requires_grad=True)
    labels = torch.randint(0, c, (batch,), device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        emb.grad = None
        head(emb, labels).backward()
        opt.step()

    ms = _timeit(step, 2, timed, dev) * 1000
    return {"ms_per_step": round(ms, 2), "peak_gib": _mem_peak_gib(dev, base)}


def _meta_head_row(kind: str, c: int, rate: float, sz: Dict[str, Any]) -> Dict[str, Any]:
    """Build the row's modules on ``meta``: a parameter, buffer or optimizer state created on
    another device fails here as it would on CUDA. Ours also runs two steps on meta (its label
    check reads values, so it is switched off); the dense baseline's forward needs collectives,
    which meta tensors cannot take: its construction is what is checked."""
    from bench.head import _DenseGradPartialFC
    from trainer.heads import UNPG, ArcFace, PartialFC, PartialFCSGD

    meta = torch.device("meta")
    if kind == "dense-grad PFC":
        with torch.device(meta):
            head = _DenseGradPartialFC(c, rate, 0, 1)
        _on_device(head, meta, kind)
        return {"meta": "parameters on meta"}
    head = PartialFC(ArcFace(s=64.0, m=0.5), sz["dim"], c, sample_rate=rate, device=meta,
                     unpg=UNPG(wisk=1.5) if kind.endswith("on") else None)
    head.check_inputs = lambda: None  # a host read by design (labels in range): no data on meta
    opt = PartialFCSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
    emb = torch.randn(sz["head_batch"], sz["dim"], device=meta, requires_grad=True)
    for _ in range(2):
        head(emb, torch.randint(0, c, (sz["head_batch"],), device=meta)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _on_device(head, meta, kind)
    _on_device([(f"state[{i}].{k}", v) for i, s in enumerate(opt.state.values()) for k, v in s.items()], meta, kind)
    return {"meta": "2 steps on meta"}


def stage_head(res: Results, a) -> None:
    sz, dev = SIZES[a.dry_run], _device(a.dry_run)
    _process_group(dev)
    kinds = ("dense-grad PFC", "ours UNPG off", "ours UNPG on")
    for c in sz["head_classes"]:
        for rate in (1.0, 0.1):
            for kind in kinds:
                key = {"classes": c, "rate": rate, "head": kind}
                if a.dry_run:
                    with meta_autocast():
                        row(res, "head_meta", key, partial(_meta_head_row, kind, c, rate, sz))
                row(res, "head", key, partial(_head_row, kind, c, rate, dev, sz, sz["timed"] if a.dry_run else 10))


def _flops_per_step(model: torch.nn.Module, x: torch.Tensor, dtype) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.autocast(x.device.type, dtype=dtype):
        model(x).float().sum().backward()
    model.zero_grad(set_to_none=True)
    return float(fc.get_total_flops())


def _backbone_row(name: str, dtype, cl: bool, comp: bool, dev, sz, peaks, backend: str) -> Dict[str, Any]:
    from trainer.backbones import get_backbone

    fmt = torch.channels_last if cl else torch.contiguous_format
    kw: Dict[str, Any] = {"width": 8} if name == "tiny" else {}
    model = get_backbone(name, **kw).to(dev).to(memory_format=fmt)  # pyright: ignore[reportCallIssue] (torch accepts it)
    x = torch.randn(sz["bb_batch"], 3, 112, 112, device=dev).to(memory_format=fmt)
    flops = _flops_per_step(model, x, dtype)
    fwd = torch.compile(model, backend=backend) if comp else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        with torch.autocast(dev.type, dtype=dtype):
            loss = fwd(x).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec = _timeit(step, 5 if comp else 3, sz["timed"] if dev.type != "cuda" else 20, dev)
    tf = flops / sec / 1e12
    pk = peaks.get(str(dtype).split(".")[-1], {})
    return {"samples_per_s": round(sz["bb_batch"] / sec, 1), "tflops": round(tf, 3),
            "mfu_vs_measured_peak": round(tf / pk["measured"], 3) if pk.get("measured") else None,
            "mfu_vs_datasheet_peak": round(tf / pk["datasheet"], 3) if pk.get("datasheet") else None}


def _backbone_grid(res: Results, a, stage: str, compile_rows: bool) -> None:
    sz, dev, peaks = SIZES[a.dry_run], _device(a.dry_run), _peaks(res)
    grid = []
    for name in sz["bb_names"]:
        if compile_rows:
            grid.append((name, torch.bfloat16, True, True))
        else:
            grid += [(name, torch.bfloat16, True, False), (name, torch.float16, True, False)]
            if name == sz["bb_names"][-1]:
                grid.append((name, torch.bfloat16, False, False))
    for name, dtype, cl, comp in grid:
        key = {"backbone": name, "batch": sz["bb_batch"], "dtype": str(dtype).split(".")[-1],
               "channels_last": cl, "compile": sz["compile_backend"] if comp else False,
               "peak_used": f"{str(dtype).split('.')[-1]} matmul (measured here / datasheet)"}
        row(res, stage, key, partial(_backbone_row, name, dtype, cl, comp, dev, sz, peaks, sz["compile_backend"]))


def stage_backbones(res: Results, a) -> None:
    _backbone_grid(res, a, "backbones", compile_rows=False)


def stage_compile(res: Results, a) -> None:
    _backbone_grid(res, a, "compile", compile_rows=True)


def _engine(precision: str, dev: torch.device, sz: Dict[str, Any], meta: bool = False):
    from trainer.backbones import get_backbone
    from trainer.engine.config import EngineConfig
    from trainer.engine.ddp import DDPEngine
    from trainer.heads import PartialFC, PartialFCSGD, build_margin
    from trainer.optim import OptimConfig, optimizer_factory
    from trainer.runtime.process_group import DistInfo

    kw: Dict[str, Any] = {"width": 8} if sz["e2e_backbone"] == "tiny" else {}
    backbone = get_backbone(sz["e2e_backbone"], **kw).to(dev).to(memory_format=torch.channels_last)  # pyright: ignore[reportCallIssue]
    head = PartialFC(build_margin("arcface"), 512, sz["e2e_classes"], sample_rate=0.1, device=dev)
    if meta:
        head.check_inputs = lambda: None  # a host read by design: no data on meta
    hopt = PartialFCSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
    return DDPEngine(EngineConfig(precision=precision), optimizer_factory(OptimConfig(lr=0.1)), 5.0, backbone, head,
                     hopt, DistInfo(0, 1, 0, dev), 1, precision)


def _e2e_synthetic_row(precision: str, dev, sz) -> Dict[str, Any]:
    eng = _engine(precision, dev, sz)
    base = _mem_start(dev)
    x = torch.randn(sz["e2e_batch"], 3, 112, 112, device=dev).to(memory_format=torch.channels_last)
    y = torch.randint(0, sz["e2e_classes"], (sz["e2e_batch"],), device=dev)
    last = {}

    def step():
        last["out"] = eng.train_step(lambda: (x, y))
    sec = _timeit(step, 3, sz["timed"] if dev.type != "cuda" else 10, dev)
    out = last["out"]
    r = {"samples_per_s": round(sz["e2e_batch"] / sec, 1), "peak_gib": _mem_peak_gib(dev, base),
         "last_loss": round(float(out.loss), 4), "last_skipped": bool(out.skipped)}
    if getattr(out, "loss_scale", None) is not None:
        r["loss_scale"] = float(out.loss_scale)
    return r


def _meta_e2e_row(sz) -> Dict[str, Any]:
    """Engine.train_step (fp32: GradScaler and autocast have no meta kernels) with every
    module, the batch and the model input on ``meta``."""
    from trainer.data.model_input import to_model_input

    meta = torch.device("meta")
    eng = _engine("fp32", meta, sz, meta=True)
    # torch has no fused SGD for meta: the plain one, stepped as the fused one is (the engine
    # then never reads `skipped` on the host, which meta tensors cannot give)
    class _MetaSGD(torch.optim.SGD):
        _step_supports_amp_scaling = True

        def step(self, closure=None):
            self.grad_scale = self.found_inf = None
            return super().step(closure)

    eng.backbone_opt = _MetaSGD(list(eng.backbone.parameters()), lr=0.1, momentum=0.9)
    images = torch.empty(sz["e2e_batch"], 112, 112, 3, dtype=torch.uint8, device=meta)
    y = torch.randint(0, sz["e2e_classes"], (sz["e2e_batch"],), device=meta)
    for _ in range(2):
        eng.train_step(lambda: (to_model_input(images), y))
    _on_device(eng.backbone, meta, "backbone")
    _on_device(eng.head, meta, "head")
    return {"meta": "2 Engine.train_step calls on meta"}


def _loader(a, batch: int, dev):
    from trainer.data import build_train_loader

    return build_train_loader(a.work / "synth", batch, device=dev, backend="auto", num_threads=8, seed=0)


def _batches(loader, n: int):
    """``n`` batches, across epochs if the set is smaller."""
    epoch, got = 0, 0
    while got < n:
        loader.set_epoch(epoch)
        for b in loader:
            yield b
            got += 1
            if got == n:
                return
        epoch += 1


def _loader_only_row(a, dev, sz) -> Dict[str, Any]:
    n, warm = sz["loader_batches"], 5
    loader = _loader(a, sz["e2e_batch"], dev)
    it = _batches(loader, warm + n)
    for _ in range(warm):
        next(it)
    _sync(dev)
    t0 = time.perf_counter()
    for _images, _ in it:
        pass
    _sync(dev)
    return {"loader": type(loader).__name__, "batches": n,
            "images_per_s": round(n * sz["e2e_batch"] / (time.perf_counter() - t0), 1)}


def _with_loader_row(a, precision: str, dev, sz) -> Dict[str, Any]:
    from trainer.data.model_input import to_model_input

    n, warm = sz["loader_batches"], 5
    eng = _engine(precision, dev, sz)
    loader = _loader(a, sz["e2e_batch"], dev)
    it = _batches(loader, warm + n)
    C = sz["e2e_classes"]

    def nxt():
        images, labels = next(it)
        return to_model_input(images), labels % C
    for _ in range(warm):
        eng.train_step(nxt)
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(n):
        eng.train_step(nxt)
    _sync(dev)
    return {"loader": type(loader).__name__, "batches": n,
            "samples_per_s": round(n * sz["e2e_batch"] / (time.perf_counter() - t0), 1)}


def stage_e2e(res: Results, a) -> None:
    sz, dev = SIZES[a.dry_run], _device(a.dry_run)
    what = f"{sz['e2e_backbone']} + PFC 0.1, C={sz['e2e_classes']:,}, batch {sz['e2e_batch']}"
    if a.dry_run:
        with meta_autocast():
            row(res, "e2e_meta", {"what": what}, lambda: _meta_e2e_row(sz))
    for precision in ("bf16", "fp16"):
        row(res, "e2e", {"what": f"Engine.train_step, synthetic tensors: {what}", "precision": precision},
            partial(_e2e_synthetic_row, precision, dev, sz))
    row(res, "e2e", {"what": f"loader only, batch {sz['e2e_batch']}", "precision": "-"},
        lambda: _loader_only_row(a, dev, sz))
    for precision in ("bf16", "fp16"):
        row(res, "e2e", {"what": f"Engine.train_step fed by the loader: {what}", "precision": precision},
            partial(_with_loader_row, a, precision, dev, sz))
    rows = {(r["what"].split(":")[0], r["precision"]): r for r in res.data["e2e"]["rows"]}
    for p in ("bf16", "fp16"):
        s = rows.get(("Engine.train_step, synthetic tensors", p), {}).get("samples_per_s")
        w = rows.get(("Engine.train_step fed by the loader", p), {}).get("samples_per_s")
        if s and w:
            res.put("e2e", f"loader_share_{p}", round(1 - w / s, 3))


def _trainer_phase(a, steps: int, sz) -> Dict[str, Any]:
    run_dir = a.work / "trainer_run"
    if steps == sz["trainer_steps"][0] and run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)  # the first phase starts a fresh run
    cmd = [sys.executable, "-m", "trainer.train", "configs/synth_demo.yaml", f"run.output={run_dir}",
           f"data.train_dir={a.work / 'synth'}", f"model.backbone={sz['trainer_backbone']}",
           f"data.batch_size={sz['trainer_batch']}", "engine.precision=fp16", f"run.max_steps={steps}",
           f"checkpoint.save_every={sz['trainer_steps'][0]}", f"validation.every={sz['trainer_steps'][0]}",
           "logging.log_every=10", f"data.num_threads={min(4, os.cpu_count() or 1)}", "logging.progress_bar=false"]
    cmd += ["model.width=8"] if sz["trainer_backbone"] == "tiny" else ["model.embedding_size=512"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=a.budget)
    wall = round(time.time() - t0, 1)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        raise RuntimeError(f"exit {proc.returncode}: {' | '.join(tail)[-400:]}")
    s = json.loads((run_dir / "summary.json").read_text())
    h = s["history"]
    acc = s["val"][-1]["acc"] if s.get("val") else {}
    return {"steps": s["steps"], "wall_s": wall, "overflow_steps": s.get("overflow_steps"),
            "loss_scale": s.get("loss_scale"), "first_loss": round(h[0]["loss"], 3),
            "last_loss": round(h[-1]["loss"], 3), "val_acc": acc, "history_steps": len(h)}


def stage_trainer(res: Results, a) -> None:
    sz = SIZES[a.dry_run]
    first, total = sz["trainer_steps"]
    key = {"what": f"unpg-train fp16 {sz['trainer_backbone']} batch {sz['trainer_batch']}"}
    row(res, "trainer", dict(key, phase=f"steps 1-{first}, validation + checkpoint"),
        lambda: _trainer_phase(a, first, sz))
    r = row(res, "trainer", dict(key, phase=f"resumed at {first}, to {total}"), lambda: _trainer_phase(a, total, sz))
    if "error" not in r and r["history_steps"] != total:
        res.add_row("trainer", {"error": f"resumed run has {r['history_steps']} steps of history, expected {total}"})


RUN = {"env": stage_env, "data": stage_data, "gpu_tests": stage_gpu_tests, "peak": stage_peak, "head": stage_head,
       "backbones": stage_backbones, "e2e": stage_e2e, "trainer": stage_trainer, "compile": stage_compile}


# ------------------------------------------------------------------ report
def markdown(r: Dict[str, Any]) -> str:
    lines = ["# device check results", ""]
    if "env" in r:
        lines += ["## env", ""] + [f"- {k}: {v}" for k, v in r["env"].items()]
    for key, part in r.items():
        if key == "env" or not isinstance(part, dict):
            continue
        lines += ["", f"## {key}", ""]
        for k, v in part.items():
            if k != "rows":
                lines.append(f"- {k}: {v}")
        rows = part.get("rows") or []
        if rows:
            cols = list(dict.fromkeys(c for x in rows for c in x))
            lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(str(x.get(c, "")) for c in cols) + " |" for x in rows]
    head = r.get("head", {}).get("rows")
    if head:
        lines += ["", "## head ratios (same run)", ""]
        by = {(x["classes"], x["rate"], x["head"]): x for x in head}
        for (c, rate, kind), x in sorted(by.items()):
            base = by.get((c, rate, "dense-grad PFC"))
            if kind != "dense-grad PFC" and base and x.get("ms_per_step") and base.get("ms_per_step"):
                mem = (f", {x['peak_gib'] / base['peak_gib']:.2f}x the baseline's peak memory"
                       if x.get("peak_gib") and base.get("peak_gib") else "")
                lines.append(f"- C={c:,} r={rate} {kind}: {base['ms_per_step'] / x['ms_per_step']:.2f}x "
                             f"the baseline's speed{mem}")
    return "\n".join(lines) + "\n"


def errors(r: Dict[str, Any]) -> List[str]:
    out = []
    for key, part in r.items():
        if isinstance(part, dict):
            out += [f"{key}: {x['error']}" for x in part.get("rows", []) if "error" in x]
            if "error" in part:
                out.append(f"{key}: {part['error']}")
            if part.get("exit"):  # the stage's process failed or timed out (scripts/device_check.sh)
                out.append(
                    f"{key}: stage exited {part['exit']}" + (" (timed out)" if part["exit"] in (124, 137) else "")
                )
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="folder for results.json / results.md")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (data set, trainer run); default OUT/../")
    ap.add_argument("--stage", choices=STAGES + ("all", "report"), default="all")
    ap.add_argument(
        "--dry-run", action="store_true", help="tiny sizes on the CPU, meta-device checks; exit 1 on errors"
    )
    ap.add_argument("--budget", type=int, default=300, help="seconds for a stage's subprocess (tests, trainer)")
    a = ap.parse_args(argv)
    a.work = a.work or Path(tempfile.mkdtemp(prefix="device_check_"))
    a.work.mkdir(parents=True, exist_ok=True)
    res = Results(a.out)
    for stage in (STAGES if a.stage == "all" else () if a.stage == "report" else (a.stage,)):
        print(f"[device-check] {stage}", flush=True)
        t0 = time.time()
        try:
            RUN[stage](res, a)
        except Exception as e:  # noqa: BLE001 - the stage's own failure (not a row's) is kept too
            traceback.print_exc()
            res.put(stage, "error", _error(e))
        res.put(stage, "stage_seconds", round(time.time() - t0, 1))
    if a.stage == "report":
        res.write()
        bad = errors(res.data)
        print("\n".join(["[device-check] errors:"] + bad) if bad else "[device-check] no errors", flush=True)
        return 1 if bad and a.dry_run else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

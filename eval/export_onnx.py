"""Export a backbone to ONNX in the form insightface's recognition loader expects.

    python -m eval.export_onnx --model model.pt --network r50 --out model.onnx

Graph: input ``input`` float32 [N, 3, 112, 112] RGB already scaled to [-1, 1], dynamic
batch; output ``output`` float32 [N, D] (raw, not L2-normalised). Input normalisation is
deliberately NOT in the graph, exactly like insightface's own arcface_torch export:
``insightface.model_zoo.get_model(path)`` returns an ``ArcFaceONNX`` that decides how to
normalise by looking at the *names* of the first 8 graph nodes (names starting with
``Sub``/``_minus`` and ``Mul``/``_mul`` mean "the graph normalises, feed raw pixels";
otherwise it feeds ``(pixel - 127.5) / 127.5``). Torch's exporters name nodes ``/Sub``,
``node_sub``..., so a graph that normalised itself would be normalised twice there.
After export every node name that could trigger the heuristic is renamed, the model is
checked with onnx.checker and compared with PyTorch under onnxruntime (max abs diff
printed, a tolerance enforced).
"""
from __future__ import annotations

import argparse
import copy
import io
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union, cast

import numpy as np
import onnx
import torch

from eval.models import add_model_args, model_from_args
from trainer.io.atomic import atomic_open

# prefixes insightface's ArcFaceONNX inspects in graph.node[:8] (model_zoo/arcface_onnx.py)
INSIGHTFACE_SUB_PREFIXES = ("Sub", "_minus")
INSIGHTFACE_MUL_PREFIXES = ("Mul", "_mul")


def insightface_input_norm(model: onnx.ModelProto) -> Tuple[float, float]:
    """(input_mean, input_std) insightface's ArcFaceONNX would pick for this graph.

    A re-implementation of its heuristic, used to check exports when the real package
    is not installed: (0, 1) when among the first 8 nodes one name starts with Sub/_minus
    and one with Mul/_mul, else (127.5, 127.5).
    """
    find_sub = find_mul = False
    for node in model.graph.node[:8]:
        if node.name.startswith(INSIGHTFACE_SUB_PREFIXES):
            find_sub = True
        if node.name.startswith(INSIGHTFACE_MUL_PREFIXES):
            find_mul = True
    return (0.0, 1.0) if (find_sub and find_mul) else (127.5, 127.5)


def sanitize_node_names(model: onnx.ModelProto) -> int:
    """Rename nodes whose names start like insightface's normalisation markers; returns the count."""
    used = {n.name for n in model.graph.node}
    renamed = 0
    for node in model.graph.node:
        if node.name.startswith(INSIGHTFACE_SUB_PREFIXES + INSIGHTFACE_MUL_PREFIXES):
            new = f"op_{node.name}"
            while new in used:
                new = "op_" + new
            used.add(new)
            node.name = new
            renamed += 1
    return renamed


def _export_bytes(model: torch.nn.Module, image_size: int, opset: int) -> bytes:
    dummy = torch.zeros(2, 3, image_size, image_size)
    buf = io.BytesIO()
    kwargs: Dict[str, Any] = dict(
        input_names=["input"],
        output_names=["output"],
        opset_version=opset,
        do_constant_folding=True,
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="no signature found for")  # ScriptModule inputs
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            # TorchScript-based exporter: no onnxscript dependency, stable node naming
            # (a file object is accepted; the annotation names paths only)
            torch.onnx.export(model, (dummy,), cast(Any, buf), dynamo=False, **kwargs)
        except TypeError:  # a torch without the dynamo switch
            torch.onnx.export(model, (dummy,), cast(Any, buf), **kwargs)
    return buf.getvalue()


def check_parity(
    model: torch.nn.Module, onnx_path: Union[str, Path], image_size: int = 112, batch: int = 3, seed: int = 0
) -> Tuple[float, float]:
    """(max |onnxruntime - PyTorch|, max |PyTorch|) on a random [-1, 1] batch whose size differs
    from the export's, so the dynamic batch axis is exercised too."""
    import onnxruntime as ort

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, image_size, image_size, generator=g) * 2 - 1
    with torch.no_grad():
        ref = model(x).float().numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = np.asarray(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    if got.shape != ref.shape:
        raise ValueError(f"{onnx_path}: onnxruntime output shape {got.shape} != PyTorch {ref.shape}")
    return float(np.max(np.abs(got - ref))), float(np.max(np.abs(ref)))


def export_onnx(
    model: torch.nn.Module,
    out: Union[str, Path],
    image_size: int = 112,
    opset: int = 17,
    atol: float = 1e-3,
    rtol: float = 1e-4,
) -> Tuple[float, float]:
    """Export ``model`` (eval mode, CPU, input in [-1, 1]) to ``out`` atomically.

    Returns (max abs diff onnxruntime vs PyTorch, max |PyTorch output|) and raises when
    the diff exceeds ``atol + rtol * max|output|`` (untrained nets output ~1e7, so a
    purely absolute bound would be meaningless there)."""
    out = Path(out)
    # a CPU copy in eval mode: the caller's model (maybe training on a GPU) is left untouched
    with warnings.catch_warnings():
        # TorchScript modules: .cpu() touches .grad of non-leaf script tensors (harmless)
        warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
        model = copy.deepcopy(model).cpu().eval()
    proto = onnx.load_from_string(_export_bytes(model, image_size, opset))
    sanitize_node_names(proto)
    onnx.checker.check_model(proto)
    if len(proto.graph.output) != 1:
        raise ValueError(f"exported graph has {len(proto.graph.output)} outputs; insightface needs exactly one")
    if insightface_input_norm(proto) != (127.5, 127.5):
        raise AssertionError("node names would make insightface skip input normalisation")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out, "wb") as f:
        f.write(proto.SerializeToString())
    diff, scale = check_parity(model, out, image_size)
    if not diff <= atol + rtol * scale:
        raise ValueError(f"{out}: onnxruntime differs from PyTorch by {diff:.3g} (> {atol} + {rtol} * {scale:.3g})")
    return diff, scale


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m eval.export_onnx", description="export a backbone to ONNX (insightface-loadable)"
    )
    add_model_args(p, "model.pt (+ --network) | checkpoint dir | TorchScript | module:factory")
    p.add_argument("--out", required=True)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--opset", type=int, default=17)
    p.add_argument(
        "--atol", type=float, default=1e-3, help="allowed |onnxruntime - PyTorch| = atol + rtol * max|output|"
    )
    p.add_argument("--rtol", type=float, default=1e-4)
    args = p.parse_args(argv)
    if str(args.model).endswith(".onnx"):
        p.error("--model is already ONNX")
    model = model_from_args(args, "cpu")
    diff, scale = export_onnx(
        model, args.out, image_size=args.image_size, opset=args.opset, atol=args.atol, rtol=args.rtol
    )
    print(f"exported {args.out}; max abs diff onnxruntime vs PyTorch: {diff:.3g} (max |output| {scale:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

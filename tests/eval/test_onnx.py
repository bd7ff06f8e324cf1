"""ONNX export: parity with PyTorch, dynamic batch, insightface's loader (real package if installed,
otherwise a faithful re-implementation of its normalisation heuristic), and .onnx evaluation."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from eval import export_onnx as ex
from eval import verify
from eval.models import OnnxModule, load_model
from tests.eval.fixtures import TinyNet, make_bin, tiny_net
from trainer.verification_protocol import embed_images, load_bin


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    net = tiny_net(32)
    torch.save(net.state_dict(), d / "model.pt")
    rc = ex.main(
        ["--model", str(d / "model.pt"), "--network", "tests.eval.fixtures:TinyNet", "--out", str(d / "model.onnx")]
    )
    assert rc == 0
    return net, d / "model.onnx"


def _insightface_blob(bgr_images, mean, std):
    """What ArcFaceONNX.get_feat feeds: cv2.dnn.blobFromImages(imgs, 1/std, size, (mean,)*3, swapRB=True)."""
    x = np.stack(bgr_images).astype(np.float32)[..., ::-1]  # BGR -> RGB
    return ((x - mean) / std).transpose(0, 3, 1, 2).copy()


def test_export_shapes_and_parity(exported, capsys):
    net, path = exported
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    inp, out = model.graph.input[0], model.graph.output[0]
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["batch", 3, 112, 112]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", 32]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        x = torch.rand(n, 3, 112, 112) * 2 - 1
        got = sess.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            ref = net(x).numpy()
        assert got.shape == (n, 32)
        assert np.max(np.abs(got - ref)) < 1e-4
    diff, scale = ex.check_parity(net, path)
    assert diff < 1e-4 and scale > 0.1


def test_parity_check_detects_a_different_model(exported):
    _, path = exported
    other = TinyNet(32).eval()  # other random weights
    assert ex.check_parity(other, path)[0] > 1e-2


def test_cli_prints_max_abs_diff(tmp_path, capsys):
    torch.jit.script(tiny_net(8)).save(str(tmp_path / "m.ts"))
    assert ex.main(["--model", str(tmp_path / "m.ts"), "--out", str(tmp_path / "m.onnx")]) == 0
    assert "max abs diff onnxruntime vs PyTorch" in capsys.readouterr().out


def _graph_with_names(names):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 112, 112])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3, 112, 112])
    c = helper.make_tensor("c", TensorProto.FLOAT, [], [1.0])
    nodes = [helper.make_node("Sub", ["input", "c"], ["t0"], name=names[0]),
             helper.make_node("Mul", ["t0", "c"], ["output"], name=names[1])]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], [c]))


def test_insightface_heuristic_reimplementation_and_sanitizer():
    # mxnet-style names -> insightface assumes normalisation in the graph (feeds raw pixels)
    m = _graph_with_names(["Sub_0", "Mul_1"])
    assert ex.insightface_input_norm(m) == (0.0, 1.0)
    assert ex.sanitize_node_names(m) == 2
    assert ex.insightface_input_norm(m) == (127.5, 127.5)
    # current exporters' names do not match the prefixes -> normalised by the loader
    assert ex.insightface_input_norm(_graph_with_names(["/Sub", "/Mul"])) == (127.5, 127.5)
    assert ex.insightface_input_norm(_graph_with_names(["node_sub", "node_mul"])) == (127.5, 127.5)


def test_exported_graph_loader_pipeline_matches_pytorch(exported):
    """Re-implementation of ArcFaceONNX: pick (mean, std) from node names, blob from BGR uint8, run."""
    net, path = exported
    mean, std = ex.insightface_input_norm(onnx.load(str(path)))
    assert (mean, std) == (127.5, 127.5)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(3, 112, 112, 3), dtype=np.uint8)
    bgr = [im[..., ::-1].copy() for im in rgb]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feat = sess.run(None, {sess.get_inputs()[0].name: _insightface_blob(bgr, mean, std)})[0]
    with torch.no_grad():
        ref = net(torch.from_numpy(rgb.transpose(0, 3, 1, 2).copy()).float().sub(127.5).div(127.5)).numpy()
    assert np.max(np.abs(feat - ref)) < 1e-4


def test_real_insightface_loader(exported):
    pytest.importorskip("insightface", reason="insightface not installed (optional; see docs/eval.md)")
    from insightface.model_zoo import get_model

    net, path = exported
    m = get_model(str(path), providers=["CPUExecutionProvider"])
    assert type(m).__name__ == "ArcFaceONNX"
    assert (m.input_mean, m.input_std) == (127.5, 127.5)
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(2, 112, 112, 3), dtype=np.uint8)
    feat = m.get_feat([im[..., ::-1].copy() for im in rgb])  # insightface takes BGR (cv2) images
    with torch.no_grad():
        ref = net(torch.from_numpy(rgb.transpose(0, 3, 1, 2).copy()).float().sub(127.5).div(127.5)).numpy()
    assert np.max(np.abs(feat - ref)) < 1e-4


def test_evaluator_accepts_onnx(exported, tmp_path):
    net, path = exported
    make_bin(tmp_path / "lfw.bin", pairs=20)
    onnx_model = load_model(path)
    assert isinstance(onnx_model, OnnxModule)
    images, _ = load_bin(tmp_path / "lfw.bin")
    e_onnx = embed_images(onnx_model, images, batch_size=7)
    e_torch = embed_images(net, images)
    assert torch.allclose(e_onnx, e_torch, atol=1e-4)
    assert (
        verify.main(
            ["--model", str(path), "--bin", str(tmp_path / "lfw.bin"), "--out", str(tmp_path / "o"), "--no-plots"]
        )
        == 0
    )
    assert "lfw" in json.loads((tmp_path / "o" / "results.json").read_text())["results"]


def test_export_trainer_backbone(tmp_path):
    bb = pytest.importorskip("trainer.backbones")
    if not hasattr(bb, "get_backbone"):
        pytest.skip("trainer.backbones.get_backbone has not landed")
    torch.manual_seed(0)
    net = bb.get_backbone("tiny", num_features=64).eval()
    torch.save(net.state_dict(), tmp_path / "model.pt")
    assert ex.main(["--model", str(tmp_path / "model.pt"), "--network", "tiny", "--out", str(tmp_path / "m.onnx")]) == 0
    assert ex.insightface_input_norm(onnx.load(str(tmp_path / "m.onnx"))) == (127.5, 127.5)
    diff, scale = ex.check_parity(net, tmp_path / "m.onnx")
    assert diff <= 1e-3 + 1e-4 * scale


def test_export_leaves_callers_model_alone(tmp_path):
    net = tiny_net(8).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    diff, _ = ex.export_onnx(net, tmp_path / "m.onnx")
    assert diff < 1e-4 and net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())

""".bin loading (restricted unpickler, decode, resize), embed_images contract, verify CLI smoke."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from eval import verify
from eval.metrics import verify_embeddings
from tests.eval.fixtures import PatchNet, aligned_face, encode, make_bin, tiny_net
from trainer.io.binfile import UnsafePickleError, read_bin, write_bin
from trainer.verification_protocol import embed_images, load_bin

REPO = Path(__file__).resolve().parents[2]


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(([b"x", b"y"], [_Exploit(marker)]), protocol=2))
    with pytest.raises(UnsafePickleError, match=r"evil\.bin.*refusing to load global"):
        read_bin(evil)
    with pytest.raises(UnsafePickleError):
        load_bin(evil)
    assert not marker.exists()
    # the same file is executable with the plain unpickler (the test's premise holds)
    with open(evil, "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_not_a_pickle_and_missing(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="bad.bin"):
        load_bin(bad)
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        load_bin(tmp_path / "nope.bin")


def _py2_pickle(images, issame):
    """The opcodes Python 2's cPickle (protocol 2) emits for a tuple of (list of str, list of bool)."""
    import struct
    out = [b"\x80\x02", b"(", b"("]  # PROTO 2, MARK (tuple), MARK (list)
    for data in images:
        out.append(b"T" + struct.pack("<I", len(data)) + data)  # BINSTRING (py2 str)
    out.append(b"l(")  # LIST, MARK
    out.extend(b"\x88" if s else b"\x89" for s in issame)  # NEWTRUE / NEWFALSE
    out.append(b"lt.")  # LIST, TUPLE, STOP
    return b"".join(out)


def test_python2_and_protocol2_bins_load(tmp_path):
    imgs = [encode(aligned_face(i)) for i in (0, 0, 1, 2)]
    p2 = tmp_path / "py2.bin"
    p2.write_bytes(_py2_pickle(imgs, [True, False]))
    images, issame = load_bin(p2)
    assert images.shape == (4, 3, 112, 112) and issame.tolist() == [True, False]
    # Python 3 at protocol 2 stores bytes via _codecs.encode(..., 'latin1'): allowed, nothing else is
    p3 = tmp_path / "py3p2.bin"
    p3.write_bytes(pickle.dumps((imgs, [True, False]), protocol=2))
    images3, _ = load_bin(p3)
    assert torch.equal(images, images3)
    p4 = tmp_path / "codec.bin"
    p4.write_bytes(pickle.dumps(([b"ab", b"cd"], [True]), protocol=2).replace(b"latin1", b"rot_13"))
    with pytest.raises(UnsafePickleError, match="_codecs.encode"):
        read_bin(p4)


def test_load_bin_decodes_resizes_and_png_fallback(tmp_path):
    p = tmp_path / "small.bin"
    issame = make_bin(p, pairs=10, size=96, png_every=3)
    images, got = load_bin(p)
    assert images.dtype == torch.uint8 and images.shape == (20, 3, 112, 112)
    assert np.array_equal(got, issame) and got.dtype == bool
    # channel order RGB: the red landmark dot (left eye) is red after decoding
    img = images[0].permute(1, 2, 0).numpy().astype(int)
    y, x = 52, 38
    assert img[y, x, 0] > 200 and img[y, x, 1] < 80 and img[y, x, 2] < 80


def test_undecodable_image_named(tmp_path):
    p = tmp_path / "broken.bin"
    write_bin(p, [encode(aligned_face(0)), b"\xff\xd8\xff not a jpeg"], [True])
    with pytest.raises(ValueError, match=r"broken\.bin: image 1"):
        load_bin(p)


def test_embed_images_contract():
    net = tiny_net(16).train()
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, size=(10, 3, 112, 112), dtype=np.uint8))
    emb = embed_images(net, images, batch_size=3)
    assert net.training  # mode restored
    assert emb.dtype == torch.float32 and emb.shape == (10, 16) and emb.device.type == "cpu"
    assert torch.allclose(emb.norm(dim=1), torch.ones(10), atol=1e-5)
    # independent computation: eval mode, (x-127.5)/127.5, emb(x)+emb(flip x), normalise
    net.eval()
    with torch.no_grad():
        x = (images.float() - 127.5) / 127.5
        ref = torch.nn.functional.normalize(net(x) + net(x.flip(3)), dim=1)
    assert torch.allclose(emb, ref, atol=1e-5)
    # batch size does not matter
    assert torch.allclose(embed_images(net, images, batch_size=128), emb, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        embed_images(net, images.float())


def test_flip_invariance_of_embedding():
    net = tiny_net(16)
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, size=(4, 3, 112, 112), dtype=np.uint8))
    a = embed_images(net, images)
    b = embed_images(net, images.flip(3))
    assert torch.allclose(a, b, atol=1e-5)


def test_patchnet_separates_identities_on_bin(tmp_path):
    p = tmp_path / "lfw.bin"
    make_bin(p, pairs=40)
    images, issame = load_bin(p)
    res = verify_embeddings(embed_images(PatchNet(), images), issame)
    assert res["accuracy"] == 1.0 and res["auc"] == 1.0
    # training's validator over several sets reports the same accuracy as the eval report
    from trainer.config import ValidationConfig
    from trainer.runtime.process_group import DistInfo
    from trainer.validator import Validator

    v = Validator(ValidationConfig(), {"lfw": p, "lfw_again": p}, DistInfo(0, 1, 0, torch.device("cpu")),
                  tmp_path, total_steps=1)
    assert v.accuracies(PatchNet()) == {"lfw": res["accuracy"], "lfw_again": res["accuracy"]}


def test_verify_cli_state_dict_and_torchscript(tmp_path, capsys):
    bins = [tmp_path / "lfw.bin", tmp_path / "cfp_fp.bin"]
    make_bin(bins[0], pairs=40, seed=0)
    make_bin(bins[1], pairs=20, seed=1, size=128)
    # 1) plain state_dict (DDP-prefixed, as some checkpoints are) + module:factory network
    net = tiny_net(24)
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, tmp_path / "model.pt")
    out = tmp_path / "out1"
    rc = verify.main(["--model", str(tmp_path / "model.pt"), "--network", "tests.eval.fixtures:TinyNet",
                      "--bin", *map(str, bins), "--out", str(out), "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| lfw |" in printed and "| cfp_fp |" in printed
    data = json.loads((out / "results.json").read_text())
    assert set(data["results"]) == {"lfw", "cfp_fp"}
    # same numbers as the library path
    images, issame = load_bin(bins[0])
    lib = verify_embeddings(embed_images(net, images), issame)
    assert data["results"]["lfw"]["accuracy"] == pytest.approx(lib["accuracy"])
    assert data["results"]["lfw"]["tar_at_far"]["1e-3"] == pytest.approx(lib["tar_at_far"][1e-3])
    for f in ("results.md", "roc.png", "hist_lfw.png", "hist_cfp_fp.png"):
        assert (out / f).stat().st_size > 0
    # 2) checkpoint directory + 3) TorchScript file
    ckdir = tmp_path / "ckpt"
    ckdir.mkdir()
    torch.save({"backbone": net.state_dict(), "step": 10}, ckdir / "checkpoint_step10.pt")
    assert verify.main(["--model", str(ckdir), "--network", "tests.eval.fixtures:TinyNet", "--bin", str(bins[0]),
                        "--out", str(tmp_path / "out2"), "--no-plots"]) == 0
    d2 = json.loads((tmp_path / "out2" / "results.json").read_text())
    assert d2["results"]["lfw"]["accuracy"] == pytest.approx(lib["accuracy"])
    torch.jit.script(PatchNet()).save(str(tmp_path / "patch.ts"))
    assert (
        verify.main(["--model", str(tmp_path / "patch.ts"), "--bin", str(bins[0]), "--out", str(tmp_path / "out3")])
        == 0
    )
    d3 = json.loads((tmp_path / "out3" / "results.json").read_text())
    assert d3["results"]["lfw"]["accuracy"] == 1.0


def test_verify_cli_errors(tmp_path, capsys):
    """Expected errors: one ``error:`` line naming the file and exit code 2 (no traceback)."""
    make_bin(tmp_path / "lfw.bin", pairs=10)
    torch.save(tiny_net(8).state_dict(), tmp_path / "model.pt")
    assert verify.main(["--model", str(tmp_path / "model.pt"), "--bin", str(tmp_path / "lfw.bin"),
                        "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model.pt" in err and "needs --network" in err
    assert verify.main(["--model", str(tmp_path / "model.pt"), "--network", "tests.eval.fixtures:patch_net",
                        "--bin", str(tmp_path / "lfw.bin"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "do not fit" in err and err.count("\n") == 1


def test_verify_cli_subprocess(tmp_path):
    make_bin(tmp_path / "lfw.bin", pairs=40)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "eval.verify",
            "--model",
            "tests.eval.fixtures:patch_net",
            "--bin",
            str(tmp_path / "lfw.bin"),
            "--out",
            str(tmp_path / "o"),
            "--no-plots",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr
    assert "| lfw | 100.00 ± 0.00 |" in r.stdout


def test_verify_cli_on_bin_made_by_data_tools(tmp_path, capsys):
    mb = pytest.importorskip("data_tools.make_bin", reason="data_tools make_bin has not landed")
    # image files + a pairs list -> data_tools make_bin -> eval.verify
    lines = []
    rng = np.random.default_rng(5)
    for k in range(20):
        a, b = (k, k) if k % 2 == 0 else (k, k + 100)
        for j, ident in enumerate((a, b)):
            name = f"p{k}_{j}.{'png' if (k + j) % 3 == 0 else 'jpg'}"
            (tmp_path / name).write_bytes(
                encode(aligned_face(ident, rng=rng), "PNG" if name.endswith("png") else "JPEG")
            )
        lines.append(
            f"p{k}_0.{'png' if k % 3 == 0 else 'jpg'} p{k}_1.{'png' if (k + 1) % 3 == 0 else 'jpg'} {int(k % 2 == 0)}"
        )
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    mb.make_bin(tmp_path / "pairs.txt", tmp_path / "tiny.bin", progress=False)
    assert verify.main(["--model", "tests.eval.fixtures:patch_net", "--bin", str(tmp_path / "tiny.bin"),
                        "--out", str(tmp_path / "o"), "--no-plots"]) == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())["results"]["tiny"]
    assert res["num_pairs"] == 20 and res["auc"] == 1.0

"""Helpers of the end-to-end launch tests (tiny synthetic data, tiny configs, log parsing)."""
from __future__ import annotations

import contextlib
import importlib.util
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
_STEP = re.compile(r"\bstep (\d+)/(\d+) epoch \d+ loss ([0-9.eE+-]+|nan|inf)")
_RESUMED = re.compile(r"resumed from \S+ \(step (\d+),")


def missing_pieces() -> List[str]:
    """What the end-to-end tests need from other parts of the project and is not there yet."""
    need = {"trainer.train (trainer branch)": "trainer.train",
            "trainer.data.build_train_loader (data branch)": "trainer.data.torch_loader",
            "data_tools synth (data branch)": "data_tools.synth"}
    return [what for what, mod in need.items() if importlib.util.find_spec(mod) is None]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """16 identities x 8 images of the project's synthetic faces (about 1 s)."""
    missing = missing_pieces()
    if missing:
        pytest.skip("end-to-end launch test needs " + ", ".join(missing))
    out = tmp_path_factory.mktemp("launch_ds") / "synth"
    subprocess.run([sys.executable, "-m", "data_tools", "synth", "--out", str(out), "--identities", "16",
                    "--images-per-identity", "8", "--seed", "1", "--label-noise", "0",
                    "--val-identities", "4", "--val-pairs", "20", "--workers", "1"],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    return out


def tiny_config(path: Path, data_dir: Path, output: Path, max_steps: int = 16, save_every: int = 4) -> Path:
    """A training config small enough for 2 CPU cores: tiny CNN, batch 8 per rank."""
    cfg = {
        "run": {"output": str(output), "seed": 7, "max_steps": max_steps},
        "model": {"backbone": "tiny", "embedding_size": 32, "width": 8},
        "loss": {"s": 16.0, "m": 0.3},
        "data": {"train_dir": str(data_dir), "batch_size": 8, "backend": "torch", "num_threads": 1},
        "optim": {"lr": 0.05, "weight_decay": 0.0},
        "checkpoint": {"save_every": save_every, "keep_last": 10},
        "logging": {"log_every": 1, "hist_every": 0, "image_grid": False, "progress_bar": False},
        "validation": {"every": 0, "at_start": False, "targets": []},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_lines(log_text: str) -> List[Tuple[int, int, float]]:
    """(step, total, loss) of every per-step log line, in order."""
    return [(int(a), int(b), float(c)) for a, b, c in _STEP.findall(log_text)]


def resumed_steps(log_text: str) -> List[int]:
    return [int(s) for s in _RESUMED.findall(log_text)]


def checkpoint_meta(output: Path) -> Dict[int, dict]:
    """step -> COMPLETE marker of every complete checkpoint."""
    import json

    out = {}
    for d in sorted((output / "checkpoints").glob("step_*")):
        if (d / "COMPLETE").is_file():
            meta = json.loads((d / "COMPLETE").read_text())
            out[int(meta["step"])] = {**meta, "files": sorted(p.name for p in d.iterdir())}
    return out


@contextlib.contextmanager
def reaped(procs: List[Tuple[subprocess.Popen, object]]) -> Iterator[List[Tuple[subprocess.Popen, object]]]:
    """``(process, log file)`` pairs: on leaving, kill what still runs and close the logs."""
    try:
        yield procs
    finally:
        for p, f in procs:
            if p.poll() is None:
                p.kill()
            f.close()

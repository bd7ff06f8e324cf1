"""``launch multi``'s elastic waits and its message when the rendezvous fails (MIN not met)."""
import os
import subprocess
import sys

import pytest

from launch import cli
from tests.launch.e2e import ROOT, free_port


def _cmd(*extra):
    return cli.build_command(cli.parse(["multi", "--nnodes", "1:2", "--rdzv-endpoint", "h:29400",
                                        "--rdzv-id", "j", *extra, "--", "c.yaml"]), env={})


def test_waits_go_to_rdzv_conf():
    cmd = _cmd("--rdzv-host", "yes", "--join-timeout", "20", "--last-call-timeout", "3",
               "--close-timeout", "5", "--keep-alive-interval", "1")
    assert "--rdzv-conf=is_host=1,join_timeout=20,last_call_timeout=3,close_timeout=5,keep_alive_interval=1" in cmd
    assert not any(c.startswith("--rdzv-conf") for c in _cmd())  # torchrun's defaults
    with pytest.raises(cli.LaunchError, match="--last-call-timeout must be >= 1 second, got 0"):
        _cmd("--last-call-timeout", "0")


def test_min_nodes_not_reached_is_a_clear_error(tmp_path):
    """One agent of a job that needs 2 nodes: the rendezvous times out after --join-timeout and the
    launcher says why in one line (no worker ever started, so no worker code)."""
    port = free_port()
    cmd = [sys.executable, "-m", "launch", "multi", "--nnodes", "2:2", "--nproc-per-node", "1",
           "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"min-{port}", "--rdzv-host", "yes",
           "--join-timeout", "3", "--max-restarts", "0", "--", "configs/synth_demo.yaml"]
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0
    lines = [x for x in p.stderr.splitlines() if x.startswith("[launch] no worker exit code")]
    assert len(lines) == 1, p.stderr[-3000:]
    assert "fewer than 2 node(s) (--nnodes 2:2) joined within --join-timeout=3 s" in lines[0]

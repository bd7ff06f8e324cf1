"""Environment defaults for training processes (GPU clusters first; harmless on CPU).

Every value is a *default*: a variable already set in the environment wins, so
``NCCL_DEBUG=INFO python -m launch single ...`` or ``docker run -e NCCL_DEBUG=INFO``
overrides it. Applied by ``python -m launch`` before it starts torchrun, and by
the Docker entrypoint (``python -m launch.env_defaults --export``) for every
command the image runs. No torch import here: the entrypoint calls it on each start.

Deliberately NOT defaulted, because the right value depends on the cluster
(see docs/launch.md): NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME (which NIC),
NCCL_IB_HCA, NCCL_IB_GID_INDEX (RoCE), NCCL_NET_GDR_LEVEL, OMP_NUM_THREADS
(torchrun sets 1 per worker when unset).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Dict, MutableMapping, Optional, Sequence

#: name -> (default, why)
DEFAULTS: Dict[str, tuple] = {
    "NCCL_DEBUG": ("WARN", "NCCL prints its warnings and the reason of a failure, not INFO noise"),
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": (
        "1", "a failed or timed-out collective tears the process down, so torchrun sees the "
             "failure and restarts the group (--max-restarts) instead of hanging"),
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": (
        "1", "each restart attempt gets a fresh TCPStore for init_process_group. With the store "
             "shared across attempts (torch's default since 2.5), a restarted group can read the "
             "previous attempt's gloo/NCCL bootstrap addresses and fail with 'Connection refused' "
             "(pytorch/pytorch#135712, #167288); tests/launch/test_elastic_restart.py hit it"),
    "PYTORCH_ALLOC_CONF": ("expandable_segments:True",
                           "Partial FC sampling changes tensor shapes every step; expandable "
                           "segments keep the CUDA caching allocator from fragmenting"),
    "CUDA_DEVICE_ORDER": ("PCI_BUS_ID", "LOCAL_RANK k is the k-th GPU as nvidia-smi lists them"),
    "PYTHONUNBUFFERED": ("1", "worker log lines reach torchrun/SLURM/kubectl logs immediately"),
}


def apply_defaults(env: Optional[MutableMapping[str, str]] = None) -> Dict[str, str]:
    """Set every default that ``env`` (default: os.environ) lacks; return what was set."""
    env = os.environ if env is None else env
    set_now = {}
    for name, (value, _why) in DEFAULTS.items():
        if name not in env:
            env[name] = value
            set_now[name] = value
    return set_now


def export_lines(env: Optional[MutableMapping[str, str]] = None) -> str:
    """Shell ``export`` lines for the defaults that ``env`` lacks (for ``eval`` in a shell)."""
    env = dict(os.environ if env is None else env)
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in apply_defaults(env).items())


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.env_defaults", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", action="store_true",
                   help="print `export NAME=VALUE` for each default not already set (for eval)")
    args = p.parse_args(argv)
    if args.export:
        sys.stdout.write(export_lines())
    else:
        for k, (v, why) in DEFAULTS.items():
            cur = os.environ.get(k)
            state = f"(set: {cur})" if cur is not None else "(default applies)"
            print(f"{k}={v}  {state}\n    {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

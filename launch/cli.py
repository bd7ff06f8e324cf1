"""``python -m launch``: start training under torchrun (torch.distributed.run), nothing home-made.

Subcommands (everything after ``--`` goes to the training module, by default
``python -m trainer.train CONFIG.yaml [key=value ...]``)::

    python -m launch single [--nproc-per-node N] [--max-restarts K] -- CONFIG [k=v ...]
        one node, N processes (default: one per visible GPU, 1 on CPU), torchrun --standalone
    python -m launch multi --nnodes N --rdzv-endpoint HOST[:PORT] --rdzv-id ID [...] -- CONFIG ...
        run the same command on every node; a c10d rendezvous forms one job
    python -m launch slurm [--nproc-per-node N] [--max-restarts K] -- CONFIG ...
        inside ``srun`` (one task per node): everything derived from SLURM variables
    python -m launch env
        the environment defaults (NCCL...) and whether they apply

Preemption: torchrun forwards the signals it handles to the workers and kills them
after its shutdown timeout. The launcher adds SIGUSR1 (SLURM's ``--signal``) to
torchrun's signals (``--signals-to-handle``) and sets ``--shutdown-timeout``
(``--shutdown-timeout`` here, default 300 s, or $UNPG_SHUTDOWN_TIMEOUT) so the
workers have time to save a checkpoint (trainer.preemption). ``python -m launch``
execs torchrun, so signals sent to it reach torchrun itself.

The backend follows the hardware: the trainer picks NCCL when CUDA is
available and gloo otherwise, so the same commands work on CPU machines.
Environment defaults (launch/env_defaults.py) are applied first; anything
already set in the environment wins. ``--dry-run`` (or UNPG_LAUNCH_DRY_RUN=1)
prints the torchrun command instead of running it.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from typing import List, Optional, Sequence

from launch import env_defaults, slurm_env

DEFAULT_MODULE = "trainer.train"
#: torchrun's default signals + SIGUSR1 (SLURM --signal); every one is forwarded to the workers
SIGNALS_TO_HANDLE = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
DEFAULT_SHUTDOWN_TIMEOUT = 300


class LaunchError(ValueError):
    """Bad launcher arguments (named in the message)."""


def visible_gpus() -> int:
    """CUDA devices this node can use (0 without CUDA)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard requirement of the project
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def default_nproc() -> int:
    """One process per visible GPU; one process on a CPU-only node (gloo)."""
    return visible_gpus() or 1


def _positive(name: str, v: Optional[int]) -> Optional[int]:
    if v is not None and v < 1:
        raise LaunchError(f"{name} must be >= 1, got {v}")
    return v


def _check_nnodes(text: str) -> str:
    if not re.fullmatch(r"\d+(:\d+)?", text):
        raise LaunchError(f"--nnodes {text!r}: expected N or MIN:MAX")
    lo, _, hi = text.partition(":")
    if int(lo) < 1 or (hi and int(hi) < int(lo)):
        raise LaunchError(f"--nnodes {text!r}: need 1 <= MIN <= MAX")
    return text


def _check_endpoint(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, ""
    if not host or (port and (not port.isdigit() or not 0 < int(port) < 65536)):
        raise LaunchError(f"--rdzv-endpoint {text!r}: expected HOST[:PORT]")
    return text


def _shutdown_timeout(args: argparse.Namespace, env: dict) -> int:
    v = args.shutdown_timeout
    if v is None:
        raw = env.get("UNPG_SHUTDOWN_TIMEOUT", "")
        try:
            v = int(raw) if raw else DEFAULT_SHUTDOWN_TIMEOUT
        except ValueError:
            raise LaunchError(f"UNPG_SHUTDOWN_TIMEOUT={raw!r}: expected seconds (an integer)") from None
    if v < 0:
        raise LaunchError(f"--shutdown-timeout must be >= 0, got {v}")
    return v


def torchrun_command(torchrun_flags: Sequence[str], module: str, target_args: Sequence[str],
                     python: str = sys.executable) -> List[str]:
    """``python -m torch.distributed.run FLAGS -m MODULE ARGS`` (same interpreter as the launcher)."""
    if not target_args:
        raise LaunchError("nothing to train: give the config after `--`, e.g. "
                          "`python -m launch single -- configs/synth_demo.yaml`")
    return [python, "-m", "torch.distributed.run", *torchrun_flags, "-m", module, *target_args]


def build_command(args: argparse.Namespace, env: Optional[dict] = None) -> List[str]:
    """The full torchrun command for parsed CLI ``args`` (pure apart from GPU counting)."""
    env = dict(os.environ if env is None else env)
    common = [f"--max-restarts={args.max_restarts}", f"--signals-to-handle={SIGNALS_TO_HANDLE}",
              f"--shutdown-timeout={_shutdown_timeout(args, env)}"]
    if args.log_dir:
        common.append(f"--log-dir={args.log_dir}")
    common += list(args.torchrun_arg or [])
    nproc = _positive("--nproc-per-node", args.nproc_per_node)
    if args.cmd == "single":
        flags = ["--standalone", "--nnodes=1", f"--nproc-per-node={nproc or default_nproc()}"]
    elif args.cmd == "multi":
        flags = [f"--nnodes={_check_nnodes(args.nnodes)}",
                 f"--nproc-per-node={nproc or default_nproc()}",
                 "--rdzv-backend=c10d",
                 f"--rdzv-endpoint={_check_endpoint(args.rdzv_endpoint)}",
                 f"--rdzv-id={args.rdzv_id}"]
        if args.rdzv_host != "auto":
            flags.append(f"--rdzv-conf=is_host={1 if args.rdzv_host == 'yes' else 0}")
    elif args.cmd == "slurm":
        nproc = nproc or slurm_env.gpus_per_node(env) or default_nproc()
        r = slurm_env.slurm_rendezvous(env, nproc_per_node=nproc, port=args.port)
        flags = slurm_env.torchrun_args(r)
    else:  # pragma: no cover - argparse restricts cmd
        raise LaunchError(f"unknown subcommand {args.cmd!r}")
    return torchrun_command(flags + common, args.module, args.target)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="processes on this node (default: visible GPUs, 1 on CPU)")
    p.add_argument("--max-restarts", type=int, default=None,
                   help="torchrun restarts the whole group this many times after a failed rank; "
                        "the trainer resumes from the newest complete checkpoint (resume: auto)")
    p.add_argument("--module", default=DEFAULT_MODULE, help=f"module to run (default {DEFAULT_MODULE})")
    p.add_argument("--log-dir", default=None, help="torchrun --log-dir: per-rank stdout/stderr files")
    p.add_argument("-T", "--torchrun-arg", action="append", metavar="FLAG",
                   help="extra torchrun flag, e.g. -T=--tee=3 (repeatable)")
    p.add_argument("--shutdown-timeout", type=int, default=None,
                   help="seconds torchrun waits for workers after forwarding a signal before SIGKILL "
                        f"(time to save a checkpoint; default $UNPG_SHUTDOWN_TIMEOUT or {DEFAULT_SHUTDOWN_TIMEOUT})")
    p.add_argument("--dry-run", action="store_true", help="print the torchrun command, do not run it")
    p.add_argument("target", nargs=argparse.REMAINDER,
                   help="-- CONFIG.yaml [key=value ...] (arguments of the module)")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("single", help="one node, N processes (torchrun --standalone)")
    _add_common(s)
    m = sub.add_parser("multi", help="one of several nodes joined by a c10d rendezvous")
    m.add_argument("--nnodes", required=True, help="N, or MIN:MAX for an elastic job")
    m.add_argument("--rdzv-endpoint", required=True, help="HOST[:PORT] of the rendezvous store "
                   "(any node reachable by all; default port 29400)")
    m.add_argument("--rdzv-id", required=True, help="job id shared by all nodes of this run")
    m.add_argument("--rdzv-host", choices=("auto", "yes", "no"), default="auto",
                   help="does THIS node host the store? auto: the node whose address is the endpoint")
    _add_common(m)
    sl = sub.add_parser("slurm", help="one torchrun per node under srun; reads SLURM_* variables")
    sl.add_argument("--port", type=int, default=None,
                    help="rendezvous port (default: $MASTER_PORT or 29400 + job id %% 1000)")
    _add_common(sl)
    sub.add_parser("env", help="show the environment defaults (NCCL...) and which apply")
    return p


def parse(argv: Sequence[str]) -> argparse.Namespace:
    args = make_parser().parse_args(list(argv))
    if args.cmd == "env":
        return args
    target = list(args.target)
    if target and target[0] == "--":
        target = target[1:]
    args.target = target
    if args.max_restarts is None:
        # Multi-node jobs restart by default (a node can die); one node fails fast.
        args.max_restarts = 0 if args.cmd == "single" else 3
    if args.max_restarts < 0:
        raise LaunchError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse(argv)
        if args.cmd == "env":
            return env_defaults.main([])
        cmd = build_command(args)
    except (LaunchError, slurm_env.SlurmEnvError) as e:
        print(f"launch error: {e}", file=sys.stderr)
        return 2
    dry = args.dry_run or os.environ.get("UNPG_LAUNCH_DRY_RUN", "") not in ("", "0")
    if dry:
        print(shlex.join(cmd))
        return 0
    env_defaults.apply_defaults()
    print(f"[launch] {shlex.join(cmd)}", file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)  # torchrun takes over this process: signals from srun/k8s reach it
    return 0  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())

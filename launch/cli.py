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
workers have time to save a checkpoint (trainer.runtime.preemption).

Exit codes: ``python -m launch`` (``unpg-launch``) runs torchrun as its child and
exits with the **workers'** code (torchrun itself exits 1 whatever they
returned): each worker writes its code into ``$UNPG_EXIT_CODE_DIR`` (a private
folder the launcher makes), and the launcher returns the first non-zero code in
rank order of the last restart (143/138 preempted, 2 config, 3 non-finite loss,
4 run folder refused, 5 data; docs/training.md); with none written, 128 + the
signal it forwarded, else torchrun's code. Signals: the first of each of
SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 is forwarded to torchrun
(which forwards it to the workers); a repeat is not forwarded (a second SIGTERM
to torchrun during the save would make it kill the workers before their
checkpoint) but noted on stderr. Torchrun runs in a session of its own, dies
with the launcher (``PR_SET_PDEATHSIG``) and is killed if it outlives the
shutdown timeout + 60 s after a forwarded signal. Plain ``torchrun``: see docs/launch.md.

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
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from launch import env_defaults, slurm_env

DEFAULT_MODULE = "trainer.train"
#: torchrun's default signals + SIGUSR1 (SLURM --signal); every one is forwarded to the workers
SIGNALS_TO_HANDLE = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
DEFAULT_SHUTDOWN_TIMEOUT = 300
#: torchrun's c10d rendezvous defaults (seconds): wait for MIN nodes; then for more nodes
DEFAULT_JOIN_TIMEOUT, DEFAULT_LAST_CALL_TIMEOUT = 600, 30
#: the signals the launcher catches; the first of each goes to torchrun
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
#: seconds the launcher waits for torchrun beyond its shutdown timeout after a forwarded signal
KILL_GRACE_S = 60
#: environment variable naming the folder where each worker writes its exit code
EXIT_CODE_DIR_ENV = "UNPG_EXIT_CODE_DIR"


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


def rdzv_conf(args: argparse.Namespace) -> str:
    """torchrun ``--rdzv-conf`` of ``multi``: the store host and the elastic waits (seconds)."""
    conf = []
    if args.rdzv_host != "auto":
        conf.append(f"is_host={1 if args.rdzv_host == 'yes' else 0}")
    for name in ("join_timeout", "last_call_timeout", "close_timeout", "keep_alive_interval"):
        v = getattr(args, name, None)
        if v is not None:
            if v < 1:
                raise LaunchError(f"--{name.replace('_', '-')} must be >= 1 second, got {v}")
            conf.append(f"{name}={v}")
    return ",".join(conf)


def rendezvous_hint(args: argparse.Namespace) -> str:
    """What a torchrun failure without any worker exit code means for ``multi`` (docs/launch.md, Elastic)."""
    if args.cmd != "multi":
        return ""
    lo, _, hi = args.nnodes.partition(":")
    join = args.join_timeout or DEFAULT_JOIN_TIMEOUT
    return (f"no worker exit code: the rendezvous {args.rdzv_endpoint} (id {args.rdzv_id}) did not complete or "
            f"was lost: fewer than {lo} node(s) (--nnodes {args.nnodes}) joined within --join-timeout={join} s, "
            "or the node hosting the store at that endpoint died (the job cannot outlive it), or more failures "
            f"happened than --max-restarts={args.max_restarts} allows; torchrun's message is above")


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
        conf = rdzv_conf(args)
        if conf:
            flags.append(f"--rdzv-conf={conf}")
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
    m.add_argument("--join-timeout", type=int, default=None,
                   help="seconds the agents wait for MIN nodes at every rendezvous before failing "
                        f"(torchrun's default {DEFAULT_JOIN_TIMEOUT})")
    m.add_argument("--last-call-timeout", type=int, default=None,
                   help="once MIN nodes are there, seconds they wait for more (a lost node coming back, "
                        "a new one) before starting at the size reached "
                        f"(torchrun's default {DEFAULT_LAST_CALL_TIMEOUT})")
    m.add_argument("--close-timeout", type=int, default=None,
                   help="seconds a closed rendezvous stays open for late joiners (torchrun's default 30)")
    m.add_argument("--keep-alive-interval", type=int, default=None,
                   help="seconds between an agent's heartbeats; a node missing 3 is dropped (default 5)")
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
    return supervise(cmd, _shutdown_timeout(args, dict(os.environ)), rendezvous_hint(args))


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def workers_exit_codes(folder: Path) -> Dict[int, int]:
    """rank -> exit code the workers wrote (``rank-R.rN`` files; the highest restart N only)."""
    found: Dict[int, Dict[int, int]] = {}
    for f in folder.glob("rank-*.r*"):
        m = re.fullmatch(r"rank-(\d+)\.r(\d+)", f.name)
        try:
            code = int(f.read_text().strip())
        except (OSError, ValueError):
            continue
        if m:
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = code
    return found[max(found)] if found else {}


def job_exit_code(codes: Dict[int, int], torchrun_rc: int, signum: int) -> int:
    """The code the scheduler gets: the first non-zero worker code in rank order; else 0 when
    torchrun succeeded; else 128 + the forwarded signal; else torchrun's own code."""
    for _, c in sorted(codes.items()):
        if c != 0:
            return c
    if torchrun_rc == 0:
        return 0
    if signum:
        return 128 + signum
    return 128 - torchrun_rc if torchrun_rc < 0 else torchrun_rc


def supervise(cmd: Sequence[str], shutdown_timeout: int, hint: str = "") -> int:
    """Run torchrun ``cmd`` as a child, forward signals once each, return the job's code."""
    folder = Path(tempfile.mkdtemp(prefix="unpg-launch-"))
    env = {**os.environ, EXIT_CODE_DIR_ENV: str(folder)}
    state = {"signum": 0, "seen": set(), "deadline": None}
    child: Optional[subprocess.Popen] = None

    def on_signal(signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum in state["seen"]:
            print(f"[launch] {name} again: not forwarded (the workers are saving a checkpoint; "
                  "SIGKILL stops at once)", file=sys.stderr, flush=True)
            return
        state["seen"].add(signum)
        state["signum"] = state["signum"] or signum
        if state["deadline"] is None:
            state["deadline"] = time.monotonic() + shutdown_timeout + KILL_GRACE_S
        print(f"[launch] {name}: forwarded to torchrun and its workers", file=sys.stderr, flush=True)
        if child is not None and child.poll() is None:
            try:
                os.kill(child.pid, signum)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, on_signal) for s in FORWARDED}
    try:
        child = subprocess.Popen(list(cmd), env=env, start_new_session=True, preexec_fn=_die_with_parent)
        if state["signum"]:  # a signal that came while starting
            os.kill(child.pid, state["signum"])
        while True:
            try:
                rc = child.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if state["deadline"] is not None and time.monotonic() > state["deadline"]:
                    print(f"[launch] torchrun still running {shutdown_timeout + KILL_GRACE_S} s after "
                          f"{signal.Signals(state['signum']).name}: killing it", file=sys.stderr, flush=True)
                    child.kill()
        codes = workers_exit_codes(folder)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        shutil.rmtree(folder, ignore_errors=True)
    code = job_exit_code(codes, rc, state["signum"])
    if hint and code and not codes and not state["signum"]:
        print(f"[launch] {hint}", file=sys.stderr, flush=True)
    print(f"[launch] torchrun exited {rc}; workers' codes {dict(sorted(codes.items())) or 'not written'}: "
          f"exit {code}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())

"""SLURM environment -> torchrun arguments (one torchrun per node, started by ``srun``).

Pure functions of an environment mapping, so tests can feed a fake one:

- :func:`expand_nodelist` expands SLURM's compressed host lists
  (``gpu[01-03,07]``, ``a[1-2]-b[1-2],login5``) the way ``scontrol show
  hostnames`` does; :func:`hostnames` asks ``scontrol`` when it is on PATH and
  falls back to the pure-Python expansion otherwise.
- :func:`slurm_rendezvous` maps the job's variables to a :class:`SlurmRendezvous`
  (nodes, this node's rank, processes per node, rendezvous host/port/id).
- :func:`torchrun_args` turns that into torchrun's command-line flags.

Variable mapping (first one present wins):

==================  =====================================================
torchrun            SLURM variables
==================  =====================================================
--nnodes            SLURM_JOB_NUM_NODES, SLURM_NNODES
node rank           SLURM_NODEID (used to pick the rendezvous host)
--nproc-per-node    explicit value, SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE
                    (``8`` or ``h100:8``), else 1 (``python -m launch slurm``
                    first tries the GPUs torch sees)
--rdzv-endpoint     first host of SLURM_JOB_NODELIST / SLURM_NODELIST, port
                    MASTER_PORT or 29400 + SLURM_JOB_ID % 1000
--rdzv-id           SLURM_JOB_ID (+ ``_`` SLURM_RESTART_COUNT after a requeue)
==================  =====================================================

The first node hosts the c10d rendezvous store: it gets ``is_host=1`` and the
others ``is_host=0``, so no hostname matching (FQDN vs short name) is needed.
Ranks inside the job are then assigned by the rendezvous, not by SLURM.
"""
from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence

DEFAULT_PORT_BASE = 29400


class SlurmEnvError(ValueError):
    """The SLURM environment is missing a variable or holds a malformed value."""


# ------------------------------------------------------------------ nodelists
def _split_top_level(text: str) -> List[str]:
    """Split on commas that are not inside ``[...]``."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise SlurmEnvError(f"nodelist {text!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise SlurmEnvError(f"nodelist {text!r}: unbalanced '['")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _expand_range_set(body: str, whole: str) -> List[str]:
    """``01-03,07`` -> ['01', '02', '03', '07'] (zero padding kept, as SLURM does)."""
    out: List[str] = []
    for item in body.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise SlurmEnvError(f"nodelist {whole!r}: bad range {item!r} in [{body}]")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        width = len(lo)
        a, b = int(lo), int(hi)
        if b < a:
            raise SlurmEnvError(f"nodelist {whole!r}: descending range {item!r}")
        out.extend(str(i).zfill(width) for i in range(a, b + 1))
    return out


def expand_nodelist(nodelist: str) -> List[str]:
    """Expand a compressed SLURM host list; order as written, like ``scontrol show hostnames``."""
    if not nodelist or not nodelist.strip():
        raise SlurmEnvError("nodelist is empty")
    hosts: List[str] = []
    for part in _split_top_level(nodelist.strip()):
        # Alternate literal text and [range] groups; several groups form a product.
        pieces = re.split(r"(\[[^\]]*\])", part)
        choices: List[List[str]] = []
        for p in pieces:
            if p.startswith("[") and p.endswith("]"):
                choices.append(_expand_range_set(p[1:-1], nodelist))
            elif p:
                if "[" in p or "]" in p:
                    raise SlurmEnvError(f"nodelist {nodelist!r}: malformed part {part!r}")
                choices.append([p])
        hosts.extend("".join(c) for c in itertools.product(*choices))
    return hosts


def hostnames(nodelist: str, use_scontrol: bool = True) -> List[str]:
    """Hosts of ``nodelist``: ``scontrol show hostnames`` when available, else :func:`expand_nodelist`."""
    if use_scontrol and shutil.which("scontrol"):
        try:
            res = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                                 capture_output=True, text=True, timeout=30)
            hosts = res.stdout.split()
            if hosts:
                return hosts
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_nodelist(nodelist)


# -------------------------------------------------------------- env -> torchrun
@dataclass(frozen=True)
class SlurmRendezvous:
    nnodes: int
    node_rank: int
    nproc_per_node: int
    master_addr: str
    port: int
    rdzv_id: str
    hosts: tuple

    @property
    def endpoint(self) -> str:
        return f"{self.master_addr}:{self.port}"

    @property
    def is_host(self) -> bool:
        return self.node_rank == 0


def _first(env: Mapping[str, str], names: Sequence[str]) -> Optional[str]:
    for n in names:
        v = env.get(n)
        if v is not None and str(v).strip() != "":
            return str(v).strip()
    return None


def _int(env: Mapping[str, str], names: Sequence[str], what: str) -> int:
    v = _first(env, names)
    if v is None:
        raise SlurmEnvError(f"{what}: none of {', '.join(names)} is set "
                            "(run inside an sbatch/salloc allocation, under srun)")
    try:
        return int(v)
    except ValueError:
        raise SlurmEnvError(f"{what}: {names[0]}={v!r} is not an integer") from None


def gpus_per_node(env: Mapping[str, str]) -> Optional[int]:
    """GPUs SLURM gave this node: SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE (``8``, ``h100:8``)."""
    v = _first(env, ["SLURM_GPUS_ON_NODE"])
    if v is not None:
        if not v.isdigit():
            raise SlurmEnvError(f"SLURM_GPUS_ON_NODE={v!r} is not an integer")
        return int(v)
    v = _first(env, ["SLURM_GPUS_PER_NODE"])
    if v is not None:
        # "8", "h100:8", or a per-type list "a100:4,h100:4" -> total
        total = 0
        for item in v.split(","):
            m = re.fullmatch(r"(?:[\w.-]+:)*(\d+)(?:\(.*\))?", item.strip())
            if not m:
                raise SlurmEnvError(f"SLURM_GPUS_PER_NODE={v!r}: cannot read a GPU count")
            total += int(m.group(1))
        return total
    return None


def slurm_rendezvous(env: Optional[Mapping[str, str]] = None, nproc_per_node: Optional[int] = None,
                     port: Optional[int] = None, use_scontrol: bool = True) -> SlurmRendezvous:
    """Read the rendezvous parameters of this node from a SLURM environment."""
    env = os.environ if env is None else env
    nnodes = _int(env, ["SLURM_JOB_NUM_NODES", "SLURM_NNODES"], "number of nodes")
    node_rank = _int(env, ["SLURM_NODEID"], "node rank")
    job_id = _int(env, ["SLURM_JOB_ID", "SLURM_JOBID"], "job id")
    nodelist = _first(env, ["SLURM_JOB_NODELIST", "SLURM_NODELIST"])
    if nodelist is None:
        raise SlurmEnvError("node list: neither SLURM_JOB_NODELIST nor SLURM_NODELIST is set")
    hosts = hostnames(nodelist, use_scontrol=use_scontrol)
    if len(hosts) != nnodes:
        raise SlurmEnvError(f"SLURM_JOB_NODELIST={nodelist!r} expands to {len(hosts)} hosts "
                            f"but the job has {nnodes} nodes")
    if not 0 <= node_rank < nnodes:
        raise SlurmEnvError(f"SLURM_NODEID={node_rank} outside [0, {nnodes})")
    if nproc_per_node is None:
        nproc_per_node = gpus_per_node(env) or 1
    if nproc_per_node < 1:
        raise SlurmEnvError(f"processes per node must be >= 1, got {nproc_per_node}")
    if port is None:
        mp = _first(env, ["MASTER_PORT"])
        if mp is not None:
            if not mp.isdigit():
                raise SlurmEnvError(f"MASTER_PORT={mp!r} is not a port number")
            port = int(mp)
        else:
            port = DEFAULT_PORT_BASE + job_id % 1000
    if not 0 < port < 65536:
        raise SlurmEnvError(f"rendezvous port {port} outside 1..65535")
    rdzv_id = str(job_id)
    restarts = _first(env, ["SLURM_RESTART_COUNT"])
    if restarts not in (None, "0"):
        rdzv_id = f"{job_id}_{restarts}"  # a requeued job must not meet its old rendezvous
    return SlurmRendezvous(nnodes=nnodes, node_rank=node_rank, nproc_per_node=nproc_per_node,
                           master_addr=hosts[0], port=port, rdzv_id=rdzv_id, hosts=tuple(hosts))


def torchrun_args(r: SlurmRendezvous) -> List[str]:
    """torchrun flags for one node of the job (c10d rendezvous hosted on the first node)."""
    return [
        f"--nnodes={r.nnodes}",
        f"--nproc-per-node={r.nproc_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={r.endpoint}",
        f"--rdzv-id={r.rdzv_id}",
        f"--rdzv-conf=is_host={1 if r.is_host else 0}",
    ]

"""Run a function on R gloo ranks inside a test.

Rendezvous through a temporary file store (no ports at all, so parallel test
runs cannot collide). Each rank's return value is saved with torch.save and
handed back to the test in rank order. Worker functions must be importable by
name (module-level functions in a test module or helper module).
"""
from __future__ import annotations

import faulthandler
import gc
import os
import tempfile
import traceback
from typing import Any, Callable, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn: Callable, world_size: int, workdir: str, args: tuple) -> None:
    faulthandler.enable(all_threads=True)  # a native crash (abort, segfault) prints every thread's Python stack
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist.init_process_group(
        "gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=world_size
    )
    try:
        out = fn(rank, world_size, *args)
        torch.save(out, f"{workdir}/result{rank}.pt")
    except BaseException:
        with open(f"{workdir}/error{rank}.txt", "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        gc.collect()  # as trainer.train.main: objects in cycles that hold the group go first
        dist.destroy_process_group()


def run_world(fn: Callable, world_size: int, *args: Any) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes; return results by rank."""
    with tempfile.TemporaryDirectory() as workdir:
        try:
            mp.spawn(_entry, args=(fn, world_size, workdir, args), nprocs=world_size, join=True)
        except Exception as e:
            errors = [
                open(os.path.join(workdir, n)).read()
                for n in sorted(os.listdir(workdir))
                if n.startswith("error")
            ]
            raise RuntimeError("distributed worker failed:\n" + "\n".join(errors)) from e
        return [torch.load(f"{workdir}/result{r}.pt", weights_only=False) for r in range(world_size)]

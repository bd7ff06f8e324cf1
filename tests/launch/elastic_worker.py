"""``python -m tests.launch.elastic_worker CONFIG [k=v ...]``: trainer.train, instrumented for
the elastic end-to-end test (tests/launch/test_elastic_scale.py).

* Every rank writes its classifier rows as loaded to ``$UNPG_IDS_DIR/head-<start step>-<rank>.pt``
  and appends one line per micro-batch it trains on to ``$UNPG_IDS_DIR/ids-<pid>``:
  ``attempt-start-step step epoch world accum image-indices...`` (the torch loader's plan).
* ``$UNPG_NODE_FAULT_STEP`` (set on one node only): on the first attempt its ranks stop
  before that step and write ``$UNPG_FAULT_DIR/node-ready``; the test then kills the node.
* ``$UNPG_NODE_PAUSE_STEP`` (set on one node only): on the first attempt its ranks wait before
  that step, rank-local ``$UNPG_FAULT_DIR/node-paused`` written, until a preemption signal arrives
  (the test sends SIGTERM to that node's launcher), then go on: the group saves at the next step.
* ``$UNPG_GROW_STEP``: at that step, while the world is smaller than 4, rank 0 writes
  ``$UNPG_FAULT_DIR/grow-ready`` and every rank waits for torchrun's SIGTERM (a node joined and
  the agents restart the group), so the test's third node joins while the job still runs.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def _install() -> None:
    from trainer import loop

    ids = Path(os.environ["UNPG_IDS_DIR"]) / f"ids-{os.getpid()}"
    fault = Path(os.environ["UNPG_FAULT_DIR"])
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # of this node's agent
    node_fault = int(os.environ.get("UNPG_NODE_FAULT_STEP", "0") or 0)
    grow = int(os.environ.get("UNPG_GROW_STEP", "0") or 0)
    pause = int(os.environ.get("UNPG_NODE_PAUSE_STEP", "0") or 0)
    one_step, next_batch = loop.Trainer._one_step, loop.Trainer._next_batch

    def write(name: str) -> None:
        tmp = fault / f"{name}.{os.getpid()}.tmp"
        tmp.write_text(str(os.getpid()))
        tmp.replace(fault / name)

    def step(self):
        if not hasattr(self, "_attempt_start"):
            self._attempt_start = self.step  # the step this process resumed at
            import torch  # the classifier rows this rank holds after the resume

            torch.save({"class_range": tuple(self.head.class_range), "weight": self.head.weight.detach().cpu()},
                       ids.parent / f"head-{self.step}-{self.d.rank}.pt")
        if node_fault and restart == "0" and self.step == node_fault:
            write("node-ready")
            while True:  # until the test kills this node
                time.sleep(0.2)
        if pause and restart == "0" and self.step == pause:
            write("node-paused")
            deadline = time.monotonic() + 120
            while not self.preempt.requested and time.monotonic() < deadline:
                time.sleep(0.1)
        if grow and self.step == grow and self.d.world_size < 4:
            if self.d.rank == 0:
                write("grow-ready")
            deadline = time.monotonic() + 120
            while not self.preempt.requested and time.monotonic() < deadline:
                time.sleep(0.1)
        return one_step(self)

    def batch(self):
        out = next_batch(self)
        p = self.state
        idx = self.loader.epoch_plan(p.epoch)[0][p.batch - 1]  # the micro-batch just served
        with open(ids, "a") as f:
            f.write(f"{self._attempt_start} {self.step + 1} {p.epoch} {self.d.world_size} {self.accum} "
                    f"{' '.join(map(str, idx.tolist()))}\n")
        return out

    loop.Trainer._one_step, loop.Trainer._next_batch = step, batch


def main() -> int:
    _install()
    from trainer.train import main as train_main

    return train_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())

"""``python -m tests.launch.fault_worker CONFIG [k=v ...]``: trainer.train with a stop sign.

For the kill -9 test only. On the first attempt (TORCHELASTIC_RESTART_COUNT=0), rank
$UNPG_FAULT_RANK finishes $UNPG_FAULT_STEP optimizer steps, writes its pid to
$UNPG_FAULT_DIR/ready and waits there; the test then kills it with SIGKILL from outside,
so the failure lands at a known step instead of at a random time. After torchrun's restart
nothing is patched: the run continues as a normal ``python -m trainer.train``.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def _install() -> None:
    from trainer import loop

    step = int(os.environ["UNPG_FAULT_STEP"])
    rank = int(os.environ.get("UNPG_FAULT_RANK", "1"))
    where = Path(os.environ["UNPG_FAULT_DIR"])
    original = loop.Trainer._one_step

    def one_step(self):
        if self.step == step and self.d.rank == rank:
            tmp = where / f"ready.{os.getpid()}.tmp"
            tmp.write_text(str(os.getpid()))
            tmp.rename(where / "ready")
            while True:  # until the test's SIGKILL
                time.sleep(0.5)
        return original(self)

    loop.Trainer._one_step = one_step


def main() -> int:
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        _install()
    from trainer.train import main as train_main

    return train_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())

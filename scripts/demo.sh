#!/usr/bin/env bash
# The README's main command (make demo). Until the trainer lands: the head's own demo.
set -euo pipefail
cd "$(dirname "$0")/.."
OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc_per_node=2 -m trainer.heads.demo "$@"

#!/usr/bin/env bash
# CI's GPU-path dry run: scripts/device_check.sh --dry-run (tiny sizes, CPU, meta-device checks)
# in a second venv shaped like the GPU machine's software: only the packages it has (no
# simplejpeg, DALI, DeepSpeed, mxnet). Usage: bash scripts/device_dryrun.sh [OUT]
# Python 3.11 (3.12 has no local CPU torch wheel here; numpy 2.5 needs 3.12, so 2.4.x);
# the pinned torch 2.13.0 CPU wheel stands in for the device's CUDA torch 2.11.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-device_dryrun_out}
VENV=${DEVICE_VENV:-.venv-device}
if [[ ! -f "$VENV/.installed" ]]; then
  rm -rf "$VENV"
  "${PYTHON:-python3.11}" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"   # first and pinned: nothing pulls a CUDA torch
  "$VENV/bin/python" -m pip install -q -r requirements-device.txt
  "$VENV/bin/python" -c 'import torch; assert torch.__version__.startswith("2.13.0"), torch.__version__'
  touch "$VENV/.installed"
fi
for m in simplejpeg nvidia.dali deepspeed mxnet; do  # the device has none of them
  if "$VENV/bin/python" -c "import $m" 2>/dev/null; then echo "$VENV has $m: not the device's set" >&2; exit 1; fi
done
rm -rf "$OUT"
OMP_NUM_THREADS=1 PYTHON="$VENV/bin/python" bash scripts/device_check.sh "$OUT" --dry-run

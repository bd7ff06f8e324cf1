#!/usr/bin/env bash
# Creates .venv in the checkout and installs requirements; idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
# torch first, pinned, so no other package can pull a different (CUDA) build.
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -r requirements.txt -r requirements-dev.txt
# DeepSpeed (optional engine: `engine: deepspeed`). It ships as an sdist; with
# pip's build isolation the build env can pull ANOTHER torch, so build against
# the pinned one already installed. DS_SKIP_CUDA_CHECK lets it build on CPU.
.venv/bin/python -m pip install -q setuptools wheel packaging
DS_SKIP_CUDA_CHECK=1 .venv/bin/python -m pip install -q --no-build-isolation "deepspeed==0.19.8"
# The project itself, editable, without dependencies (requirements.txt pinned them).
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
.venv/bin/python - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"torch {torch.__version__} replaced the pinned 2.13.0"
PY
touch .venv/.installed

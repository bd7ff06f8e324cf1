#!/usr/bin/env bash
# The one command for a CUDA machine: bash scripts/gpu_check.sh OUT_DIR [WHEELS_DIR] [--quick]
# Uses the python and torch already there; installs nothing from the network and never
# touches torch. WHEELS_DIR: optional wheels of small missing packages (pyyaml, tqdm, ...),
# installed --no-index --no-deps into a temporary folder put on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR [WHEELS_DIR] [--quick]}
WHEELS=${2:-}
EXTRA=()
if [[ "$WHEELS" == "--quick" ]]; then WHEELS=""; EXTRA+=(--quick); fi
if [[ "${3:-}" == "--quick" ]]; then EXTRA+=(--quick); fi
PY=${PYTHON:-python3}
if [[ -x .venv/bin/python && -z "${PYTHON:-}" ]]; then PY=.venv/bin/python; fi
if [[ -n "$WHEELS" && -d "$WHEELS" ]] && compgen -G "$WHEELS/*.whl" >/dev/null; then
  SITE=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m bench.gpu_check --out "$OUT" "${EXTRA[@]}"

#!/usr/bin/env bash
# The device check: bash scripts/device_check.sh OUT [--dry-run]
# Runs bench/gpu_check.py's stages one process each, each capped with `timeout`, so a hung or
# failed stage loses only itself; OUT/results.json and results.md are rewritten after every row.
# Python: $PYTHON if set, else python3 on PATH (a .venv in the checkout is NOT used unless
# PYTHON points at it); printed first. Installs nothing. Caps sum to < 8 min (one H100).
# OUT gets: results.json, results.md, log.txt, gpu-tests.xml (4 files, no folder).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${1:?usage: scripts/device_check.sh OUT [--dry-run]}
shift
PY=${PYTHON:-$(command -v python3)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/device_check.XXXXXX")
LOG="$OUT/log.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
echo "python: $PY ($("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)'))" | tee "$LOG"
START=$(date +%s)
# stage:seconds; data first (before any CUDA), compile rows last
for s in env:30 data:50 gpu_tests:75 peak:20 head:60 backbones:60 e2e:60 trainer:60 compile:55; do
  name=${s%%:*} cap=${s##*:}
  echo "== $name (timeout ${cap}s)" | tee -a "$LOG"
  timeout -k 5 "$cap" "$PY" -m bench.gpu_check --out "$OUT" --work "$WORK" --stage "$name" \
    --budget $((cap - 5)) "$@" >>"$LOG" 2>&1
  rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "   $name: exit $rc$([[ $rc -eq 124 || $rc -eq 137 ]] && echo ' (timed out)')" | tee -a "$LOG"
    "$PY" -c "import json,sys; from pathlib import Path; p=Path(sys.argv[1]); d=json.loads(p.read_text()) if p.is_file() else {}; d.setdefault(sys.argv[2], {})['exit'] = int(sys.argv[3]); p.write_text(json.dumps(d, indent=1))" \
      "$OUT/results.json" "$name" "$rc"
  fi
done
"$PY" -m bench.gpu_check --out "$OUT" --stage report "$@" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
echo "device check: $(($(date +%s) - START)) s; results in $OUT" | tee -a "$LOG"
rm -rf "$WORK"
exit "$rc"

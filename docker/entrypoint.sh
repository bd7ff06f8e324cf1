#!/bin/bash
# Entrypoint of the unpg-train image: apply the environment defaults (NCCL..., see
# launch/env_defaults.py; anything set with `docker run -e` / k8s `env:` wins), then
#   CONFIG.yaml [key=value ...]        -> python -m launch single -- CONFIG ... (all GPUs here)
#   single|multi|slurm|env ...         -> python -m launch ...
#   -m MODULE ...                      -> python -m MODULE ...   (e.g. -m data_tools synth ...)
#   anything else (torchrun, python, bash ...) -> run as given
set -euo pipefail

PY="${UNPG_PYTHON:-python}"

defaults="$("$PY" -m launch.env_defaults --export)"
eval "$defaults"

case "${1:-}" in
  "" | -h | --help | help)
    echo "unpg-train image: CONFIG.yaml [key=value ...] | single|multi|slurm|env ... | -m MODULE ... | COMMAND ..."
    exec "$PY" -m launch --help
    ;;
  single | multi | slurm | env)
    exec "$PY" -m launch "$@"
    ;;
  *.yaml | *.yml)
    exec "$PY" -m launch single -- "$@"
    ;;
  -m)
    exec "$PY" "$@"
    ;;
  *)
    exec "$@"
    ;;
esac

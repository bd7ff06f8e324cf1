#!/bin/bash
# Without Docker: does the image's Python dependency set resolve for its interpreter and
# platform (CPython 3.12, manylinux x86_64, Ubuntu 24.04)? pip --dry-run reads package
# metadata only (no multi-GB wheel downloads) and needs access to the package index.
# DeepSpeed is an sdist built in the image, so it is left out here.
#   bash docker/resolve_check.sh        # prints the resolved torch/CUDA/DALI packages
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${UNPG_PYTHON:-.venv/bin/python}"
arg() { sed -n "s/^ARG $1=//p" docker/Dockerfile; }
torch_v="$(arg TORCH_VERSION)"
dali_v="$(arg DALI_VERSION)"
dali_cuda="$(arg DALI_CUDA)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
grep -v '^nvidia-dali-cuda' requirements.txt > "$tmp/requirements-image.txt"
platforms=()
for v in $(seq 39 -1 17); do platforms+=(--platform "manylinux_2_${v}_x86_64"); done
"$PY" -m pip install --isolated --dry-run --ignore-installed --quiet --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 "${platforms[@]}" \
  --platform manylinux2014_x86_64 --target "$tmp/target" --report "$tmp/report.json" \
  "torch==${torch_v}" -r "$tmp/requirements-image.txt" "nvidia-dali-cuda${dali_cuda}==${dali_v}"
"$PY" - "$tmp/report.json" <<'PY'
import json, sys
pkgs = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.load(open(sys.argv[1]))["install"]}
print(f"resolved {len(pkgs)} packages for cp312 manylinux x86_64:")
for name in sorted(pkgs):
    if name.startswith(("torch", "triton", "cuda-", "nvidia-")):
        print(f"  {name}=={pkgs[name]}")
PY

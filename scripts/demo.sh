#!/usr/bin/env bash
# The README's main command (`make demo`): the whole pipeline on generated data.
#  1. data_tools synth: a synthetic face-like set (train.rec/.idx/property) plus a
#     val.bin of held-out identities;
#  2. torchrun, 2 CPU processes (gloo): tiny CNN + Partial FC (class centres sharded
#     over the 2 ranks) + UNPG, a few minutes (configs/synth_demo.yaml);
#  3. verification accuracy on the held-out identities before and after training,
#     TensorBoard logs and model.pt in demo_out/run.
# Extra arguments are config overrides, e.g. `bash scripts/demo.sh run.max_steps=100`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${DEMO_OUT:-demo_out}
export OMP_NUM_THREADS=1
START=$(date +%s)

if [[ ! -f "$OUT/synth/train.rec" || ! -f "$OUT/synth/val.bin" ]]; then
  echo "== 1/3 generating the synthetic dataset in $OUT/synth"
  "$PY" -m data_tools synth --out "$OUT/synth" --identities 200 --images-per-identity 20 \
      --seed 0 --label-noise 0.02 --val-identities 50 --val-pairs 600
else
  echo "== 1/3 reusing $OUT/synth"
fi

echo "== 2/3 training UNPG + Partial FC on 2 CPU processes (torchrun, gloo)"
rm -rf "$OUT/run"   # a fresh run each time (resume: auto would continue the old one)
"$PY" -m torch.distributed.run --standalone --nproc_per_node=2 \
    -m trainer.train configs/synth_demo.yaml "run.output=$OUT/run" "data.train_dir=$OUT/synth" "$@"

echo "== 3/3 result"
"$PY" - "$OUT/run" <<'PY'
import json, sys
run = sys.argv[1]
s = json.load(open(f"{run}/summary.json"))
first, last = s["val"][0], s["val"][-1]
for name in last["acc"]:
    print(f"held-out verification accuracy ({name}.bin): untrained {first['acc'][name]:.4f} "
          f"(step {first['step']}) -> trained {last['acc'][name]:.4f} (step {last['step']})")
print(f"final loss {s['history'][-1]['loss']:.3f} (first step {s['history'][0]['loss']:.3f})")
print(f"model: {run}/model.pt   TensorBoard: tensorboard --logdir {run}/tensorboard")
PY
echo "demo took $(( $(date +%s) - START )) s"

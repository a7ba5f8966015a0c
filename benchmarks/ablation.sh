#!/usr/bin/env bash
# The cross-image ablation of docs/RESULTS.md: the tiny recipe with each `model.cross_image` variant, the same
# data, seed and (short) budget, in two lanes of one thread each, then `prima eval` on the first LIMIT test
# samples and one `prima compare` table (runs/eval/ablation.md).
#
#   bash benchmarks/ablation.sh [STEPS=800] [LIMIT=200]   # the run of docs/RESULTS.md
#
# Needs the tiny recipe's data (configs/tiny.yaml comments) and shares its feature cache.
set -euo pipefail
STEPS=${1:-800}
LIMIT=${2:-200}
PRIMA=${PRIMA:-.venv/bin/prima}
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1

one() {  # train and evaluate one variant
  local v=$1
  local run=runs/ablation-$v
  if [ ! -f "$run/final/model.safetensors" ]; then
    $PRIMA train --config "configs/ablations/$v.yaml" --out "$run" train.max_steps="$STEPS" \
      train.val_every="$STEPS" train.save_every="$STEPS" train.val_generate=16 train.progress_bar=false \
      data.prefill_cache=false
  fi
  $PRIMA eval --checkpoint "$run/final" --data data/synth/test/samples.jsonl --limit "$LIMIT" --batch-size 8 \
    --out "runs/eval/ablation-$v"
}

lane() { for v in "$@"; do one "$v" > "runs/ablation-$v.log" 2>&1; done; }

start=$(date +%s)
lane concat none &              # concat reads 64 tokens per image: about twice a square step
lane square projection pooling &
wait
$PRIMA compare runs/eval/ablation-{square,projection,pooling,concat,none} --out runs/eval/ablation.md
echo "ablation: $(( ($(date +%s) - start) / 60 )) min"

#!/usr/bin/env bash
# The cross-image ablation of docs/RESULTS.md: both stages of the tiny recipe (configs/tiny.yaml, then
# configs/tiny-masks.yaml) with each `model.cross_image` variant, the same data, seed and budget, one variant after
# the other as two processes of one thread each; then `prima eval` on the seed-2 test split and one
# `prima compare` table (runs/eval/ablation.md), mIoU by question family (runs/eval/ablation-families.md) and over the
# cross-image families against the rest (benchmarks/family_split.py; runs/eval/ablation-split.md).
#
#   [SEED=0] bash benchmarks/ablation.sh [STEPS1=2800] [STEPS2=2500] [VARIANTS="square none projection pooling concat"]
#
# STEPS1 / STEPS2 are the two stages' step counts (the recipe's were 5,600 and 5,000 when docs/RESULTS.md's ablation
# ran; 4,200 and 3,000 since session 40); the first stage's blind phase (`model.images_from_step`, 1,000 of those
# 5,600) and the validation / save intervals shrink in proportion, so a shorter budget is that schedule compressed,
# not cut off. Stage 2 runs at the rate the ablation ran at, 2e-3 (the recipe's is 1e-3 since session 39), so the
# commands of docs/RESULTS.md train what they trained then. A variant whose stage-2 model exists is
# only evaluated again. Each stage's wall time goes to runs/ablation-<v>.time. SEED (`train.seed` of both stages:
# initial weights and sample order; the recipe's is 0) other than 0 draws the runs again, as runs/ablation-<v>-seed<SEED>
# and runs/eval/ablation-seed<SEED>*.md. Needs the recipe's data
# (configs/tiny.yaml comments) and shares its feature cache.
set -euo pipefail
STEPS1=${1:-2800}
STEPS2=${2:-2500}
VARIANTS=${3:-square none projection pooling concat}
PRIMA=${PRIMA:-.venv/bin/prima}
TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}
SEED=${SEED:-0}
suffix=$([ "$SEED" = 0 ] || echo "-seed$SEED")
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1

blind=$(( 1000 * STEPS1 / 5600 ))
stage1="train.seed=$SEED train.max_steps=$STEPS1 train.val_every=$(( STEPS1 / 4 )) train.save_every=$(( STEPS1 / 4 ))"
stage1="$stage1 model.images_from_step=$blind"
stage2="train.seed=$SEED train.max_steps=$STEPS2 train.val_every=$(( STEPS2 / 4 )) train.save_every=$(( STEPS2 / 4 ))"
stage2="$stage2 train.lr=2e-3"

timed() {  # timed LABEL FILE COMMAND...: run, appending "LABEL SECONDS" to FILE
  local label=$1 file=$2 start
  shift 2
  start=$(date +%s)
  "$@"
  echo "$label $(( $(date +%s) - start ))" >> "$file"
}

for v in $VARIANTS; do
  run=runs/ablation-$v$suffix
  if [ ! -f "$run-pc/final/model.safetensors" ]; then
    rm -f "$run.time"
    # shellcheck disable=SC2086  # the step overrides are words
    timed stage1 "$run.time" $TORCHRUN --standalone --nproc_per_node 2 -m prima train \
      --config "configs/ablations/$v.yaml" --out "$run" train.progress_bar=false $stage1 > "$run.log" 2>&1
    # shellcheck disable=SC2086
    timed stage2 "$run.time" $TORCHRUN --standalone --nproc_per_node 2 -m prima train \
      --config configs/tiny-masks.yaml --out "$run-pc" train.init_from="$run/final" model.cross_image="$v" \
      train.progress_bar=false $stage2 > "$run-pc.log" 2>&1
  fi
  $PRIMA eval --checkpoint "$run-pc/final" --data data/synth/test/samples.jsonl --batch-size 8 \
    --out "runs/eval/ablation-$v$suffix" > "runs/eval/ablation-$v$suffix.log" 2>&1
  echo "$v: $(tr '\n' ' ' < "$run.time")s; $(grep -m1 -i miou "runs/eval/ablation-$v$suffix/report.md" || true)"
done
evals=$(for v in $VARIANTS; do echo "runs/eval/ablation-$v$suffix"; done)
# shellcheck disable=SC2086  # one word per run
$PRIMA compare $evals --out runs/eval/ablation$suffix.md
# shellcheck disable=SC2086
$PRIMA compare $evals --by family --out runs/eval/ablation$suffix-families.md
# shellcheck disable=SC2086
${PYTHON:-.venv/bin/python} benchmarks/family_split.py $evals | tee runs/eval/ablation$suffix-split.md
cat runs/eval/ablation$suffix.md runs/eval/ablation$suffix-families.md

#!/usr/bin/env bash
# docs/results.md "BLIP3-o's recipe on the ImageNet photos": BLIP3-o's recipe (the pure head:
# cross-attention only, v-prediction, the plain velocity loss, logit-normal(0, 1) times) on the
# 8 x 8 photo shards of experiments/imagenet.sh for EPOCHS epochs (default 100: ten times the
# trainer's default budget), the held-out curve at every sixth of the run on every held-out photo
# in OUT/run/metrics.jsonl, then the evaluator (DiT vs mean vs ridge, heun 20) in OUT/report.
# Flags after EPOCHS go to `eva-repro train` (the last value of a flag wins): the demo's photo
# views need --group_by so that every view of a held-out photo is held out.
#   experiments/blip3o_photos.sh [SHARDS] [OUT] [EPOCHS] [TRAIN FLAGS...]
set -euo pipefail
data=${1:-imagenet/in8/shards}
out=${2:-blip3o-photos}
epochs=${3:-100}
cli=${EVA_REPRO:-eva-repro}

# the quality benchmark's spacing: a sixth of the steps the trainer's 20% split leaves
samples=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['num_samples'])" \
    "$data/manifest.json")
steps=$((epochs * ((samples * 8 / 10 + 7) / 8)))
$cli train --data_dir "$data" --output_dir "$out/run" --model_size tiny --eval_fraction 0.2 \
    --num_epochs "$epochs" --eval_every $((steps / 6)) --eval_samples 100000 \
    --model_variant blip3o --loss_weight velocity --time_mean 0 --time_std 1 \
    --num_workers 0 --no_progress "${@:4}"
$cli evaluate --model_path "$out/run" --embeddings_dir "$data" --output_dir "$out/report" \
    --steps 20 --sweep none --no_progress

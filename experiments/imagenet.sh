#!/usr/bin/env bash
# docs/results.md "Real photos through the trainer": the 783 ImageNet photos through the
# full-depth, randomly initialised EVA02-L-14 (target) and ViT-L-14 (condition) at 16 x 16 and 8 x 8 tokens,
# then the trainer with its defaults (tiny preset, batch 8, 10 epochs, 20% held out) and the
# evaluator (DiT vs mean vs ridge on every held-out photo); at 8 x 8 also the same run without the
# condition whitening (docs/model.md, `cond_whiten`), in run-nowhiten/ and report-nowhiten/.
#   experiments/imagenet.sh [IMAGES] [OUT]
set -euo pipefail
images=${1:-../shared/data/imagenet-sample}
out=${2:-imagenet}
cli=${EVA_REPRO:-eva-repro}

for grid in 8 16; do
    $cli extract "$images" --output_dir "$out/in$grid/shards" --grid "$grid" \
        --eva_weights random --clip_weights random --shard_size 128 --no_progress
    $cli train --data_dir "$out/in$grid/shards" --output_dir "$out/in$grid/run" \
        --model_size tiny --eval_fraction 0.2 --num_workers 0 --no_progress
    $cli evaluate --model_path "$out/in$grid/run" --embeddings_dir "$out/in$grid/shards" \
        --output_dir "$out/in$grid/report" --steps 20 --sweep none --no_progress
done
$cli train --data_dir "$out/in8/shards" --output_dir "$out/in8/run-nowhiten" \
    --model_size tiny --eval_fraction 0.2 --num_workers 0 --no_progress \
    --model_override cond_whiten=null
$cli evaluate --model_path "$out/in8/run-nowhiten" --embeddings_dir "$out/in8/shards" \
    --output_dir "$out/in8/report-nowhiten" --steps 20 --sweep none --no_progress

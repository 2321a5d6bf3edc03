#!/usr/bin/env bash
# docs/results.md "The synthetic families through the trainer": each synthetic family through
# `eva-repro train` + `evaluate` with the defaults (tiny preset, batch 16, 20% held out by key hash, heun 20 steps), the held-out
# curve at each quarter of the run in run/metrics.jsonl, DiT vs mean vs ridge in report/.
#   experiments/learning.sh [OUT]        (1 CPU thread per run)
set -euo pipefail
out=${1:-learning}
cli=${EVA_REPRO:-eva-repro}

family() {  # NAME STEPS SYNTH-FLAGS...
    local name=$1 steps=$2
    shift 2
    $cli synth --output_dir "$out/$name/shards" --dtype float32 "$@"
    $cli train --data_dir "$out/$name/shards" --output_dir "$out/$name/run" --model_size tiny \
        --batch_size 16 --max_steps "$steps" --eval_fraction 0.2 --eval_every $((steps / 4)) \
        --num_workers 0 --no_progress
    $cli evaluate --model_path "$out/$name/run" --embeddings_dir "$out/$name/shards" \
        --output_dir "$out/$name/report" --steps 20 --sweep none --no_progress
}

family synth-48-96 300 --num_samples 600 --grid 6 --clip_dim 48 --eva_dim 96 --seed 7
family synth-64-128-gain3 300 --num_samples 800 --clip_dim 64 --eva_dim 128 --seed 11 --gain 3
family synth-1024-1024 300 --num_samples 600 --grid 8 --clip_dim 1024 --eva_dim 1024 --seed 1
family synth-1024-4096 400 --num_samples 400 --clip_dim 1024 --eva_dim 4096 --seed 2

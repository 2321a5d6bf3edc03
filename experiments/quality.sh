#!/usr/bin/env bash
# docs/results.md "The quality benchmark": every synthetic family for the defaults and for
# BLIP3-o's own recipe, JSON + PNG of the held-out curves with steps and seconds to each baseline.
#   experiments/quality.sh [OUT] [SHARD_DIR...]   (add real photos as shard directories)
set -euo pipefail
out=${1:-bench_results}
shift || true
cli=${EVA_REPRO:-eva-repro}
data=()
for d in "$@"; do data+=(--data "$d"); done
$cli bench --suite quality --output_dir "$out" "${data[@]}"

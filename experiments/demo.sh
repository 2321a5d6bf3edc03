#!/usr/bin/env bash
# docs/results.md "The demo": the full demo and its --quick form, each twice (the second run
# reuses everything), timed with /usr/bin/time -v where it exists; report in OUT/*/report/.
#   experiments/demo.sh [OUT]     
set -euo pipefail
out=${1:-demo_results}
cli=${EVA_REPRO:-eva-repro}
timer=()
if [ -x /usr/bin/time ]; then timer=(/usr/bin/time -v); fi

for run in 1 2; do
    "${timer[@]}" $cli demo --output_dir "$out/demo_200"
    "${timer[@]}" $cli demo --quick --output_dir "$out/demo_quick"
done

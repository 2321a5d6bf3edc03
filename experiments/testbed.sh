#!/usr/bin/env bash
# docs/testbed.md: the bug zoo and the reference cards at the quick budget (CPU, one thread each),
# and the default head's zoo (what its score depends on). Writes zoo.json / zoo.md per table
# under OUT and copies them to experiments/results/testbed/.
#   experiments/testbed.sh [OUT] [BUDGET]   (quick: 5 to 6 minutes a correct card on a 2-core CPU)
set -euo pipefail
out=${1:-testbed}
budget=${2:-quick}
cli=${EVA_REPRO:-eva-repro}
here=$(cd "$(dirname "$0")" && pwd)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# the pure BLIP3-o head and each planted bug
$cli zoo --output_dir "$out/zoo" --budget "$budget" || true
# correct implementations by other hands: every one must pass
$cli zoo --output_dir "$out/references" --budget "$budget" \
    --reference next-dit --reference lumina-next \
    --reference "$here/../examples/plain_dit.py:build" \
    --reference "$here/../examples/diffusers_pixart.py:build" \
    --reference "$here/../examples/diffusers_sd3.py:build" || true
# the default head with the BLIP3-o parts broken one at a time
$cli zoo --output_dir "$out/default_head" --budget "$budget" --head eva-repro \
    --mutant correct --mutant cross_attention_dead --mutant rope_1d \
    --mutant t_ignored --mutant adaln_dropped || true


for table in zoo references default_head; do
    if [ -f "$out/$table/zoo.json" ]; then
        mkdir -p "$here/results/testbed"
        cp "$out/$table/zoo.json" "$here/results/testbed/$table.json"
        cp "$out/$table/zoo.md" "$here/results/testbed/$table.md"
    else
        echo "no $out/$table/zoo.json: that table did not run" >&2
    fi
done

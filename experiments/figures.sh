#!/usr/bin/env bash
# Every committed figure, redrawn from the committed summaries by report.py --plot (one style: report.finish).
#   bash experiments/figures.sh
set -euo pipefail
cd "$(dirname "$0")/.."
plot() { python report.py "$@" | sed 's/^/  /'; }
# the main job (demo.sh): its two runs' histograms and KT against training networks
plot results/demo/summary.json results/demo/summary_functional_perm.json --plot results/figures/demo
# scaling and research options at small data (experiments/run_results.sh)
plot results/runs/*/summary.json --plot results/figures/runs
# weight targets on the paper's recipe (experiments/paper_recipe.sh)
plot results/paper_recipe/runs/*/summary.json --plot results/figures/paper_recipe
# function inputs (experiments/function_inputs.sh): histograms of the 224-network runs, then KT against training
# networks of every first-seed run
plot results/function_inputs/runs/*_224/summary.json --plot results/figures/function_inputs
plot $(ls results/function_inputs/runs/*/summary.json | grep -v _seed) --plot results/figures/function_inputs --no_hist
# 50 to 2,000 networks on the reduced recipe (experiments/scaling/run_scaling.sh): first seeds, no histograms
plot $(ls results/scaling/runs/*/summary.json | grep -v _seed) --plot results/figures/scaling --no_hist
# the warm starts (experiments/warm_start.py, which draws the same figure itself), beside their JSONs
plot --plot results/warm_start --warm_start results/warm_start/warm_start.json
plot --plot results/warm_start/ten_networks --warm_start results/warm_start/ten_networks/warm_start.json
# cross-architecture translation (experiments/cross_arch.sh): one figure per target
python experiments/cross_arch_table.py --plot results/figures/cross_arch | sed 's/^/  /'

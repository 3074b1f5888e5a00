#!/usr/bin/env bash
# Weight-space objectives on data made with the paper's recipe (RESULTS.md, "Weight targets on the paper's
# recipe"): the embedded data/demo (256 training pairs, 100 validation networks with retrained small
# blocks, 10 + 10 epochs on 60,000 images per network). A run on training networks 0..N-1 picks its best
# epoch on the next 32 (--holdout_networks 32: held out from training), never on the validation networks.
# Sizes 64 and 224 training networks; 100 epochs of batch 64, evaluated every 10 epochs.
#
#   bash experiments/paper_recipe.sh QUEUE     # QUEUE = 1 or 2: two queues run side by side on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
OUT=results/paper_recipe
BASE="--device cpu --train_path data/demo/train --val_path data/demo/val --val_data_length 100
      --num_layers 4 --c_dim 64 --hidden_s_dim 128 --hidden_c_dim 256 --batch_size 64 --lr 1e-3
      --num_epochs 100 --log_step 10 --holdout_networks 32"
FUNCTIONAL="--loss functional --functional_images 32"

source experiments/train_run.sh
run() {  # run NAME N FLAGS...: one translator run on training networks 0..N-1 into $OUT/runs/NAME_N,
  local name=$1 n=$2; shift 2  # its best epoch picked on networks N..N+31
  train_run $OUT/runs/${name}_$n $BASE --train_data_length $n "$@"
}

if [ "${1:-1}" = 1 ]; then
  for n in 224 64; do run mse $n; run canon $n --canonical_targets; run hinv $n --hidden_invariant_loss; done
else
  for n in 224 64; do run perm $n --perm_aug; run perm_canon $n --perm_aug --canonical_targets
    run functional_perm $n $FUNCTIONAL --perm_aug; done
fi

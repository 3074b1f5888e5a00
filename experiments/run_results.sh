#!/usr/bin/env bash
# The runs behind RESULTS.md, on the embedded full-recipe data (data/demo: 256 training pairs,
# 100 validation networks with retrained small blocks). Each run is one train.py command; its
# train.log, metrics.csv and summary.json land in results/runs/<name>/.
#
#   bash experiments/run_results.sh QUEUE     # QUEUE = 1 or 2: two queues run side by side on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
BASE="--device cpu --train_path data/demo/train --val_path data/demo/val --val_data_length 100
      --num_layers 4 --c_dim 64 --hidden_s_dim 128 --hidden_c_dim 256 --batch_size 64 --lr 1e-3"

source experiments/train_run.sh
run() {  # run NAME FLAGS...: one train.py run into results/runs/NAME
  local name=$1; shift
  train_run results/runs/$name $BASE "$@"
}

if [ "${1:-1}" = 1 ]; then
  # the main job (256 pairs, 300 epochs): its printed table is quoted in README.md and RESULTS.md
  [ -f results/demo/table.md ] || bash demo.sh --update-results  # writes results/demo/demo_output.txt too
  # scaling with the number of training pairs (300 epochs each)
  for n in 25 64 128; do run pairs_$n --train_data_length $n --num_epochs 300 --log_step 100; done
  # translator epochs at 256 pairs
  run epochs_100 --train_data_length 256 --num_epochs 100 --log_step 50
  # --prob and --noise at 256 pairs, 100 epochs
  run prob0.1_t --train_data_length 256 --num_epochs 100 --log_step 50 --prob 0.1 --mask_target t
  run noise0.01_t --train_data_length 256 --num_epochs 100 --log_step 50 --noise 0.01 --noise_target t
else
  # research options (issue: KT at small data), 100 epochs, at 64 and 256 pairs
  for n in 64 256; do
    [ $n = 64 ] && run mse_$n --train_data_length $n --num_epochs 100 --log_step 50  # 256: epochs_100
    run perm_$n --train_data_length $n --num_epochs 100 --log_step 50 --perm_aug
    run hinv_$n --train_data_length $n --num_epochs 100 --log_step 50 --hidden_invariant_loss
    run functional_$n --train_data_length $n --num_epochs 100 --log_step 50 --loss functional --functional_images 32
    run functional_perm_$n --train_data_length $n --num_epochs 100 --log_step 50 --loss functional \
      --functional_images 32 --perm_aug
  done
fi

#!/usr/bin/env bash
# The default path's files of two checkouts, compared: generation in both layouts, K = 1 and 2, validation
# networks, and a tiny train.py run. Every change must leave them bit-identical.
#
#   git worktree add /tmp/before main
#   bash experiments/same_outputs.sh /tmp/before . /tmp/same_outputs
set -euo pipefail
BEFORE=$(cd "$1" && pwd) AFTER=$(cd "$2" && pwd) OUT=$3
export OMP_NUM_THREADS=1
C='--num_data 3 --num_epochs 1 --num_train_images 2000 --num_test_images 500 --device cpu --num_threads 1'
T='--device cpu --train_path data/demo/train --val_path data/demo/val --train_data_length 32 --val_data_length 10
   --num_layers 2 --c_dim 16 --hidden_s_dim 16 --hidden_c_dim 32 --batch_size 16 --num_epochs 4 --log_step 2
   --num_test_images 500'
for side in before after; do
  R=$OUT/$side; rm -rf "$R"; mkdir -p "$R"
  cd "$([ $side = before ] && echo "$BEFORE" || echo "$AFTER")"
  python construct_train.py $C --data_root "$R/train" 2>> "$R/stderr.txt"
  python construct_val.py $C --train_simple --data_root "$R/val" 2>> "$R/stderr.txt"
  python construct_train.py $C --layout original --data_root "$R/train_orig" 2>> "$R/stderr.txt"
  python construct_train.py $C --models_per_step 2 --data_root "$R/train_k2" 2>> "$R/stderr.txt"
  python train.py $T --ckpt_path "$R/ckpt" --log_path "$R/logs" > "$R/train_stdout.txt" 2>&1
done
cd "$AFTER"
python experiments/compare_roots.py "$OUT/before" "$OUT/after"

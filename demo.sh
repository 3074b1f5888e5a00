#!/usr/bin/env bash
# Knowledge Translation end to end on a CPU, in minutes.
#
#   bash demo.sh              # translator + table on the embedded full-recipe data in data/demo/
#   bash demo.sh --generate   # first make a small reduced-recipe dataset from scratch (about 10 more minutes)
#
# The embedded data (data/demo/, 10 MB) are 256 training pairs and 100 validation networks with
# retrained small blocks, made with the paper's recipe (10 + 10 epochs per network) on one GPU by:
#   python construct_val.py   --num_data 100 --train_simple --data_root data/demo/val
#   python construct_train.py --num_data 256 --data_root data/demo/train
# The translator here is small (4 Mixer layers, C 64) and sees only 256 pairs: the paper used
# 300,000 pairs and 24 layers. The table says plainly what it does at this scale.
set -euo pipefail
cd "$(dirname "$0")"
OUT=results/demo
TRAIN=data/demo/train
VAL=data/demo/val
NUM_TRAIN=256
NUM_VAL=100
if [ "${1:-}" = "--generate" ]; then
  # Reduced recipe (1 + 1 epochs per network) so that generation takes minutes, not hours.
  OUT=results/demo_generated
  TRAIN=data/demo_generated/train
  VAL=data/demo_generated/val
  NUM_TRAIN=32
  NUM_VAL=8
  echo "== generating $NUM_VAL validation networks and $NUM_TRAIN training pairs (1 + 1 epochs each)"
  python construct_val.py --num_data $NUM_VAL --train_simple --num_epochs 1 --data_root $VAL --device cpu
  python construct_train.py --num_data $NUM_TRAIN --num_epochs 1 --data_root $TRAIN --device cpu
fi
echo "== training a small translator (4 Mixer layers, C 64; the paper's: 24 layers, C 128) on $NUM_TRAIN pairs"
echo "   (the paper's: 300,000) for 300 epochs; scoring $NUM_VAL validation networks on 10,000 test images"
python train.py --device cpu --train_path $TRAIN --val_path $VAL --train_data_length $NUM_TRAIN \
  --val_data_length $NUM_VAL --num_layers 4 --c_dim 64 --hidden_s_dim 128 --hidden_c_dim 256 \
  --batch_size 64 --num_epochs 300 --log_step 100 --ckpt_path $OUT/ckpts --log_path $OUT/logs
SUMMARY=$(ls -t $(find $OUT/ckpts -name summary.json) | head -1)
cp "$SUMMARY" $OUT/summary.json
echo
echo "== results (test accuracy in % over the validation networks; also in $OUT/table.md)"
python report.py "$SUMMARY" --hist --out $OUT/table.md

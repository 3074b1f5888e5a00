#!/usr/bin/env bash
# Translator inputs that carry the function (train.py --inputs / --output) on the paper's recipe (data/demo),
# as experiments/paper_recipe.sh: objectives {faithful MSE, --loss functional --functional_images 32 --perm_aug}
# x inputs {conv, folded} x output {direct, residual, refit}, at 64 and 224 training networks, best epoch picked on
# the next 32 training networks (--holdout_networks 32), 100 epochs of batch 64, the same small Mixer.
# Each run's logs and summary.json go to $OUT/runs/<name>/; its best translator is kept in $OUT/ckpts/<name>.pth
# (ignored by git) for later reading. A finished run (summary.json present) is skipped: rerun to resume.
#
#   bash experiments/function_inputs.sh QUEUE     # QUEUE = 1 (MSE) or 2 (functional): side by side on 2 cores;
#                                                 # 3: functional + --ce_weight 1 (select runs with ONLY)
# A tiny check (minutes) into /tmp:
#   OUT=/tmp/fi SIZES=8 EXTRA="--num_epochs 2 --log_step 1 --num_test_images 200" bash experiments/function_inputs.sh 1
# Second translator seeds of the runs whose margin over a training-free rule is within 3 standard errors
# (runs <name>_seed1):
#   ONLY="$(python experiments/function_inputs_table.py --close)" SEED=1 bash experiments/function_inputs.sh 1
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
OUT=${OUT:-results/function_inputs}
SIZES=${SIZES:-224 64}
BASE="--device cpu --train_path data/demo/train --val_path data/demo/val --val_data_length 100
      --num_layers 4 --c_dim 64 --hidden_s_dim 128 --hidden_c_dim 256 --batch_size 64 --lr 1e-3
      --num_epochs 100 --log_step 10 --holdout_networks 32 ${EXTRA:-}"
FUNCTIONAL="--loss functional --functional_images 32 --perm_aug"
SEED=${SEED:-0}  # the translator's --seed; runs of another seed are named <name>_seed<SEED>
ONLY=${ONLY:-}  # when set, only these run names (of seed 0) are run

source experiments/train_run.sh
run() {  # run NAME N FLAGS...: one translator run on training networks 0..N-1 into $OUT/runs/NAME_N
  local name=$1_$2 n=$2; shift 2
  if [ -n "$ONLY" ] && [[ " $(echo $ONLY) " != *" $name "* ]]; then return; fi
  if [ "$SEED" != 0 ]; then name=${name}_seed$SEED; set -- "$@" --seed $SEED; fi
  train_run $OUT/runs/$name $BASE --train_data_length $n "$@"
  local best
  best=$(find "/tmp/kt_results/$OUT/runs/$name/ckpts" -name '[0-9]*.pth' 2>/dev/null | head -1)
  if [ -n "$best" ]; then  # the best translator (a plain state dict) and its metadata beside it
    mkdir -p $OUT/ckpts && cp "$best" $OUT/ckpts/$name.pth && cp "${best%.pth}.json" $OUT/ckpts/$name.json
  fi
}
variants() {  # variants OBJECTIVE FLAGS...: the six input/output combinations of one objective
  local objective=$1; shift
  run ${objective}_folded_refit $n "$@" --inputs folded --output refit
  run ${objective}_conv_refit $n "$@" --output refit
  run ${objective}_folded_residual $n "$@" --inputs folded --output residual
  run ${objective}_folded_direct $n "$@" --inputs folded
  run ${objective}_conv_residual $n "$@" --output residual
  run ${objective}_conv_direct $n "$@"  # the flags of paper_recipe.sh's runs: last, to keep its translator
}

for n in $SIZES; do
  case "${1:-1}" in
    1) variants mse ;;
    2) variants functional_perm $FUNCTIONAL ;;
    3) variants functional_ce_perm $FUNCTIONAL --ce_weight 1 ;;  # plus the cross-entropy through Last
  esac
done

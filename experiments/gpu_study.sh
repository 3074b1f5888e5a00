#!/usr/bin/env bash
# The science study's GPU part, a session of its own (BUDGET seconds, default 560; the GPU measurements of
# BENCHMARKS.md are speed/gpu_session.sh): paper-recipe pairs made on the GPU for GEN_SECONDS, then every objective
# on them with the best epoch picked on held-out training networks, and the identifiability of the paper's
# recipe (retrainings from fresh inits), logged and packed under $OUT as speed/gpu_session.sh does.
#
#   OUT=/tmp/out bash experiments/gpu_study.sh
# Dry run on a CPU at tiny sizes: DEVICE=cpu QUICK=1 OUT=/tmp/out bash experiments/gpu_study.sh
source "$(dirname "$0")/../speed/session_lib.sh"
PACKED="logs study_*.json study_tables.md identifiability.* study/*/*/*/*/train.log study/*/*/*/*/metrics.csv val/logs train/logs"

if [ "$QUICK" = 1 ]; then  # tiny sizes: a dry run of every command
  GEN="--num_epochs 1 --num_train_images 1280 --num_test_images 500"; NUM_VAL=8; GEN_SECONDS=60; HOLD=4
  STUDY="--num_epochs 4 --log_step 2 --batch_size 8 --num_test_images 500"
  IDENT="--num_networks 2 --num_inits 2 --num_epochs 1"
else
  GEN=""; NUM_VAL=100; GEN_SECONDS=${GEN_SECONDS:-150}; HOLD=64
  STUDY="--num_epochs 60 --log_step 5 --batch_size 1024 --num_test_images 10000"
  IDENT="--num_networks 24 --num_inits 3"
fi

machine
step construct_val 90 python construct_val.py --device "$DEVICE" --num_data "$NUM_VAL" --train_simple --data_root "$WORK/val" $GEN
step construct_train "$GEN_SECONDS" python construct_train.py --device "$DEVICE" --num_data 1000000 --data_root "$WORK/train" $GEN
MADE=$(python -c "import loader; print(len(shards.covered_indices('$WORK/train')))")
NUM_TRAIN=$(( MADE - HOLD ))
say "training pairs made: $MADE ($NUM_TRAIN for training, $HOLD held out for picking epochs)"
DATA="--device $DEVICE --train_path $WORK/train --val_path $WORK/val --val_data_length $NUM_VAL --train_data_length $NUM_TRAIN"

study() {  # study NAME FLAGS...: one objective, its summary kept as study_NAME.json
  local name=$1; shift
  step "study_$name" 60 python train.py $DATA --num_layers 4 --c_dim 64 --hidden_s_dim 128 --hidden_c_dim 256 \
    $STUDY --holdout_networks "$HOLD" --ckpt_path "$WORK/study/$name" --log_path "$WORK/study/$name" "$@"
  cp "$(find "$WORK/study/$name" -name summary.json | head -1)" "$WORK/study_$name.json" 2>/dev/null
}
study mse
study canon --canonical_targets
study hinv --hidden_invariant_loss
study perm --perm_aug
study functional_perm --loss functional --functional_images 32 --perm_aug
TRANSLATORS=$(find "$WORK/study" -name "[0-9]*.pth")  # none if every study step ran out of time
step identifiability 120 python experiments/identifiability.py --device "$DEVICE" --data_root "$WORK/val" $IDENT \
  ${TRANSLATORS:+--translators $TRANSLATORS} --out "$WORK/identifiability"
python report.py "$WORK"/study_*.json > "$WORK/study_tables.md" 2>&1
finish

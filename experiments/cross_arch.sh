#!/usr/bin/env bash
# Cross-architecture translation: the translator writes another small block of net.py than SimpleBlock_NoBn, from
# data/demo's large networks (256 training, 100 validation). In parts, each resumable (rerun to continue):
#   pairs      construct_train.py --small_block T --large_from data/demo/train (only the small-block phase), and
#              construct_val.py --small_block T --train_simple --large_from data/demo/val (the Retrained rows)
#   retrained  the construct_val.py half of pairs alone: T's blocks retrained in data/demo/val's 100 networks, the
#              first look's Retrained row (experiments/cross_arch_rows.py adds it to the first look's summaries)
#   universal  universal.py: the Universal block of the first N training networks, with and without --ce_weight 1
#              (SimpleBlock_NoBn's too: the original pair's tables get the row)
#   train      at N pairs, best epoch on the next HOLD (--holdout_networks): faithful MSE, functional --perm_aug,
#              functional --perm_aug --ce_weight 1; the small Mixer of function_inputs.sh
#   first      a first look that needs no pairs of T: the Universal blocks and both functional runs on data/demo's
#              networks, scored on data/demo/val (so no Retrained row), into runs <name>_demo_val
# AttnBlock's small-block phase costs about 8x the others': its pairs are only its first ATTN_TRAIN networks (its MSE
# run at ATTN_TRAIN - HOLD pairs); its functional runs and Universal block need no targets and read data/demo/train.
# Generated roots go to $DATA/<T>/{train,val} (about 2 MB per 100 networks; not committed: remade by this script);
# runs to $OUT/runs/<T>/<name>/ (summary.json, train.log, metrics.csv, command.txt).
#
#   bash experiments/cross_arch.sh PART [TARGET...]     # PART: pairs | retrained | universal | train | first | all
#   SEED=1 ONLY="mse functional_perm" bash experiments/cross_arch.sh train MLPBlock   # second seeds where close
# A tiny check (a minute) into /tmp, from tiny source roots of the same tiny recipe:
#   G="--num_epochs 1 --num_train_images 300 --num_test_images 200"
#   python construct_train.py $G --num_data 8 --data_root /tmp/ca/src_train
#   python construct_val.py $G --num_data 3 --data_root /tmp/ca/src_val
#   OUT=/tmp/ca/out DATA=/tmp/ca/data SRC_TRAIN=/tmp/ca/src_train SRC_VAL=/tmp/ca/src_val NUM_TRAIN=8 ATTN_TRAIN=5 \
#     NUM_VAL=3 N=4 HOLD=2 GEN_EXTRA="$G" UNI_EXTRA="--num_epochs 1" \
#     EXTRA="--num_epochs 1 --log_step 1 --num_test_images 200 --val_data_length 3" bash experiments/cross_arch.sh all
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
OUT=${OUT:-results/cross_arch}
DATA=${DATA:-data/cross_arch}
SRC_TRAIN=${SRC_TRAIN:-data/demo/train} SRC_VAL=${SRC_VAL:-data/demo/val}
NUM_TRAIN=${NUM_TRAIN:-256} ATTN_TRAIN=${ATTN_TRAIN:-96} NUM_VAL=${NUM_VAL:-100}
N=${N:-224} HOLD=${HOLD:-32}
SEED=${SEED:-0}  # the translator's --seed; runs of another seed are named <name>_seed<SEED>
ONLY=${ONLY:-}   # when set, only these run names
BASE="--device cpu --val_data_length 100 --num_layers 4 --c_dim 64 --hidden_s_dim 128 --hidden_c_dim 256
      --batch_size 64 --lr 1e-3 --num_epochs 100 --log_step 10 --holdout_networks $HOLD ${EXTRA:-}"
FUNCTIONAL="--loss functional --functional_images 32 --perm_aug"
PART=${1:-all}; shift || true
TARGETS=${*:-SimpleBlock MLPBlock AttnBlock}
source experiments/train_run.sh

num_train() { [ "$1" = AttnBlock ] && echo "$ATTN_TRAIN" || echo "$NUM_TRAIN"; }

GEN="--device cpu --num_threads 1 ${GEN_EXTRA:-}"

retrained() {  # retrained T: T's blocks retrained in data/demo/val's networks (generation resumes by itself)
  python construct_val.py $GEN --small_block "$1" --train_simple --large_from "$SRC_VAL" --num_data "$NUM_VAL" \
    --data_root "$DATA/$1/val"
}

pairs() {  # pairs T: the small blocks of T in data/demo's networks
  python construct_train.py $GEN --small_block "$1" --large_from "$SRC_TRAIN" --num_data "$(num_train "$1")" \
    --data_root "$DATA/$1/train"
  retrained "$1"
}

functional_train() {  # the training root of T's functional runs: its own pairs when they cover N + HOLD networks
  if [ "$1" = SimpleBlock_NoBn ] || [ "$(num_train "$1")" -lt $((N + HOLD)) ]; then echo "$SRC_TRAIN"
  else echo "$DATA/$1/train"; fi
}

universal_block() {  # universal_block T [ROOT]: its Universal blocks, without and with --ce_weight 1
  local t=$1 path=${2:-$(functional_train "$1")}
  for ce in 0 1; do
    local file="$path/universal/${t}_n${N}$([ $ce = 1 ] && echo _ce1).pt"
    [ -f "$file" ] && { echo "skip $file (done)"; continue; }
    python universal.py --train_path "$path" --train_data_length "$N" --small_block "$t" --ce_weight $ce \
      --device cpu ${UNI_EXTRA:-}
  done
}

run() {  # run T NAME TRAIN_PATH FLAGS...: one translator run into $OUT/runs/T/NAME (VAL: its validation root)
  local t=$1 name=$2 path=$3; shift 3
  if [ -n "$ONLY" ] && [[ " $(echo $ONLY) " != *" $name "* ]]; then return; fi
  if [ "$SEED" != 0 ]; then name=${name}_seed$SEED; set -- "$@" --seed $SEED; fi
  train_run "$OUT/runs/$t/$name" $BASE --train_path "$path" --val_path "${VAL:-$DATA/$t/val}" --small_block "$t" "$@"
}

first() {  # first T: the functional objectives and their Universal blocks from data/demo alone
  universal_block "$1" "$SRC_TRAIN"
  VAL=$SRC_VAL run "$1" functional_perm_demo_val "$SRC_TRAIN" --train_data_length "$N" $FUNCTIONAL
  VAL=$SRC_VAL run "$1" functional_ce_perm_demo_val "$SRC_TRAIN" --train_data_length "$N" $FUNCTIONAL --ce_weight 1
}

translators() {  # translators T: the faithful MSE (on T's pairs) and the functional objectives
  local t=$1 n=$N f; f=$(functional_train "$t")
  if [ "$(num_train "$t")" -lt $((N + HOLD)) ]; then n=$(($(num_train "$t") - HOLD)); fi
  run "$t" mse "$DATA/$t/train" --train_data_length "$n"
  run "$t" functional_perm "$f" --train_data_length "$N" $FUNCTIONAL
  run "$t" functional_ce_perm "$f" --train_data_length "$N" $FUNCTIONAL --ce_weight 1
}

for t in $TARGETS; do
  case "$PART" in
    pairs) pairs "$t" ;;
    retrained) retrained "$t" ;;
    universal) universal_block "$t" ;;
    train) translators "$t" ;;
    first) first "$t" ;;
    all) pairs "$t"; universal_block "$t"; translators "$t" ;;
    *) echo "unknown part $PART: pairs, retrained, universal, train, first or all" >&2; exit 2 ;;
  esac
done
if [ "$PART" = universal ] || [ "$PART" = first ] || [ "$PART" = all ]; then universal_block SimpleBlock_NoBn; fi

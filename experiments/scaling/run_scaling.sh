#!/usr/bin/env bash
# KT against the number of training networks, 50 -> 2,000, on a 2-core CPU (RESULTS.md, "Scaling
# to 2,000 networks"). The paper's recipe (10 + 10 epochs on 60,000 images per pair) costs about
# 2 minutes per pair here, so this study uses a reduced recipe: 1 + 1 epochs on the first 6,400
# training images (50 SGD steps per phase), everything else unchanged. 2,000 training pairs and 100
# validation networks (with retrained small blocks) go to data/scaling/ (not committed: regenerate
# with this script). Every translator run gets the same budget of 600 steps of batch 64 (epochs =
# ceil(600 / ceil(N / 64))) and is scored once, at its last epoch, on the first 2,000 test images.
# A second translator seed (all variants at 500 networks, the functional ones at every size) shows
# how much a result moves with the seed alone.
#
#   bash experiments/scaling/run_scaling.sh          # about 1 h 45 min on 2 cores; re-running skips what is done
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
OUT=results/scaling
GEN="--device cpu --num_threads 1 --models_per_step 1 --num_epochs 1 --num_train_images 6400
     --num_test_images 2000 --seed 0"
TRAIN="--device cpu --train_path data/scaling/train --val_path data/scaling/val --val_data_length 100
       --num_test_images 2000 --num_layers 4 --c_dim 64 --hidden_s_dim 128 --hidden_c_dim 256
       --batch_size 64 --lr 1e-3"
STEPS=600
TAG= SEED=  # run-name suffix and --seed flag of the second-seed runs
FUNCTIONAL="--loss functional --functional_images 32"
mkdir -p $OUT/logs $OUT/runs

gen() {  # gen KIND START NUM [FLAGS...]: one generation process (resumes by itself)
  local kind=$1 start=$2 num=$3; shift 3
  python construct_$kind.py $GEN --data_root data/scaling/$kind --start_index $start --num_data $num "$@" \
    >> $OUT/logs/gen_${kind}_$start.log 2>&1
}

source experiments/train_run.sh
PIDS=()
wait_all() {  # wait for the jobs in PIDS and fail if one failed (a bare wait returns 0 whatever they did)
  local pid status=0
  for pid in "${PIDS[@]}"; do wait "$pid" || status=1; done
  PIDS=()
  return $status
}
run() {  # run VARIANT N FLAGS...: one translator run into runs/VARIANT_N$TAG, 600 steps at N networks
  local n=$2 iters=$(( ($2 + 63) / 64 ))
  local epochs=$(( (STEPS + iters - 1) / iters ))
  train_run $OUT/runs/$1_$2$TAG $TRAIN --train_data_length $n --num_epochs $epochs --log_step $epochs $SEED "${@:3}"
}

variants() {  # variants N QUEUE: this queue's share of the five variants at N networks
  if [ "$2" = 1 ]; then
    run mse "$1"; run hinv "$1" --hidden_invariant_loss; run functional "$1" $FUNCTIONAL
  else
    run perm "$1" --perm_aug; run functional_perm "$1" $FUNCTIONAL --perm_aug
  fi
}

echo "$(date -u +%T) generation of the validation networks and pairs 0..499"
{ gen val 0 100 --train_simple; gen train 0 200; } & PIDS+=($!)
gen train 200 300 & PIDS+=($!)
wait_all
echo "$(date -u +%T) translators at 50, 150, 500 networks"
{ for n in 50 150 500; do variants $n 1; done; } & PIDS+=($!)
{ for n in 50 150 500; do variants $n 2; done; } & PIDS+=($!)
wait_all
echo "$(date -u +%T) generation of pairs 500..1999"
gen train 500 750 & PIDS+=($!)
gen train 1250 750 & PIDS+=($!)
wait_all
echo "$(date -u +%T) translators at 2,000 networks"
variants 2000 1 & PIDS+=($!)
variants 2000 2 & PIDS+=($!)
wait_all
echo "$(date -u +%T) a second translator seed at 500 networks"
TAG=_seed1 SEED="--seed 1"
variants 500 1 & PIDS+=($!)
variants 500 2 & PIDS+=($!)
wait_all
echo "$(date -u +%T) a second translator seed of the functional variants at 50, 150 and 2,000 networks"
{ for n in 50 150 2000; do run functional $n $FUNCTIONAL; done; } & PIDS+=($!)
{ for n in 50 150 2000; do run functional_perm $n $FUNCTIONAL --perm_aug; done; } & PIDS+=($!)
wait_all
echo "$(date -u +%T) done"

#!/usr/bin/env bash
# The one prepared GPU session (about 10 minutes on one H200): every GPU measurement and study of the
# repository in one command, each phase under its own time limit, everything logged under $OUT.
#
#   1. benchmarks: generation speed at several K, the translator step of the original README's command
#      (fp32, TF32, bf16, torch.compile; peak memory), evaluation of 100 networks on 10,000 test images;
#   2. a paper-recipe dataset: 100 validation networks with retrained small blocks, then as many training
#      pairs as GEN_SECONDS allow;
#   3. every GPU path of train.py once: torchrun with NCCL + --amp bf16 + --compile + --tf32, killed
#      mid-run and resumed with --resume; its evaluations score the 100 networks on 10,000 test images;
#   4. the science study on the pairs made: every objective with the best epoch picked on held-out
#      training networks, and the identifiability of the paper's recipe (retrainings from fresh inits).
#
#   OUT=/tmp/out bash experiments/gpu_session.sh
# Dry run on a CPU at tiny sizes (the same commands, minutes): DEVICE=cpu QUICK=1 OUT=/tmp/out bash experiments/gpu_session.sh
# At most 8 files come back from a device run: everything is packed into $OUT/session.tar.gz beside session.log.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
WORK=${WORK:-/tmp/kt_gpu}
mkdir -p "$OUT" "$WORK/logs"
LOG="$OUT/session.log"
say() { echo "== $(date +%T) $*" | tee -a "$LOG"; }
step() {  # step NAME SECONDS CMD...: run CMD under a time limit, its output in $WORK/logs/NAME.log
  local name=$1 limit=$2; shift 2
  say "$name (limit ${limit}s): $*"
  timeout -k 10 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1  # TERM first: torchrun passes it on to its workers
  local rc=$?
  tr '\r' '\n' < "$WORK/logs/$name.log" | tail -n 4 | tee -a "$LOG"
  say "$name: exit $rc"
}
killed() {  # killed NAME CMD...: start CMD, SIGKILL its whole process group once it has written a last.pth
  local name=$1 t=0; shift
  say "$name (SIGKILL once $WORK/ckpts holds a last.pth): $*"
  setsid "$@" > "$WORK/logs/$name.log" 2>&1 &
  local pid=$!
  until [ -n "$(find "$WORK/ckpts" -name last.pth 2>/dev/null)" ] || [ $t -ge 1000 ] || ! kill -0 $pid 2>/dev/null; do
    sleep 0.2; t=$((t + 1))
  done
  kill -9 -- -$pid 2>/dev/null
  pkill -9 -f -- "--ckpt_path $WORK/ckpts"  # torchrun's workers run in sessions of their own
  wait $pid
  say "$name: exit $? after $((t / 5))s"
}

if [ "$QUICK" = 1 ]; then  # tiny sizes: a dry run of every command
  GEN="--num_epochs 1 --num_train_images 1280 --num_test_images 500"; NUM_VAL=8; GEN_SECONDS=60; HOLD=4
  BENCH_GEN="--num_images 1280 --k 2"; BENCH_STEP="--quick --batches 8 --main_batch 8 --num_layers 1"
  BENCH_EVAL="--quick --num_nets 4 --num_images 500 --no_sweep"
  TRANSLATOR="--num_layers 1 --c_dim 16 --hidden_s_dim 16 --hidden_c_dim 16 --num_test_images 500"
  PATHS="--num_epochs 40 --log_step 10 --batch_size 8"; STUDY="--num_epochs 4 --log_step 2 --batch_size 8"
  IDENT="--num_networks 2 --num_inits 2 --num_epochs 1"
else
  GEN=""; NUM_VAL=100; GEN_SECONDS=${GEN_SECONDS:-100}; HOLD=64
  BENCH_GEN="--num_images 12800 --k 128 256 512 --compile"
  BENCH_STEP="--batches 1024 4096 --main_batch 4096 --compile on --compile_timeout 90 --repeats 3"
  BENCH_EVAL="--no_sweep --repeats 2"
  TRANSLATOR="--num_layers 24 --c_dim 128 --hidden_s_dim 256 --hidden_c_dim 512 --dropout 0.1"
  PATHS="--num_epochs 40 --log_step 10 --batch_size 4096"; STUDY="--num_epochs 60 --log_step 5 --batch_size 1024"
  IDENT="--num_networks 24 --num_inits 3"
fi

say "machine"
{ nvidia-smi -L 2>/dev/null; python -c 'import torch; print(torch.__version__, torch.cuda.is_available())'; } 2>&1 | tee -a "$LOG"

# 1. benchmarks
step bench_generate 120 python bench/bench_generate.py --device "$DEVICE" --skip_original $BENCH_GEN --out "$WORK/generate.json"
K=$(python -c "import json; r=json.load(open('$WORK/generate.json'))['rows']; print(max((v for k, v in r.items() if 'compiled' not in k), key=lambda v: v['pairs_per_hour'])['k'])" 2>/dev/null || echo 0)
say "fastest K: $K"
step bench_translator_step 240 python bench/bench_translator_step.py --device "$DEVICE" $BENCH_STEP --out "$WORK/translator_step.json"
step bench_eval 60 python bench/bench_eval.py --device "$DEVICE" $BENCH_EVAL --out "$WORK/eval.json"

# 2. a paper-recipe dataset
step construct_val 90 python construct_val.py --device "$DEVICE" --num_data "$NUM_VAL" --train_simple --models_per_step "$K" \
  --data_root "$WORK/val" $GEN
step construct_train "$GEN_SECONDS" python construct_train.py --device "$DEVICE" --num_data 1000000 --models_per_step "$K" \
  --data_root "$WORK/train" $GEN
MADE=$(python -c "import loader; print(len(loader.covered_indices('$WORK/train')))")
NUM_TRAIN=$(( MADE - HOLD ))
say "training pairs made: $MADE ($NUM_TRAIN for training, $HOLD held out for picking epochs)"
DATA="--device $DEVICE --train_path $WORK/train --val_path $WORK/val --val_data_length $NUM_VAL --train_data_length $NUM_TRAIN"

# 3. every GPU path of train.py: torchrun (NCCL on a GPU), bf16, compile, TF32; killed mid-run, then resumed
TORCHRUN="python -m torch.distributed.run --standalone --nproc_per_node 1 train.py $DATA $TRANSLATOR $PATHS
  --amp bf16 --compile --tf32 --ckpt_path $WORK/ckpts --log_path $WORK/train_logs"
killed train_paths_killed $TORCHRUN
step train_paths_resumed 200 $TORCHRUN --resume
grep -h "torchrun:\|resumed from\|Epoch .*, Mean\|reference rows measured\|loaded in" "$WORK"/train_logs/*/*/*/train.log | tee -a "$LOG"

# 4. the science study: every objective on the pairs made, best epoch picked on held-out training networks
study() {  # study NAME FLAGS...
  local name=$1; shift
  step "study_$name" 60 python train.py $DATA --num_layers 4 --c_dim 64 --hidden_s_dim 128 --hidden_c_dim 256 \
    --num_test_images 10000 $STUDY --holdout_networks "$HOLD" --ckpt_path "$WORK/study/$name" --log_path "$WORK/study/$name" "$@"
  cp "$(find "$WORK/study/$name" -name summary.json | head -1)" "$WORK/study_$name.json" 2>/dev/null
}
[ "$QUICK" = 1 ] && STUDY="$STUDY --num_test_images 500"
study mse
study canon --canonical_targets
study hinv --hidden_invariant_loss
study perm --perm_aug
study functional_perm --loss functional --functional_images 32 --perm_aug
step identifiability 120 python experiments/identifiability.py --device "$DEVICE" --data_root "$WORK/val" $IDENT \
  --translators $(find "$WORK/study" -name "[0-9]*.pth") --out "$WORK/identifiability"
python report.py "$WORK"/study_*.json > "$WORK/study_tables.md" 2>&1

pkill -f -- "$WORK" 2>/dev/null  # nothing of this session may outlive it on the GPU
say "packing"
tar czf "$OUT/session.tar.gz" -C "$WORK" logs train_logs study_tables.md $(cd "$WORK" && ls *.json identifiability.* 2>/dev/null) \
  $(cd "$WORK" && find study -name train.log -o -name metrics.csv) val/logs train/logs 2>/dev/null
# the pairs themselves, when they fit what comes back (16 MiB a file): shards hold ~29 KB a pair
tar czf "$WORK/pairs.tar.gz" --exclude logs -C "$WORK" train val 2>/dev/null
if [ "$(stat -c %s "$WORK/pairs.tar.gz")" -lt 16000000 ]; then mv "$WORK/pairs.tar.gz" "$OUT/"; else say "pairs not kept: over 16 MB"; fi
ls -la "$OUT" | tee -a "$LOG"
say "done"

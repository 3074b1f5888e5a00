# Helpers of the prepared GPU sessions (speed/gpu_check.sh, speed/gpu_session.sh, experiments/gpu_study.sh), sourced by them: a session runs its
# steps within BUDGET seconds (default 560), logs to $OUT/session.log and packs its logs into
# $OUT/session.tar.gz after every step, so that a session cut short still brings back what it measured.
# STEPS="name name ..." runs only the steps so named (e.g. those a session cut short did not reach; a step that
# reads another's output needs that one too).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
WORK=${WORK:-$(mktemp -d /tmp/kt_gpu.XXXXXX)}  # fresh: a second session on a warm machine must not reuse the first's data
DEADLINE=$(( $(date +%s) + ${BUDGET:-560} ))
mkdir -p "$OUT" "$WORK/logs"
LOG="$OUT/session.log"
PACKED="logs"  # what pack() takes from $WORK (the scripts add their own)
say() { echo "== $(date +%T) $*" | tee -a "$LOG"; }
left() { echo $(( DEADLINE - $(date +%s) - 10 )); }  # seconds left, 10 kept for packing
pack() {  # everything so far into $OUT/session.tar.gz
  tar czf "$OUT/session.tar.gz" -C "$WORK" $(cd "$WORK" && ls -d $PACKED 2>/dev/null)
}
chosen() {  # chosen NAME: whether STEPS (when set) names this step
  [ -z "${STEPS:-}" ] || [[ " $STEPS " == *" $1 "* ]] || { say "$1: skipped, not in STEPS"; return 1; }
}
limit_for() {  # limit_for NAME SECONDS: min(SECONDS, time left), or nothing when too little time is left
  local limit=$2
  [ "$(left)" -lt "$limit" ] && limit=$(left)
  if [ "$limit" -lt 15 ]; then say "$1: skipped, the session's time is spent" >&2; return 1; fi
  echo "$limit"
}
ended() {  # ended NAME RC: the end of a step's log and its exit status into the session's log
  tr '\r' '\n' < "$WORK/logs/$1.log" | grep -v -e Warning -e '^wrote ' -e '^$' | tail -n 4 | tee -a "$LOG"
  say "$1: exit $2"
  pack
}
step() {  # step NAME SECONDS CMD...: run CMD under min(SECONDS, time left), its output in $WORK/logs/NAME.log
  local name=$1 limit; chosen "$name" && limit=$(limit_for "$name" "$2") || return 0
  shift 2
  say "$name (limit ${limit}s): $*"
  timeout -k 10 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1  # TERM first: torchrun passes it on to its workers
  ended "$name" $?
}
BACKGROUND=()
background() {  # background NAME SECONDS CMD...: as step, but CMD runs beside the next steps until joined()
  local name=$1 limit; chosen "$name" && limit=$(limit_for "$name" "$2") || return 0
  shift 2
  say "$name (in the background, limit ${limit}s): $*"
  { timeout -k 10 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1; echo $? > "$WORK/logs/$name.rc"; } &
  BACKGROUND+=("$name:$!")
}
joined() {  # wait for the background steps, then report them
  local job
  for job in "${BACKGROUND[@]}"; do
    wait "${job#*:}"
    ended "${job%%:*}" "$(cat "$WORK/logs/${job%%:*}.rc" 2>/dev/null)"
  done
  BACKGROUND=()
}
machine() {  # the GPU and torch, into the log
  say "machine"
  { nvidia-smi -L 2>/dev/null; python -c 'import torch; print(torch.__version__, torch.cuda.is_available())'; } 2>&1 | tee -a "$LOG"
}
killed() {  # killed NAME CMD...: start CMD, SIGKILL its whole process group once $WORK/ckpts holds a last.pth
  local name=$1 t=0 wait=$(( $(left) * 5 )); shift
  chosen "$name" || return 0
  say "$name (SIGKILL once $WORK/ckpts holds a last.pth): $*"
  setsid "$@" > "$WORK/logs/$name.log" 2>&1 &
  local pid=$!
  until [ -n "$(find "$WORK/ckpts" -name last.pth 2>/dev/null)" ] || [ $t -ge $wait ] || ! kill -0 $pid 2>/dev/null; do
    sleep 0.2; t=$((t + 1))
  done
  kill -9 -- -$pid 2>/dev/null
  pkill -9 -f -- "--ckpt_path $WORK/ckpts"  # torchrun's workers run in sessions of their own
  wait $pid
  say "$name: exit $? after $((t / 5))s"
  pack
}
train_paths() {  # pairs made here with $DATA_RECIPE, then train.py under torchrun (NCCL on a GPU) with --amp bf16
  # --compile --tf32, SIGKILLed mid-run and resumed (the scripts set DATA_RECIPE, NUM_VAL, NUM_TRAIN, TRANSLATOR, PATHS)
  step construct_val 40 python construct_val.py --device "$DEVICE" --num_data "$NUM_VAL" --train_simple --data_root "$WORK/val" $DATA_RECIPE
  step construct_train 40 python construct_train.py --device "$DEVICE" --num_data "$NUM_TRAIN" --data_root "$WORK/train" $DATA_RECIPE
  local torchrun="python -m torch.distributed.run --standalone --nproc_per_node 1 train.py --device $DEVICE
    --train_path $WORK/train --val_path $WORK/val --val_data_length $NUM_VAL --train_data_length $NUM_TRAIN
    $TRANSLATOR $PATHS --amp bf16 --compile --tf32 --ckpt_path $WORK/ckpts --log_path $WORK/train_logs"
  killed train_paths_killed $torchrun
  step train_paths_resumed 90 $torchrun --resume
  grep -h "torchrun:\|resumed from\|Epoch .*, Mean\|reference rows measured\|loaded in\|cached in" \
    "$WORK"/train_logs/*/*/*/train.log 2>/dev/null | tee -a "$LOG"
}
finish() {  # nothing of the session may outlive it on the GPU; pack a last time
  pkill -f -- "$WORK" 2>/dev/null
  pack
  ls -la "$OUT" | tee -a "$LOG"
  say "done"
}

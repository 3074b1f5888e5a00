# Helpers of the prepared GPU sessions (gpu_session.sh, gpu_study.sh), sourced by them: a session runs its
# steps within BUDGET seconds (default 560), logs to $OUT/session.log and packs its logs into
# $OUT/session.tar.gz after every step, so that a session cut short still brings back what it measured.
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
step() {  # step NAME SECONDS CMD...: run CMD under min(SECONDS, time left), its output in $WORK/logs/NAME.log
  local name=$1 limit=$2; shift 2
  [ "$(left)" -lt "$limit" ] && limit=$(left)
  if [ "$limit" -lt 15 ]; then say "$name: skipped, the session's time is spent"; return; fi
  say "$name (limit ${limit}s): $*"
  timeout -k 10 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1  # TERM first: torchrun passes it on to its workers
  local rc=$?
  tr '\r' '\n' < "$WORK/logs/$name.log" | grep -v Warning | tail -n 4 | tee -a "$LOG"
  say "$name: exit $rc"
  pack
}
machine() {  # the GPU and torch, into the log
  say "machine"
  { nvidia-smi -L 2>/dev/null; python -c 'import torch; print(torch.__version__, torch.cuda.is_available())'; } 2>&1 | tee -a "$LOG"
}
finish() {  # nothing of the session may outlive it on the GPU; pack a last time
  pkill -f -- "$WORK" 2>/dev/null
  pack
  ls -la "$OUT" | tee -a "$LOG"
  say "done"
}

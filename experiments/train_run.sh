# Sourced by the results scripts: train_run DIR FLAGS... runs `python train.py FLAGS...` once
# (skipped when DIR/summary.json exists) and keeps its command, stdout, train.log, metrics.csv and
# summary.json in DIR; checkpoints stay under /tmp/kt_results/DIR.
train_run() {
  local dir=$1; shift
  [ -f "$dir/summary.json" ] && { echo "skip $dir (done)"; return; }
  local tmp=/tmp/kt_results/$dir
  rm -rf "$tmp"  # an earlier, unfinished attempt would leave a second run to copy from
  mkdir -p "$dir"
  echo "python train.py $*" | tee "$dir/command.txt"
  python train.py "$@" --ckpt_path "$tmp/ckpts" --log_path "$tmp/logs" > "$dir/stdout.log" 2>&1
  cp "$(find "$tmp/logs" -name train.log)" "$(find "$tmp/logs" -name metrics.csv)" \
    "$(find "$tmp/ckpts" -name summary.json)" "$dir/"
}

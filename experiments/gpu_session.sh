#!/usr/bin/env bash
# One prepared GPU session: benchmarks 1, 3 and 4 on the GPU, then a full-recipe dataset
# (val networks with retrained small blocks, then as many training pairs as fit in GEN_SECONDS)
# and a README-configuration translator trained on it. Everything lands in $OUT (logs, JSON,
# and the shards packed as data_part_* for use on other machines).
#
#   OUT=/tmp/out bash experiments/gpu_session.sh
# Sizes can be shrunk for a dry run on CPU: DEVICE=cpu QUICK=1 OUT=/tmp/out bash experiments/gpu_session.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
GEN_SECONDS=${GEN_SECONDS:-110}
TRAIN_SECONDS=${TRAIN_SECONDS:-70}
NUM_VAL=${NUM_VAL:-100}
WORK=${WORK:-/tmp/kt_gpu}
mkdir -p "$OUT" "$WORK"
LOG="$OUT/session.log"
say() { echo "== $(date +%T) $*" | tee -a "$LOG"; }

say "machine"
{ nvidia-smi -L 2>/dev/null; python -c 'import torch; print(torch.__version__, torch.cuda.is_available())'; } 2>&1 | tee -a "$LOG"

if [ "$QUICK" = 1 ]; then
  GEN_FLAGS="--num_epochs 1 --num_train_images 1280 --num_test_images 500"
  BENCH_GEN="--num_images 1280 --k 2"; BENCH_Q="--quick"; TRAIN_FLAGS="--num_layers 1 --c_dim 16 --hidden_s_dim 16 --hidden_c_dim 16 --num_epochs 2 --log_step 1 --batch_size 8 --num_test_images 500"
else
  GEN_FLAGS=""
  BENCH_GEN="--num_images 12800 --k 64 256 512"; BENCH_Q="--quick"; TRAIN_FLAGS="--num_layers 24 --num_epochs 500 --log_step 50 --batch_size 256"
fi

say "benchmark 1: generation"
timeout 100 python bench/bench_generate.py --device "$DEVICE" --skip_original $BENCH_GEN --out "$OUT/generate_gpu.json" 2>&1 | tee -a "$LOG" | tail -12
K=$(python -c "import json,sys; r=json.load(open('$OUT/generate_gpu.json'))['rows']; print(max((v for k, v in r.items() if 'compiled' not in k), key=lambda v: v['pairs_per_hour'])['k'])" 2>/dev/null || echo 0)
say "best K: $K"

say "benchmark 3: translator step"
timeout 90 python bench/bench_translator_step.py --device "$DEVICE" $BENCH_Q --compile_timeout 40 --out "$OUT/translator_step_gpu.json" 2>&1 | tee -a "$LOG" | tail -15

say "benchmark 4: evaluation"
timeout 30 python bench/bench_eval.py --device "$DEVICE" --out "$OUT/eval_gpu.json" 2>&1 | tee -a "$LOG" | tail -8

say "val networks (with retrained small blocks)"
timeout 80 python construct_val.py --device "$DEVICE" --num_data "$NUM_VAL" --train_simple --models_per_step "$K" \
  --data_root "$WORK/val" $GEN_FLAGS 2>&1 | tail -3 | tee -a "$LOG"

say "training pairs for ${GEN_SECONDS}s (a killed run leaves only complete shards)"
timeout "$GEN_SECONDS" python construct_train.py --device "$DEVICE" --num_data 100000 --models_per_step "$K" \
  --data_root "$WORK/train" $GEN_FLAGS 2>&1 | tail -2 | tee -a "$LOG"
NUM_TRAIN=$(python -c "import loader; print(len(loader.covered_indices('$WORK/train')))")
say "training pairs made: $NUM_TRAIN"

say "translator, README configuration, on the pairs made"
timeout "$TRAIN_SECONDS" python train.py --device "$DEVICE" --train_path "$WORK/train" --val_path "$WORK/val" \
  --train_data_length "$NUM_TRAIN" --val_data_length "$NUM_VAL" --ckpt_path "$WORK/ckpts" --log_path "$WORK/logs" \
  $TRAIN_FLAGS 2>&1 | tail -25 | tee -a "$LOG"

say "packing"
tar czf "$OUT/logs.tar.gz" -C "$WORK" logs $(cd "$WORK" && ls -d train/logs val/logs 2>/dev/null) 2>/dev/null
# shards in index order up to 56 MB, split in parts of 15 MB (what comes back is limited)
python - "$WORK" <<'EOF' > "$WORK/pack.txt"
import os, sys, loader
work, total, keep = sys.argv[1], 0, []
for folder, _, files in os.walk(os.path.join(work, 'ckpts')):  # the best translator first
    for name in files:
        if name.endswith('.pth') and name != 'last.pth':
            keep.append(os.path.relpath(os.path.join(folder, name), work))
            total += os.path.getsize(os.path.join(folder, name))
for sub in ('val', 'train'):
    root = os.path.join(work, sub)
    for name in ('recipe.json',):
        keep.append(os.path.join(sub, name))
    for start, stop, path in loader.list_shards(root):
        total += os.path.getsize(path)
        if total > 56 * 2 ** 20:
            break
        keep.append(os.path.relpath(path, work))
print('\n'.join(keep))
EOF
tar cf - -C "$WORK" -T "$WORK/pack.txt" | split -b 15m - "$OUT/data_part_"
ls -la "$OUT" | tee -a "$LOG"
say "done"

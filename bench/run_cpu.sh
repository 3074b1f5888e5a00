#!/usr/bin/env bash
# The CPU runs behind BENCHMARKS.md; logs and JSON land in results/bench_cpu/. Compile times are cold: each
# compiling run gets an empty inductor cache.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=results/bench_cpu
mkdir -p $OUT
{ lscpu | grep -E 'Model name|^CPU\(s\)'; grep MemTotal /proc/meminfo; } > $OUT/machine.txt
python bench/bench_generate.py --k 4 --out $OUT/generate.json 2>&1 | tee $OUT/generate.log
python speed/bench_generate.py --skip_original --k 1 --rows 1:channels_last 1:compile 1:channels_last+compile \
  4:channels_last --out $OUT/generate_options.json 2>&1 | tee $OUT/generate_options.log
python speed/bench_generate.py --skip_original --k 4 --rows 4:channels_last --out $OUT/generate_channels_last.json \
  2>&1 | tee $OUT/generate_channels_last.log
python bench/bench_draw.py --k 128 512 2>&1 | tee $OUT/draw.log
python bench/bench_loading.py --num_pairs 20000 --out $OUT/loading.json 2>&1 | tee $OUT/loading.log
python bench/bench_translator_step.py --batches 64 --main_batch 64 --warmup 1 --repeats 2 --iters 1 --dropout 0. \
  --out $OUT/translator_step.json 2>&1 | tee $OUT/translator_step.log
for d in 0. 0.1; do  # the saved activations of the README configuration, counted (one tiny step each)
  python bench/bench_translator_step.py --batches 8 --main_batch 8 --warmup 0 --repeats 1 --iters 1 --dropout $d \
    --out $(mktemp) 2>&1
done | tee $OUT/saved_activations.log
TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python bench/bench_translator_step.py --batches 64 --main_batch 64 --warmup 1 \
  --repeats 3 --iters 1 --compile on --compile_timeout 1200 --out $OUT/translator_step_compile.json 2>&1 | tee $OUT/translator_step_compile.log
python bench/bench_eval.py --no_sweep --repeats 1 --out $OUT/eval.json 2>&1 | tee $OUT/eval.log
python bench/bench_mnist_load.py 2>&1 | tee $OUT/mnist_load.log
python bench/bench_begin_cache.py 2>&1 | tee $OUT/begin_cache.log
python bench/profile_step.py 2>&1 | tee $OUT/profile_step.log
python bench/roofline.py 2>&1 | tee $OUT/roofline.log
python bench/step_routes.py 2>&1 | tee $OUT/step_routes.log
if python -c 'import triton' 2>/dev/null; then  # triton is not a dependency: compiles the kernels for sm_90
  python speed/kernel_resources.py 2>&1 | tee $OUT/kernel_resources.log
fi

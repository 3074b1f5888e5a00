#!/usr/bin/env bash
# The short GPU check of speed/: about 6 minutes (BUDGET, default 360 s) on one CUDA GPU, only the rows that
# decide whether a path of speed/ may move back to the top level, each beside the plain path in the same run.
# Everything is logged under $OUT (session.log, and session.tar.gz packed after every step; see session_lib.sh).
#   1. speed/'s kernel tests, the Triton kernels compiled on the GPU (TRITON_INTERPRET=0), and --cuda_graph
#      against the eager step;
#   2. generation pairs/hour: the plain step at K = 128 against the fused kernels (Begin, Basic, small step) at
#      K = 128 and 512, with and without a CUDA graph (speed/bench_generate.py);
#   3. the translator step of the README configuration, --amp bf16 --compile among its rows, as a fraction of the
#      bf16 matmul peak measured in the same run (bench/bench_translator_step.py);
#   4. train.py under torchrun --nproc_per_node 1 (NCCL) with --amp bf16 --compile --tf32, SIGKILLed mid-run,
#      then --resume.
#
#   OUT=/tmp/out bash speed/gpu_check.sh
# Dry run on a CPU at tiny sizes (the same commands): DEVICE=cpu QUICK=1 OUT=/tmp/out bash speed/gpu_check.sh
# (on a CPU the Triton steps end with their clear message, exit 2, or are skipped where triton is missing).
BUDGET=${BUDGET:-360}
source "$(dirname "$0")/session_lib.sh"
PACKED="logs *.json train_logs"

FUSED=fused_begin+fused_basic+fused_small
if [ "$QUICK" = 1 ]; then  # tiny sizes: a dry run of every command
  GEN="--num_images 256 --k 2 --rows 2:$FUSED 2:$FUSED+graphed 4:no_cache+$FUSED 4:no_cache+$FUSED+graphed"
  STEP="--quick --batches 8 --main_batch 8 --num_layers 1 --compile on --warmup 1 --iters 1 --repeats 1"
  DATA_RECIPE="--num_epochs 1 --num_train_images 256 --num_test_images 100 --models_per_step 4"; NUM_VAL=4; NUM_TRAIN=8
  TRANSLATOR="--num_layers 1 --c_dim 16 --hidden_s_dim 16 --hidden_c_dim 16 --num_test_images 100"
  PATHS="--num_epochs 40 --log_step 10 --batch_size 8"
else
  GEN="--num_images 12800 --k 128 --rows 128:$FUSED 128:$FUSED+graphed 512:no_cache+$FUSED
    512:no_cache+$FUSED+graphed"
  STEP="--batches 4096 --main_batch 4096 --compile on --compile_timeout 60 --warmup 2 --iters 3 --repeats 2"
  DATA_RECIPE="--num_epochs 1 --num_train_images 12800 --models_per_step 128"; NUM_VAL=100; NUM_TRAIN=256
  TRANSLATOR="--num_layers 4 --c_dim 64 --hidden_s_dim 128 --hidden_c_dim 256"
  PATHS="--num_epochs 40 --log_step 10 --batch_size 64"
fi

machine
# 1. compiling the kernels is CPU work: it runs beside 4, which keeps the GPU mostly idle
background kernel_tests 150 env TRITON_INTERPRET=0 python -m pytest -q -p no:cacheprovider speed/tests/test_triton_conv.py \
  speed/tests/test_generate_speed.py::test_cuda_graph_replays_the_same_steps -k "not compiles_for_a_gpu"
# 4. every GPU path of train.py, on pairs made here with a short recipe (speed, not science)
train_paths
joined
# 2. and 3., the plain rows beside the others in each run
step generate 120 python speed/bench_generate.py --device "$DEVICE" --skip_original $GEN --out "$WORK/generate.json"
step translator_step 120 python bench/bench_translator_step.py --device "$DEVICE" $STEP --out "$WORK/translator_step.json"
finish

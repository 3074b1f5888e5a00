#!/usr/bin/env bash
# The long prepared GPU session (speed/gpu_check.sh is the short one): every open GPU measurement of the repository in one command, within BUDGET
# seconds (default 560), each step under its own limit and the session's deadline, everything logged under
# $OUT and packed after every step (a run cut short still brings back what it measured).
#
#   1. generation speed: the Triton kernels checked on the GPU against float64 references (their tests), then
#      the plain step at K = 128 against the fused Triton kernels (the Begin block, the Basic block and Last's
#      convolution, the small-block step),
#      channels-last, the Begin cache, larger K without it, bf16 autocast, the Triton convolutions, the whole
#      step compiled with CUDA graphs or captured in one (--cuda_graph) (speed/bench_generate.py --rows; each row's
#      accuracies and small-block phase's share too), and where a step's time goes (profile_step.py);
#   2. the translator step of the original README's command (dropout 0.1, batch 4096): fp32, TF32, bf16,
#      torch.compile (blocks and whole model) fp32 and bf16, peak memory;
#   3. evaluation of 100 networks on 10,000 test images;
#   4. every GPU path of train.py once: torchrun with NCCL + --amp bf16 + --compile + --tf32, killed with
#      SIGKILL mid-run and resumed with --resume, on pairs made here with a short recipe (speed, not science).
# They run in the order 4, 3, 1 (the fused kernels and their profile), 2, 1 (the other options), the other
# profiles: when the time runs out, the last steps are the ones skipped. The Triton kernels' tests and compilation
# (CPU work) run in the background beside 4, which keeps the GPU mostly idle; nothing is timed beside them.
#
#   OUT=/tmp/out bash speed/gpu_session.sh
# Dry run on a CPU at tiny sizes (the same commands): DEVICE=cpu QUICK=1 OUT=/tmp/out bash speed/gpu_session.sh
# At most 8 files come back from a device run: everything is packed into $OUT/session.tar.gz beside session.log.
source "$(dirname "$0")/session_lib.sh"
PACKED="logs *.json train_logs val/logs train/logs"

if [ "$QUICK" = 1 ]; then  # tiny sizes: a dry run of every command
  WARMUP="--num_images 1280 --k 2 --rows 2:fused_begin+fused_basic+fused_small+cache 2:triton"
  BENCH_FUSED="--num_images 1280 --k 2 --rows 2:fused_begin+fused_basic+fused_small 2:fused_begin+fused_basic+fused_small+graphed"
  BENCH_GEN="--num_images 1280 --k 2 --rows 2:channels_last 2:cache 4:no_cache 2:bf16 2:triton 2:cuda_graphs 2:graphed"
  BENCH_STEP="--quick --batches 8 --main_batch 8 --num_layers 1 --compile on"; PROFILE_K=2
  BENCH_EVAL="--quick --num_nets 4 --num_images 500 --no_sweep"
  DATA_RECIPE="--num_epochs 1 --num_train_images 1280 --num_test_images 500 --models_per_step 4"; NUM_VAL=8; NUM_TRAIN=16
  TRANSLATOR="--num_layers 1 --c_dim 16 --hidden_s_dim 16 --hidden_c_dim 16 --num_test_images 500"
  PATHS="--num_epochs 40 --log_step 10 --batch_size 8"
else
  # Triton compiles a kernel for each class of its integer arguments (1, multiple of 16, other): the kernels of the
  # rows below at K = 128, 512 and 1024 are those of this short run (its 1,280 images divide by 16 as 12,800 do)
  WARMUP="--num_images 1280 --k 128 --rows 128:fused_begin+fused_basic+fused_small+cache
    128:fused_begin+fused_basic+fused_small+no_cache 128:triton"
  # the fused kernels first (the likeliest to pay), in a process of their own (a kernel fault would end the
  # process's CUDA context), then each other option alone; each beside the plain step at K = 128, compiling last
  BENCH_FUSED="--num_images 12800 --k 128 --rows 128:fused_begin+fused_basic+fused_small 128:fused_begin+fused_small
    512:no_cache+fused_begin+fused_basic+fused_small 1024:no_cache+fused_begin+fused_basic+fused_small
    128:fused_begin 128:fused_basic 128:fused_small 128:fused_begin+fused_basic+fused_small+graphed
    512:no_cache+fused_begin+fused_basic+fused_small+graphed"
  BENCH_GEN="--num_images 12800 --k 128 --rows 128:channels_last 128:cache 512:no_cache 128:bf16 128:triton
    512:no_cache+triton 128:graphed 128:cuda_graphs 512:no_cache+channels_last+cuda_graphs 512:no_cache+triton+cuda_graphs"
  BENCH_STEP="--batches 4096 --main_batch 4096 --compile on --compile_timeout 60 --warmup 2 --iters 3 --repeats 3"
  PROFILE_K=128
  BENCH_EVAL="--no_sweep --repeats 2"
  DATA_RECIPE="--num_epochs 1 --num_train_images 12800 --models_per_step 128"; NUM_VAL=100; NUM_TRAIN=256
  TRANSLATOR="--num_layers 4 --c_dim 64 --hidden_s_dim 128 --hidden_c_dim 256"
  PATHS="--num_epochs 40 --log_step 10 --batch_size 64"
fi

machine

# the Triton kernels compiled on the GPU and checked against float64 references (speed/tests/test_triton_conv.py; the test
# that compiles them for sm_90 without a GPU is left out: here they compile for the GPU itself), and --cuda_graph
# against the eager step. Compiling is CPU work (102 s for the 13 kernels cold on the 2-core CI machine,
# results/bench_cpu/kernel_compile_cold.log; the tests need each kernel in about two classes of arguments): the tests
# run on half the cores, at most 8 (pytest-xdist, where the machine has it), the steps beside them keep the other
# half. Beside them too, a short run of the fused rows compiles their kernels for the benchmark's K, so that
# bench_generate_fused times its rows instead of compiling them.
XDIST=$(python -c 'import xdist' 2>/dev/null && echo "-n $(( $(nproc) / 2 < 8 ? $(nproc) / 2 : 8 ))")
background triton_kernels 240 env TRITON_INTERPRET=0 python -m pytest -q -p no:cacheprovider $XDIST \
  speed/tests/test_triton_conv.py speed/tests/test_generate_speed.py::test_cuda_graph_replays_the_same_steps \
  -k "not compiles_for_a_gpu"
background triton_warmup 240 python speed/bench_generate.py --device "$DEVICE" --skip_original $WARMUP \
  --out "$WORK/warmup.json"

# the cheap, all-or-nothing items first; then the benchmarks, largest first; the profiles last
# 4. every GPU path of train.py: torchrun (NCCL on a GPU), bf16, compile, TF32; killed mid-run, then resumed
train_paths
joined

# 3. evaluation; 1. generation with the fused kernels and its profile; 2. the translator step; 1. generation's
# other options; where the plain step's time goes
step bench_eval 30 python bench/bench_eval.py --device "$DEVICE" $BENCH_EVAL --out "$WORK/eval.json"
step bench_draw 20 python bench/bench_draw.py --k 128 512
step bench_generate_fused 150 python speed/bench_generate.py --device "$DEVICE" --skip_original $BENCH_FUSED \
  --out "$WORK/generate_fused.json"
step profile_generate_fused_basic 30 python bench/profile_step.py --device "$DEVICE" --k "$PROFILE_K" --fused_begin --fused_basic
step bench_translator_step 200 python bench/bench_translator_step.py --device "$DEVICE" $BENCH_STEP --out "$WORK/translator_step.json"
step bench_generate 180 python speed/bench_generate.py --device "$DEVICE" --skip_original $BENCH_GEN --out "$WORK/generate.json"
step profile_generate 30 python bench/profile_step.py --device "$DEVICE" --k "$PROFILE_K"
step profile_generate_fused 30 python bench/profile_step.py --device "$DEVICE" --k "$PROFILE_K" --fused_begin

finish

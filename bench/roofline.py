"""The roofline of pair generation on this machine, measured in one run: the FLOPs of one pair of the recipe, the
fp32 matmul peak and the memory bandwidth, the time of one pair by today's default path (and its share of the
peak), and where a training step of each phase spends its time, per operator, forward and backward.

One pair = 10 epochs of the large network (Begin, BasicBlock, Last) then 10 epochs of the small block between the
frozen Begin and Last, with the Begin cache, as construct.make_pairs runs them. The FLOPs are counted by
torch.utils.flop_counter on one real step of each phase (convolutions and matmuls, forward and backward), times
the recipe's steps. The pair's time comes from --epochs epochs of each phase (default 1) scaled to the recipe's 10,
plus its three test evaluations, on one network (K = 1, construct_train.py's CPU default).

    python bench/roofline.py > results/bench_cpu/roofline.log          # needs a quiet machine (say so in the log)
    python bench/roofline.py --num_images 6400 --epochs 1 --profile_steps 5  # a quick look
"""
import argparse
import math
import time

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import common
import construct
import construct_train
import generation
import net
import utils

RECIPE_IMAGES, RECIPE_EPOCHS, BATCH = 60000, 10, 128


def memory_bandwidth(n_bytes=256 << 20, repeats=5):
    """Bytes/s of a large tensor copy (read + write), median of `repeats`: the streaming roof."""
    a, b = torch.empty(n_bytes // 4), torch.empty(n_bytes // 4)
    a.fill_(1.0)
    b.copy_(a)
    times = [common.timed(lambda: b.copy_(a), 'cpu') for _ in range(repeats)]
    return 2 * n_bytes / common.median(times)


def phase_steps(mnist, k=1):
    """The two phases' training steps as make_pairs builds them (plain Steps, Begin cache on): {phase: (step(),
    forward())}, forward() being the step's loss alone (its graph built, then dropped)."""
    train_x, train_y = mnist[0], mnist[1]
    recipe = construct.Recipe()
    sds = [construct.init_pair(i) for i in range(k)]
    begin, basic, last, simple = (net.stack_states([sd[j] for sd in sds]) for j in range(4))
    ws = construct.Workspace({'begin': begin, 'basic': basic, 'last': last, 'simple': simple}, recipe, mnist)
    large_params = construct.trainable(begin) + construct.trainable(basic) + construct.trainable(last)
    large_loss = construct.PLAIN.large_loss(train_x, train_y, begin, basic, last)
    large = ws.step('large', large_params, large_loss)
    construct.freeze(begin, basic, last)
    cache = ws.begin_cache(train_x, begin)
    small_params = construct.trainable(simple)
    small_loss = construct.PLAIN.small_loss(train_x, train_y, begin, last, simple, cache)
    small = ws.step('small', small_params, small_loss)
    gen = torch.Generator().manual_seed(0)

    def phase(params, fn):  # fn with only this phase's tensors requiring grad, as in make_pairs
        def run():
            construct.freeze(begin, basic, last, simple)
            for t in params:
                t.requires_grad_()
            return fn(torch.randint(0, len(train_x), (k, BATCH), generator=gen),
                      torch.rand(k, BATCH, generator=gen) < 0.5)
        return run
    return {'large': (phase(large_params, large), phase(large_params, large_loss)),
            'small': (phase(small_params, small), phase(small_params, small_loss))}


def step_flops(step):
    """FLOPs of one call of step() (convolutions and matmuls, forward and backward), by torch's counter."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def pair_seconds(args, device):
    """(seconds of one pair by construct.make_pairs at K = 1, scaled to the recipe; the measured parts)."""
    gen_args = construct_train.get_args('train', ['--num_epochs', str(args.epochs), '--num_train_images',
                                                  str(args.num_images), '--device', 'cpu'])
    mnist = generation.load_mnist_to(device, gen_args)
    workspaces = {}
    construct.make_pairs(range(1), gen_args.recipe, mnist, device, True, workspaces)  # warm-up
    evaluations = []
    accuracy = net.stacked_accuracy

    def timed_accuracy(*a, **kw):
        t = time.perf_counter()
        out = accuracy(*a, **kw)
        evaluations.append(time.perf_counter() - t)
        return out
    net.stacked_accuracy = timed_accuracy
    try:
        t0 = time.perf_counter()
        construct.make_pairs(range(1, 2), gen_args.recipe, mnist, device, True, workspaces)
        total = time.perf_counter() - t0
    finally:
        net.stacked_accuracy = accuracy
    train = total - sum(evaluations)
    scale = RECIPE_EPOCHS * RECIPE_IMAGES / (args.epochs * args.num_images)
    return train * scale + sum(evaluations), {'measured_s': total, 'evaluations_s': sum(evaluations),
                                              'training_scaled_s': train * scale}


def profile_phase(step, forward, steps):
    """(torch.profiler's per-operator table of `steps` steps, seconds of a whole step, of its forward alone)."""
    for _ in range(3):
        step()
    whole = common.timed(lambda: [step() for _ in range(steps)], 'cpu') / steps
    alone = common.timed(lambda: [forward() for _ in range(steps)], 'cpu') / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return prof, whole, alone


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--num_images', type=int, default=60000, help='training images of the timed pair (scaled to 60000)')
    p.add_argument('--epochs', type=int, default=1, help='epochs of each phase of the timed pair (scaled to 10)')
    p.add_argument('--profile_steps', type=int, default=50, help='steps profiled per phase')
    p.add_argument('--matmul_n', type=int, default=2048, help='size of the square matmul that measures the peak')
    utils.add_shared_flags(p, 'num_threads')
    args = p.parse_args()
    common.set_threads(args.num_threads)
    device = torch.device('cpu')
    print(f'machine: {common.machine(device)}')
    peak = common.matmul_flops_per_s(device, args.matmul_n)
    bandwidth = memory_bandwidth()
    print(f'fp32 matmul peak ({args.matmul_n}^2 torch.mm): {peak / 1e9:.1f} GFLOP/s; '
          f'memory bandwidth (copy): {bandwidth / 1e9:.1f} GB/s')

    mnist = generation.load_mnist_to(device, construct_train.get_args('train', ['--device', 'cpu']))
    steps = phase_steps(mnist)
    per_epoch = math.ceil(RECIPE_IMAGES / BATCH)
    flops = {phase: step_flops(step) for phase, (step, _) in steps.items()}
    pair_flops = sum(flops.values()) * per_epoch * RECIPE_EPOCHS
    print(f'\nFLOPs of one step (batch {BATCH}, forward + backward): large {flops["large"] / 1e6:.1f} M, small '
          f'{flops["small"] / 1e6:.1f} M; one pair ({RECIPE_EPOCHS} + {RECIPE_EPOCHS} epochs of {per_epoch} steps): '
          f'{pair_flops / 1e12:.3f} TFLOP, so {pair_flops / peak:.1f} s at the matmul peak')

    seconds, parts = pair_seconds(args, device)
    print(f'one pair by the default path (K = 1, Begin cache on; {args.epochs} epoch(s) of {args.num_images} images '
          f'measured, scaled to the recipe): {seconds:.1f} s ({parts["training_scaled_s"]:.1f} s training, '
          f'{parts["evaluations_s"]:.1f} s for the 3 test evaluations), {pair_flops / seconds / 1e9:.1f} GFLOP/s = '
          f'{pair_flops / seconds / peak:.1%} of the matmul peak; {3600 / seconds:.0f} pairs an hour per process')

    for phase, (step, forward) in steps.items():
        prof, whole, alone = profile_phase(step, forward, args.profile_steps)
        print(f'\n## {phase} phase: {whole * 1e3:.2f} ms a step ({alone * 1e3:.2f} forward, {(whole - alone) * 1e3:.2f} '
              f'backward and SGD update), {flops[phase] / whole / 1e9:.1f} GFLOP/s = {flops[phase] / whole / peak:.1%} '
              f'of the matmul peak; per operator (backward operators end in _backward or Backward):')
        print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=20))


if __name__ == '__main__':
    utils.run_main(main)

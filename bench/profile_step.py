"""Where one eager training step of the large network (batch 128) spends its time: torch.profiler table.

Without --k: one nn.Module network on the CPU (the original's structure). With --k K: generation's own step
(construct.Steps) of K networks side by side, on --device, with any of speed/generate.py's flags, e.g.

    python bench/profile_step.py
    python bench/profile_step.py --device cuda --k 128 [--channels_last] [--conv triton] [--fused_begin] [--fused_basic]
        [--compile]
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import common  # noqa: F401  (puts the repository on sys.path)
import construct
import net
import utils

sys.path.insert(0, os.path.join(common.REPO, 'speed'))
import generate  # noqa: E402  (speed/generate.py: the faster steps, by their flags)


def module_step():
    """One network as nn.Modules with torch.optim.SGD: the step function."""
    model = net.large_network()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,))

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def stacked_step(k, device, flags):
    """K large networks' SGD step as generation runs it, on random images: the step function."""
    args = generate.get_args(['--device', str(device), *flags])
    steps = generate.FastSteps(args, device) if flags else construct.PLAIN
    images = torch.randint(0, 256, (1024, 28, 28), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (1024,), device=device)
    begin, basic, last = (net.fresh_states(b, range(k), device) for b in ('begin', 'basic', 'last'))
    params = construct.trainable(begin) + construct.trainable(basic) + construct.trainable(last)
    step, reset = steps.build(params, steps.large_loss(images, labels, begin, basic, last), args.recipe)
    reset()
    idx = torch.randint(0, 1024, (k, 128), device=device)
    flip = torch.rand(k, 128, device=device) < 0.5
    return lambda: step(idx, flip)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--k', type=int, default=0, help='profile generation\'s step of K networks (0: one nn.Module)')
    utils.add_shared_flags(p, 'device', device='cpu')
    args, flags = p.parse_known_args()  # the rest: speed/generate.py's flags
    device = torch.device(args.device)
    torch.manual_seed(0)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    step = stacked_step(args.k, device, flags) if args.k else module_step()
    for _ in range(5):
        step()
    seconds = common.timed(lambda: [step() for _ in range(50)], device)
    what = f'K = {args.k} networks on {device} {" ".join(flags)}' if args.k else 'one network (nn.Module)'
    print(f'{what}, {torch.get_num_threads()} threads: {seconds / 50 * 1e3:.2f} ms per step')
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with profile(activities=activities) as prof:
        for _ in range(20):
            step()
        common.sync(device)
    sort = 'self_cuda_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    print(prof.key_averages().table(sort_by=sort, row_limit=15))


if __name__ == '__main__':
    utils.run_main(main)

"""What drawing the recipe's random orders and flips costs on this machine's CPU: generation draws them with
one torch.Generator per network (network i depends only on (seed, i)), K networks per epoch, and overlaps
the next epoch's draw with the current epoch's training (construct.train_phase).

    python bench/bench_draw.py --k 128 512
"""
import argparse

import torch

import common  # noqa: F401  (puts the repository on sys.path)
import construct


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--k', type=int, nargs='+', default=[128, 512], help='networks per step')
    p.add_argument('--repeats', type=int, default=3, help='timed draws per K; the fastest is reported')
    args = p.parse_args()
    print(f'{common.machine("cpu")}; one epoch of 60,000 images, the recipe has 10 + 10 epochs')
    for k in args.k:
        gens = [construct.data_generator(seed) for seed in range(k)]
        best = min(common.timed(lambda: construct.draw_epoch(gens, 60000, torch.device('cpu')), 'cpu')
                   for _ in range(args.repeats))
        print(f'K = {k}: {best:.3f} s an epoch, {best * 20 / k * 1e3:.1f} ms a pair over the recipe\'s 20 epochs')


if __name__ == '__main__':
    main()

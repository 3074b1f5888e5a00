"""The Begin-output caches on a CPU (train.py's for the validation networks, construct_train.py's for the
small-block phase) against the bytes of activations per image chunk that net.begin_outputs allows
(net.CPU_CHUNK_BYTES); each cap gives the same outputs bit for bit (asserted), only the time differs.

    python bench/bench_begin_cache.py --k 100 1 --num_images 2000 60000
"""
import argparse

import torch

import common
import mnist
import net


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--k', type=int, nargs='+', default=[100, 1], help='networks of each case')
    p.add_argument('--num_images', type=int, nargs='+', default=[2000, 60000], help='images of each case')
    p.add_argument('--caps_mib', type=float, nargs='+', default=[2, 4, 8, 16, 32, 0],
                   help='chunk caps in MiB; 0: none (chunks of --chunk_images, as before the cap)')
    p.add_argument('--chunk_images', type=int, default=1000, help="the callers' chunk (construct_train's default)")
    p.add_argument('--repeats', type=int, default=3, help='timed runs per cap, interleaved; the median is reported')
    args = p.parse_args()
    images = mnist.load_mnist('data', train=True)[0]
    print(common.machine(torch.device('cpu')))
    print('| networks x images | ' + ' | '.join(f'{c:g} MiB' if c else 'no cap' for c in args.caps_mib) + ' |')
    print('| --- ' * (len(args.caps_mib) + 1) + '|')
    for k, n in zip(args.k, args.num_images):
        begin = net.fresh_states('begin', list(range(k)))
        out, ref = torch.empty(k, n, *net.FEATURE), None
        times = {c: [] for c in args.caps_mib}
        for _ in range(args.repeats):
            for cap in args.caps_mib:
                net.CPU_CHUNK_BYTES = int(cap * 2 ** 20) if cap else 2 ** 62
                out.fill_(float('nan'))  # a chunk left unwritten cannot pass for the previous cap's
                times[cap].append(common.timed(
                    lambda: net.begin_outputs(images[:n], begin, args.chunk_images, out=out), 'cpu'))
                if ref is None:
                    ref = out.clone()
                assert torch.equal(out, ref), f'cap {cap} MiB changed the outputs'
        cells = ' | '.join(f'{common.median(times[c]):.2f} s' for c in args.caps_mib)
        print(f'| {k} x {n} | {cells} |', flush=True)


if __name__ == '__main__':
    main()

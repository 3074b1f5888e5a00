"""Where the missing information is: conv2 refit by least squares on real activations instead of the BatchNorm model.

Weight selection (folded, refit) solves for conv2 under a model of the hidden activations built from the BN buffers
alone (independent Gaussian channels). Here the same kept channels (rules.top_hidden of the folded convs) get conv2 by
least squares on the activations of N MNIST training images through the network's own frozen Begin: the small
block's hidden activations relu(conv1_kept * x) against the BasicBlock's pre-residual output bn2(conv2(hidden)).
This uses images, so it is not a rule KT competes with (a translator reads weights only); it measures how much of
the gap to Retrained a conv2 fit can close when the statistics of the block's input are known.

The fit is a ridge regression in float64: conv2 = (F'F + lambda I)^-1 F't with lambda = --ridge x the mean diagonal
of F'F (F: the (N*196, 27) hidden patches, t: the targets). A hidden channel that a few images leave dead or nearly
dead makes F'F singular; plain least squares then returns weights that move with the BLAS thread count (on 16
images, 2 of 100 networks, by up to 23.50 points: results/baselines/data_refit_threads_ridge0.log). The ridge term
makes the solve well conditioned; --ridge 0 is plain torch.linalg.lstsq. --compare_threads A B checks it. Each of
--draws draws shuffles the training images with seed --seed + draw and fits on the first N; the table gives the
mean over the draws of the 100-network mean, ± the standard error over the draws.

    OMP_NUM_THREADS=1 python experiments/data_refit.py --num_threads 1 \\
        --json results/baselines/data_refit.json > results/baselines/data_refit.log
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate  # noqa: E402
import loader  # noqa: E402
import mnist  # noqa: E402
import net  # noqa: E402
import rules  # noqa: E402
import utils  # noqa: E402

RIDGE = 1e-10  # lambda / mean diagonal of F'F: negligible on well-conditioned fits, a unique solution on singular ones


def ridge_fit(feats, target, ridge):
    """argmin_w |feats w - target|^2 + lam |w|^2 with lam = ridge x the mean diagonal of feats'feats (float64);
    ridge 0: plain least squares (torch.linalg.lstsq)."""
    if ridge == 0:
        return torch.linalg.lstsq(feats, target).solution
    gram = feats.T @ feats
    lam = ridge * gram.diagonal().mean()
    return torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), feats.T @ target)


def data_refit(basic, begin, images, ridge=RIDGE):
    """Stacked small blocks: folded_selection's conv1, conv2 fit by ridge_fit on the activations of `images`
    (float (N, 1, 28, 28)) after each network's Begin."""
    c1, shift1, c2, shift2 = rules.fold_bn(basic)
    keep = rules.top_hidden(c1, c2)
    small = rules.select_hidden(c1, c2, keep)
    c1, shift1, c2, shift2, kept, images = (t.double() for t in (c1, shift1, c2, shift2, small['conv1.weight'],
                                                                 images))
    conv2 = []
    for i in range(len(c1)):  # all in float64: float32 rounding would move weak directions with the thread count
        x = net.begin_forward(images, {k: t[i:i + 1].double() for k, t in begin.items()})  # (N, 6, 14, 14)
        want = F.conv2d(F.relu(F.conv2d(x, c1[i], padding=1) + shift1[i, :, None, None]), c2[i], padding=1) + \
            shift2[i, :, None, None]  # the BasicBlock's output before the residual and the last ReLU
        hidden = F.relu(F.conv2d(x, kept[i], padding=1))
        feats = F.unfold(hidden, 3, padding=1).transpose(1, 2).reshape(-1, net.HIDDEN * 9)  # (N*196, 27)
        target = want.flatten(2).transpose(1, 2).reshape(-1, net.PLANES)  # (N*196, 6)
        w = ridge_fit(feats, target, ridge)  # (27, 6)
        conv2.append(w.T.reshape(net.PLANES, net.HIDDEN, 3, 3).float())
    return {'conv1.weight': small['conv1.weight'], 'conv2.weight': torch.stack(conv2)}


def compare_threads(args, val, score, train_images):
    """Print, per fit size, how far the per-network accuracies of draw 0 move between two thread counts."""
    order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(args.seed))
    print(f'{len(val)} networks of {args.val_path}, {len(score.images)} MNIST test images; ridge {args.ridge:g}; '
          f'draw seed {args.seed}; the fit and the scoring on {args.compare_threads[0]} and on '
          f'{args.compare_threads[1]} threads\n')
    print('| conv2 fit on | mean, A threads | mean, B threads | networks that differ | largest difference |\n'
          '| --- | --- | --- | --- | --- |')
    with torch.no_grad():
        for n in args.num_images:
            x = net.to_float(train_images[order[:n]]).unsqueeze(1)
            accs = []
            for threads in args.compare_threads:
                torch.set_num_threads(threads)
                accs.append(score(data_refit(val.basic, val.begin, x, args.ridge)))
            diff = (accs[0] - accs[1]).abs()
            print(f'| {n} images | {accs[0].mean():.2f} | {accs[1].mean():.2f} | {int((diff > 0).sum())} of '
                  f'{len(diff)} | {diff.max():.2f} points |')


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--val_path', default='data/demo/val')
    p.add_argument('--val_data_length', type=int, default=100)
    p.add_argument('--num_test_images', type=int, default=10000)
    p.add_argument('--num_images', type=int, nargs='+', default=[16, 128, 1024],
                   help='training images of each fit (the first N of a draw\'s shuffle)')
    p.add_argument('--seed', type=int, default=0, help='draw d shuffles the training images with seed + d')
    p.add_argument('--draws', type=int, default=3, help='independent shuffles of the training images')
    p.add_argument('--ridge', type=float, default=RIDGE, help='lambda / mean diagonal of F\'F; 0: plain lstsq')
    p.add_argument('--json', default=None, help='also write every row\'s per-network accuracies here')
    p.add_argument('--compare_threads', type=int, nargs=2, metavar=('A', 'B'), default=None,
                   help='instead of the table: fit and score draw 0 on A and on B threads, print the differences')
    utils.add_shared_flags(p, 'mnist_root', 'num_threads')
    args = p.parse_args()
    if args.draws < 1 or args.ridge < 0:
        raise utils.UserError('--draws must be >= 1 and --ridge >= 0')
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    t0 = time.time()
    val = loader.ValDataset(args.val_path, args.val_data_length)
    images, labels = mnist.load_mnist(args.mnist_root, train=False)
    score = evaluate.Scorer(images[:args.num_test_images], labels[:args.num_test_images], val.begin, val.last)
    train_images, _ = mnist.load_mnist(args.mnist_root, train=True)
    base = 'Weight selection (folded, refit)'
    rule_accs = {'Weight selection (folded)': score(rules.folded_selection(val.basic)),
                 base: score(rules.refit_selection(val.basic))}
    fits = {n: [] for n in args.num_images}  # N -> per-draw accuracies (networks,)
    with torch.no_grad():
        for d in range(args.draws):
            order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(args.seed + d))
            for n in args.num_images:
                x = net.to_float(train_images[order[:n]]).unsqueeze(1)
                fits[n].append(score(data_refit(val.basic, val.begin, x, args.ridge)))
    if args.compare_threads:
        return compare_threads(args, val, score, train_images)
    rows = {name: [a] for name, a in rule_accs.items()}
    rows.update((f'conv2 fit on {n} training images', a) for n, a in fits.items())
    if val.simple is not None:
        rows['Retrained'] = [score(val.simple)]
    print(f'{len(val)} networks of {args.val_path}, {len(score.images)} MNIST test images; test accuracy in %; '
          f'ridge {args.ridge:g} x the mean diagonal of F\'F; {args.draws} draws of the training images (seeds '
          f'{args.seed}..{args.seed + args.draws - 1}), {torch.get_num_threads()} threads.\n'
          f'mean: the 100-network mean, averaged over the draws, ± its standard error over the draws (rules and '
          f'Retrained use no images: one value). min/max: over the networks, draw {args.seed}. margin: minus {base}, '
          f'paired over the networks, of the per-network accuracy averaged over the draws (mean ± SE).\n')
    print(f'| conv2 from | mean over draws | each draw | min | max | vs {base} |\n'
          f'| --- | --- | --- | --- | --- | --- |')
    for name, draws in rows.items():
        means = torch.stack([a.double().mean() for a in draws])
        spread = f' ± {(means.std() / len(means) ** 0.5).item():.2f}' if len(draws) > 1 else ''
        mean, se = evaluate.paired_margin(torch.stack(draws).double().mean(0), rule_accs[base])
        print(f'| {name} | {means.mean().item():.2f}{spread} | {" / ".join(f"{m:.2f}" for m in means.tolist())} | '
              f'{draws[0].min():.2f} | {draws[0].max():.2f} | {mean:+.2f} ± {se:.2f} |')
    if args.json:
        utils.atomic_write(args.json, json.dumps({'flags': {k: v for k, v in vars(args).items() if k != 'json'},
                                                  'threads': torch.get_num_threads(),
                                                  'rows': {name: [a.tolist() for a in draws]
                                                           for name, draws in rows.items()}}, indent=1))
    print(f'\n({time.time() - t0:.0f} s)')


if __name__ == '__main__':
    utils.run_main(main)

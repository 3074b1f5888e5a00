"""Where the missing information is: conv2 refit by least squares on real activations instead of the BatchNorm model.

Weight selection (folded, refit) solves for conv2 under a model of the hidden activations built from the BN buffers
alone (independent Gaussian channels). Here the same kept channels (rules.top_hidden of the folded convs) get conv2 by
least squares on the activations of N MNIST training images through the network's own frozen Begin: the small
block's hidden activations relu(conv1_kept * x) against the BasicBlock's pre-residual output bn2(conv2(hidden)).
This uses images, so it is not a rule KT competes with (a translator reads weights only); it measures how much of
the gap to Retrained a conv2 fit can close when the statistics of the block's input are known.

    python experiments/data_refit.py > results/baselines/data_refit.log
"""
import argparse
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


def data_refit(basic, begin, images):
    """Stacked small blocks: folded_selection's conv1, conv2 fit by least squares on the activations of `images`
    (float (N, 1, 28, 28)) after each network's Begin."""
    c1, shift1, c2, shift2 = rules.fold_bn(basic)
    keep = rules.top_hidden(c1, c2)
    small = rules.select_hidden(c1, c2, keep)
    conv2 = []
    for i in range(len(c1)):
        x = net.begin_forward(images, {k: t[i:i + 1] for k, t in begin.items()})  # (N, 6, 14, 14)
        want = F.conv2d(F.relu(F.conv2d(x, c1[i], padding=1) + shift1[i, :, None, None]), c2[i], padding=1) + \
            shift2[i, :, None, None]  # the BasicBlock's output before the residual and the last ReLU
        hidden = F.relu(F.conv2d(x, small['conv1.weight'][i], padding=1))
        feats = F.unfold(hidden, 3, padding=1).transpose(1, 2).reshape(-1, net.HIDDEN * 9).double()  # (N*196, 27)
        target = want.flatten(2).transpose(1, 2).reshape(-1, net.PLANES).double()  # (N*196, 6)
        w = torch.linalg.lstsq(feats, target).solution  # (27, 6)
        conv2.append(w.T.reshape(net.PLANES, net.HIDDEN, 3, 3).float())
    return {'conv1.weight': small['conv1.weight'], 'conv2.weight': torch.stack(conv2)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--val_path', default='data/demo/val')
    p.add_argument('--val_data_length', type=int, default=100)
    p.add_argument('--num_test_images', type=int, default=10000)
    p.add_argument('--num_images', type=int, nargs='+', default=[16, 128, 1024],
                   help='training images of each fit (the first N of a fixed shuffle)')
    p.add_argument('--seed', type=int, default=0, help='seed of the shuffle of the training images')
    utils.add_shared_flags(p, 'mnist_root')
    args = p.parse_args()
    t0 = time.time()
    val = loader.ValDataset(args.val_path, args.val_data_length)
    images, labels = mnist.load_mnist(args.mnist_root, train=False)
    score = evaluate.Scorer(images[:args.num_test_images], labels[:args.num_test_images], val.begin, val.last)
    train_images, _ = mnist.load_mnist(args.mnist_root, train=True)
    order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(args.seed))
    accs = {'Weight selection (folded)': score(rules.folded_selection(val.basic)),
            'Weight selection (folded, refit)': score(rules.refit_selection(val.basic))}
    with torch.no_grad():
        for n in args.num_images:
            x = net.to_float(train_images[order[:n]]).unsqueeze(1)
            accs[f'conv2 fit on {n} training images'] = score(data_refit(val.basic, val.begin, x))
    if val.simple is not None:
        accs['Retrained'] = score(val.simple)
    base = 'Weight selection (folded, refit)'
    print(f'{len(val)} networks of {args.val_path}, {len(score.images)} MNIST test images; test accuracy in %; '
          f'margin: minus {base}, paired over the networks (mean ± standard error)\n')
    print(f'| conv2 from | mean | min | max | vs {base} |\n| --- | --- | --- | --- | --- |')
    for name, a in accs.items():
        mean, se = evaluate.paired_margin(a, accs[base])
        print(f'| {name} | {a.mean():.2f} | {a.min():.2f} | {a.max():.2f} | {mean:+.2f} ± {se:.2f} |')
    print(f'\n({time.time() - t0:.0f} s)')


if __name__ == '__main__':
    utils.run_main(main)

"""Training-free baselines on the validation networks: each rule's mean test accuracy and its margin over
Weight selection, paired over the same networks (mean ± standard error).

    python experiments/baselines.py [--val_path data/demo/val] [--num_test_images 10000] > results/baselines/baselines.log

Rules beyond evaluate.reference_rows are the ablations of Weight selection (folded): the scales folded with
the first channels kept, and the importance rule without folding.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate  # noqa: E402
import loader  # noqa: E402
import mnist  # noqa: E402
import net  # noqa: E402
import rules  # noqa: E402
import utils  # noqa: E402


def every_rule(basic):
    """Name -> stacked small blocks of every training-free rule measured here."""
    c1, c2 = basic['conv1.weight'], basic['conv2.weight']
    f1, _, f2, _ = rules.fold_bn(basic)
    first = torch.arange(net.HIDDEN).expand(len(c1), -1)
    return {'Weight selection': rules.weight_selection(basic),
            'scales folded, first 3 channels': rules.select_hidden(f1, f2, first),
            'importance top 3, not folded': rules.select_hidden(c1, c2, rules.top_hidden(c1, c2)),
            'Weight selection (folded)': rules.folded_selection(basic),
            'Weight selection (folded, refit)': rules.refit_selection(basic)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--val_path', default='data/demo/val')
    p.add_argument('--val_data_length', type=int, default=100)
    p.add_argument('--num_test_images', type=int, default=10000)
    utils.add_shared_flags(p, 'mnist_root')
    args = p.parse_args()
    t0 = time.time()
    val = loader.ValDataset(args.val_path, args.val_data_length)
    images, labels = mnist.load_mnist(args.mnist_root, train=False)
    images, labels = images[:args.num_test_images], labels[:args.num_test_images]
    score = evaluate.Scorer(images, labels, val.begin, val.last)
    accs = {name: score(block) for name, block in every_rule(val.basic).items()}
    accs['Large (BasicBlock)'] = score(val.basic, 'basic')
    if val.simple is not None:
        accs['Retrained'] = score(val.simple)
    print(f'{len(val)} networks of {args.val_path}, {len(images)} MNIST test images; test accuracy in %; '
          f'margin: minus Weight selection, paired over the networks (mean ± standard error)\n')
    print('| rule | mean | min | max | vs Weight selection |\n| --- | --- | --- | --- | --- |')
    for name, a in accs.items():
        mean, se = evaluate.paired_margin(a, accs['Weight selection'])
        print(f'| {name} | {a.mean():.2f} | {a.min():.2f} | {a.max():.2f} | {mean:+.2f} ± {se:.2f} |')
    print(f'\n({time.time() - t0:.0f} s)')


if __name__ == '__main__':
    utils.run_main(main)

"""Why the Mean target scores as Identity (block skipped): the mean of data/demo's 256 trained SimpleBlock_NoBn.

    python experiments/mean_target.py > results/cross_arch/mean_target.txt
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import shards  # noqa: E402

small = shards.read_pairs('data/demo/train', 256)['simple']
for key in ('conv1.weight', 'conv2.weight'):
    w = small[key]
    mean = w.mean(0)
    print(f'{key}: norm of the mean block {mean.norm():.3f}, mean norm of a trained block '
          f'{w.flatten(1).norm(dim=1).mean():.3f} (ratio {mean.norm() / w.flatten(1).norm(dim=1).mean():.3f})')
mean1 = small['conv1.weight'].mean(0)
for h in range(len(mean1)):
    print(f'mean conv1 filter {h}: sum {mean1[h].sum():+.3f}, largest weight {mean1[h].max():+.4f}, '
          f'smallest {mean1[h].min():+.4f}')

"""The generators' own test accuracies of the embedded data (data/demo), as quoted in RESULTS.md.

    python experiments/dataset_accuracies.py > results/dataset_accuracies.txt
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import shards  # noqa: E402

for split, n in (('train', 256), ('val', 100)):
    pairs = shards.read_pairs(os.path.join(REPO, 'data', 'demo', split), n)
    for key in ('acc_large', 'acc_small_init', 'acc_small'):
        a = pairs[key]
        print(f'{split} ({n}) {key}: mean {a.mean():.2f}  min {a.min():.2f}  max {a.max():.2f}')

"""Shared test helpers of tests/ and speed/tests/: tiny weight-pair sets in both layouts, from fresh blocks."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:  # the scripts are top-level modules of the repository
    sys.path.insert(0, ROOT)

import net  # noqa: E402
import shards  # noqa: E402

TEST_RECIPE = {'made_by': 'tests/conftest.py', 'epochs': 0}
TINY = ['--num_epochs', '1', '--num_train_images', '300', '--num_test_images', '200', '--device', 'cpu']  # generation


def tiny_args(data_root, *extra, kind='train'):
    """construct_train.py's (kind 'val': construct_val.py's) checked flags of a tiny recipe writing to data_root."""
    import construct_train
    return construct_train.get_args(kind, ['--data_root', str(data_root), *TINY, *extra])


def _jitter(stacked, gen, scale=0.1):
    """Make every float tensor differ between networks (fresh BN params are all 1 / 0)."""
    out = {}
    for k, t in stacked.items():
        if t.is_floating_point():
            t = t + scale * torch.randn(t.shape, generator=gen)
            if k.endswith('running_var'):
                t = t.abs() + 0.5
        out[k] = t
    return out


def make_pairs(n, start=0, seed=0, simple=True):
    """A shard dict (loader's format) of pairs [start, start + n) from fresh, jittered blocks."""
    seeds = [seed * 100_000 + i for i in range(start, start + n)]
    gen = torch.Generator().manual_seed(seed * 7 + start)
    shard = {'recipe': dict(TEST_RECIPE), 'index': torch.arange(start, start + n), 'seed': torch.tensor(seeds)}
    for block in ('begin', 'basic', 'last') + (('simple',) if simple else ()):
        shard[block] = _jitter(net.fresh_states(block, seeds), gen)
    shard['acc_large'] = torch.rand(n, generator=gen, dtype=torch.float64) * 100
    shard['acc_small_init'] = torch.full((n,), float('nan'), dtype=torch.float64)
    shard['acc_small'] = torch.rand(n, generator=gen, dtype=torch.float64) * 100 if simple else \
        torch.full((n,), float('nan'), dtype=torch.float64)
    return shard


def write_shards(root, n, shard_size=4, seed=0, simple=True):
    """Write pairs [0, n) as shards of shard_size under root; returns the merged shard dict."""
    shards.claim_root(str(root), dict(TEST_RECIPE))
    parts = []
    for start in range(0, n, shard_size):
        part = make_pairs(min(shard_size, n - start), start, seed, simple)
        shards.write_shard(str(root), part)
        parts.append(part)
    return shards._concat_shards(parts)


def write_original(root, n, split, seed=0):
    """The original per-file layout of n pairs (train: inputs/labels/backup_*; val: begin/complex/last)."""
    pairs = make_pairs(n, 0, seed)
    dirs = {'train': {'basic': 'inputs', 'simple': 'labels', 'begin': 'backup_begin', 'last': 'backup_last'},
            'val': {'begin': 'begin', 'basic': 'complex', 'last': 'last'}}[split]
    for block, folder in dirs.items():
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        for i in range(n):
            torch.save(net.unstack_state(pairs[block], i), os.path.join(root, folder, f'{i}.pth'))
    return pairs


@pytest.fixture(scope='session')
def pair_sets(tmp_path_factory):
    """Shard roots: 'train' (12 pairs in 3 shards) and 'val' (3 networks with retrained small blocks)."""
    base = tmp_path_factory.mktemp('pairs')
    write_shards(base / 'train', 12, shard_size=4, seed=1)
    write_shards(base / 'val', 3, shard_size=3, seed=2)
    return {'train': str(base / 'train'), 'val': str(base / 'val')}


@pytest.fixture
def one_thread():
    """Run a test single-threaded: tiny CPU ops on a shared 2-core machine are far slower with 2 threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='session')
def tiny_mnist():
    """MNIST of the tiny recipe (TINY), on the CPU."""
    import generation
    return generation.load_mnist_to(torch.device('cpu'), tiny_args('unused'))

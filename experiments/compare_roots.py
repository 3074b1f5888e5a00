"""Compare two output folders file by file: every tensor of every .pt/.pth (torch.equal), recipe.json and
metrics.csv as text. A checkpoint's args may differ only in the output paths. Exits 1 when anything differs.

    python experiments/compare_roots.py BEFORE AFTER
"""
import os
import sys

import torch

PATH_ARGS = ('ckpt_path', 'log_path')  # where each side wrote its run: differ by construction


def same(a, b):
    """Whether two loaded objects are equal, tensors bit for bit."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def load(path):
    """A .pt/.pth file, with a checkpoint's output paths dropped."""
    obj = torch.load(path, weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get('args'), dict):
        obj = dict(obj, args={k: v for k, v in obj['args'].items() if k not in PATH_ARGS})
    return obj


def main(before, after):
    """Print one line per compared file; return the number that differ or are missing."""
    bad = 0
    for root, _, files in sorted(os.walk(before)):
        for name in sorted(files):
            a = os.path.join(root, name)
            rel = os.path.relpath(a, before)
            b = os.path.join(after, rel)
            if name.endswith(('.pt', '.pth')):
                ok = os.path.exists(b) and same(load(a), load(b))
            elif name in ('recipe.json', 'metrics.csv'):
                ok = os.path.exists(b) and open(a).read() == open(b).read()
            else:
                continue
            bad += not ok
            print(f'{"identical" if ok else "DIFFERENT"} {rel}')
    print('all identical' if not bad else f'{bad} files differ')
    return bad


if __name__ == '__main__':
    sys.exit(1 if main(*sys.argv[1:3]) else 0)

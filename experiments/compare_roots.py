"""Compare two output folders file by file: every tensor of every .pt/.pth (torch.equal), recipe.json and
metrics.csv as text. A checkpoint's args may differ only in the output paths, its reference rows only by the rows
added on purpose (ADDED_ROWS, named in the output). Exits 1 when anything else differs.

    python experiments/compare_roots.py BEFORE AFTER
"""
import os
import sys

import torch

PATH_ARGS = ('ckpt_path', 'log_path')  # where each side wrote its run: differ by construction
# reference rows that evaluate.reference_rows gained on purpose: a checkpoint of AFTER may add them (named in the
# output), every other row and tensor must stay bit-identical
ADDED_ROWS = ('Identity (block skipped)',)


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


def drop_added_rows(a, b):
    """b without the ADDED_ROWS of its checkpoint's 'refs' that a lacks; the names dropped."""
    if not (isinstance(a, dict) and isinstance(b, dict) and isinstance(a.get('refs'), dict)
            and isinstance(b.get('refs'), dict)):
        return b, []
    added = [n for n in ADDED_ROWS if n in b['refs'] and n not in a['refs']]
    return dict(b, refs={k: v for k, v in b['refs'].items() if k not in added}), added


def main(before, after):
    """Print one line per compared file; return the number that differ or are missing."""
    bad = 0
    for root, _, files in sorted(os.walk(before)):
        for name in sorted(files):
            a = os.path.join(root, name)
            rel = os.path.relpath(a, before)
            b = os.path.join(after, rel)
            added = []
            if name.endswith(('.pt', '.pth')):
                ok = os.path.exists(b)
                if ok:
                    old, (new, added) = load(a), drop_added_rows(load(a), load(b))
                    ok = same(old, new)
            elif name in ('recipe.json', 'metrics.csv'):
                ok = os.path.exists(b) and open(a).read() == open(b).read()
            else:
                continue
            bad += not ok
            print(f'{"identical" if ok else "DIFFERENT"} {rel}' + (f' (new reference rows: {", ".join(added)})'
                                                                    if added else ''))
    print('all identical' if not bad else f'{bad} files differ')
    return bad


if __name__ == '__main__':
    sys.exit(1 if main(*sys.argv[1:3]) else 0)

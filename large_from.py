"""construct_train.py / construct_val.py --large_from ROOT: the trained large networks of another root.

A pair's large network does not depend on its small block: make_pairs can take Begin, BasicBlock, Last and their
accuracy from a root made with the same recipe (any small block, trained or not) and run only the small-block
phase, about half the cost. Its pairs are those of a full run (tests/test_cross_arch.py shows it).
"""
import os

import original_layout
import shards
import utils
from utils import UserError

FREE_KEYS = ('small_block', 'train_small')  # what may differ between ROOT's recipe and the one asked


def check_source(root, recipe, start=None, stop=None):
    """Refuse a --large_from ROOT that is missing, has no recipe.json, another large-network recipe, or (given
    [start, stop)) not every one of those networks."""
    if not os.path.isdir(root):
        raise UserError(f'--large_from {root}: no such folder; point it at a data root of construct_train.py or '
                        f'construct_val.py')
    theirs = shards.read_recipe(root)
    if theirs is None:
        raise UserError(f'--large_from {root}: no recipe.json, so its large networks\' recipe cannot be checked; '
                        f'use a root this repository made')
    asked = recipe.as_json()
    diff = {k: (theirs.get(k), asked.get(k)) for k in set(theirs) | set(asked)
            if k not in FREE_KEYS and theirs.get(k) != asked.get(k)}
    if diff:
        raise UserError(f'--large_from {root}: made with another recipe than asked (stored vs asked: {diff}); '
                        f'pass the same flags as its recipe.json, except --small_block / --skip_simple / '
                        f'--train_simple')
    if start is not None:
        dirs = {b: d for b, d in original_layout.ORIGINAL_DIRS[recipe.kind].items() if b != 'simple'}
        have = shards.covered_indices(root) if shards.list_shards(root) else original_layout.original_made(root, dirs)
        missing = utils.missing_ranges(have, start, stop)
        if missing:
            raise UserError(f'--large_from {root}: lacks networks {utils.format_ranges(missing)} of [{start}, {stop}); '
                            f'make them there first, or ask for fewer (--start_index, --num_data)')


def read_large(root, start, stop, kind):
    """Networks [start, stop) of ROOT (shards or the original layout) as make_pairs' `large`: stacked begin,
    basic, last, and acc_large when ROOT keeps it (the original layout does not); plus their seeds when known."""
    if shards.list_shards(root):
        data = shards.read_pairs(root, stop - start, ('begin', 'basic', 'last'), start)
    else:
        dirs = {b: d for b, d in original_layout.ORIGINAL_DIRS[kind].items() if b != 'simple'}
        data = original_layout.read_original(root, stop - start, dirs, tuple(dirs), start)
    return {k: data[k] for k in ('begin', 'basic', 'last', 'acc_large', 'seed') if k in data}

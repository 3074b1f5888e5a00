"""The translator's datasets: every pair of a data root loaded once into stacked tensors (no per-item file reads).

Two layouts, detected automatically: shards (shards.py), as construct_train.py / construct_val.py write them, and
the original per-file layout (original_layout.py).
"""
import os

import net
from original_layout import ORIGINAL_DIRS, read_original
from shards import list_shards, read_pairs, read_recipe
import targets
from utils import UserError

BASIC_KEYS = ('conv1.weight', 'conv2.weight', 'bn1.weight', 'bn1.bias', 'bn1.running_mean', 'bn1.running_var',
              'bn2.weight', 'bn2.bias', 'bn2.running_mean', 'bn2.running_var')  # the original item order
SIMPLE_KEYS = ('conv1.weight', 'conv2.weight')
WEIGHT_SHAPES = {'basic': net.BASIC_SHAPES, 'simple': net.SIMPLE_SHAPES}  # what the translator depends on


def as_float(stacked):
    """A stacked block in float32 (whatever precision the files were saved in), contiguous; None stays None."""
    if stacked is None:
        return None
    return {k: t.float().contiguous() if t.is_floating_point() else t.contiguous() for k, t in stacked.items()}


class _PairData:
    """Shared loading, checks and device moves of TrainDataset and ValDataset."""
    original_dirs = {}
    original_required = ()

    def __init__(self, base_path, num, blocks, start=0):
        if num < 1:
            raise UserError(f'{base_path}: asked for {num} pairs; ask for at least 1')
        self.base_path, self.num, self.start = base_path, num, start
        if list_shards(base_path):
            data, self.layout = read_pairs(base_path, num, blocks, start), 'shards'
        elif os.path.isdir(base_path) and any(os.path.isdir(os.path.join(base_path, d))
                                              for d in self.original_dirs.values()):
            dirs = {b: d for b, d in self.original_dirs.items() if b in blocks}
            data, self.layout = read_original(base_path, num, dirs, self.original_required, start), 'original'
        else:
            folders = ', '.join(d + '/' for d in self.original_dirs.values())
            raise UserError(f'{base_path}: no pairs there (neither shard_*.pt files nor the original folders '
                            f'{folders}); generate them with construct_train.py / construct_val.py or fix the path')
        self.recipe = data.get('recipe')
        recipe = self.recipe or read_recipe(base_path)  # the original layout keeps its recipe in recipe.json only
        # the kind of small block the set holds (or would hold): its recipe's, else its blocks' keys, else unknown
        self.small_block = recipe.get('small_block', net.DEFAULT_SMALL) if recipe else \
            net.small_block_of(data['simple']) if data.get('simple') else None
        self._check_shapes(data, 'basic')
        self._check_shapes(data, 'simple')
        # the translator runs in float32 whatever precision the files were saved in
        self.begin = as_float(data.get('begin'))
        self.basic = as_float(data.get('basic'))
        self.last = as_float(data.get('last'))
        self.simple = as_float(data.get('simple'))
        self.acc_large = data.get('acc_large')
        self.acc_small_init = data.get('acc_small_init')
        self.acc_small = data.get('acc_small')

    def _check_shapes(self, data, block):
        """Refuse blocks of another architecture, naming the data folder."""
        stacked = data.get(block)
        if stacked is None:
            return
        kind = 'BasicBlock' if block == 'basic' else self.small_block or net.DEFAULT_SMALL
        shapes = WEIGHT_SHAPES['basic'] if block == 'basic' else \
            WEIGHT_SHAPES['simple'] if kind == net.DEFAULT_SMALL else targets.written_shapes(kind)
        for key, shape in shapes.items():
            if key not in stacked:
                raise UserError(f'{self.base_path}: {block} weights lack "{key}" (not a {kind} state dict'
                                f'{"" if block == "basic" else ", the small block its recipe.json names"})')
            if tuple(stacked[key].shape[1:]) != shape:
                raise UserError(f'{self.base_path}: {block} "{key}" has shape {tuple(stacked[key].shape[1:])}, '
                                f'expected {shape} (the 6->6->6 BasicBlock / 6->3->6 SimpleBlock_NoBn of KT, '
                                f'or the {kind} of net.py)')

    def __len__(self):
        return self.num

    def to(self, device):
        """Move every tensor to `device` (in place); returns self."""
        self.begin, self.basic, self.last, self.simple = (
            None if d is None else {k: t.to(device) for k, t in d.items()}
            for d in (self.begin, self.basic, self.last, self.simple))
        self.acc_large, self.acc_small_init, self.acc_small = (
            None if a is None else a.to(device) for a in (self.acc_large, self.acc_small_init, self.acc_small))
        return self

    def require(self, block, why):
        """Raise a UserError if the set lacks `block` weights, saying why they are needed."""
        if {'begin': self.begin, 'basic': self.basic, 'last': self.last, 'simple': self.simple}[block] is None:
            what = {'simple': f'small blocks ({self.small_block or net.DEFAULT_SMALL})', 'begin': 'Begin blocks',
                    'last': 'Last blocks'}[block]
            raise UserError(f'{self.base_path}: holds no {what}, needed for {why} '
                            f'(made with --skip_simple, or the original layout without that folder); '
                            f'regenerate it without --skip_simple or point at another set')

    def basic_inputs(self, i):
        """The 10 BasicBlock tensors of pair i, in the original order (BASIC_KEYS)."""
        return [self.basic[k][i] for k in BASIC_KEYS]


class TrainDataset(_PairData):
    """Training pairs. Item i: (inputs, targets), inputs the 10 BasicBlock tensors in BASIC_KEYS order,
    targets [conv1.weight, conv2.weight] of the SimpleBlock_NoBn (another small block's targets.KEYS tensors).

    Attributes (stacked tensors, leading axis = pair): basic and simple (dicts by state-dict key; simple is
    None without small blocks), begin and last (None unless with_networks names them, or is True for both,
    and present: the weight MSE never needs them and at 300k pairs Last alone is 7 GB), acc_large / acc_small_init
    / acc_small
    ((num,) float64 in %, None in the original layout), recipe (dict or None), layout, small_block (the kind of
    small block: the recipe's, else that of the blocks held, else None). start: the index of
    the first pair read (pairs start .. start + num - 1)."""
    original_dirs = ORIGINAL_DIRS['train']
    original_required = ('basic',)

    def __init__(self, base_path, num, with_networks=False, start=0):
        networks = ('begin', 'last') if with_networks is True else tuple(with_networks or ())
        super().__init__(base_path, num, ('basic', 'simple') + networks, start)

    def __getitem__(self, i):
        self.require('simple', 'MSE targets')
        return self.basic_inputs(i), [self.simple[k][i] for k in targets.KEYS[self.small_block or net.DEFAULT_SMALL]]


class ValDataset(_PairData):
    """Validation networks. Item i: (begin, inputs, last), begin and last that network's BeginBlock and
    LastBlock state dicts, inputs its 10 BasicBlock tensors in BASIC_KEYS order.

    Attributes as TrainDataset, begin and last always loaded; simple holds retrained small blocks when
    the set has them (key 'simple' of the shards, folder simple/ of the original layout), else None."""
    original_dirs = ORIGINAL_DIRS['val']
    original_required = ('begin', 'basic', 'last')

    def __init__(self, base_path, num, start=0):
        super().__init__(base_path, num, ('begin', 'basic', 'last', 'simple'), start)
        self.require('begin', 'validation')
        self.require('last', 'validation')

    def __getitem__(self, i):
        return ({k: t[i] for k, t in self.begin.items()}, self.basic_inputs(i),
                {k: t[i] for k, t in self.last.items()})

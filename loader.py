"""Weight pairs: the shards that generation writes, the original per-file layout, and the translator's datasets."""
import json
import logging
import os
import re

import torch
from tqdm import tqdm

import net
from mnist import load_mnist  # noqa: F401  (re-exported for users of the old name loader.load_mnist)
from utils import UserError, atomic_save, atomic_write, load_file

# ----------------------------------------------------------------------------------------
# Weight-pair shards.
#
# A data root holds recipe.json (the recipe every shard of it was made with) and shard files
# shard_<start>_<stop>.pt, each covering the contiguous indices [start, stop) with every tensor
# stacked along a first axis:
#   {'format': SHARD_FORMAT, 'recipe': {...}, 'index': (n,) int64, 'seed': (n,) int64,
#    'begin': {state-dict key: (n, ...)}, 'basic': {...}, 'last': {...},
#    'simple': {...}  (only when the small block was trained),
#    'acc_large': (n,), 'acc_small_init': (n,), 'acc_small': (n,)  float64, in %; NaN when not measured}

SHARD_FORMAT = 'kt-pairs-v1'
SHARD_RE = re.compile(r'^shard_(\d+)_(\d+)\.pt$')


def shard_path(root, start, stop):
    """Path of the shard covering [start, stop)."""
    return os.path.join(root, f'shard_{start:08d}_{stop:08d}.pt')


def list_shards(root):
    """Sorted (start, stop, path) of the shards in root, read from the file names."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = SHARD_RE.match(name)
        if m:
            found.append((int(m.group(1)), int(m.group(2)), os.path.join(root, name)))
    return sorted(found)


def covered_indices(root):
    """Set of indices covered by the shards in root."""
    return {i for start, stop, _ in list_shards(root) for i in range(start, stop)}


def check_shard_ranges(shards):
    """Raise if shard ranges overlap (an index made twice)."""
    for (a0, a1, pa), (b0, b1, pb) in zip(shards, shards[1:]):
        if b0 < a1:
            raise UserError(f'shards overlap: {pa} [{a0}, {a1}) and {pb} [{b0}, {b1}); remove one of them')


def missing_ranges(indices, start, stop):
    """Contiguous ranges [a, b) of [start, stop) not in `indices`."""
    ranges, a = [], None
    for i in range(start, stop):
        if i in indices:
            if a is not None:
                ranges.append((a, i))
                a = None
        elif a is None:
            a = i
    if a is not None:
        ranges.append((a, stop))
    return ranges


def format_ranges(ranges, limit=10):
    """'a-b, c, ...' for a list of [a, b) ranges."""
    parts = [f'{a}' if b == a + 1 else f'{a}-{b - 1}' for a, b in ranges[:limit]]
    return ', '.join(parts) + (f', ... ({len(ranges)} ranges)' if len(ranges) > limit else '')


def read_recipe(root):
    """The recipe dict stored in root/recipe.json, or None."""
    path = os.path.join(root, 'recipe.json')
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f'{path}: not a readable recipe ({e}); generation writes it before the first shard: '
                        f'delete it if the folder holds no pairs yet') from None


def holds_pairs(root):
    """Whether root holds any network: a shard, or a file of the original layout."""
    folders = {d for dirs in ORIGINAL_DIRS.values() for d in dirs.values()}
    return bool(list_shards(root)) or any(os.path.isdir(os.path.join(root, d)) and os.listdir(os.path.join(root, d))
                                          for d in folders)


def claim_root(root, recipe):
    """Make root/recipe.json hold `recipe`; refuse a root claimed with another recipe (another process of
    the same job may be making its first networks there)."""
    os.makedirs(root, exist_ok=True)
    old = read_recipe(root)
    if old is not None and old != recipe:
        diff = {k: (old.get(k), recipe.get(k)) for k in set(old) | set(recipe) if old.get(k) != recipe.get(k)}
        made = holds_pairs(root)
        hint = '' if made else '; it holds no networks yet: if no other process is making them, delete its recipe.json'
        raise UserError(f'{root} {"holds pairs made" if made else "was claimed"} with another recipe (stored vs asked: '
                        f'{diff}); use another --data_root or the same settings{hint}')
    if old is None:
        atomic_write(os.path.join(root, 'recipe.json'), json.dumps(recipe, indent=1, sort_keys=True) + '\n')


def write_shard(root, shard):
    """Write one shard atomically; its name comes from its index range."""
    index = shard['index']
    start, stop = int(index[0]), int(index[-1]) + 1
    assert torch.equal(index, torch.arange(start, stop)), 'a shard covers a contiguous range'
    atomic_save({'format': SHARD_FORMAT, **shard}, shard_path(root, start, stop))


def load_shard(path):
    """Load one shard, naming the file if it is unreadable."""
    shard = load_file(path, 'shard', '; delete it and re-run generation')
    if not isinstance(shard, dict) or shard.get('format') != SHARD_FORMAT:
        raise UserError(f'{path}: not a {SHARD_FORMAT} shard')
    return shard


def read_pairs(root, num, blocks=None, start=0):
    """Indices [start, start + num) of the shards in root, merged into one dict of stacked tensors.

    blocks: the weight dicts to keep (e.g. ('basic', 'simple')); the others are dropped shard by shard,
    so a 300k-pair train set never holds its Begin and Last blocks in memory at once. None keeps all."""
    shards = list_shards(root)
    if not shards:
        raise UserError(f'{root}: no shard_*.pt files (generate them with construct_train.py / construct_val.py)')
    check_shard_ranges(shards)
    end = start + num
    have = covered_indices(root)
    if not all(i in have for i in range(start, end)):
        raise UserError(f'{root}: asked for {num} pairs ({start}..{end - 1}) but {len(have)} exist; '
                        f'missing indices: {format_ranges(missing_ranges(have, start, end))}')
    parts, recipe = [], read_recipe(root)
    for a, b, path in shards:
        if b <= start:
            continue
        if a >= end:
            break
        shard = load_shard(path)
        if not torch.equal(shard['index'], torch.arange(a, b)):
            raise UserError(f'{path}: its networks are not {a}..{b - 1} as its name says (a renamed or copied '
                            f'shard?); regenerate it')
        if recipe is not None and shard.get('recipe') != recipe:
            raise UserError(f'{path}: made with another recipe than {root}/recipe.json')
        recipe = shard.get('recipe')
        if blocks is not None:
            shard = {k: v for k, v in shard.items() if not (isinstance(v, dict) and k != 'recipe') or k in blocks}
        parts.append(_slice_shard(shard, max(start, a) - a, min(b, end) - a))
    return _concat_shards(parts)


def _slice_shard(shard, a, b):
    """Rows [a, b) of a shard."""
    out = {}
    for key, value in shard.items():
        if isinstance(value, dict) and key != 'recipe':
            out[key] = {n: t[a:b] for n, t in value.items()}
        elif isinstance(value, torch.Tensor):
            out[key] = value[a:b]
        else:
            out[key] = value
    return out


def _concat_shards(parts):
    """Concatenate sliced shards along the first axis."""
    out = {}
    for key, value in parts[0].items():
        if isinstance(value, dict) and key != 'recipe':
            if any(key not in p for p in parts):
                raise UserError(f'some shards have "{key}" weights and some do not')
            out[key] = {n: torch.cat([p[key][n] for p in parts]) for n in value}
        elif isinstance(value, torch.Tensor):
            out[key] = torch.cat([p[key] for p in parts])
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------------------------------
# The translator's datasets: every pair loaded once into stacked tensors (no per-item file reads).
#
# Two layouts, detected automatically:
#   * shards (above), as construct_train.py / construct_val.py write them;
#   * the original per-file layout, one plain state dict per file:
#       train: inputs/{i}.pth (BasicBlock), labels/{i}.pth (SimpleBlock_NoBn),
#              backup_begin/{i}.pth, backup_last/{i}.pth (BeginBlock, LastBlock; optional here)
#       val:   begin/{i}.pth, complex/{i}.pth (BasicBlock), last/{i}.pth,
#              simple/{i}.pth (ours, optional: retrained SimpleBlock_NoBn, the "Retrained" row)
#     construct_train.py --layout original writes it (write_original, the inverse of read_original).

BASIC_KEYS = ('conv1.weight', 'conv2.weight', 'bn1.weight', 'bn1.bias', 'bn1.running_mean', 'bn1.running_var',
              'bn2.weight', 'bn2.bias', 'bn2.running_mean', 'bn2.running_var')  # the original item order
SIMPLE_KEYS = ('conv1.weight', 'conv2.weight')
ACC_KEYS = ('acc_large', 'acc_small_init', 'acc_small')
WEIGHT_SHAPES = {'basic': net.BASIC_SHAPES, 'simple': net.SIMPLE_SHAPES}  # what the translator depends on
ORIGINAL_ITEM_RE = re.compile(r'^(\d+)\.pth$')
ORIGINAL_DIRS = {  # block -> sub-folder of the original per-file layout, per split
    'train': {'basic': 'inputs', 'simple': 'labels', 'begin': 'backup_begin', 'last': 'backup_last'},
    # the original val layout has no retrained small blocks: simple/ is our name for them
    'val': {'begin': 'begin', 'basic': 'complex', 'last': 'last', 'simple': 'simple'},
}


def _original_indices(folder):
    """Set of i with a file folder/{i}.pth."""
    return {int(m.group(1)) for m in map(ORIGINAL_ITEM_RE.match, os.listdir(folder)) if m}


def read_original(base_path, num, dirs, required, start=0):
    """Indices [start, start + num) of the original per-file layout as stacked dicts {block: {key: (num, ...)}}.

    dirs maps block -> sub-folder; folders of blocks not in `required` may be absent."""
    present = {b: os.path.join(base_path, d) for b, d in dirs.items() if os.path.isdir(os.path.join(base_path, d))}
    for block in required:
        if block not in present:
            raise UserError(f'{base_path}: sub-folder {dirs[block]}/ is missing (the original layout needs '
                            f'{", ".join(dirs[b] + "/" for b in required)})')
    for block, folder in present.items():
        have = _original_indices(folder)
        if not all(i in have for i in range(start, start + num)):
            raise UserError(f'{folder}: asked for {num} pairs ({start}..{start + num - 1}) but {len(have)} exist; '
                            f'missing indices: {format_ranges(missing_ranges(have, start, start + num))}')
    out = {}
    for block, folder in present.items():
        sds = []
        for i in tqdm(range(start, start + num), desc=f'reading {folder}', leave=False, disable=num < 2000):
            path = os.path.join(folder, f'{i}.pth')
            sd = load_file(path, 'state dict')
            if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
                raise UserError(f'{path}: not a plain state dict of tensors')
            if sds and set(sd) != set(sds[0]):
                raise UserError(f'{path}: keys {sorted(sd)} differ from {folder}/{start}.pth {sorted(sds[0])}')
            sds.append(sd)
        try:
            out[block] = {k: torch.stack([sd[k] for sd in sds]) for k in sds[0]}
        except RuntimeError as e:
            raise UserError(f'{folder}: tensors of different shapes across files ({e})') from None
    return out


def original_made(root, dirs):
    """Indices complete in the original layout under root: those with a file {i}.pth in every folder of dirs."""
    folders = [os.path.join(root, d) for d in dirs.values()]
    return set.intersection(*(_original_indices(f) if os.path.isdir(f) else set() for f in folders))


def write_original(root, shard, dirs):
    """Write a shard's networks as plain state dicts root/<dirs[block]>/{i}.pth, each file atomically: the
    inverse of read_original. Index i counts as made once all its files exist (original_made)."""
    for j, i in enumerate(shard['index'].tolist()):
        for block, d in dirs.items():
            # unstack_state clones: a view would save the whole stacked storage into every file
            atomic_save(net.unstack_state(shard[block], j), os.path.join(root, d, f'{i}.pth'))


# ----------------------------------------------------------------------------------------
# The folder a generation process writes: its layout, what is made, checks before it starts.

def original_layout_help(kind):
    """The folders of --layout original, for --help."""
    dirs = ORIGINAL_DIRS[kind]
    when = 'without --skip_simple' if kind == 'train' else 'with --train_simple'
    return ', '.join(f'{d}/' for b, d in dirs.items() if b != 'simple') + f', and {dirs["simple"]}/ {when}'


def original_dirs(kind, train_small):
    """Block -> folder that --layout original writes (small blocks only when trained)."""
    return {b: d for b, d in ORIGINAL_DIRS[kind].items() if b != 'simple' or train_small}


def check_writable(root):
    """Create root if needed and make sure files can be written there."""
    try:
        os.makedirs(root, exist_ok=True)
        probe = os.path.join(root, f'.write_test_{os.getpid()}')
        open(probe, 'wb').close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f'--data_root {root} is not writable ({e.strerror}); choose another folder') from None


def check_layout(root, layout, kind):
    """Refuse a data root holding the other layout; True when it holds original-layout folders without a
    recipe.json (recipe.json is written before any pair: such files come from the original code)."""
    folders = [d + '/' for d in ORIGINAL_DIRS[kind].values() if os.path.isdir(os.path.join(root, d))]
    if layout == 'original' and list_shards(root):
        raise UserError(f'--data_root {root} holds shards (shard_*.pt): --layout original needs a folder of its '
                        f'own, or pass --layout shards to resume them')
    if layout == 'shards' and folders:
        raise UserError(f'--data_root {root} holds the original layout ({", ".join(folders)}): pass '
                        f'--layout original to resume it, or choose another folder')
    return bool(folders) and read_recipe(root) is None


def check_original_shapes(root, dirs):
    """Refuse any file {i}.pth under root/<dirs[block]> whose state dict does not fit its block."""
    for block, d in dirs.items():
        want = {k: tuple(t.shape) for k, t in net.BLOCKS[block]().state_dict().items()}
        folder = os.path.join(root, d)
        for i in sorted(_original_indices(folder)) if os.path.isdir(folder) else ():
            path = os.path.join(folder, f'{i}.pth')
            sd = load_file(path, 'state dict')
            ok = isinstance(sd, dict) and all(isinstance(t, torch.Tensor) for t in sd.values())
            got = {k: tuple(t.shape) for k, t in sd.items()} if ok else None
            if got != want:
                raise UserError(f'{path}: not a {net.BLOCKS[block].__name__} state dict (keys and shapes '
                                f'{got}, expected {want}); move it away or choose another --data_root')


def made_indices(root, layout, dirs):
    """Indices already complete in root, in its layout (dirs: the original layout's folders)."""
    if layout == 'original':
        return original_made(root, dirs)
    check_shard_ranges(list_shards(root))
    return covered_indices(root)


def accuracy_text(acc, train_small):
    """'large …%' and, when small blocks are trained, the small block's at init and trained (acc: the shard's
    acc_* keys -> numbers)."""
    small = (f', small at init {acc["acc_small_init"]:.2f}%, small trained {acc["acc_small"]:.2f}%'
             if train_small else '')
    return f'large {acc["acc_large"]:.2f}%{small}'


def save_pairs(root, layout, shard, dirs):
    """Write one step group's networks in the layout, every file atomically (the original layout has no
    place for the test accuracies: they go to the log, a line per network)."""
    if layout == 'shards':
        return write_shard(root, shard)
    write_original(root, shard, dirs)
    for j, i in enumerate(shard['index'].tolist()):
        acc = {key: shard[key][j].item() for key in ACC_KEYS}
        logging.info(f'network {i}: test accuracy {accuracy_text(acc, "simple" in dirs)}')


def log_original(shard, epochs, kind, train_small):
    """The original generation scripts' lines for each network of a shard (epochs: make_pairs' epoch_log)."""
    large = 'Complex Test Accuracy' if kind == 'train' else 'Test Accuracy'
    for j, i in enumerate(shard['index'].tolist()):
        lines = [f'Data index: {i}'] + [f'Epoch {e}, {large} {a[j].item()}%' for e, a in enumerate(epochs['large'])]
        lines.append('-' * 50)
        if train_small:
            lines.append(f'Before Train, Test Accuracy {shard["acc_small_init"][j].item()}%')
            lines += [f'Epoch {e}, Simple Test Accuracy {a[j].item()}%' for e, a in enumerate(epochs['small'])]
        logging.info('\n'.join(lines))


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
        for key, shape in WEIGHT_SHAPES[block].items():
            if key not in stacked:
                raise UserError(f'{self.base_path}: {block} weights lack "{key}" (not a '
                                f'{"BasicBlock" if block == "basic" else "SimpleBlock_NoBn"} state dict)')
            if tuple(stacked[key].shape[1:]) != shape:
                raise UserError(f'{self.base_path}: {block} "{key}" has shape {tuple(stacked[key].shape[1:])}, '
                                f'expected {shape} (the 6->6->6 BasicBlock / 6->3->6 SimpleBlock_NoBn of KT)')

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
            what = {'simple': 'small blocks (SimpleBlock_NoBn)', 'begin': 'Begin blocks', 'last': 'Last blocks'}[block]
            raise UserError(f'{self.base_path}: holds no {what}, needed for {why} '
                            f'(made with --skip_simple, or the original layout without that folder); '
                            f'regenerate it without --skip_simple or point at another set')

    def basic_inputs(self, i):
        """The 10 BasicBlock tensors of pair i, in the original order (BASIC_KEYS)."""
        return [self.basic[k][i] for k in BASIC_KEYS]


class TrainDataset(_PairData):
    """Training pairs. Item i: (inputs, targets), inputs the 10 BasicBlock tensors in BASIC_KEYS order,
    targets [conv1.weight, conv2.weight] of the SimpleBlock_NoBn.

    Attributes (stacked tensors, leading axis = pair): basic and simple (dicts by state-dict key; simple is
    None without small blocks), begin and last (None unless with_networks names them, or is True for both,
    and present: the weight MSE never needs them and at 300k pairs Last alone is 7 GB), acc_large / acc_small_init
    / acc_small
    ((num,) float64 in %, None in the original layout), recipe (dict or None), layout. start: the index of
    the first pair read (pairs start .. start + num - 1)."""
    original_dirs = ORIGINAL_DIRS['train']
    original_required = ('basic',)

    def __init__(self, base_path, num, with_networks=False, start=0):
        networks = ('begin', 'last') if with_networks is True else tuple(with_networks or ())
        super().__init__(base_path, num, ('basic', 'simple') + networks, start)

    def __getitem__(self, i):
        self.require('simple', 'MSE targets')
        return self.basic_inputs(i), [self.simple[k][i] for k in SIMPLE_KEYS]


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

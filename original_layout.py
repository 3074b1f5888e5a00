"""The original code's per-file layout: one plain state dict per network and block, {i}.pth in a folder each.

    train: inputs/{i}.pth (BasicBlock), labels/{i}.pth (the small block: SimpleBlock_NoBn, or --small_block),
           backup_begin/{i}.pth, backup_last/{i}.pth (BeginBlock, LastBlock; optional when read)
    val:   begin/{i}.pth, complex/{i}.pth (BasicBlock), last/{i}.pth,
           simple/{i}.pth (ours, optional: retrained SimpleBlock_NoBn, the "Retrained" row)

construct_train.py --layout original writes it (write_original, the inverse of read_original); the translator's
datasets read it (loader.py).
"""
import os
import re

import torch
from tqdm import tqdm

import net
from utils import UserError, atomic_save, format_ranges, load_file, missing_ranges

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


def original_layout_help(kind):
    """The folders of --layout original, for --help."""
    dirs = ORIGINAL_DIRS[kind]
    when = 'without --skip_simple' if kind == 'train' else 'with --train_simple'
    return ', '.join(f'{d}/' for b, d in dirs.items() if b != 'simple') + f', and {dirs["simple"]}/ {when}'


def original_dirs(kind, train_small):
    """Block -> folder that --layout original writes (small blocks only when trained)."""
    return {b: d for b, d in ORIGINAL_DIRS[kind].items() if b != 'simple' or train_small}


def check_original_shapes(root, dirs, small_block=net.DEFAULT_SMALL):
    """Refuse any file {i}.pth under root/<dirs[block]> whose state dict does not fit its block (the small blocks':
    small_block, a name of net.SMALL_BLOCKS)."""
    for block, d in dirs.items():
        module = net.SMALL_BLOCKS[small_block]() if block == 'simple' else net.BLOCKS[block]()
        want = {k: tuple(t.shape) for k, t in module.state_dict().items()}
        folder = os.path.join(root, d)
        for i in sorted(_original_indices(folder)) if os.path.isdir(folder) else ():
            path = os.path.join(folder, f'{i}.pth')
            sd = load_file(path, 'state dict')
            ok = isinstance(sd, dict) and all(isinstance(t, torch.Tensor) for t in sd.values())
            got = {k: tuple(t.shape) for k, t in sd.items()} if ok else None
            if got != want:
                raise UserError(f'{path}: not a {type(module).__name__} state dict (keys and shapes '
                                f'{got}, expected {want}); move it away or choose another --data_root')

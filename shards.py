"""Weight-pair shards: the files generation writes and the translator reads, one root per recipe.

A data root holds recipe.json (the recipe every shard of it was made with) and shard files
shard_<start>_<stop>.pt, each covering the contiguous indices [start, stop) with every tensor
stacked along a first axis:
  {'format': SHARD_FORMAT, 'recipe': {...}, 'index': (n,) int64, 'seed': (n,) int64,
   'begin': {state-dict key: (n, ...)}, 'basic': {...}, 'last': {...},
   'simple': {...}  (only when the small block was trained),
   'acc_large': (n,), 'acc_small_init': (n,), 'acc_small': (n,)  float64, in %; NaN when not measured}

An index may be made twice (two processes on one root before claims.py, or a claim taken over from a process
that was only slow). Readers then take each index from one copy by a fixed rule: shards in order of their start,
the longest first among equal starts, each giving the indices no earlier shard gave (reading_plan). They warn once
with the files involved; `construct_train.py --dedupe` deletes the copies that rule never reads (dedupe).
"""
import json
import logging
import os
import re
import zipfile

import torch

import original_layout
from utils import UserError, atomic_save, atomic_write, format_ranges, load_file, missing_ranges

SHARD_FORMAT = 'kt-pairs-v1'
SHARD_RE = re.compile(r'^shard_(\d+)_(\d+)\.pt$')
ACC_KEYS = ('acc_large', 'acc_small_init', 'acc_small')  # test accuracies in %, NaN when not measured
log = logging.getLogger(__name__)


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


def reading_plan(shards):
    """[(start, stop, path, lo, hi)]: rows [lo, hi) of each shard that a reader takes, by the rule of the module
    docstring (earliest start first, then the longest); shards that give no row are left out."""
    plan, end = [], None
    for a, b, path in sorted(shards, key=lambda s: (s[0], -s[1], s[2])):
        lo = a if end is None else max(a, end)
        if lo < b:
            plan.append((a, b, path, lo - a, b - a))
        end = b if end is None else max(end, b)
    return plan


def duplicates(shards):
    """(ranges [a, b) of indices in more than one shard, sorted paths of the shards holding them)."""
    ranges, files, end = [], set(), None
    for a, b, path in sorted(shards, key=lambda s: (s[0], -s[1], s[2])):
        if end is not None and a < end:
            lo, hi = a, min(b, end)
            if ranges and lo <= ranges[-1][1]:
                ranges[-1] = (ranges[-1][0], max(ranges[-1][1], hi))
            else:
                ranges.append((lo, hi))
            files.update(p for s, t, p in shards if s < hi and lo < t)
        end = b if end is None else max(end, b)
    return ranges, sorted(files)


_warned = set()  # roots whose duplicates were reported: once per process


def warn_duplicates(root, shards):
    """Log once per root which indices were made twice and by which files, and how to remove the extra copies."""
    ranges, files = duplicates(shards)
    if not ranges or root in _warned:
        return
    _warned.add(root)
    names = [os.path.basename(p) for p in files]
    log.warning(f'{root}: indices {format_ranges(ranges)} were made more than once ({", ".join(names[:8])}'
                f'{f", ... {len(names)} files" if len(names) > 8 else ""}); each is read from one copy (the shard '
                f'that starts first, the longest among equal starts); python construct_train.py --data_root {root} '
                f'--dedupe (construct_val.py for validation networks) deletes the others')


def complete(path):
    """Whether a shard file is whole: torch files are zip archives, whose directory is at their very end (a
    truncated copy or a disk error loses it). Reads only that directory, not the tensors."""
    try:
        with zipfile.ZipFile(path):
            return True
    except (OSError, zipfile.BadZipFile):
        return False


def dedupe(root):
    """Delete every shard the reading rule never reads (each fully covered by kept shards), after checking that
    the kept shards covering it load; returns the deleted paths. A shard only partly covered is kept: readers skip
    its extra rows, and a rewrite would not be one atomic step. Each deletion is one atomic unlink."""
    shards = list_shards(root)
    kept = {plan[2] for plan in reading_plan(shards)}
    removed = []
    for a, b, path in shards:
        if path in kept:
            continue
        for c, d, other in shards:
            if other in kept and c < b and a < d:
                check_shard(other, c, d)  # never delete a copy whose replacement cannot be read
        os.remove(path)
        removed.append(path)
    return removed


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
    folders = {d for dirs in original_layout.ORIGINAL_DIRS.values() for d in dirs.values()}
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


def check_shard(path, a, b):
    """Load the shard of [a, b) at path; refuse it if its networks are not those its name says."""
    shard = load_shard(path)
    if not torch.equal(shard['index'], torch.arange(a, b)):
        raise UserError(f'{path}: its networks are not {a}..{b - 1} as its name says (a renamed or copied '
                        f'shard?); regenerate it')
    return shard


def read_pairs(root, num, blocks=None, start=0):
    """Indices [start, start + num) of the shards in root, merged into one dict of stacked tensors.

    blocks: the weight dicts to keep (e.g. ('basic', 'simple')); the others are dropped shard by shard,
    so a 300k-pair train set never holds its Begin and Last blocks in memory at once. None keeps all."""
    shards = list_shards(root)
    if not shards:
        raise UserError(f'{root}: no shard_*.pt files (generate them with construct_train.py / construct_val.py)')
    end = start + num
    have = covered_indices(root)
    if not all(i in have for i in range(start, end)):
        raise UserError(f'{root}: asked for {num} pairs ({start}..{end - 1}) but {len(have)} exist; '
                        f'missing indices: {format_ranges(missing_ranges(have, start, end))}')
    warn_duplicates(root, [s for s in shards if s[0] < end and start < s[1]])
    parts, recipe = [], read_recipe(root)
    for a, b, path, lo, hi in reading_plan(shards):
        if a + hi <= start:
            continue
        if a + lo >= end:
            break
        shard = check_shard(path, a, b)
        if recipe is not None and shard.get('recipe') != recipe:
            raise UserError(f'{path}: made with another recipe than {root}/recipe.json')
        recipe = shard.get('recipe')
        if blocks is not None:
            shard = {k: v for k, v in shard.items() if not (isinstance(v, dict) and k != 'recipe') or k in blocks}
        parts.append(_slice_shard(shard, max(start, a + lo) - a, min(a + hi, end) - a))
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

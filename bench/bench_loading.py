"""Translator data loading: samples/s that reach the training loop, (a) the original per-file layout through a
torch DataLoader vs (b) our in-memory path, on one synthetic set written in both layouts.

(a) train/inputs/{i}.pth (BasicBlock state dict) and train/labels/{i}.pth (SimpleBlock_NoBn state dict), a
    Dataset whose __getitem__ torch.loads the two files (weights_only=True) and returns the 10 BasicBlock
    tensors and the 2 target convs, as the original did; DataLoader(shuffle=True, batch_size) with 0, 2 and
    all cores of workers (DataLoader's default non-persistent workers, which start again every epoch). The
    tensors the model uses (conv1/conv2 in, conv1/conv2 out) are moved to the device per batch.
(b) loader.TrainDataset (else shards.read_pairs) loaded once from the shards, conv1/conv2 moved to the
    device, then a batch is an index lookup with a random permutation, as train.py does (epoch time: the
    mean of 5 consecutive epochs). Its one-time load is timed separately (also TrainDataset on the original
    layout, which reads every file once).
Also bytes on disk (apparent and allocated) and file counts of both layouts. Files are read from the page
cache (they were just written): a cold disk would slow (a) much more than (b).
Rows are timed interleaved, repeat by repeat; each reports the median epoch.

    python bench/bench_loading.py             # 20,000 pairs, batch 4096
    python bench/bench_loading.py --quick     # 2,000 pairs, batch 512
"""
import argparse
import contextlib
import io
import os
import tempfile
import time

import torch

import common
from common import default_device, machine, median, print_table, set_threads, sync, timed, write_json
import loader
import net
import shards
import utils

BASIC_KEYS = ('conv1.weight', 'conv2.weight', 'bn1.weight', 'bn1.bias', 'bn1.running_mean', 'bn1.running_var',
              'bn2.weight', 'bn2.bias', 'bn2.running_mean', 'bn2.running_var')  # the original item order
SIMPLE_KEYS = ('conv1.weight', 'conv2.weight')
MEMORY_EPOCHS_PER_TIMING = 5
RECIPE = {'made_by': 'bench/bench_loading.py (synthetic random weights)'}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true', help='2,000 pairs, batch 512, 2 repeats')
    utils.add_shared_flags(p, 'device', device=default_device())
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads; default: torch\'s')
    p.add_argument('--num_pairs', type=int, default=None, help='synthetic pairs (default 20,000; quick 2,000)')
    p.add_argument('--batch', type=int, default=None, help='batch size (default 4096; quick 512)')
    p.add_argument('--workers', type=int, nargs='+', default=None,
                   help='DataLoader worker counts of path (a) (default 0, 2 and os.cpu_count())')
    p.add_argument('--shard_size', type=int, default=256,
                   help='pairs per shard (construct_train.py writes one shard per --models_per_step group, '
                        'up to 256 on a GPU)')
    p.add_argument('--no_networks', action='store_true',
                   help='write only the large and small blocks, not the Begin / Last blocks that generation '
                        'also stores (backup_begin/, backup_last/ and in the shards)')
    p.add_argument('--repeats', type=int, default=None, help='timed epochs per row (default 3; quick 2)')
    p.add_argument('--tmp_dir', default=None, help='where the temporary data sets go (default: the system\'s)')
    p.add_argument('--out', default=os.path.join(common.REPO, 'bench', 'results', 'loading.json'))
    args = p.parse_args(argv)
    args.num_pairs = args.num_pairs or (2000 if args.quick else 20000)
    args.batch = args.batch or (512 if args.quick else 4096)
    args.repeats = args.repeats or (2 if args.quick else 3)
    if args.workers is None:
        args.workers = sorted({0, 2, os.cpu_count() or 1})
    return args


# ----------------------------------------------------------------------------------------
# Synthetic data, both layouts.

def random_states(block, n, gen):
    """Stacked states of n networks of `block`: the state-dict keys, shapes and dtypes of the real block,
    filled with random values (running_var positive)."""
    out = {}
    for key, t in net.BLOCKS[block]().state_dict().items():
        if t.is_floating_point():
            x = torch.randn((n, *t.shape), generator=gen) * 0.3
            out[key] = x.abs() + 0.5 if key.endswith('running_var') else x
        else:
            out[key] = torch.full((n, *t.shape), 1000, dtype=t.dtype)
    return out


def write_sets(root, n, shard_size, networks):
    """Write n pairs as shards (root/shards) and in the original layout (root/original); seconds of each."""
    gen = torch.Generator().manual_seed(0)
    blocks = ('basic', 'simple') + (('begin', 'last') if networks else ())
    shards_root, orig_root = os.path.join(root, 'shards'), os.path.join(root, 'original')
    shards.claim_root(shards_root, RECIPE)
    t_shards = t_orig = 0.0
    folders = {'basic': 'inputs', 'simple': 'labels', 'begin': 'backup_begin', 'last': 'backup_last'}
    for b in blocks:
        os.makedirs(os.path.join(orig_root, folders[b]), exist_ok=True)
    for start in range(0, n, shard_size):
        m = min(shard_size, n - start)
        states = {b: random_states(b, m, gen) for b in blocks}
        shard = {'recipe': dict(RECIPE), 'index': torch.arange(start, start + m),
                 'seed': torch.arange(start, start + m), **states,
                 **{k: torch.full((m,), float('nan'), dtype=torch.float64) for k in shards.ACC_KEYS}}
        t0 = time.perf_counter()
        shards.write_shard(shards_root, shard)
        t1 = time.perf_counter()
        for b in blocks:
            for j in range(m):
                torch.save(net.unstack_state(states[b], j), os.path.join(orig_root, folders[b], f'{start + j}.pth'))
        t_orig += time.perf_counter() - t1
        t_shards += t1 - t0
    return shards_root, orig_root, t_shards, t_orig


def disk_usage(folder):
    """(apparent bytes, allocated bytes, file count) of every file under folder."""
    apparent = allocated = count = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            st = os.stat(os.path.join(dirpath, name))
            apparent += st.st_size
            allocated += getattr(st, 'st_blocks', 0) * 512
            count += 1
    return apparent, allocated, count


# ----------------------------------------------------------------------------------------
# (a) the original per-file Dataset.

class OriginalPairs(torch.utils.data.Dataset):
    """Item i: ([10 BasicBlock tensors], [conv1.weight, conv2.weight]) read from inputs/{i}.pth, labels/{i}.pth."""

    def __init__(self, root, n):
        self.root, self.n = root, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        basic = torch.load(os.path.join(self.root, 'inputs', f'{i}.pth'), weights_only=True)
        simple = torch.load(os.path.join(self.root, 'labels', f'{i}.pth'), weights_only=True)
        return [basic[k] for k in BASIC_KEYS], [simple[k] for k in SIMPLE_KEYS]


def original_epoch(root, n, batch, workers, device):
    """One epoch through a fresh DataLoader (workers start as the original's did each epoch); pairs seen."""
    data = torch.utils.data.DataLoader(OriginalPairs(root, n), batch_size=batch, shuffle=True, num_workers=workers,
                                       pin_memory=device.type == 'cuda')
    seen = 0
    x1 = y2 = None
    for inputs, targets in data:
        x1, x2 = inputs[0].to(device, non_blocking=True), inputs[1].to(device, non_blocking=True)
        y1, y2 = targets[0].to(device, non_blocking=True), targets[1].to(device, non_blocking=True)
        seen += x1.shape[0]
    sync(device)
    assert seen == n and x1.shape[1:] == (6, 6, 3, 3) and y2.shape[1:] == (6, 3, 3, 3)
    return seen


# ----------------------------------------------------------------------------------------
# (b) in memory.

def load_in_memory(root, n, device):
    """conv1/conv2 of the large and small blocks on the device: (x1, x2, y1, y2)."""
    if hasattr(loader, 'TrainDataset'):
        ds = loader.TrainDataset(root, n)
        basic, simple = ds.basic, ds.simple
    else:  # before loader.TrainDataset existed
        pairs = shards.read_pairs(root, n)
        basic, simple = pairs['basic'], pairs['simple']
    return tuple(d[k].float().to(device) for d in (basic, simple) for k in SIMPLE_KEYS)


def memory_epoch(tensors, batch, device, gen):
    """One epoch of index-lookup batches over a random permutation, as train.py does; pairs seen."""
    x1, x2, y1, y2 = tensors
    n = x1.shape[0]
    perm = torch.randperm(n, generator=gen, device=device)
    seen = 0
    for i in range(0, n, batch):
        idx = perm[i:i + batch]
        b = (x1[idx], x2[idx], y1[idx], y2[idx])
        seen += b[0].shape[0]
    sync(device)
    return seen


def main(argv=None):
    args = get_args(argv)
    device = torch.device(args.device)
    threads = set_threads(args.threads)
    n, bs = args.num_pairs, args.batch
    print(f'{machine(device)}\n{n} synthetic pairs, batch {bs}, {args.repeats} timed epochs per row, interleaved')
    with tempfile.TemporaryDirectory(dir=args.tmp_dir, prefix='kt_bench_loading_') as tmp:
        shards_root, orig_root, t_write_shards, t_write_orig = write_sets(tmp, n, args.shard_size,
                                                                         not args.no_networks)
        usage = {'shards': disk_usage(shards_root), 'original': disk_usage(orig_root),
                 'original_inputs_labels': tuple(map(sum, zip(disk_usage(os.path.join(orig_root, 'inputs')),
                                                              disk_usage(os.path.join(orig_root, 'labels')))))}
        print(f'written: shards {t_write_shards:.1f} s, original layout {t_write_orig:.1f} s')

        # one-time loads of (b), timed: from the shards (median of the repeats), from the original layout (once)
        load_times = {'shards': [], 'original': []}
        result = []
        for _ in range(args.repeats):
            result.clear()
            load_times['shards'].append(timed(lambda: result.append(load_in_memory(shards_root, n, device)), device))
        tensors = result[0]
        with contextlib.redirect_stderr(io.StringIO()):  # the original-layout reader's progress bars
            load_times['original'].append(timed(lambda: result.append(load_in_memory(orig_root, n, device)),
                                                device))
        assert all(torch.equal(a, b) for a, b in zip(tensors, result[-1])), 'the two layouts hold different pairs'
        del result

        rows = {f'(a) original layout, DataLoader, {w} workers': {'path': 'a', 'workers': w} for w in args.workers}
        rows['(b) in memory, index lookups'] = {'path': 'b', 'workers': None}
        gen = torch.Generator(device=device).manual_seed(0)
        fns = {name: (lambda w=r['workers']: original_epoch(orig_root, n, bs, w, device)) if r['path'] == 'a'
               else (lambda: memory_epoch(tensors, bs, device, gen)) for name, r in rows.items()}
        # warm-up (imports, first worker start-up, allocator): (a) on one batch's worth of pairs
        original_epoch(orig_root, min(n, bs), bs, 0, device)
        memory_epoch(tensors, bs, device, gen)
        # (b) is timed over 5 consecutive epochs (its steady state in a training run; a single short epoch
        # right after a DataLoader run is dominated by cold caches and page faults)
        per = {name: 1 if r['path'] == 'a' else MEMORY_EPOCHS_PER_TIMING for name, r in rows.items()}
        times = {name: [] for name in rows}
        for r in range(args.repeats):
            for name, fn in fns.items():
                times[name].append(timed(lambda: [fn() for _ in range(per[name])], device) / per[name])
            print(f'  repeat {r + 1}/{args.repeats} done', flush=True)

    base = median(times[next(iter(rows))])
    out_rows = []
    for name, r in rows.items():
        s = median(times[name])
        out_rows.append({'name': name, **r, 'epoch_s': s, 'epoch_s_all': times[name], 'samples_per_s': n / s,
                         'speedup_vs_a0': base / s})
    load = {k: median(v) for k, v in load_times.items()}
    print(f'\n{machine(device)}; {n} pairs, batch {bs}\n')
    print_table(['path', 'epoch s', 'samples / s', 'vs first row'],
                [[r['name'], f"{r['epoch_s']:.4f}", f"{r['samples_per_s']:,.0f}", f"{r['speedup_vs_a0']:.1f}x"]
                 for r in out_rows])
    print(f"\none-time load of (b): {load['shards']:.2f} s from shards, {load['original']:.2f} s from the original "
          f"layout ({n / load['shards']:,.0f} and {n / load['original']:,.0f} pairs/s)\n")
    print_table(['layout', 'files', 'MB (apparent)', 'MB (allocated)'],
                [[name, f'{c:,}', f'{a / 1e6:.1f}', f'{al / 1e6:.1f}'] for name, (a, al, c) in
                 (('original, all folders', usage['original']), ('original, inputs/ + labels/ only',
                  usage['original_inputs_labels']), (f'shards of {args.shard_size}', usage['shards']))])
    if not args.no_networks:
        print('(both layouts also hold the Begin and Last blocks, as generation writes them)')
    write_json(args.out, {
        'script': 'bench_loading', 'machine': machine(device), 'device': str(device), 'threads': threads,
        'args': vars(args), 'num_pairs': n, 'batch': bs, 'rows': out_rows,
        'load_s': load, 'load_s_all': load_times, 'write_s': {'shards': t_write_shards, 'original': t_write_orig},
        'disk': {k: {'apparent_bytes': a, 'allocated_bytes': al, 'files': c} for k, (a, al, c) in usage.items()},
        'uses': 'loader.TrainDataset' if hasattr(loader, 'TrainDataset') else 'shards.read_pairs'})


if __name__ == '__main__':
    main()

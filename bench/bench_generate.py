"""Pair generation speed: the original's structure vs our one-at-a-time and batched paths, in one run.

(a) original structure: one network per process, a torch DataLoader over MNIST whose workers
    flip each image (per-item transform, as torchvision's RandomHorizontalFlip + ToTensor did),
    nn.Module training, a test evaluation after every epoch of both phases;
(b) ours, one network at a time (--models_per_step 1): MNIST in memory, batching and flips on
    the device, frozen Begin cached in the small phase;
(c) ours, K networks side by side (grouped convolutions); with --rows, also with or without the Begin cache
    (e.g. 512:no_cache); speed/bench_generate.py adds the rows of speed/generate.py's flags.
Each path trains both phases for --epochs epochs on --num_images images, then the time of the full
recipe (10 + 10 epochs on 60,000 images) is projected linearly from the measured training time
plus the evaluations that recipe makes; the frozen-Begin cache, built once per small-block phase
whatever the epochs, is timed apart and scaled by the images only. Also: bytes and files per 1,000 pairs on disk.

    python bench/bench_generate.py            # 1 + 1 epochs on all images
    python bench/bench_generate.py --quick    # 12,800 images
"""
import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import construct  # noqa: E402
import construct_train  # noqa: E402
from common import sync, write_json  # noqa: E402
import generation  # noqa: E402
import net  # noqa: E402
import shards  # noqa: E402
import sizing  # noqa: E402
import utils  # noqa: E402

RECIPE_EPOCHS, RECIPE_IMAGES, TEST_IMAGES = 10, 60000, 10000


class FlipDataset(torch.utils.data.Dataset):
    """MNIST items transformed one by one in the workers, as the original's torchvision pipeline."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = self.images[i].float().div(255).unsqueeze(0)
        if torch.rand(1).item() < 0.5:
            x = x.flip(-1)
        return x, self.labels[i]


def evaluate(model, test_x, test_y):
    """Test accuracy of one module, batches of 128 (the original's loop)."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test_x), 128):
            correct += (model(test_x[i:i + 128].float().div(255).unsqueeze(1)).argmax(1) == test_y[i:i + 128]).sum()
    return correct.item() / len(test_x) * 100


def original_structure(args, mnist, workers):
    """Seconds of training both phases and seconds of one test evaluation, the original way."""
    train_x, train_y, test_x, test_y = mnist
    data = torch.utils.data.DataLoader(FlipDataset(train_x, train_y), batch_size=128, shuffle=True,
                                       num_workers=workers, persistent_workers=workers > 0)
    begin, basic, last = net.BeginBlock(), net.BasicBlock(), net.LastBlock()
    t_train = t_eval = 0.0
    for phase in ('large', 'small'):
        if phase == 'large':
            model = torch.nn.Sequential(begin, basic, last)
        else:
            simple = net.SimpleBlock_NoBn()
            model = torch.nn.Sequential(begin, simple, last)
            for p in list(begin.parameters()) + list(last.parameters()):
                p.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
        for _ in range(args.epochs):
            t0 = time.perf_counter()
            model.train()
            if phase == 'small':
                begin.eval(), last.eval()
            for x, y in data:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            t1 = time.perf_counter()
            evaluate(model, test_x, test_y)
            t_train += t1 - t0
            t_eval = time.perf_counter() - t1
    return t_train, t_eval


# construct_train.py's options, by the names --rows uses.
VARIANTS = {'cache': ['--begin_cache', 'on'], 'no_cache': ['--begin_cache', 'off']}


def plain_steps(argv, device):
    """(construct_train.py's parsed flags argv, the plain Steps): how a row's flags become generation's step."""
    return construct_train.get_args('train', argv), construct.PLAIN


def parse_row(spec, variants=VARIANTS):
    """'K' or 'K:variant+variant' -> (label, K, the variants' flags)."""
    k, _, names = spec.partition(':')
    names = [n for n in names.split('+') if n]
    unknown = [n for n in names if n not in variants]
    if not k.isdigit() or int(k) < 1 or unknown:
        raise SystemExit(f'--rows {spec}: expected K or K:variant+variant with variants from {", ".join(variants)}')
    label = f'(c) ours, batched K={k}' + ''.join(f', {n}' for n in names)
    return label, int(k), [f for n in names for f in variants[n]]


@contextlib.contextmanager
def timing(module, name, device):
    """Within the block, module.name (a module's function or a class's method) is timed call by call (device
    synchronised): yields the list of seconds."""
    fn, seconds = getattr(module, name), []

    def timed_fn(*a, **kw):
        sync(device)
        t = time.perf_counter()
        out = fn(*a, **kw)
        sync(device)
        seconds.append(time.perf_counter() - t)
        return out
    setattr(module, name, timed_fn)
    try:
        yield seconds
    finally:
        setattr(module, name, fn)


def ours(args, mnist, device, k, flags, share, steps_for=plain_steps):
    """Seconds per network of our make_pairs for K networks at once: training (its Begin cache included), the
    Begin cache's build and the 3 evaluations; the seconds of its warm-up run (cuDNN autotuning, and compiling
    with --compile), whether the Begin cache was used, and the networks' accuracies with the small-block
    phase's share of the training time. share: the process's GPU memory share measured before the first row;
    steps_for(argv, device): (parsed flags, Steps), plain_steps or speed/bench_generate.py's."""
    assert len(mnist[0]) == args.num_images, 'the projection scales from --num_images'
    gen_args, steps = steps_for(['--num_epochs', str(args.epochs), '--num_train_images', str(args.num_images),
                                 '--device', str(device), *flags], device)
    # the Begin cache as a generation process would choose it for the full recipe on this device, from the memory
    # free before the first row: earlier rows' memory stays in torch's cache (None: a CPU, which has the RAM for it)
    recipe, _ = steps_for(['--num_train_images', str(RECIPE_IMAGES), *flags], device)
    cache = sizing.use_begin_cache(recipe, k, share)
    cache = True if cache is None else cache
    # the warm-up is a whole run on the same workspace, so the timed run reuses its compiled step and its
    # cuDNN choices (evaluation shapes included) instead of counting them as training
    torch._dynamo.reset()  # each compiled row from scratch: no shapes made dynamic by an earlier row's K
    workspaces = {}
    t0 = time.perf_counter()
    construct.make_pairs(range(k), gen_args.recipe, mnist, device, cache, workspaces, steps)
    sync(device)
    t1 = time.perf_counter()
    # the recipe's 3 test evaluations are timed apart, and the small-block phase (2 of them inside it)
    with timing(net, 'stacked_accuracy', device) as evaluations, \
            timing(construct, 'small_phase', device) as small, \
            timing(construct.Workspace, 'begin_cache', device) as cache_builds:
        shard = construct.make_pairs(range(k, 2 * k), gen_args.recipe, mnist, device, cache, workspaces, steps)
    sync(device)
    total = time.perf_counter() - t1
    t_eval = sum(evaluations)
    small_share = (sum(small) - sum(evaluations[1:])) / (total - t_eval)  # its Begin cache included
    accuracy = {f'{key}_{stat}': float(getattr(shard[key], stat)()) if k > 1 or stat == 'mean' else float('nan')
                for key in ('acc_large', 'acc_small') for stat in ('mean', 'std')}  # this row's networks
    return (total - t_eval) / k, sum(cache_builds) / k, t_eval / k, t1 - t0, cache, \
        {**accuracy, 'small_phase_share': small_share}


def storage_per_1000(tmp):
    """(bytes, files) per 1,000 pairs: original four .pth files per pair vs our shards."""
    sds = construct.init_pair(0)
    names = ('backup_begin', 'inputs', 'backup_last', 'labels')
    orig = 0
    for name, sd in zip(names, sds):
        path = os.path.join(tmp, name + '.pth')
        torch.save(sd, path)
        orig += os.path.getsize(path)
    n = 100
    stacked = [net.stack_states([construct.init_pair(i)[j] for i in range(n)]) for j in range(4)]
    shard = {'recipe': {}, 'index': torch.arange(n), 'seed': torch.arange(n), 'begin': stacked[0],
             'basic': stacked[1], 'last': stacked[2], 'simple': stacked[3],
             **{k: torch.zeros(n, dtype=torch.float64) for k in ('acc_large', 'acc_small_init', 'acc_small')}}
    shards.write_shard(tmp, shard)
    ours_bytes = os.path.getsize(shards.shard_path(tmp, 0, n)) / n
    return {'original_bytes': orig * 1000, 'original_files': 4000, 'shard_bytes': ours_bytes * 1000}


def main(variants=VARIANTS, steps_for=plain_steps, out='bench/results/generate.json'):
    """Measure the paths; variants and steps_for: the rows' options and how they become a step (plain_steps)."""
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true', help='12,800 images per epoch')
    p.add_argument('--epochs', type=int, default=1, help='epochs of each phase actually run')
    p.add_argument('--num_images', type=int, default=RECIPE_IMAGES, help='training images actually used')
    utils.add_shared_flags(p, 'device', device='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--k', type=int, nargs='+', default=None, help='K values of the batched path (plain step)')
    p.add_argument('--rows', nargs='+', default=[], metavar='K:VARIANTS',
                   help='more batched rows, e.g. 128:cache 256:no_cache; variants: ' + ', '.join(variants))
    p.add_argument('--workers', type=int, default=2, help='DataLoader workers of the original structure')
    p.add_argument('--skip_original', action='store_true', help='skip path (a) (e.g. on a GPU)')
    p.add_argument('--out', default=out)
    args = p.parse_args()
    if args.quick:
        args.num_images = 12800
    device = torch.device(args.device)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    ks = args.k or ([64, 128, 256] if device.type == 'cuda' else [4])
    share = sizing.gpu_share(device, 1)
    mnist = generation.load_mnist_to(device, construct_train.get_args(
        'train', ['--num_train_images', str(args.num_images)]))  # make_pairs trains on all it is given
    image_scale = RECIPE_IMAGES / args.num_images
    scale = (RECIPE_EPOCHS / args.epochs) * image_scale
    rows = {}
    if not args.skip_original:
        cpu_mnist = tuple(t.cpu() for t in mnist)
        t_train, t_eval = original_structure(args, cpu_mnist, args.workers)
        rows['(a) original structure'] = {'k': 1, 'train_s': t_train, 'eval_s': t_eval,
                                          'pair_s': t_train * scale + 2 * RECIPE_EPOCHS * t_eval}
    paths = [('(b) ours, one at a time', 1, [])] + [(f'(c) ours, batched K={k}', k, []) for k in ks]
    paths += [parse_row(spec, variants) for spec in args.rows]
    for label, k, flags in paths:
        try:
            t_train, t_cache, t_eval, t_warm, cache, accuracy = ours(args, mnist, device, k, flags, share, steps_for)
        except Exception as e:  # a row that cannot run here (out of memory, no triton, ...) is reported, not fatal
            print(f'{label}: failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ""}', flush=True)
            if device.type == 'cuda':
                torch.cuda.empty_cache()
            continue
        rows[label] = {'k': k, 'flags': flags, 'begin_cache': cache, 'train_s': t_train, 'cache_build_s': t_cache,
                       'eval_s': t_eval, 'warmup_s': t_warm,
                       'pair_s': (t_train - t_cache) * scale + t_cache * image_scale + t_eval, **accuracy}
        write_json(args.out, {'args': vars(args), 'rows': rows, 'complete': False})  # a run cut short keeps its rows
        print(f"{label}: {t_train:.3f} s training per network measured (warm-up run {t_warm:.1f} s, Begin cache "
              f"{f'on, built in {t_cache:.3f} s' if cache else 'off'}, small-block phase "
              f"{accuracy['small_phase_share']:.0%} of it), "
              f"{3600 / rows[label]['pair_s']:.1f} pairs/hour projected; test accuracy "
              f"large {accuracy['acc_large_mean']:.2f} ± {accuracy['acc_large_std']:.2f}%, small "
              f"{accuracy['acc_small_mean']:.2f} ± {accuracy['acc_small_std']:.2f}%", flush=True)
    base_label = '(a) original structure' if '(a) original structure' in rows else '(b) ours, one at a time'
    base = rows[base_label]['pair_s']  # (b) with --skip_original
    machine = torch.cuda.get_device_name(device) if device.type == 'cuda' else \
        f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads'
    print(f'\n{machine}; measured {args.epochs}+{args.epochs} epochs on {args.num_images} images, '
          f'projected to the recipe (10+10 epochs on 60,000 images)\n')
    print(f'| path | measured training s / pair | projected s / pair | pairs / hour | vs {base_label[:3]} |')
    print('| --- | --- | --- | --- | --- |')
    for label, r in rows.items():
        r['pairs_per_hour'] = 3600 / r['pair_s']
        r['ratio_vs_base'] = base / r['pair_s']
        print(f"| {label} | {r['train_s']:.2f} | {r['pair_s']:.1f} | {r['pairs_per_hour']:.1f} "
              f"| {r['ratio_vs_base']:.2f}x |")
    with tempfile.TemporaryDirectory() as tmp:
        storage = storage_per_1000(tmp)
    print(f"\nper 1,000 pairs: original layout {storage['original_bytes'] / 1e6:.1f} MB in 4,000 files; "
          f"our shards {storage['shard_bytes'] / 1e6:.1f} MB in 1000/K files")
    write_json(args.out, {'machine': machine, 'args': vars(args), 'rows': rows, 'storage': storage, 'complete': True})


if __name__ == '__main__':
    main()

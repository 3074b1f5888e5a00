"""The driver of generation (construct_train.py, construct_val.py, speed/generate.py): the missing indices of a
data root made in groups of K networks by construct.make_pairs, written as they finish, with a progress bar
and a log; a killed run resumes where it stopped."""
import logging
import os
import time

import torch
from tqdm import tqdm

import construct
import large_from
from mnist import load_mnist
import original_layout
import shards
import sizing
import utils


def load_mnist_to(device, args):
    """(train images, train labels, test images, test labels) on the device, subsampled as asked."""
    train_x, train_y = load_mnist(args.mnist_root, train=True)
    test_x, test_y = load_mnist(args.mnist_root, train=False)
    return (train_x[:args.num_train_images].to(device), train_y[:args.num_train_images].to(device),
            test_x[:args.num_test_images].to(device), test_y[:args.num_test_images].to(device))


def generate(args, steps=construct.PLAIN):
    """Make the missing networks of [start_index, start_index + num_data) in args.data_root."""
    device = utils.get_device(args.gpu_id, args.device)
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest grouped convolutions
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    check_writable(args.data_root)
    utils.set_logger(os.path.join(args.data_root, 'logs', f'{args.kind}_{args.start_index}.log'))
    recipe, dirs = args.recipe, original_layout.original_dirs(args.kind, args.train_small)
    theirs = check_layout(args.data_root, args.layout, args.kind)
    if theirs:  # the original code's own files: their shapes can be checked, their recipe cannot
        original_layout.check_original_shapes(args.data_root, original_layout.ORIGINAL_DIRS[args.kind],
                                              recipe.small_block)
    share = sizing.gpu_share(device, args.processes_per_gpu)
    k = args.models_per_step or sizing.default_models_per_step(device, share)
    cache_begin = sizing.use_begin_cache(args, k, share)
    mnist = load_mnist_to(device, args)  # before the root is claimed: bad input leaves no recipe.json behind
    if theirs:
        logging.info(f'{args.data_root} holds the original code\'s files without a recipe.json: their shapes fit, '
                     f'but their recipe cannot be checked; the networks made here follow recipe {recipe.as_json()}')
    else:
        shards.claim_root(args.data_root, recipe.as_json())
    stop = args.start_index + args.num_data
    todo = utils.missing_ranges(made_indices(args.data_root, args.layout, dirs), args.start_index, stop)
    groups = [(a, min(a + k, b)) for lo, b in todo for a in range(lo, b, k)]
    groups.sort(key=lambda g: g[0] - g[1])  # full groups first: one workspace per K (their networks stay the same)
    total = sum(b - a for a, b in groups)
    memory = '' if share is None else (f', memory share {share / 2 ** 30:.1f} GiB (1/{args.processes_per_gpu} of the '
                                       f'free memory less 1 GiB), Begin cache {"on" if cache_begin else "off"}')
    logging.info(f'{args.kind} networks [{args.start_index}, {stop}) in {args.data_root} ({args.layout} layout): '
                 f'{args.num_data - total} already made, {total} to make; device {device}, {k} per step{memory}, '
                 f'step {steps.describe()}, recipe {recipe.as_json()}')
    made, workspaces, t0 = [], {}, time.time()
    with tqdm(total=total, unit='net', desc=f'{args.kind} networks', dynamic_ncols=True) as bar:
        for a, b in groups:
            epochs = {} if args.original_log else None
            large = large_from.read_large(args.large_from, a, b, args.kind) if args.large_from else None
            shard = construct.make_pairs(range(a, b), recipe, mnist, device, cache_begin, workspaces, steps,
                                               epochs, large)
            if args.original_log:
                log_original(shard, epochs, recipe.kind, recipe.train_small)
            save_pairs(args.data_root, args.layout, shard, dirs)
            made.append(shard)
            bar.update(b - a)
            bar.set_postfix(large=f"{shard['acc_large'].mean():.1f}%",
                            small=f"{shard['acc_small'].mean():.1f}%" if args.train_small else '-')
    if made:
        hours = (time.time() - t0) / 3600
        means = {key: torch.cat([s[key] for s in made]).mean().item() for key in shards.ACC_KEYS}
        logging.info(f'made {total} networks in {hours * 3600:.1f} s ({total / hours:.1f} per hour); mean test '
                     f'accuracy: {accuracy_text(means, args.train_small)}')
    else:
        logging.info('nothing to do: every index of the range exists')
    return made


# ----------------------------------------------------------------------------------------
# The folder a generation process writes: checks before it starts, what is made, how a group is saved.

def check_writable(root):
    """Create root if needed and make sure files can be written there."""
    try:
        os.makedirs(root, exist_ok=True)
        probe = os.path.join(root, f'.write_test_{os.getpid()}')
        open(probe, 'wb').close()
        os.remove(probe)
    except OSError as e:
        raise utils.UserError(f'--data_root {root} is not writable ({e.strerror}); choose another folder') from None


def check_layout(root, layout, kind):
    """Refuse a data root holding the other layout; True when it holds original-layout folders without a
    recipe.json (recipe.json is written before any pair: such files come from the original code)."""
    folders = [d + '/' for d in original_layout.ORIGINAL_DIRS[kind].values() if os.path.isdir(os.path.join(root, d))]
    if layout == 'original' and shards.list_shards(root):
        raise utils.UserError(f'--data_root {root} holds shards (shard_*.pt): --layout original needs a folder of its '
                        f'own, or pass --layout shards to resume them')
    if layout == 'shards' and folders:
        raise utils.UserError(f'--data_root {root} holds the original layout ({", ".join(folders)}): pass '
                        f'--layout original to resume it, or choose another folder')
    return bool(folders) and shards.read_recipe(root) is None


def made_indices(root, layout, dirs):
    """Indices already complete in root, in its layout (dirs: the original layout's folders)."""
    if layout == 'original':
        return original_layout.original_made(root, dirs)
    shards.check_shard_ranges(shards.list_shards(root))
    return shards.covered_indices(root)


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
        return shards.write_shard(root, shard)
    original_layout.write_original(root, shard, dirs)
    for j, i in enumerate(shard['index'].tolist()):
        acc = {key: shard[key][j].item() for key in shards.ACC_KEYS}
        logging.info(f'network {i}: test accuracy {accuracy_text(acc, "simple" in dirs)}')


def log_original(shard, epochs, kind, train_small):
    """The original generation scripts' lines for each network of a shard (epochs: make_pairs' epoch_log)."""
    large = 'Complex Test Accuracy' if kind == 'train' else 'Test Accuracy'
    for j, i in enumerate(shard['index'].tolist()):
        lines = [f'Data index: {i}'] + [f'Epoch {e}, {large} {a[j].item()}%' for e, a in enumerate(epochs.get('large', []))]
        lines.append('-' * 50)
        if train_small:
            lines.append(f'Before Train, Test Accuracy {shard["acc_small_init"][j].item()}%')
            lines += [f'Epoch {e}, Simple Test Accuracy {a[j].item()}%' for e, a in enumerate(epochs['small'])]
        logging.info('\n'.join(lines))

"""The driver of generation (construct_train.py, construct_val.py, speed/generate.py): the missing indices of a
data root made in groups of K networks by construct_train.make_pairs, written as they finish, with a progress bar
and a log; a killed run resumes where it stopped."""
import logging
import os
import time

import torch
from tqdm import tqdm

import construct_train
import loader
from mnist import load_mnist
import sizing
import utils


def load_mnist_to(device, args):
    """(train images, train labels, test images, test labels) on the device, subsampled as asked."""
    train_x, train_y = load_mnist(args.mnist_root, train=True)
    test_x, test_y = load_mnist(args.mnist_root, train=False)
    return (train_x[:args.num_train_images].to(device), train_y[:args.num_train_images].to(device),
            test_x[:args.num_test_images].to(device), test_y[:args.num_test_images].to(device))


def generate(args, steps=construct_train.PLAIN):
    """Make the missing networks of [start_index, start_index + num_data) in args.data_root."""
    device = utils.get_device(args.gpu_id, args.device)
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest grouped convolutions
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    loader.check_writable(args.data_root)
    utils.set_logger(os.path.join(args.data_root, 'logs', f'{args.kind}_{args.start_index}.log'))
    recipe, dirs = args.recipe, loader.original_dirs(args.kind, args.train_small)
    theirs = loader.check_layout(args.data_root, args.layout, args.kind)
    if theirs:  # the original code's own files: their shapes can be checked, their recipe cannot
        loader.check_original_shapes(args.data_root, loader.ORIGINAL_DIRS[args.kind])
    share = sizing.gpu_share(device, args.processes_per_gpu)
    k = args.models_per_step or sizing.default_models_per_step(device, share)
    cache_begin = sizing.use_begin_cache(args, k, share)
    mnist = load_mnist_to(device, args)  # before the root is claimed: bad input leaves no recipe.json behind
    if theirs:
        logging.info(f'{args.data_root} holds the original code\'s files without a recipe.json: their shapes fit, '
                     f'but their recipe cannot be checked; the networks made here follow recipe {recipe.as_json()}')
    else:
        loader.claim_root(args.data_root, recipe.as_json())
    stop = args.start_index + args.num_data
    todo = loader.missing_ranges(loader.made_indices(args.data_root, args.layout, dirs), args.start_index, stop)
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
            shard = construct_train.make_pairs(range(a, b), recipe, mnist, device, cache_begin, workspaces, steps,
                                               epochs)
            if args.original_log:
                loader.log_original(shard, epochs, recipe.kind, recipe.train_small)
            loader.save_pairs(args.data_root, args.layout, shard, dirs)
            made.append(shard)
            bar.update(b - a)
            bar.set_postfix(large=f"{shard['acc_large'].mean():.1f}%",
                            small=f"{shard['acc_small'].mean():.1f}%" if args.train_small else '-')
    if made:
        hours = (time.time() - t0) / 3600
        means = {key: torch.cat([s[key] for s in made]).mean().item() for key in loader.ACC_KEYS}
        logging.info(f'made {total} networks in {hours * 3600:.1f} s ({total / hours:.1f} per hour); mean test '
                     f'accuracy: {loader.accuracy_text(means, args.train_small)}')
    else:
        logging.info('nothing to do: every index of the range exists')
    return made


def main(kind='train'):
    """Parse construct_train.py's flags (construct_val.py's for kind 'val') and generate."""
    generate(construct_train.get_args(kind))

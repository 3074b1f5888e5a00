"""The driver of generation (construct_train.py, construct_val.py, speed/generate.py): the missing indices of a
data root made in groups of K networks by construct.make_pairs, written as they finish, with a progress bar
and a log; a killed run resumes where it stopped."""
import json
import logging
import os
import time

import torch
from tqdm import tqdm

import claims
import construct
import large_from
from mnist import load_mnist
import original_layout
import shards
import sizing
import utils

CLAIM_TIMEOUT_H = 2.0  # --claim_timeout: a claim untouched that long is stale (its holder touches it each minute)

def load_mnist_to(device, args):
    """(train images, train labels, test images, test labels) on the device, subsampled as asked."""
    train_x, train_y = load_mnist(args.mnist_root, train=True)
    test_x, test_y = load_mnist(args.mnist_root, train=False)
    return (train_x[:args.num_train_images].to(device), train_y[:args.num_train_images].to(device),
            test_x[:args.num_test_images].to(device), test_y[:args.num_test_images].to(device))


def generate(args, steps=construct.PLAIN):
    """Make the missing networks of [start_index, start_index + num_data) in args.data_root. SIGTERM / SIGINT or a
    failed write stop it at once with utils.Stopped: complete shards stay, the group being made is dropped."""
    check_writable(args.data_root)
    held = claims.Claims(args.data_root, getattr(args, 'claim_timeout', CLAIM_TIMEOUT_H))
    with utils.stop_signals():
        try:
            return _generate(args, steps, held)
        except (utils.WriteError, utils.Interrupted) as e:
            stop = utils.stopped(e, kept_text(args), utils.resume_command(f'construct_{args.kind}.py'))
            utils.log_to_files(str(stop))
            raise stop from None
        finally:
            held.release_all()


def _generate(args, steps, held):
    """generate() within its signal handlers; held: this process's claims.Claims on the root."""
    device = utils.get_device(args.gpu_id, args.device)
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest grouped convolutions
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
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
    groups = todo_groups(args, dirs, k)
    total = sum(b - a for a, b in groups)
    memory = '' if share is None else (f', memory share {share / 2 ** 30:.1f} GiB (1/{args.processes_per_gpu} of the '
                                       f'free memory less 1 GiB), Begin cache {"on" if cache_begin else "off"}')
    logging.info(f'{args.kind} networks [{args.start_index}, {stop}) in {args.data_root} ({args.layout} layout): '
                 f'{args.num_data - total} already made, {total} to make; device {device}, {k} per step{memory}, '
                 f'step {steps.describe()}, recipe {recipe.as_json()}')
    made, workspaces, t0, waited = [], {}, time.time(), set()
    with tqdm(total=total, unit='net', desc=f'{args.kind} networks', dynamic_ncols=True) as bar:
        while groups:
            group = next_group(groups, held, waited)
            if group is None:  # others hold every group left: wait for their shards, or for a claim to go stale
                time.sleep(claims.POLL_S)
            elif not fresh(group, args, dirs):
                held.release(*group)  # made (in part) by another process meanwhile: list the groups again
            else:
                a, b = group
                epochs = {} if args.original_log else None
                large = large_from.read_large(args.large_from, a, b, args.kind) if args.large_from else None
                shard = construct.make_pairs(range(a, b), recipe, mnist, device, cache_begin, workspaces, steps,
                                             epochs, large)
                if args.original_log:
                    log_original(shard, epochs, recipe.kind, recipe.train_small)
                save_pairs(args.data_root, args.layout, shard, dirs)
                held.release(a, b)
                made.append(shard)
                bar.update(b - a)
                bar.set_postfix(large=f"{shard['acc_large'].mean():.1f}%",
                                small=f"{shard['acc_small'].mean():.1f}%" if args.train_small else '-')
            groups = todo_groups(args, dirs, k)
    if made:
        hours = (time.time() - t0) / 3600
        count = sum(len(s['index']) for s in made)
        means = {key: torch.cat([s[key] for s in made]).mean().item() for key in shards.ACC_KEYS}
        logging.info(f'made {count} networks in {hours * 3600:.1f} s ({count / hours:.1f} per hour); mean test '
                     f'accuracy: {accuracy_text(means, args.train_small)}')
    else:
        logging.info('nothing to do: every index of the range exists')
    return made


def todo_groups(args, dirs, k):
    """The groups [a, b) of at most k networks still missing from the range, full groups first (one workspace per
    K, whose networks stay the same); each missing range is cut from its start, so that a resumed run makes the
    groups, and so the networks, of an uninterrupted one."""
    stop = args.start_index + args.num_data
    todo = utils.missing_ranges(made_indices(args.data_root, args.layout, dirs), args.start_index, stop)
    groups = [(a, min(a + k, b)) for lo, b in todo for a in range(lo, b, k)]
    return sorted(groups, key=lambda g: g[0] - g[1])


def fresh(group, args, dirs):
    """Whether none of the group's networks was made since the groups were listed."""
    made = made_indices(args.data_root, args.layout, dirs)
    return not any(i in made for i in range(*group))


def next_group(groups, held, waited):
    """The first group this process could claim (and now holds), or None when other live processes hold every
    one; says once per claim that its networks are left for later (waited: the claims already named)."""
    for group in groups:
        blocker = held.try_claim(*group)
        if blocker is None:
            return group
        if blocker.path not in waited:
            waited.add(blocker.path)
            logging.info(f'networks [{blocker.start}, {blocker.stop}) are claimed by {blocker.holder()} '
                         f'({blocker.path}): making the others first, then coming back to them')
    return None


def kept_text(args):
    """What a stopped run leaves on disk: its complete networks of the range (read from the folder, not written)."""
    stop = args.start_index + args.num_data
    try:
        dirs = original_layout.original_dirs(args.kind, args.train_small)
        have = made_indices(args.data_root, args.layout, dirs)
    except (OSError, utils.UserError):
        return f'the complete files in {args.data_root}'
    missing = utils.missing_ranges(have, args.start_index, stop)
    left = sum(b - a for a, b in missing)
    where = 'shards' if args.layout == 'shards' else 'files'
    return (f'{args.num_data - left} of the {args.num_data} networks [{args.start_index}, {stop}) in complete {where} '
            f'of {args.data_root}' + (f' (missing: {utils.format_ranges(missing)})' if missing else ''))


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


# ----------------------------------------------------------------------------------------
# --status: a root read without writing anything, while generators run.

def status_lines(args, now=None):
    """The lines of --status for args.data_root: recipe, made / missing, duplicates, claims, unreadable shards,
    leftover temporary files, and the rate from the shards' times. Reads only; files may come and go meanwhile."""
    root, now = args.data_root, time.time() if now is None else now
    if not os.path.isdir(root):
        raise utils.UserError(f'--data_root {root} does not exist: nothing generated there yet')
    recipe = shards.read_recipe(root)
    lines = [f'{root}: {args.kind} networks, recipe ' + (json.dumps(recipe, sort_keys=True) if recipe else
                                                         'none yet (no recipe.json)')]
    if args.layout == 'original':
        have, files, bad = original_layout.original_made(root, original_layout.original_dirs(args.kind,
                                                                                             args.train_small)), [], []
    else:
        files = shards.list_shards(root)
        bad = [(a, b, p) for a, b, p in files if os.path.exists(p) and not shards.complete(p)]
        files = [f for f in files if f not in bad]  # an unreadable shard counts as missing
        have = {i for a, b, _ in files for i in range(a, b)}
    made = utils.missing_ranges(set(range(max(have) + 1)) - have, 0, max(have) + 1) if have else []  # ranges of have
    lines.append(f'made: {len(have)} networks' + (f' in {len(files)} shards' if files else '') +
                 (f', indices {utils.format_ranges(made)}' if made else ''))
    start = args.start_index
    stop = start + args.num_data if args.num_data is not None else max(have | {start - 1}) + 1
    missing = utils.missing_ranges(have, start, stop)
    left = sum(b - a for a, b in missing)
    lines.append(f'range [{start}, {stop}): ' + (f'missing {left}: {utils.format_ranges(missing)}' if left else
                                                 'nothing missing') +
                 ('' if args.num_data is not None else ' (--num_data N --start_index S: the range of a whole job)'))
    ranges, dup_files = shards.duplicates(files)
    if ranges:
        lines.append(f'duplicates: indices {utils.format_ranges(ranges)} in more than one shard '
                     f'({", ".join(os.path.basename(p) for p in dup_files)}); readers take each once; --dedupe '
                     f'deletes the copies they never read')
    timeout = getattr(args, 'claim_timeout', CLAIM_TIMEOUT_H)
    for c in claims.read_claims(root):
        why = c.stale(timeout, now)
        state = f'stale ({why}): the next generator on this root takes it over' if why else 'live'
        lines.append(f'claim [{c.start}, {c.stop}) by {c.holder()}, started {time.ctime(c.started)}, touched '
                     f'{now - c.touched:.0f} s ago: {state}')
    if bad:
        lines.append(f'unreadable: {", ".join(os.path.basename(p) for *_, p in bad)} (incomplete files, e.g. '
                     f'truncated copies; counted as missing): delete them, and generation makes their networks again')
    temps = [n for n in os.listdir(root) if n.startswith('.tmp_')]
    if temps:
        lines.append(f'temporary files: {len(temps)} (.tmp_*, of processes killed while writing): safe to delete '
                     f'when no generator writes here')
    lines.append(rate_line(files, left, now))
    return lines


def rate_line(files, left, now):
    """The rate of the shards' modification times: networks made after the first shard, per hour."""
    times = []
    for a, b, path in files:
        try:
            times.append((os.stat(path).st_mtime, b - a))
        except FileNotFoundError:
            pass
    times.sort()
    if len(times) < 2 or times[-1][0] <= times[0][0]:
        return 'rate: needs two shards written at different times'
    hours = (times[-1][0] - times[0][0]) / 3600
    rate = sum(n for _, n in times[1:]) / hours
    eta = f'; the {left} missing take about {left / rate:.1f} h at that rate' if left else ''
    return (f'rate: {rate:.1f} networks per hour (shards written {time.ctime(times[0][0])} .. '
            f'{time.ctime(times[-1][0])}, the last {(now - times[-1][0]) / 60:.1f} min ago){eta}')

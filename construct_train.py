"""Make the translator's training pairs: the flags of construct_train.py and construct_val.py.

The recipe itself is construct.py; generation.py runs it over a data root (resumable shards, or --layout
original). Faster paths not yet shown faster: speed/.

    python construct_train.py --num_data 100 --start_index 0 --data_root ./data/train

A job of many processes (run.sh, a SLURM array) on one root:
  - Any number of processes may share a root and overlap ranges (run.sh started twice, one --node_rank given to two
    machines): each claims a group before making it (claims.py), skips groups others hold and comes back to them.
    A claim whose process is gone (same host) or untouched for --claim_timeout hours (any host) is taken over.
  - An index made twice is read once (the shard that starts first, the longest among equal starts), with one
    warning; --dedupe deletes the shards that rule never reads.
  - SIGTERM / SIGINT (SLURM's preemption) stop a process at once: its complete shards stay, the group it was
    making is dropped. A full disk or an I/O error stops it the same way. Either prints one line: what is safe on
    disk and the command that resumes (the same command); exit status 128 + signal, or 1 for a failed write.
  - --status prints a root's state without writing anything, while generators run.
Reproducibility: network i is drawn from (seed, i) only. The same --models_per_step (K), device, torch version and
thread count make it bit for bit, as a rerun after a stop does. Another K, device or thread count rounds the
grouped convolutions differently and SGD amplifies it: on CPU, torch 2.13, K = 4 against K = 1 differed by 2e-7 in
the weights after 3 steps, by up to 3e-2 (and 0.8 points of test accuracy) after 32 (tests/test_robust.py). A
process that takes over another's range may use another K: its networks are equally valid samples of the recipe,
not bit-identical ones.
"""
import argparse

import construct
import generation
import large_from
import net
import original_layout
import shards
import utils


def get_parser(kind='train'):
    """Flags; names and defaults follow the original generation scripts (speed/generate.py adds its own)."""
    p = argparse.ArgumentParser(description=f'Generate {kind} networks for Knowledge Translation.',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog='Many processes on one root, stops (SIGTERM, a full disk) and what is '
                                       'bit-identical: the docstring at the top of construct_train.py.')
    p.add_argument('--batch_size', type=int, default=128, help='SGD batch size of both phases')
    p.add_argument('--num_epochs', type=int, default=10, help='epochs of each phase (large net, small block)')
    p.add_argument('--lr', type=float, default=0.01, help='SGD learning rate (momentum 0.9, no weight decay)')
    p.add_argument('--num_data', type=int, default=1, help='number of networks this process makes (--status: '
                   'unset, the range up to the last network made)')
    p.add_argument('--start_index', type=int, default=0, help='index of its first network')
    p.add_argument('--data_root', type=str, default=f'./data/{kind}', help='folder of the pairs (see --layout)')
    p.add_argument('--layout', choices=('shards', 'original'), default='shards',
                   help=f'shards: shard_<start>_<stop>.pt files; original: the {{i}}.pth state dicts the original '
                        f'train.py reads ({original_layout.original_layout_help(kind)}), also in a folder of its own files')
    p.add_argument('--seed', type=int, default=0, help='dataset seed: network i is drawn from (seed, i) only (its '
                   'init, order and flips); the same --models_per_step, device, torch version and threads give it bit '
                   'for bit, another --models_per_step, device or thread count only within float rounding')
    utils.add_shared_flags(p, 'gpu_id', 'device', 'mnist_root', 'num_threads')
    p.add_argument('--models_per_step', type=int, default=0, help='networks trained side by side (one shard each '
                   'group); 0 = chosen from the device (its memory share, see --processes_per_gpu)')
    p.add_argument('--processes_per_gpu', type=int, default=1, metavar='N', help='generation processes sharing this '
                   'GPU (generate_sh.py passes it): --models_per_step 0 and the Begin cache are sized from this '
                   "process's share, free memory at start / N - 1 GiB")
    p.add_argument('--begin_cache', default='auto', choices=('auto', 'on', 'off'), help="small-block phase: keep the "
                   "frozen Begin's outputs for every image (538 MiB a network at 60,000 images) instead of "
                   'recomputing them each step; auto: when it fits')
    p.add_argument('--num_train_images', type=int, default=60000, help='use the first N training images (quick runs '
                   'and tests; the recipe uses 60000)')
    p.add_argument('--num_test_images', type=int, default=10000, help='score on the first N test images (quick runs '
                   'and tests; the recipe uses 10000)')
    p.add_argument('--original_log', action='store_true', help="log the original scripts' lines per network (Data "
                   'index, test accuracy after every epoch of both phases): slower, the same networks')
    p.add_argument('--small_block', default=net.DEFAULT_SMALL, choices=tuple(net.SMALL_BLOCKS),
                   help="the small block trained in the large block's place (the original's class names); recorded "
                        'in recipe.json (when not the default), so roots of different blocks never mix')
    p.add_argument('--large_from', metavar='ROOT', default=None,
                   help='take the trained large networks (Begin, BasicBlock, Last, accuracy) of ROOT, made with the '
                        'same recipe, and run only the small-block phase: the same pairs as a full run')
    j = p.add_argument_group('job', 'many processes on one root: claims, progress, duplicates')
    j.add_argument('--claim_timeout', type=float, default=generation.CLAIM_TIMEOUT_H, metavar='HOURS',
                   help='a claim (claims/<start>_<stop>.claim: a group being made) whose file was not touched for '
                        'this long is stale and taken over, on any host (a live holder touches it every minute); on '
                        'the same host a claim whose process is gone is taken over at once')
    j.add_argument('--status', action='store_true', help='print the state of --data_root and exit, writing nothing '
                   '(safe while generators run): recipe, made / missing of [--start_index, + --num_data), '
                   'duplicates, claims, unreadable shards, rate')
    j.add_argument('--dedupe', action='store_true', help='delete the shards of --data_root that readers never read '
                   '(each index made twice is read from the shard that starts first, the longest among equal '
                   'starts), after loading their replacements, and exit')
    if kind == 'train':
        p.add_argument('--skip_simple', action='store_true', help='skip the small-block phase (pairs usable only '
                       'by the functional loss)')
    else:
        p.add_argument('--train_simple', action='store_true', help='also retrain a small block (--small_block) in '
                       'each network (the "Retrained" reference)')
    return p


def check_args(args, kind='train'):
    """Refuse bad values; add args.kind, args.train_small and args.recipe (a Recipe)."""
    if args.num_data is None and not args.status:
        args.num_data = 1  # unset: --status reads the range up to the last network made
    if args.claim_timeout <= 0:
        raise utils.UserError(f'--claim_timeout must be > 0 hours (got {args.claim_timeout})')
    if args.status and args.dedupe:
        raise utils.UserError('--status reads, --dedupe deletes: give one of them')
    for flag in ('batch_size', 'num_epochs', 'num_data', 'num_train_images', 'num_test_images', 'processes_per_gpu',
                 'lr'):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise utils.UserError(f'--{flag} must be > 0 (got {getattr(args, flag)})')
    for flag in ('start_index', 'models_per_step', 'num_threads'):
        if getattr(args, flag) < 0:
            raise utils.UserError(f'--{flag} must be >= 0 (got {getattr(args, flag)})')
    if args.num_train_images > 60000 or args.num_test_images > 10000:
        raise utils.UserError('MNIST has 60000 training and 10000 test images')
    args.kind = kind
    args.train_small = (not args.skip_simple) if kind == 'train' else args.train_simple
    args.recipe = recipe_of(args)
    if args.large_from is not None:
        if not args.train_small:
            raise utils.UserError('--large_from runs only the small-block phase: it needs '
                                  + ('no --skip_simple' if kind == 'train' else '--train_simple'))
        large_from.check_source(args.large_from, args.recipe, args.start_index, args.start_index + args.num_data)
    return args


def get_args(kind='train', argv=None):
    """The flags of construct_train.py (kind 'train') or construct_val.py ('val'), checked."""
    unset = argparse.Namespace(num_data=None)  # argparse keeps a value already there: None tells --num_data unset
    return check_args(get_parser(kind).parse_args(argv, unset), kind)


def recipe_of(args):
    """The Recipe of parsed flags."""
    return construct.Recipe(args.kind, args.seed, args.num_epochs, args.lr, args.batch_size, construct.MOMENTUM,
                            args.train_small, args.num_train_images, args.num_test_images, args.small_block)


def main(kind='train'):
    """Parse construct_train.py's flags (construct_val.py's for kind 'val') and generate, or --status, --dedupe."""
    args = get_args(kind)
    if args.status:
        print('\n'.join(generation.status_lines(args)))
    elif args.dedupe:
        dedupe(args.data_root)
    else:
        generation.generate(args)


def dedupe(root):
    """--dedupe: delete the shards readers never read, saying which."""
    removed = shards.dedupe(root)
    for path in removed:
        print(f'deleted {path}: every network of it is read from another shard')
    print(f'{root}: {len(removed)} redundant shard(s) deleted' if removed else f'{root}: no redundant shard')


if __name__ == '__main__':
    utils.run_main(main)

"""Warm starts: how many fine-tuning SGD steps does a start of the small block save over a random init?

    OMP_NUM_THREADS=1 python experiments/warm_start.py --num_networks 20 \\
        --translator faithful=runs/warm/faithful.pth --translator perm=runs/warm/perm.pth \\
        --out results/warm_start/warm_start.json

Each start is a SimpleBlock_NoBn for every validation network, fine-tuned in place for one epoch by the recipe's
own small-block phase, construct.small_phase (SGD lr 0.01, momentum 0.9, batch 128, random flips, all
60,000 training images: 469 steps, Begin and Last frozen in eval mode). The starts of network i are trained side
by side, each with its own copy of the generator data_generator(seed_for(seed, 'warm_start', i)): every start of a
network sees the same batches and flips, so comparisons between starts are paired over the networks. The test
accuracy is scored after steps 0, 10, 30, 100, 300 and the last (469), by a Steps subclass around the plain step.

Starts: the training-free rows of evaluate.reference_rows (Random Init seeded as there, Mean target of the first
--num_mean_targets training pairs, Weight selection, folded, folded + refit), then each --translator NAME=PATH
(train.py's <acc>.pth with its <acc>.json beside it: its --inputs/--output are read from there).

Written: --out (JSON, report.plot_warm_start's schema plus 'flags'; rewritten after every network, and a rerun
with the same flags skips the networks already in it), the same path with .md (the tables below) and .png.

Split runs: the starts of a network never interact, so parts can run side by side (one core each) and be joined:
--starts keeps only the named starts, --first_network skips the networks before it, and --merge A.json B.json ...
joins such parts (same flags but --starts and --translator; every start on every network of the union) into --out.

(a) Accuracy: per start and grid step, the mean test accuracy (%) over the networks and its margin over Random
    Init, paired over the networks (mean ± standard error).
(b) Steps to reach 50%, 80% and 90% of the network's own Retrained accuracy (the val set's small block trained 10
    epochs from scratch): the first grid step whose accuracy is at least that, '>469' when none is (measured on the
    grid 0/10/30/100/300/469 only). Per start: the median of these steps (the lower median, the ceil(n/2)-th
    smallest, so it is defined when at most half the networks never reach it, else '>469'), the fraction of
    networks that reach it, and 'earlier - later': over the networks, sign(Random Init's step - the start's step)
    (never reaching counts as later than any grid step; both never reaching is a tie), its mean ± standard error:
    the fraction of networks where the start gets there at an earlier grid step than Random Init minus the
    fraction where it gets there later.
(c) When the refit rule is a start: every other start's accuracy margin over it at each grid step (paired, ± SE).
"""
import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import construct  # noqa: E402
import evaluate  # noqa: E402
import generation  # noqa: E402
import loader  # noqa: E402
import net  # noqa: E402
import report  # noqa: E402
import translate  # noqa: E402
import utils  # noqa: E402

CHECKPOINTS = (10, 30, 100, 300)  # scored between step 0 and the last, which small_phase scores itself
FRACTIONS = (0.5, 0.8, 0.9)  # of the network's Retrained accuracy
NOT_STARTS = ('Large (BasicBlock)', 'Identity (block skipped)', 'Retrained')  # reference_rows' rows: no start
RULE = 'Weight selection (folded, refit)'  # the strongest training-free start: table (c) compares the others to it


def get_args(argv=None):
    """Parse and check the flags."""
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--val_path', default='data/demo/val', help='validation networks with retrained small blocks')
    p.add_argument('--num_networks', type=int, default=100, help='fine-tune the first N validation networks')
    p.add_argument('--train_path', default='data/demo/train', help='training pairs of the Mean target start')
    p.add_argument('--num_mean_targets', type=int, default=224, help='Mean target: the mean of the first N pairs')
    p.add_argument('--translator', action='append', default=[], metavar='NAME=PATH',
                   help="a translator start: train.py's <acc>.pth (its .json beside it); repeatable")
    p.add_argument('--out', default='results/warm_start/warm_start.json', help='the JSON; .md and .png beside it')
    p.add_argument('--seed', type=int, default=0, help="Random Init's seed (as train.py --seed) and the batches'")
    p.add_argument('--lr', type=float, default=0.01, help="fine-tuning SGD's learning rate (momentum 0.9)")
    p.add_argument('--batch_size', type=int, default=128, help='fine-tuning batch size')
    p.add_argument('--num_train_images', type=int, default=60000, help='one epoch over the first N training images')
    p.add_argument('--num_test_images', type=int, default=10000, help='score on the first N test images')
    p.add_argument('--starts', nargs='+', default=None, metavar='NAME',
                   help='fine-tune only these starts (reference rows or --translator names); default: all')
    p.add_argument('--first_network', type=int, default=0, help='skip the validation networks before this one')
    p.add_argument('--merge', nargs='+', default=None, metavar='JSON',
                   help='join the JSONs of split runs into --out (its .md and .png too), networks below '
                        '--num_networks only, and fine-tune nothing')
    p.add_argument('--side_by_side', type=int, default=0, help='starts fine-tuned side by side (stacked); 0: all on '
                   'a GPU, one at a time on a CPU (where grouped convolutions are slower); the same batches either way')
    utils.add_shared_flags(p, 'device', 'mnist_root', 'num_threads', device='cpu')
    args = p.parse_args(argv)
    if args.side_by_side < 0 or args.first_network < 0:
        raise utils.UserError(f'--side_by_side and --first_network must be >= 0 (got {args.side_by_side}, '
                              f'{args.first_network})')
    for flag in ('num_networks', 'num_mean_targets', 'lr', 'batch_size', 'num_train_images', 'num_test_images'):
        if getattr(args, flag) <= 0:
            raise utils.UserError(f'--{flag} must be > 0 (got {getattr(args, flag)})')
    if args.num_train_images > 60000 or args.num_test_images > 10000:
        raise utils.UserError('MNIST has 60000 training and 10000 test images')
    args.translators = {}
    for spec in args.translator:
        name, _, path = spec.partition('=')
        if not name or not path or name in args.translators:
            raise utils.UserError(f'--translator {spec}: give NAME=PATH, each NAME once')
        args.translators[name] = path
    if not args.out.endswith('.json'):
        raise utils.UserError(f'--out {args.out}: give a .json path (the .md and .png go beside it)')
    return args


def flags_of(args):
    """The flags a result depends on (not --num_networks: a rerun may add networks)."""
    keep = ('val_path', 'train_path', 'num_mean_targets', 'translators', 'seed', 'lr', 'batch_size',
            'num_train_images', 'num_test_images')
    flags = {k: getattr(args, k) for k in keep}
    if args.starts is not None:  # absent when all starts run: the JSONs of earlier runs stay valid
        flags['starts'] = sorted(args.starts)
    return flags


def step_grid(num_images, batch_size):
    """The steps scored: 0, the CHECKPOINTS within the epoch, and its last step."""
    last = math.ceil(num_images / batch_size)
    return [0] + [s for s in CHECKPOINTS if s < last] + [last]


class ScoredSteps(construct.Steps):
    """The plain SGD step, with the stacked small blocks' test accuracy scored after each step of `at`."""

    def __init__(self, at, test_x, test_y, begin, last, simple):
        self.at, self.test, self.blocks, self.accs = set(at), (test_x, test_y), (begin, last, simple), {}

    def build(self, params, loss_fn, recipe):
        step, reset = super().build(params, loss_fn, recipe)
        done = [0]

        def scored_step(idx, flip):
            step(idx, flip)
            done[0] += 1
            if done[0] in self.at:
                begin, last, simple = self.blocks
                self.accs[done[0]] = net.stacked_accuracy(*self.test, begin, simple, last, 'simple')

        def scored_reset():
            reset()
            done[0] = 0
            self.accs.clear()
        return scored_step, scored_reset


def start_blocks(val, targets, seed, translators):
    """Name -> stacked small blocks (all networks) of every start: reference_rows' training-free rows (its score
    function here returns the blocks it is given, so the starts are the rows' blocks), then the translators'."""
    rows = evaluate.reference_rows(lambda middle, kind='simple': middle, val, targets, seed)
    blocks = {name: block for name, block in rows.items() if name not in NOT_STARTS}
    for name, path in translators.items():
        if name in blocks:
            raise utils.UserError(f'--translator {name}=...: that name is a reference start; choose another')
        model = translate.load_translator(argparse.Namespace(ckpt=path, **{f: None for f in translate.SIZE_FLAGS}))
        blocks[name] = evaluate.translate_blocks(model, val.basic)
    return blocks


def fine_tune(i, blocks, val, recipe, mnist, seed, grid, group):
    """Network i's accuracy curves on the grid, {start: [acc at each grid step]}, and the fine-tuned blocks: every
    start fine-tuned by construct.small_phase with the same batches and flips, `group` starts side by side
    (on a CPU grouped convolutions are slower than one start at a time)."""
    g = construct.data_generator(utils.seed_for(seed, 'warm_start', i))
    curves, tuned = {}, {}
    names = list(blocks)
    for n0 in range(0, len(names), group):
        part = names[n0:n0 + group]
        k = len(part)
        begin, last = ({n: t[i:i + 1].repeat(k, *[1] * (t.dim() - 1)) for n, t in s.items()}
                       for s in (val.begin, val.last))
        simple = {n: torch.stack([blocks[name][n][i] for name in part]).contiguous() for n in blocks[part[0]]}
        steps = ScoredSteps(grid[1:-1], *mnist[2:], begin, last, simple)
        ws = construct.Workspace({'begin': begin, 'last': last, 'simple': simple}, recipe, mnist, steps)
        gens = [torch.Generator().set_state(g.get_state()) for _ in part]  # copies: g itself is never drawn from
        acc0, acc_end = construct.small_phase(begin, last, simple, gens, recipe, mnist, ws=ws)
        curves.update(zip(part, torch.stack([acc0, *(steps.accs[s] for s in grid[1:-1]), acc_end], 1).tolist()))
        tuned.update((name, {n: t[j] for n, t in simple.items()}) for j, name in enumerate(part))
    return curves, tuned


def load_done(path, flags):
    """The JSON of an earlier run with the same flags, or None; a UserError if it was made with other flags."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except ValueError as e:  # a file of something else: the JSON itself is only ever replaced whole
        raise utils.UserError(f'{path}: not a warm-start JSON ({e}); move it away or choose another --out') from None
    if data.get('flags') != flags:
        raise utils.UserError(f'{path} was made with other flags ({data.get("flags")}); rerun with those or give '
                              f'another --out')
    return data


def merge(datas, num_networks=None):
    """One results dict from split runs' (same flags but 'starts' and 'translators'): every network of any part
    (below num_networks, if given), in order, with every start of any part; a UserError when a start lacks a network
    or two parts disagree."""
    common = [{k: v for k, v in d['flags'].items() if k not in ('starts', 'translators')} for d in datas]
    if any(c != common[0] for c in common) or any(d['steps'] != datas[0]['steps'] for d in datas):
        raise utils.UserError('--merge: the parts were made with other flags or step grids')
    translators, curves, retrained = {}, {}, {}
    for d in datas:
        for name, path in d['flags']['translators'].items():
            if translators.setdefault(name, path) != path:
                raise utils.UserError(f'--merge: translator {name} has two paths')
        for j, i in enumerate(d['networks']):
            if retrained.setdefault(i, d['retrained'][j]) != d['retrained'][j]:
                raise utils.UserError(f'--merge: network {i} has two Retrained accuracies')
            for name, c in d['starts'].items():
                if curves.setdefault(name, {}).setdefault(i, c[j]) != c[j]:
                    raise utils.UserError(f'--merge: start {name} on network {i} differs between the parts')
    networks = sorted(i for i in retrained if num_networks is None or i < num_networks)
    for name, by_net in curves.items():
        missing = [i for i in networks if i not in by_net]
        if missing:
            raise utils.UserError(f'--merge: start {name} lacks networks {missing}')
    widest = max(datas, key=lambda d: len(d['starts']))['starts']  # its order first (reference rows, translators)
    names = list(widest) + [n for n in curves if n not in widest]
    return {'steps': datas[0]['steps'], 'starts': {name: [curves[name][i] for i in networks] for name in names},
            'retrained': [retrained[i] for i in networks], 'networks': networks,
            'flags': {**common[0], 'translators': translators}}


def reach_step(curve, target, grid):
    """Index in grid of the first step whose accuracy is >= target; len(grid) when none is."""
    return next((j for j, a in enumerate(curve) if a >= target), len(grid))


def tables(data):
    """The Markdown tables (a) and (b) of a results dict."""
    grid, starts, retrained = data['steps'], data['starts'], data['retrained']
    n, base = len(retrained), starts['Random Init']
    lines = [f'{n} validation networks of {data["flags"]["val_path"]}, test accuracy in % on '
             f'{data["flags"]["num_test_images"]} MNIST test images; margins vs Random Init paired over the networks '
             f'(mean ± SE).', '', '(a) Mean accuracy after each number of fine-tuning steps (margin vs Random Init)', '',
             '| start | ' + ' | '.join(f'step {s}' for s in grid) + ' |', '| --- |' + ' --- |' * len(grid)]
    for name, curves in starts.items():
        cells = []
        for j in range(len(grid)):
            accs = [c[j] for c in curves]
            cell = f'{sum(accs) / n:.2f}'
            if name != 'Random Init':
                mean, se = evaluate.paired_margin(accs, [c[j] for c in base])
                cell += f' ({mean:+.2f} ± {se:.2f})'
            cells.append(cell)
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    never = f'>{grid[-1]}'
    lines += ['', f'Retrained (10 epochs from scratch): mean {sum(retrained) / n:.2f}', '',
              f'(b) Steps to reach a fraction of the network\'s Retrained accuracy: the first grid step '
              f'({"/".join(map(str, grid))}) at or above it, {never} when none. Median: the lower median over the '
              f'networks; reached: fraction of networks reaching it by step {grid[-1]}; earlier - later: fraction '
              f'of networks where the start reaches it at an earlier grid step than Random Init minus the fraction '
              f'later (± SE).', '',
              '| start | ' + ' | '.join(f'{f:.0%}: median / reached / earlier - later' for f in FRACTIONS) + ' |',
              '| --- |' + ' --- |' * len(FRACTIONS)]
    for name, curves in starts.items():
        cells = []
        for f in FRACTIONS:
            at = [reach_step(c, f * r, grid) for c, r in zip(curves, retrained)]
            at_base = [reach_step(c, f * r, grid) for c, r in zip(base, retrained)]
            median = sorted(at)[(n + 1) // 2 - 1]
            signs = [float((b > a) - (b < a)) for a, b in zip(at, at_base)]
            mean, se = evaluate.paired_margin(signs, [0.0] * n)
            cells.append(f'{grid[median] if median < len(grid) else never} / '
                         f'{sum(a < len(grid) for a in at) / n:.2f} / ' +
                         ('—' if name == 'Random Init' else f'{mean:+.2f} ± {se:.2f}'))
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    rule = starts.get(RULE)
    others = [name for name in starts if name not in ('Random Init', RULE)]
    if rule is not None and others:  # (c): does a start do better than the strongest rule it could replace?
        lines += ['', f'(c) Margin over {RULE} after each number of fine-tuning steps, paired over the networks '
                  f'(mean ± SE)', '', '| start | ' + ' | '.join(f'step {s}' for s in grid) + ' |',
                  '| --- |' + ' --- |' * len(grid)]
        for name in others:
            cells = [evaluate.paired_margin([c[j] for c in starts[name]], [c[j] for c in rule])
                     for j in range(len(grid))]
            lines.append(f'| {name} | ' + ' | '.join(f'{m:+.2f} ± {se:.2f}' for m, se in cells) + ' |')
    return '\n'.join(lines) + '\n'


def write_plot(data, path):
    """report.py's warm-start figure as PNG; matplotlib is optional, so only a note without it."""
    try:
        plt = report.pyplot()
    except utils.UserError as e:
        print(f'no plot: {e}')
        return
    report.save_figure(report.plot_warm_start(data, plt), path, plt)
    print(f'wrote {path}')


def write_outputs(data, out):
    """Print the tables and write them (.md) and the figure (.png) beside out."""
    text = tables(data)
    print(text)
    stem = os.path.splitext(out)[0]
    utils.atomic_write(stem + '.md', text)
    write_plot(data, stem + '.png')


def main(argv=None):
    args = get_args(argv)
    if args.merge:
        datas = []
        for path in args.merge:
            with open(path) as f:
                datas.append(json.load(f))
        data = merge(datas, args.num_networks)
        utils.atomic_write(args.out, json.dumps(data, indent=1))
        return write_outputs(data, args.out)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = utils.check_device(args.device)
    flags = flags_of(args)
    data = load_done(args.out, flags)
    val = loader.ValDataset(args.val_path, args.num_networks)
    val.require('simple', 'the Retrained reference of the warm-start tables')
    train = loader.TrainDataset(args.train_path, args.num_mean_targets)
    train.require('simple', 'the Mean target start')
    targets = [train.simple['conv1.weight'], train.simple['conv2.weight']]
    blocks = start_blocks(val, targets, args.seed, args.translators)
    if args.starts is not None:
        unknown = sorted(set(args.starts) - set(blocks))
        if unknown:
            raise utils.UserError(f'--starts {unknown}: no such start (there are {list(blocks)})')
        blocks = {name: b for name, b in blocks.items() if name in args.starts}
    val.to(device)
    blocks = {name: {n: t.to(device) for n, t in b.items()} for name, b in blocks.items()}
    mnist = generation.load_mnist_to(device, args)
    recipe = construct.Recipe(kind='val', seed=args.seed, num_epochs=1, lr=args.lr, batch_size=args.batch_size,
                                    num_train_images=args.num_train_images, num_test_images=args.num_test_images)
    grid = step_grid(args.num_train_images, args.batch_size)
    retrained = net.stacked_accuracy(*mnist[2:], val.begin, val.simple, val.last, 'simple').tolist()
    if data is None:
        data = {'steps': grid, 'starts': {name: [] for name in blocks}, 'retrained': [], 'networks': [],
                'flags': flags}
    print(f'{len(blocks)} starts x {args.num_networks} networks of {args.val_path}, steps {grid} '
          f'({len(data["networks"])} networks already in {args.out})', flush=True)
    for i in range(args.first_network, args.num_networks):
        if i in data['networks']:
            continue
        t0 = time.time()
        curves, _ = fine_tune(i, blocks, val, recipe, mnist, args.seed, grid, args.side_by_side or
                              (1 if device.type == 'cpu' else len(blocks)))
        for name, curve in curves.items():
            data['starts'][name].append(curve)
        data['retrained'].append(retrained[i])
        data['networks'].append(i)
        utils.atomic_write(args.out, json.dumps(data, indent=1))
        print(f'network {i} ({time.time() - t0:.0f} s), retrained {retrained[i]:.2f}: ' +
              '; '.join(f'{name} ' + ' '.join(f'{a:.1f}' for a in c) for name, c in curves.items()), flush=True)
    if 'Random Init' not in data['starts']:  # a part of a split run: its tables come from --merge
        return print(f'{len(data["networks"])} networks in {args.out}; join the parts with --merge')
    write_outputs(data, args.out)


if __name__ == '__main__':
    utils.run_main(main)

"""Identifiability of the small-block targets: how much does the recipe itself decide them?

A translator trained on weights can at best learn what the recipe determines. For K validation networks
of a data root (construct_val.py --train_simple) this retrains each network's SimpleBlock_NoBn from R
fresh inits (fresh init and fresh data order, as another run of the recipe would draw, with the
repository's own recipe code: construct.small_phase) and compares blocks as orbits of the small
block's symmetries: cosine in canonical scale (unit-norm hidden filters) under the best of the 3! hidden
orders (symmetry.best_order_cosine). Reported, mean ± standard error over pairs:
  * inits:        retrainings of the same network from different inits;
  * target:       each retraining against the stored target (the shard's 'simple' block);
  * across:       retrainings of different networks; stored targets of different networks;
  * drift:        each retrained block against its own init;
  * chance:       independent fresh inits against each other (what best-of-6 cosine gives for nothing);
  * the test accuracy of the retrained blocks (sanity), of the stored targets and of the inits;
  * per --translators checkpoint, and per training-free rule of evaluate.py (for scale: a rule writes a
    different block per network by construction): its outputs against the stored targets, the retrainings and
    each other (outputs of different networks that agree: a collapse to the mean), the ratio of output norm to
    target norm (raw weights) and the outputs' test accuracy;
  * per --output residual / refit translator, also its delta (output - the rule it adds to): the ratio of the delta's
    norm to the rule's, and the raw cosine of the deltas of different networks (near +1: the same correction
    for every network).

    python experiments/identifiability.py --data_root data/demo/val --num_networks 6 --num_inits 2

Writes <out>.json, <out>.md (the table), <out>.log and <out>.blocks.pt (the retrained blocks, from which a
killed run resumes; --blocks reads and writes another file, to compare new translators against retrainings
already made); --out defaults to results/identifiability/<data root's last two folders>_<epochs>ep.
"""
import argparse
import json
import logging
import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import construct  # noqa: E402
import construct_train  # noqa: E402
import evaluate  # noqa: E402
import generation  # noqa: E402
import loader  # noqa: E402
import mixer  # noqa: E402
import net  # noqa: E402
import rules  # noqa: E402
import symmetry  # noqa: E402
import translate  # noqa: E402
import utils  # noqa: E402
from utils import UserError  # noqa: E402

SPLIT = 'identifiability'  # seeds of the retrainings: utils.seed_for(seed, 'identifiability/init<r>', index)
COSINE_ROWS = (  # (key, what it compares), in the table's order
    ('inits', 'retrained, same network, different inits'),
    ('target', 'retrained vs the stored target'),
    ('across_retrained', 'retrained, different networks'),
    ('across_targets', 'stored targets, different networks'),
    ('drift', 'retrained vs its own init'),
    ('chance', 'fresh inits vs each other (chance level)'),
)
TRANSLATOR_ROWS = (
    ('target', 'output vs the stored target'),
    ('retrained', 'output vs the retrainings of its network'),
    ('across', 'outputs of different networks'),
)
DELTA_ROWS = (
    ('delta_norm', 'delta norm / norm of the rule it adds to'),
    ('delta_across', 'deltas of different networks (raw cosine)'),
)
RULES = {'Weight selection': rules.weight_selection, 'Weight selection (folded)': rules.folded_selection,
         'Weight selection (folded, refit)': rules.refit_selection}


def get_args(argv=None):
    """Flags; the recipe defaults to the data root's recipe.json (what made the stored targets)."""
    p = argparse.ArgumentParser(description='Retrain the small blocks of validation networks from fresh inits and '
                                            'measure how much the recipe determines them.')
    p.add_argument('--data_root', default='data/demo/val', help='validation shards made with --train_simple')
    p.add_argument('--num_networks', '-K', type=int, default=6, help='the first K networks of the data root')
    p.add_argument('--num_inits', '-R', type=int, default=2, help='retrainings per network, from fresh inits')
    p.add_argument('--num_epochs', type=int, default=None, help="small-block epochs (default: the recipe's)")
    p.add_argument('--num_train_images', type=int, default=None, help="first N training images (default: the recipe's)")
    p.add_argument('--num_test_images', type=int, default=None, help="first N test images (default: the recipe's)")
    p.add_argument('--seed', type=int, default=0, help='seed of the retrainings (split "identifiability")')
    p.add_argument('--translators', nargs='+', default=[], metavar='CKPT',
                   help="train.py checkpoints (or the original's state dicts) whose outputs to compare too")
    p.add_argument('--out', default=None, help='output path prefix: <out>.json, <out>.md, <out>.log')
    p.add_argument('--blocks', default=None, help='the retrained blocks\' file (default <out>.blocks.pt)')
    utils.add_shared_flags(p, 'device', device='cpu')
    p.add_argument('--models_per_step', type=int, default=0,
                   help='retrainings side by side (0: 1 on a CPU, all on a GPU)')
    utils.add_shared_flags(p, 'num_threads', 'mnist_root')
    args = p.parse_args(argv)
    if args.num_networks < 2 or args.num_inits < 2:
        raise UserError(f'--num_networks and --num_inits must be >= 2 (got {args.num_networks}, {args.num_inits}): '
                        f'agreement needs pairs of networks and pairs of inits')
    for flag in ('num_epochs', 'num_train_images', 'num_test_images'):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise UserError(f'--{flag} must be > 0 (got {getattr(args, flag)})')
    if args.models_per_step < 0 or args.num_threads < 0:
        raise UserError('--models_per_step and --num_threads must be >= 0')
    return args


def recipe_for(args, stored):
    """The small-block recipe of the retrainings: the stored one, with the flags' overrides."""
    if stored is None:
        raise UserError(f'{args.data_root}: no recipe.json; these shards were not made by construct_val.py')
    if stored.get('momentum') != construct.MOMENTUM:
        raise UserError(f'{args.data_root}: made with momentum {stored.get("momentum")}, but construct_train.py '
                        f'trains with {construct.MOMENTUM}: its recipe cannot be replayed here')
    recipe = {k: stored[k] for k in ('num_epochs', 'lr', 'batch_size', 'num_train_images', 'num_test_images')}
    recipe.update({k: getattr(args, k) for k in ('num_epochs', 'num_train_images', 'num_test_images')
                   if getattr(args, k) is not None})
    if recipe['num_train_images'] > 60000 or recipe['num_test_images'] > 10000:
        raise UserError('MNIST has 60000 training and 10000 test images')
    return recipe


def recipe_args(recipe, mnist_root):
    """The namespace construct's recipe functions read."""
    args = construct_train.get_args('val', ['--mnist_root', mnist_root])  # the speed options' defaults
    vars(args).update(recipe)
    args.recipe = construct_train.recipe_of(args)
    return args


def default_out(data_root, num_epochs):
    """results/identifiability/<parent>_<folder>_<epochs>ep, e.g. demo_val_10ep."""
    parts = os.path.normpath(os.path.abspath(data_root)).split(os.sep)[-2:]
    return os.path.join('results', 'identifiability', f'{"_".join(parts)}_{num_epochs}ep')


# ----------------------------------------------------------------------------------------
# Retraining, with the recipe's own code.

def take(stacked, idx):
    """Rows idx of a stacked state, as a new dict on the same device."""
    return {k: t[idx] for k, t in stacked.items()}


def retrain(data, nets, init, gens, rargs, mnist):
    """Train the stacked small blocks `init` (one per entry of nets) between the frozen Begin and Last of
    data's networks `nets`; return (trained state, test accuracy at init, after)."""
    device = mnist[0].device
    idx = torch.tensor(nets)
    begin, last = ({k: t.to(device) for k, t in take(d, idx).items()} for d in (data.begin, data.last))
    simple = {k: t.clone().to(device) for k, t in init.items()}
    acc_init, acc = construct.small_phase(begin, last, simple, gens, rargs.recipe, mnist)
    return {k: t.cpu() for k, t in simple.items()}, acc_init.cpu(), acc.cpu()


def retrain_all(data, args, rargs, mnist, device, cache_path):
    """Retrain R small blocks per network; blocks in order (network, init): row i * R + r. Every finished
    group is kept in cache_path, so a killed run resumes (blocks made with another recipe or seed are redone)."""
    k, r = args.num_networks, args.num_inits
    jobs = [(i, j) for i in range(k) for j in range(r)]
    seeds = [utils.seed_for(args.seed, f'{SPLIT}/init{j}', i) for i, j in jobs]
    # the blocks' test accuracies are kept too: the test images are part of the key
    recipe = {key: getattr(rargs, key) for key in ('num_epochs', 'lr', 'batch_size', 'num_train_images',
                                                    'num_test_images')}
    cache = utils.load_file(cache_path, 'retrained blocks') if os.path.exists(cache_path) else {}
    done = cache.get('blocks', {}) if cache.get('recipe') == recipe and cache.get('data_root') == args.data_root else {}
    # one at a time on a CPU (grouped convolutions are slower there, BENCHMARKS.md); all at once on a GPU
    step = args.models_per_step or (1 if device.type == 'cpu' else len(jobs))
    with tqdm(total=len(jobs), unit='block', desc='retraining', dynamic_ncols=True) as bar:
        for a in range(0, len(jobs), step):
            group = [x for x in range(a, min(a + step, len(jobs))) if done.get(seeds[x], {}).get('job') != jobs[x]]
            bar.update(min(a + step, len(jobs)) - a - len(group))
            if not group:
                continue
            init = net.fresh_states('simple', [seeds[x] for x in group])
            gens = [construct.data_generator(seeds[x]) for x in group]
            t0 = time.time()
            out, a0, a1 = retrain(data, [jobs[x][0] for x in group], init, gens, rargs, mnist)
            for n, x in enumerate(group):
                done[seeds[x]] = {'job': jobs[x], 'init': take(init, [n]), 'trained': take(out, [n]),
                                  'acc_init': a0[n:n + 1], 'acc': a1[n:n + 1]}
            utils.atomic_save({'recipe': recipe, 'data_root': args.data_root, 'blocks': done}, cache_path)
            bar.update(len(group))
            pct = lambda accs: ', '.join(f'{x:.2f}%' for x in accs.tolist())  # noqa: E731
            logging.info(f'retrained {[jobs[x] for x in group]} in {time.time() - t0:.1f} s: test accuracy '
                         f'{pct(a1)} (at init {pct(a0)})')
    blocks = [done[sd] for sd in seeds]
    return {'init': cat_states([b['init'] for b in blocks]), 'trained': cat_states([b['trained'] for b in blocks]),
            'acc_init': torch.cat([b['acc_init'] for b in blocks]), 'acc': torch.cat([b['acc'] for b in blocks]),
            'seeds': seeds}


def cat_states(states):
    """Stacked states concatenated along their leading axis."""
    return {n: torch.cat([s[n] for s in states]) for n in states[0]}


# ----------------------------------------------------------------------------------------
# Comparisons: cosine in canonical scale under the best hidden order.

def convs(state):
    """(conv1, conv2) of a stacked small-block state."""
    return state['conv1.weight'], state['conv2.weight']


def pair_cosines(a, b, pairs):
    """symmetry.best_order_cosine of a[i] and b[j] for each (i, j) in pairs; a, b stacked small-block states."""
    i, j = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2).T
    return symmetry.best_order_cosine(tuple(t[i] for t in convs(a)), tuple(t[j] for t in convs(b)))


def summary(values):
    """mean, standard error of the mean (the values taken as independent), n, min, max and the values of a 1-d
    tensor."""
    v = values.double()
    se = (v.std() / len(v) ** 0.5).item() if len(v) > 1 else float('nan')
    return {'mean': v.mean().item(), 'se': se, 'n': len(v), 'min': v.min().item(), 'max': v.max().item(),
            'values': [round(x, 6) for x in v.tolist()]}


def retraining_pairs(k, r):
    """Index pairs of the (network, init) rows i * r + s: same network, different networks."""
    rows = [(i, s) for i in range(k) for s in range(r)]
    same = [(a, b) for a in range(len(rows)) for b in range(a + 1, len(rows)) if rows[a][0] == rows[b][0]]
    other = [(a, b) for a in range(len(rows)) for b in range(a + 1, len(rows)) if rows[a][0] != rows[b][0]]
    return same, other


def cosine_metrics(targets, ret, k, r):
    """The cosine rows of COSINE_ROWS for stored targets (K) and retrainings (K * R rows, with their inits)."""
    same, other = retraining_pairs(k, r)
    own = [(x, x) for x in range(k * r)]
    everyone = [(a, b) for a in range(k * r) for b in range(a + 1, k * r)]
    return {
        'inits': summary(pair_cosines(ret['trained'], ret['trained'], same)),
        'target': summary(pair_cosines(ret['trained'], targets, [(x, x // r) for x in range(k * r)])),
        'across_retrained': summary(pair_cosines(ret['trained'], ret['trained'], other)),
        'across_targets': summary(pair_cosines(targets, targets, [(i, j) for i in range(k) for j in range(i + 1, k)])),
        'drift': summary(pair_cosines(ret['trained'], ret['init'], own)),
        'chance': summary(pair_cosines(ret['init'], ret['init'], everyone)),
    }


def block_norms(state):
    """L2 norm (N,) of each block's raw weights, conv1 and conv2 together."""
    c1, c2 = convs(state)
    return torch.cat([c1.flatten(1), c2.flatten(1)], 1).norm(dim=1)


# ----------------------------------------------------------------------------------------
# Translators.

def load_translators(paths):
    """(path, translator in eval mode) for each checkpoint, through translate.py's loader."""
    out = []
    for path in paths:
        flags = types.SimpleNamespace(ckpt=path, **{flag: None for flag in translate.SIZE_FLAGS})
        out.append((path, translate.load_translator(flags)))
    return out


@torch.no_grad()
def translator_metrics(model, data, targets, ret, k, r, score):
    """A translator's outputs on the K networks against the stored targets, the retrainings and each other."""
    basic = take(data.basic, slice(0, k))
    out = evaluate.translate_blocks(model, basic)
    rows = block_metrics(out, targets, ret, k, r, score)
    base = residual_base(model, basic)
    if base is not None:
        delta = torch.cat([(out[n] - base[n]).flatten(1) for n in sorted(out)], 1)
        flat_base = torch.cat([base[n].flatten(1) for n in sorted(base)], 1)
        pairs = torch.tensor([(i, j) for i in range(k) for j in range(i + 1, k)]).T
        rows['delta_norm'] = summary(delta.norm(dim=1) / flat_base.norm(dim=1))
        rows['delta_across'] = summary(torch.nn.functional.cosine_similarity(delta[pairs[0]], delta[pairs[1]]))
    return rows


def residual_base(model, basic):
    """The rule a --output residual / refit translator adds its delta to, on the blocks basic (None for others)."""
    if not mixer.needs_bn(model) or model.kt['output'] == 'direct':
        return None
    return model.base(*rules.fold_bn(basic), basic['bn1.weight'], basic['bn1.bias'])


def block_metrics(out, targets, ret, k, r, score):
    """Stacked small blocks out (one per network) against the stored targets, the retrainings and each other."""
    rows = {
        'target': summary(pair_cosines(out, targets, [(i, i) for i in range(k)])),
        'retrained': summary(pair_cosines(out, ret['trained'], [(x // r, x) for x in range(k * r)])),
        'across': summary(pair_cosines(out, out, [(i, j) for i in range(k) for j in range(i + 1, k)])),
        'norm_ratio': summary(block_norms(out) / block_norms(targets)),
    }
    rows['acc'] = summary(score(on_device(out, score.images.device)))
    return rows


def on_device(stacked, device):
    """A stacked state moved to `device`."""
    return {n: t.to(device) for n, t in stacked.items()}


# ----------------------------------------------------------------------------------------
# Report.

def fmt(row):
    """'+0.123 ± 0.004 | n | min | max' cells of a summary."""
    return f'{row["mean"]:+.3f} ± {row["se"]:.3f} | {row["n"]} | {row["min"]:+.3f} | {row["max"]:+.3f}'


def markdown(report):
    """The report as markdown: the cosines of the retrainings, then one row per rule and translator."""
    rc = report['recipe']
    lines = [f'Identifiability of `{report["data_root"]}`: K = {report["num_networks"]} networks, '
             f'R = {report["num_inits"]} inits each, small block retrained {rc["num_epochs"]} epoch(s) on '
             f'{rc["num_train_images"]} images (lr {rc["lr"]}, batch {rc["batch_size"]}); cosine in canonical scale '
             f'under the best of the 3! hidden orders, mean ± standard error over pairs.', '',
             '| compared | cosine | pairs | min | max |', '| --- | --- | --- | --- | --- |']
    lines += [f'| {what} | {fmt(report["cosine"][key])} |' for key, what in COSINE_ROWS]
    blocks = {**report['rules'], **report['translators']}
    if blocks:
        keys = [key for key, _ in TRANSLATOR_ROWS] + ['norm_ratio'] + [key for key, _ in DELTA_ROWS]
        heads = [what for _, what in TRANSLATOR_ROWS] + ['output norm / target norm'] + [w for _, w in DELTA_ROWS]
        lines += ['', 'Rules and translators on the same networks (cosines as above; "-": not a residual):', '',
                  '| blocks | ' + ' | '.join(heads) + ' | test accuracy (%) |', '| --- ' * (len(keys) + 2) + '|']
        cell = lambda row: f'{row["mean"]:+.3f} ± {row["se"]:.3f}' if row else '-'  # noqa: E731
        lines += [f'| {name} | ' + ' | '.join(cell(tr.get(key)) for key in keys) + f' | {tr["acc"]["mean"]:.2f} |'
                  for name, tr in blocks.items()]
    lines += ['', f'Test accuracy on {rc["num_test_images"]} images (%):', '',
              '| blocks | mean | min | max |', '| --- | --- | --- | --- |']
    accs = [('stored targets', report['acc']['target']), ('retrained', report['acc']['retrained']),
            ('fresh inits', report['acc']['init'])]
    accs += [(f'{name} outputs', tr['acc']) for name, tr in blocks.items()]
    lines += [f'| {what} | {a["mean"]:.2f} | {a["min"]:.2f} | {a["max"]:.2f} |' for what, a in accs]
    return '\n'.join(lines) + '\n'


def main(argv=None):
    """Retrain, compare, write <out>.json and <out>.md."""
    args = get_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = torch.device(args.device)
    data = loader.ValDataset(args.data_root, args.num_networks)
    data.require('simple', 'the stored targets (make the data root with construct_val.py --train_simple)')
    recipe = recipe_for(args, data.recipe)
    out = args.out or default_out(args.data_root, recipe['num_epochs'])
    translators = load_translators(args.translators)  # before the long part: a bad path fails at once
    utils.set_logger(out + '.log')
    logging.info(f'identifiability of {args.data_root}: K {args.num_networks}, R {args.num_inits}, recipe {recipe}, '
                 f'device {device}, seed {args.seed}')
    rargs = recipe_args(recipe, args.mnist_root)
    mnist = generation.load_mnist_to(device, rargs)
    t0 = time.time()
    ret = retrain_all(data, args, rargs, mnist, device, args.blocks or out + '.blocks.pt')
    k, r = args.num_networks, args.num_inits
    targets = take(data.simple, slice(0, k))
    score = evaluate.Scorer(mnist[2], mnist[3], on_device(data.begin, device), on_device(data.last, device))
    report = {'data_root': args.data_root, 'num_networks': k, 'num_inits': r, 'recipe': recipe,
              'stored_recipe': data.recipe, 'seed': args.seed, 'seed_split': f'{SPLIT}/init<r>',
              'retrain_seeds': ret['seeds'],
              'retrain_seconds': round(time.time() - t0, 1), 'device': str(device),
              'cosine': cosine_metrics(targets, ret, k, r),
              'acc': {'target': summary(score(on_device(targets, device))), 'retrained': summary(ret['acc']),
                      'init': summary(ret['acc_init'])},
              'rules': {name: block_metrics(rule(take(data.basic, slice(0, k))), targets, ret, k, r, score)
                        for name, rule in RULES.items()},
              'translators': {path: translator_metrics(model, data, targets, ret, k, r, score)
                              for path, model in translators}}
    utils.atomic_write(out + '.json', json.dumps(report, indent=1) + '\n')
    table = markdown(report)
    utils.atomic_write(out + '.md', table)
    logging.info('\n' + table)
    logging.info(f'wrote {out}.json and {out}.md ({report["retrain_seconds"]} s of retraining)')
    return report


if __name__ == '__main__':
    utils.run_main(main)

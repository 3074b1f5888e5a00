"""Judging translators: translate blocks, score networks on MNIST, the reference rows, summaries and verdicts.

A network is scored by its MNIST test accuracy (in %) with a middle block (its own BasicBlock, a
translated or a reference small block: SimpleBlock_NoBn or another target) between its own frozen Begin and Last,
all in eval mode.
"""
import logging
import time

import torch

import mixer
import net
import rules
import targets as blocks
import utils

log = logging.getLogger(__name__)
# the training-free rows KT must beat (each uses only the training set's or the network's own weights and BN buffers)
TRAINING_FREE = ('Random Init', 'Identity (block skipped)', 'Mean target', 'Weight selection',
                 'Weight selection (folded)', 'Weight selection (folded, refit)', 'Centre taps (folded)',
                 'Summed taps (folded)')
UNIVERSAL = 'Universal block'  # one block for every network (universal.py): the translator that ignores its input
BASELINES = TRAINING_FREE + (UNIVERSAL,)


@torch.no_grad()
def translate(model, conv1, conv2, batch_size=4096, bn=()):
    """Eval-mode translation of stacked BasicBlock convs (and, for a mixer.FunctionTranslator, their
    rules.bn_inputs bn) into a stacked state of the translator's target (SimpleBlock_NoBn: conv1, conv2)."""
    was_training = model.training
    model.eval()
    inputs = [conv1, conv2, *bn]
    outs = [model([t[i:i + batch_size] for t in inputs]) for i in range(0, len(conv1), batch_size)]
    model.train(was_training)
    return blocks.state_of(model.target, [torch.cat([o[j] for o in outs]) for j in range(len(outs[0]))])


def translate_blocks(model, basic, batch_size=4096):
    """translate() of stacked BasicBlock states, with the BatchNorm inputs when the translator reads them."""
    bn = rules.bn_inputs(basic) if mixer.needs_bn(model) else ()
    return translate(model, basic['conv1.weight'], basic['conv2.weight'], batch_size, bn)


def eval_chunks(device):
    """(images, networks) per forward of net.stacked_accuracy: on a GPU 10 networks side by side in small
    memory; on a CPU grouped convolutions are slower than separate ones, so one network at a time
    (bench/bench_eval.py measures both; BENCHMARKS.md)."""
    return (1000, 10) if device.type == 'cuda' else (500, 1)


class Scorer:
    """Scores middle blocks inside a fixed set of networks (begin, last: stacked states on the device).

    Their Begin never changes, so its output on the test images is computed once when it fits in memory
    (4.7 GB for 100 networks x 10,000 images), which makes every evaluation about 4x cheaper. Under torchrun
    (ctx from distributed.setup) each rank scores, and caches, its share of the networks."""

    def __init__(self, images, labels, begin, last, ctx=None):
        self.images, self.labels, self.begin, self.last, self.ctx = images, labels, begin, last, ctx
        self.k = begin['conv.weight'].shape[0]
        self.chunk_images, self.chunk_nets = eval_chunks(images.device)
        self.mine = ctx.network_share(self.k) if ctx is not None else slice(0, self.k)
        n = self.mine.stop - self.mine.start
        fits = n > 0 and utils.fits_in_memory(n * len(images) * net.FEATURE_NUMEL * 4, images.device)
        self.begin_out = net.begin_outputs(images, {k: t[self.mine] for k, t in begin.items()},
                                           self.chunk_images) if fits else None

    def __call__(self, middle, kind='simple'):
        """Test accuracies (%) (k,) on the CPU of every network with `middle` (stacked) in it."""
        def score(part):  # part: within this rank's share
            b, m, l = ({n: t[part] for n, t in d.items()} for d in (self.begin, middle, self.last))
            cached = None if self.begin_out is None else \
                self.begin_out[part.start - self.mine.start:part.stop - self.mine.start]
            return net.stacked_accuracy(self.images, self.labels, b, m, l, kind, self.chunk_images,
                                        self.chunk_nets, cached)
        accs = self.ctx.gather(self.k, score) if self.ctx is not None else score(slice(0, self.k))
        return accs.cpu()


def random_init(k, seed, block=net.DEFAULT_SMALL, device='cpu'):
    """The Random Init row's blocks: k fresh `block`s (a SMALL_BLOCKS name), network i's drawn under
    utils.seed_for(seed, 'random_init', i)."""
    return net.fresh_states(block, [utils.seed_for(seed, 'random_init', i) for i in range(k)], device)


def reference_rows(score, networks, targets, seed, block=net.DEFAULT_SMALL, universal=None):
    """The rows every run is judged against, for the networks of `score` (networks: their stacked
    blocks; targets: the training set's written small blocks (targets.written; SimpleBlock_NoBn: [conv1, conv2]),
    or [] without them; block: the target): Large (their own BasicBlock), Random Init (fresh small blocks, seeded),
    Identity (block skipped: Begin straight into Last), Mean target (the mean small block of the training set),
    Universal block (universal: one trained block's state, universal.py), the target's training-free rules
    (rules.rules_of: for SimpleBlock_NoBn Weight selection, (folded) and (folded, refit)), Retrained (a small block
    of the target's kind trained in place, when the val set has them)."""
    c1 = networks.basic['conv1.weight']
    k = c1.shape[0]
    rows = {'Large (BasicBlock)': score(networks.basic, 'basic'),
            'Random Init': score(random_init(k, seed, block, c1.device)),
            'Identity (block skipped)': score({}, 'identity')}
    if targets:
        rows['Mean target'] = score(mean_block(targets, k, block))
    else:
        log.info('note: no "Mean target" row: the training set has no small blocks')
    if universal is not None:
        rows[UNIVERSAL] = score({n: t.to(c1.device).expand(k, *t.shape) for n, t in universal.items()})
    for name, rule in rules.rules_of(block).items():
        rows[name] = score(rule(networks.basic))
    if networks.simple is not None and net.small_block_of(networks.simple) == block:
        rows['Retrained'] = score(networks.simple)
    elif networks.simple is not None:
        log.info(f'note: no "Retrained" row: the val set\'s retrained blocks are '
                 f'{net.small_block_of(networks.simple)}, not {block} (make them with construct_val.py --small_block '
                 f'{block} --train_simple)')
    return rows


def mean_block(targets, k, block=net.DEFAULT_SMALL):
    """The mean of stacked written small blocks (SimpleBlock_NoBn: [conv1, conv2]) as a state, repeated for k
    networks."""
    return blocks.state_of(block, [y.mean(0, keepdim=True).expand(k, *y.shape[1:]) for y in targets])


def acc_row(accs):
    """A summary row: mean/min/max, the 20-bin histogram and the per-network accuracies (in %)."""
    accs = torch.as_tensor(accs, dtype=torch.float64).cpu()
    return {'mean': accs.mean().item(), 'min': accs.min().item(), 'max': accs.max().item(),
            'histogram': utils.acc_histogram(accs), 'accs': [round(a, 4) for a in accs.tolist()]}


def log_row(name, accs):
    """Log one accuracy row and its distribution."""
    log.info(f'{name:>17}: {utils.acc_summary(accs)}  (n={len(accs)})')
    log.info(f'{"":>17}  counts per 5% bin: {utils.acc_histogram(accs)}')


def original_line(prefix, accs):
    """The original train.py's accuracy line: '<prefix>, Mean Accuracy ..%, Min Accuracy ..%, Max Accuracy ..%'."""
    accs = torch.as_tensor(accs, dtype=torch.float64)
    return (f'{prefix}, Mean Accuracy {accs.mean():.2f}%, Min Accuracy {accs.min():.2f}%, '
            f'Max Accuracy {accs.max():.2f}%')


def paired_margin(accs, baseline_accs):
    """Mean and standard error of accs - baseline_accs, paired over the same networks."""
    d = torch.as_tensor(accs, dtype=torch.float64) - torch.as_tensor(baseline_accs, dtype=torch.float64)
    se = d.std() / len(d) ** 0.5 if len(d) > 1 else torch.tensor(float('inf'))
    return d.mean().item(), se.item()


def beats(accs, baseline_accs):
    """The one definition of "KT beats baseline X": its mean margin, paired over the same validation
    networks, exceeds two standard errors."""
    mean, se = paired_margin(accs, baseline_accs)
    return mean > 2 * se


def verdict(rows, kt='KT (best)'):
    """One honest sentence: did KT beat each baseline present (paired, more than 2 standard errors)? The
    training-free row of highest mean, when one is highest, is named the strongest."""
    present = [name for name in BASELINES if name in rows]
    means = sorted((rows[name]['mean'] for name in present if name in TRAINING_FREE), reverse=True)
    parts = []
    for name in present:
        mean, se = paired_margin(rows[kt]['accs'], rows[name]['accs'])
        word = 'beat' if beats(rows[kt]['accs'], rows[name]['accs']) else 'did NOT beat'
        strongest = name in TRAINING_FREE and len(means) > 1 and rows[name]['mean'] == means[0] > means[1]
        parts.append(f'{word} {name}{", the strongest training-free rule" if strongest else ""} '
                     f'({mean:+.2f} ± {se:.2f} points)')
    if 'Retrained' in rows:
        parts.append(f"and is {rows['Retrained']['mean'] - rows[kt]['mean']:.2f} points below Retrained")
    ignores = UNIVERSAL in rows and not beats(rows[kt]['accs'], rows[UNIVERSAL]['accs'])
    return ('KT (best epoch) ' + ', '.join(parts) + '.' + (' Not beating the Universal block, one block for every '
            'network, it shows no use of its input.' if ignores else '') + ' (Beat: the margin, paired over the same '
            'validation networks, is above two standard errors.)')


# ---------------------------------------------------------------------------------------- a training run's evaluation

def log_original(prefix, accs, distribution=False):
    """The original train.py's accuracy line, and its 'Accuracy Distribution' line where it writes one."""
    log.info(original_line(prefix, accs))
    if distribution:
        log.info(f'Accuracy Distribution {utils.acc_histogram(accs)}')


def run_references(score, networks, objective, args, state=None, universal=None):
    """A run's reference rows, measured once (a resumed run reads them back from its state) and logged; universal:
    the Universal block's state made for this training set and target, or None."""
    if state is not None:
        refs = state['refs']
    else:
        t0 = time.time()
        refs = reference_rows(score, networks, objective.raw_targets, args.seed, objective.block, universal)
        if args.canonical_targets:
            refs['Mean canonical target'] = score(mean_block(objective.targets, len(networks)))
        log.info(f'reference rows measured in {time.time() - t0:.1f} s')
    for name, accs in refs.items():
        log_row(name, accs)
    log_original('Random Init', refs['Random Init'], distribution=True)
    return refs


class BestEpoch:
    """A run's evaluations: scores the translator on the val networks at an epoch and keeps the best epoch,
    picked on the val mean (the original) or on held-out training networks (--holdout_networks)."""

    def __init__(self, score, networks, batch_size, score_holdout=None, holdout=None, state=None):
        self.score, self.score_holdout, self.batch_size = score, score_holdout, batch_size
        self.val_basic = networks.basic
        self.holdout_basic = holdout.basic if holdout else None
        self.best = {'mean': -1.0, 'epoch': -1, 'model': None, 'accs': None}
        self.last_accs = None
        if state is not None:
            self.best, self.last_accs = state['best'], state['last_accs']

    def __call__(self, model, epoch, row):
        """Score `model` at `epoch` into row (mean, min, max, holdout), log the original's lines; the tail of
        our epoch line."""
        accs = self.last_accs = self.score(translate_blocks(model, self.val_basic, self.batch_size))
        row.update(mean=accs.mean().item(), min=accs.min().item(), max=accs.max().item())
        log_original(f'Epoch {epoch}', accs)
        pick, message = row['mean'], ''
        if self.holdout_basic is not None:
            pick = self.score_holdout(translate_blocks(model, self.holdout_basic, self.batch_size)).mean().item()
            row['holdout'] = pick
            message += f'  held-out mean {pick:.2f}'
        held = ' (picked on the held-out mean {:.2f}%)' if self.holdout_basic is not None else ''
        if pick > self.best['mean']:
            self.best = {'mean': pick, 'epoch': epoch, 'accs': accs,
                         'model': {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
            # the original's line, with the val mean as there
            log.info(f'Update Best Mean Accuracy {row["mean"]:.2f}%' + held.format(pick))
        message += (f'  test acc {utils.acc_summary(accs)}  (best {"held-out " if held else ""}mean '
                    f'{self.best["mean"]:.2f} at {self.best["epoch"]})')
        return message + f'\n  counts per 5% bin: {utils.acc_histogram(accs)}'

    def state(self):
        """What last.pth keeps of the evaluations."""
        return {'best': self.best, 'last_accs': self.last_accs}

    def best_val(self):
        """The val mean of the best epoch (the selection's own mean with --holdout_networks is self.best['mean'])."""
        return self.best['accs'].mean().item()

    def log_final(self, rows, checkpoint, best_step):
        """The original's closing lines, then every row of the run and where the best translator went."""
        best_val, held = self.best_val(), self.holdout_basic is not None
        log.info(f'Best Mean Accuracy {best_val:.2f}%' +
                 (f' (picked on the held-out mean {self.best["mean"]:.2f}%)' if held else ''))
        log.info(f'Accuracy Distribution {utils.acc_histogram(self.best["accs"])}')
        log.info(f'summary (test accuracy in %, {len(self.best["accs"])} validation networks):')
        for name, accs in rows.items():
            log_row(name, accs)
        log.info(f'best translator (epoch {self.best["epoch"]}, step {best_step}, val mean {best_val:.2f}) '
                 f'saved to {checkpoint}')

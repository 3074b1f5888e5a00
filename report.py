"""Print the results table of one or more train.py runs (their summary.json files).

    python report.py ckpts/nobn/<run>/summary.json [more summary.json ...] [--out table.md] [--hist]
    python report.py SUMMARIES... --plot OUTDIR [--warm_start warm_start.json]   # PNG figures (needs matplotlib)

One table per run: Large / Random Init / Identity / Mean target / Universal block / the target's rules / KT /
Retrained, with mean, min and max test accuracy over the val networks, then one line saying plainly whether KT beat each baseline (evaluate.beats:
its margin, paired over the same val networks, is above two standard errors).
"""
import argparse
import json
import os
import re

import utils
from evaluate import BASELINES, paired_margin, verdict

ORDER = ['Large (BasicBlock)', 'Random Init', 'Identity (block skipped)', 'Mean target', 'Universal block',
         'Weight selection', 'Weight selection (folded)', 'Weight selection (folded, refit)', 'Centre taps (folded)',
         'Summed taps (folded)', 'KT (best)', 'KT (last)', 'Retrained']
NETWORK_ROWS = ('Large (BasicBlock)', 'Identity (block skipped)', 'Weight selection', 'Weight selection (folded)',
                'Weight selection (folded, refit)', 'Centre taps (folded)', 'Summed taps (folded)',
                'Retrained')  # fixed by the val networks and test images


def load_summary(path):
    """A train.py summary.json, or a clear error."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise utils.UserError(f'{path}: not a readable summary.json ({e}); train.py writes it at the end of a run')


def picked_on(summary):
    """Where the run's KT (best) epoch was picked: on the reported validation networks (the original's rule, as
    train.py does without --holdout_networks) or on held-out training networks."""
    selection = summary.get('selection') or 'val'
    if selection.startswith('holdout'):
        return (f"Best epoch picked on {selection.split()[1]} held-out training networks, not on the "
                f"{summary.get('num_val', '')} reported ones.").replace('  ', ' ')
    return (f"Best epoch picked on the {summary.get('num_val', '')} reported validation networks themselves (the "
            f"original's rule).").replace('  ', ' ')


def table(summary, hist=False):
    """Markdown table (and optional 5% histograms) of one run."""
    rows = summary['rows']
    lines = ['| row | mean | min | max |', '| --- | --- | --- | --- |']
    for name in [n for n in ORDER if n in rows] + [n for n in rows if n not in ORDER]:
        r = rows[name]
        lines.append(f"| {name} | {r['mean']:.2f} | {r['min']:.2f} | {r['max']:.2f} |")
    lines += ['', verdict(rows) + ' ' + picked_on(summary)]
    if hist:
        lines += ['', 'Counts of val networks per 5% accuracy bin (0-5, 5-10, ..., 95-100):', '```']
        lines += [f"{name:>18}: {' '.join(f'{c:3d}' for c in rows[name]['histogram'])}"
                  for name in ('Random Init', 'KT (best)') if name in rows]
        lines.append('```')
    return '\n'.join(lines)


def side_by_side(summaries, labels):
    """One table of runs on the same validation networks: the reference rows they share once, then each
    run's own rows (KT, and Random Init or Mean target where its seed or training set makes them differ),
    and each run's verdict."""
    first = summaries[0]['rows']
    for s, label in zip(summaries[1:], labels[1:]):
        if any(s['rows'][n]['accs'] != first[n]['accs'] for n in NETWORK_ROWS if n in first and n in s['rows']):
            raise utils.UserError(f'{label}: scored on other validation networks or test images than {labels[0]}; '
                                  f'--side_by_side needs runs on the same ones')
    present = dict.fromkeys(n for s in summaries for n in s['rows'])
    names = [n for n in ORDER if n in present] + [n for n in present if n not in ORDER]
    shared = [n for n in names if not n.startswith('KT') and n in first and all(
        n in s['rows'] and s['rows'][n]['accs'] == first[n]['accs'] for s in summaries)]
    own = [n for n in names if n not in shared]
    lines = ['| row | mean | min | max |', '| --- | --- | --- | --- |']
    for name, r in [(n, first[n]) for n in shared] + [(f'{n}, {label}', s['rows'][n]) for s, label in
                                                       zip(summaries, labels) for n in own if n in s['rows']]:
        lines.append(f"| {name} | {r['mean']:.2f} | {r['min']:.2f} | {r['max']:.2f} |")
    lines.append('')
    lines += [f'{label}: ' + verdict(s['rows']) + ' ' + picked_on(s) for s, label in zip(summaries, labels)]
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------- figures

def pyplot():
    """matplotlib's pyplot on the Agg backend, or a UserError saying how to get it (it is optional at run time)."""
    try:
        import matplotlib
    except ImportError:
        raise utils.UserError('--plot draws with matplotlib, which is not installed: pip install matplotlib '
                              '(requirements.txt pins the tested version)') from None
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


OPTION_LABELS = {'perm': 'perm', 'canon': 'canonical targets', 'hinv': 'hidden-invariant loss'}
IO_LABELS = {'in-folded': 'folded inputs', 'out-residual': 'residual output', 'out-refit': 'refit output'}


def objective_options(summary):
    """A run's research options, from its run name (e.g. ['perm', 'functional-w1-ce0-img32']); [] for the original."""
    parts = summary['run'].split('/')[-1].split('_')
    return [p for p in parts if not re.fullmatch(r'n\d+|seed\d+|mask-t0|noise-t0|hold\d+|val\d+|test\d+', p)]


def objective_of(summary):
    """A run's objective in words, for legends and titles: the loss ('faithful MSE', 'MSE', 'functional',
    'functional + CE', 'MSE + functional'), '+ option' per research option (perm, canonical targets, hidden-invariant
    loss, mask/noise) and ', folded inputs' / ', residual output' / ', refit output'; e.g. 'functional + perm'."""
    loss, options, io = 'MSE', [], []
    for part in objective_options(summary):
        m = re.fullmatch(r'(mse\+)?functional-w[\d.]+-ce([\d.]+)-img\d+', part)
        if m:
            loss = ('MSE + functional' if m.group(1) else 'functional') + (' + CE' if float(m.group(2)) else '')
        elif part in OPTION_LABELS:
            options.append(OPTION_LABELS[part])
        elif part in IO_LABELS:
            io.append(IO_LABELS[part])
        elif re.fullmatch(r'(mask|noise)-\w+?[\d.]+', part):
            options.append(part.replace('-t', ' ').replace('-s', ' ').replace('-both', ' '))
        else:
            options.append(part)
    if loss == 'MSE' and not options and not io:
        loss = 'faithful MSE'
    return ' + '.join([loss] + options) + ''.join(f', {x}' for x in io)


def finish(fig, ax, xlabel, ylabel, title=None):
    """The one style of every figure: light grid, no top/right frame, 9-point labels, the legend outside on the
    right (it holds the curves' names in words), tight layout."""
    ax.grid(True, alpha=0.3)
    ax.spines[['top', 'right']].set_visible(False)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, frameon=False, loc='center left', bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def mean_se(accs):
    """Mean and standard error of per-network accuracies."""
    mean, se = paired_margin(accs, [0.0] * len(accs))
    return mean, se


def plot_scaling(summaries, plt):
    """KT (best) mean ± 1 SE against the number of training networks, a line per objective; the training-free
    rules of the first summary that are fixed by the val networks as horizontal bands (mean ± 1 SE)."""
    fig, ax = plt.subplots(figsize=(10, 4.5))
    by_objective = {}
    for s in summaries:
        by_objective.setdefault(objective_of(s), []).append((s['train_pairs'], *mean_se(s['rows']['KT (best)']['accs'])))
    lines, bands = plt.get_cmap('tab20'), plt.get_cmap('Set2')  # distinct colours for up to 20 objectives
    for i, (label, points) in enumerate(sorted(by_objective.items())):
        n, mean, se = zip(*sorted(points))
        ax.errorbar(n, mean, yerr=se, marker='os^D'[i // 20 % 4], capsize=3, color=lines(i % 20), label=label)
    rows = summaries[0]['rows']
    for i, name in enumerate(b for b in BASELINES if b in rows and b != 'Mean target'):
        mean, se = mean_se(rows[name]['accs'])
        ax.axhspan(mean - se, mean + se, color=bands(i), alpha=0.35, label=f'{name} (± 1 SE)')
    ax.set_xscale('log')
    sizes = sorted({s['train_pairs'] for s in summaries})
    ax.set_xticks(sizes, [str(n) for n in sizes])  # plain numbers at the sizes run, no powers of ten
    ax.xaxis.set_minor_locator(plt.NullLocator())
    return finish(fig, ax, 'training networks', f"mean test accuracy (%), {summaries[0]['num_val']} val networks")


def plot_histograms(summary, plt):
    """Per-network accuracy histograms (5% bins) of KT (best) beside the training-free rules, one bar group per bin."""
    names = ['KT (best)'] + [b for b in BASELINES if b in summary['rows']]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 5 / (len(names) + 1)
    for i, name in enumerate(names):
        counts = summary['rows'][name]['histogram']
        ax.bar([5 * b + width * (i + 0.5) for b in range(len(counts))], counts, width, label=name, align='edge')
    ax.yaxis.set_major_locator(plt.MaxNLocator(integer=True))  # counts of networks: whole numbers
    return finish(fig, ax, 'test accuracy (%)', 'val networks',
                  objective_of(summary) + f", {summary['train_pairs']} training networks")


def plot_warm_start(data, plt):
    """Warm-start curves from a JSON dict (experiments/warm_start.py writes it):
        {"steps": [0, 10, ...]  (fine-tuning steps, ascending),
         "starts": {start name: [[accuracy in % at each step] for each network], ...},
         "retrained": [accuracy in % per network]  (optional: the small block trained from scratch),
         "networks": [val network indices]  (optional, for the record)}
    Drawn: each start's mean accuracy ± 1 SE over the networks against the steps (symlog axis, so step 0
    shows, ticked at the steps scored, in plain numbers), and the retrained mean as a dashed line."""
    steps = data['steps']
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for name, per_network in data['starts'].items():
        if any(len(a) != len(steps) for a in per_network):
            raise utils.UserError(f'warm-start file: start "{name}" has a network without one accuracy per step '
                                  f'({len(steps)} steps)')
        stats = [mean_se([a[j] for a in per_network]) for j in range(len(steps))]
        ax.errorbar(steps, [m for m, _ in stats], yerr=[e for _, e in stats], marker='o', capsize=3, label=name)
    if data.get('retrained'):
        ax.axhline(mean_se(data['retrained'])[0], color='k', linestyle='--', label='Retrained')
    ax.set_xscale('symlog', linthresh=max(1, min((s for s in steps if s > 0), default=1)))
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.set_xlim(left=min(steps) - 1)  # room for step 0's marker; the ticks stay at the steps scored
    networks = len(next(iter(data['starts'].values()), []))
    return finish(fig, ax, 'fine-tuning steps', f'mean test accuracy (%), {networks} val networks')


def save_figure(fig, path, plt):
    """Write a figure as PNG atomically, and close it."""
    tmp = path + '.tmp.png'
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def plot(summaries, paths, outdir, warm_start=None, hist=True):
    """--plot: scaling.png (all summaries, if any), hist_<run dir>.png per summary (unless hist is False),
    warm_start.png; returns the paths."""
    plt = pyplot()
    os.makedirs(outdir, exist_ok=True)
    written = []
    if summaries:
        written.append(os.path.join(outdir, 'scaling.png'))
        save_figure(plot_scaling(summaries, plt), written[0], plt)
    for s, path in zip(summaries if hist else [], paths):
        name = os.path.basename(os.path.dirname(os.path.abspath(path))) + \
            ('' if os.path.basename(path) == 'summary.json' else '_' + os.path.splitext(os.path.basename(path))[0])
        written.append(os.path.join(outdir, f'hist_{name}.png'))
        save_figure(plot_histograms(s, plt), written[-1], plt)
    if warm_start:
        data = load_summary(warm_start)
        written.append(os.path.join(outdir, 'warm_start.png'))
        save_figure(plot_warm_start(data, plt), written[-1], plt)
    return written


def main():
    p = argparse.ArgumentParser(description='Results table of train.py runs.')
    p.add_argument('summaries', nargs='*', help='summary.json files written by train.py')
    p.add_argument('--out', default='', help='also write the tables to this markdown file')
    p.add_argument('--hist', action='store_true', help='add the 20-bin histograms of Random Init and KT')
    p.add_argument('--side_by_side', nargs='+', metavar='LABEL', default=None,
                   help='one table for runs on the same validation networks, a label per summary')
    p.add_argument('--plot', metavar='OUTDIR', default=None,
                   help='write PNG figures there instead: accuracy against training networks per objective, '
                        'per-run histograms (needs matplotlib)')
    p.add_argument('--warm_start', metavar='JSON', default=None,
                   help='with --plot: also warm_start.png from this file (schema: report.plot_warm_start)')
    p.add_argument('--no_hist', action='store_true', help='with --plot: scaling.png only, no per-run histograms')
    args = p.parse_args()
    if not args.summaries and not (args.plot is not None and args.warm_start):
        raise utils.UserError('give summary.json files (or --plot OUTDIR --warm_start JSON alone)')
    summaries = [load_summary(path) for path in args.summaries]
    if args.plot is not None:
        for path in plot(summaries, args.summaries, args.plot, args.warm_start, not args.no_hist):
            print(f'wrote {path}')
        return
    if args.warm_start:
        raise utils.UserError('--warm_start goes with --plot OUTDIR')
    text = []
    if args.side_by_side is not None:
        if len(args.side_by_side) != len(summaries):
            raise utils.UserError(f'--side_by_side: {len(args.side_by_side)} labels for {len(summaries)} summaries')
        text = [side_by_side(summaries, args.side_by_side), '']
    else:
        for s in summaries:
            text += [f"### {s['run']}",
                     f"{s['train_pairs']} training pairs, {s['num_val']} val networks, {s['num_test_images']} test "
                     f"images; translator {s['config']}; best epoch {s['best_epoch']} of {s['num_epochs']}", '',
                     table(s, args.hist), '']
    print('\n'.join(text))
    if args.out:
        utils.atomic_write(args.out, '\n'.join(text))


if __name__ == '__main__':
    utils.run_main(main)

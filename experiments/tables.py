"""Markdown tables for RESULTS.md from the runs in results/runs/ and results/scaling/runs/ (each holds
train.py's summary.json).

    python experiments/tables.py > results/tables.md
"""
import csv
import json
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, 'results')
sys.path.insert(0, REPO)
import evaluate  # noqa: E402
from evaluate import beats, paired_margin  # noqa: E402

GROUPS = [
    ('KT against the number of training pairs (300 translator epochs)',
     ['pairs_25', 'pairs_64', 'pairs_128', 'demo']),
    ('KT against translator epochs (256 pairs; see also the evaluations inside the main job below)',
     ['epochs_100', 'demo']),
    ('--prob and --noise (256 pairs, 100 epochs)', ['epochs_100', 'prob0.1_t', 'noise0.01_t']),
    ('Research options at small data (100 epochs)',
     ['mse_64', 'perm_64', 'hinv_64', 'functional_64', 'functional_perm_64',
      'epochs_100', 'perm_256', 'hinv_256', 'functional_256', 'functional_perm_256']),
]


SCALING_SIZES = [50, 150, 500, 2000]
SCALING_ROWS = [(n, tag) for n in SCALING_SIZES for tag in ('', '_seed1')]  # (networks, run-name suffix)
SCALING_VARIANTS = [('mse', 'faithful MSE'), ('perm', 'MSE + `--perm_aug`'),
                    ('hinv', 'MSE + `--hidden_invariant_loss`'), ('functional', '`--loss functional`'),
                    ('functional_perm', '`--loss functional --perm_aug`')]


def load(name, folder='runs'):
    """summary.json of one run in results/<folder>/ (results/demo holds the main job's), or None if it has not run."""
    path = os.path.join(RESULTS, 'demo' if name == 'demo' else os.path.join(folder, name), 'summary.json')
    if not os.path.exists(path):
        return None
    with open(path) as f:
        s = json.load(f)
    return s if 'rows' in s else None


def options(s):
    """The flags that distinguish a run, read from its run name."""
    run = s['run']
    parts = run.split('/')[-1].split('_')
    return ' '.join(p for p in parts if not re.fullmatch(r'n\d+|seed\d+|mask-t0|noise-t0', p)) or 'faithful'


BASELINES = evaluate.BASELINES  # main narrows it to the columns the runs have


def present_baselines():
    """The evaluate.BASELINES that some run of GROUPS was scored against (rows added to evaluate later show once
    experiments/rescore_baselines.py has added them to the committed summaries)."""
    runs = [s for _, names in GROUPS for name in names if (s := load(name))]
    return tuple(b for b in evaluate.BASELINES if any(b in s['rows'] for s in runs))


def row(name, s):
    """One markdown row: recipe, KT best mean/min/max, margins over the baselines."""
    r = s['rows']
    kt = r['KT (best)']
    margins = ' | '.join(f"{kt['mean'] - r[b]['mean']:+.2f}" if b in r else 'n/a' for b in BASELINES)
    return (f"| {name} | {s['train_pairs']} | {s['num_epochs']} | {options(s)} | {kt['mean']:.2f} | "
            f"{kt['min']:.2f} | {kt['max']:.2f} | {margins} |")


def margin(s, baseline):
    """KT minus a baseline, paired over the same val networks: (mean difference, its standard error)."""
    return paired_margin(s['rows']['KT (best)']['accs'], s['rows'][baseline]['accs'])


def beats_baseline(s, baseline):
    """evaluate.beats: KT's paired margin over the baseline exceeds two standard errors."""
    return beats(s['rows']['KT (best)']['accs'], s['rows'][baseline]['accs'])


def row_label(n, tag):
    """'500', or '500 (seed 1)' for a second-seed run."""
    return f"{n} (seed {tag.removeprefix('_seed')})" if tag else str(n)


def scaling():
    """The 50 -> 2,000 networks study (experiments/scaling/run_scaling.sh): KT means beside the baselines."""
    runs = {(v, n, tag): load(f'{v}_{n}{tag}', os.path.join('scaling', 'runs'))
            for v, _ in SCALING_VARIANTS for n, tag in SCALING_ROWS}
    if not any(runs.values()):
        return
    print('\n#### Scaling to 2,000 networks (reduced recipe, 600 translator steps, 2,000 test images)\n')
    print('| networks | ' + ' | '.join(label for _, label in SCALING_VARIANTS)
          + ' | Random Init | Mean target | Weight selection | Retrained | Large |')
    print('| --- ' * (len(SCALING_VARIANTS) + 6) + '|')
    for n, tag in SCALING_ROWS:
        cells = [f"{s['rows']['KT (best)']['mean']:.2f}" if (s := runs[v, n, tag]) else 'not run'
                 for v, _ in SCALING_VARIANTS]
        ref = next((s for v, _ in SCALING_VARIANTS if (s := runs[v, n, tag]) and 'Mean target' in s['rows']), None)
        refs = [f"{ref['rows'][r]['mean']:.2f}" if ref else 'n/a'
                for r in ('Random Init', 'Mean target', 'Weight selection', 'Retrained', 'Large (BasicBlock)')]
        print(f'| {row_label(n, tag)} | ' + ' | '.join(cells + refs) + ' |')
    print('\nKT minus Mean target, paired over the same 100 validation networks (mean ± standard error):\n')
    print('| networks | ' + ' | '.join(label for _, label in SCALING_VARIANTS) + ' |')
    print('| --- ' * (len(SCALING_VARIANTS) + 1) + '|')
    for n, tag in SCALING_ROWS:
        cells = ['%+.2f ± %.2f' % margin(runs[v, n, tag], 'Mean target') if runs[v, n, tag] else 'not run'
                 for v, _ in SCALING_VARIANTS]
        print(f'| {row_label(n, tag)} | ' + ' | '.join(cells) + ' |')
    largest = max(n for (v, n, tag), s in runs.items() if s)
    print('\nThe numbers of training networks at which each variant beats a baseline by more than two '
          'standard errors (paired, as above) with every translator seed run there; the first is the smallest:\n')
    print('| variant | beats Mean target at | beats Weight selection at |\n| --- | --- | --- |')
    for v, label in SCALING_VARIANTS:
        cells = []
        for baseline in ('Mean target', 'Weight selection'):
            beats = [n for n in SCALING_SIZES if runs[v, n, '']
                     and all(beats_baseline(s, baseline) for tag in ('', '_seed1') if (s := runs[v, n, tag]))]
            cells.append(', '.join(map(str, beats)) if beats else f'not reached up to {largest}')
        print(f'| {label} | ' + ' | '.join(cells) + ' |')


PAPER_VARIANTS = [('mse', 'faithful MSE'), ('canon', 'MSE, `--canonical_targets`'),
                  ('hinv', 'MSE, `--hidden_invariant_loss`'), ('perm', 'MSE, `--perm_aug`'),
                  ('perm_canon', 'MSE, `--perm_aug --canonical_targets`'),
                  ('functional_perm', '`--loss functional --perm_aug`')]


def paper_recipe():
    """Weight-space objectives on the paper's recipe (experiments/paper_recipe.sh), picked on held-out networks."""
    runs = {(v, n): load(f'{v}_{n}', os.path.join('paper_recipe', 'runs'))
            for v, _ in PAPER_VARIANTS for n in (64, 224)}
    if not any(runs.values()):
        return
    print('\n#### Weight targets on the paper\'s recipe (data/demo; best epoch picked on 32 held-out training '
          'networks)\n')
    print('KT (best) mean; its margin over Mean target and over Weight selection, paired over the 100 validation '
          'networks (mean ± standard error; **bold**: more than two standard errors); the step it was picked at.\n')
    print('| objective | networks | KT (best) | KT (last) | vs Mean target | vs Weight selection | picked at step |')
    print('| --- ' * 7 + '|')
    for v, label in PAPER_VARIANTS:
        for n in (64, 224):
            s = runs[v, n]
            if s is None:
                print(f'| {label} | {n} | not run | | | | |')
                continue
            cells = []
            for baseline in ('Mean target', 'Weight selection'):
                cell = '%+.2f ± %.2f' % margin(s, baseline)
                cells.append(f'**{cell}**' if beats_baseline(s, baseline) else cell)
            print(f"| {label} | {n} | {s['rows']['KT (best)']['mean']:.2f} | {s['rows']['KT (last)']['mean']:.2f} | "
                  f"{' | '.join(cells)} | {s['best_step']} of {s['steps_per_epoch'] * s['num_epochs']} |")
    ref = next(s for s in runs.values() if s)
    means = {n: runs['mse', n]['rows']['Mean target']['mean'] for n in (64, 224) if runs['mse', n]}
    canon = {n: runs['canon', n]['rows']['Mean canonical target']['mean'] for n in (64, 224) if runs['canon', n]}
    r = ref['rows']
    print(f"\nReference rows: Random Init {r['Random Init']['mean']:.2f}, Weight selection "
          f"{r['Weight selection']['mean']:.2f}, "
          + ''.join(f"{name} {r[name]['mean']:.2f}, " for name in ('Weight selection (folded)',
                                                                    'Weight selection (folded, refit)') if name in r)
          + f"Retrained {r['Retrained']['mean']:.2f}; Mean target "
          + ', '.join(f'{m:.2f} ({n} networks)' for n, m in means.items()) + '; mean canonical target '
          + ', '.join(f'{m:.2f} ({n} networks)' for n, m in canon.items()) + '.')


def main():
    first = next((s for name in ('demo', 'epochs_100', 'mse_64') if (s := load(name))), None)
    if first is None:
        sys.exit('no runs yet: bash experiments/run_results.sh 1 (and 2)')
    print('Reference rows (the same 100 validation networks in every run):\n')
    print('| row | mean | min | max |\n| --- | --- | --- | --- |')
    for name in ('Large (BasicBlock)', 'Random Init', 'Weight selection', 'Weight selection (folded)',
                 'Weight selection (folded, refit)', 'Retrained'):
        if name not in first['rows']:
            continue
        r = first['rows'][name]
        print(f"| {name} | {r['mean']:.2f} | {r['min']:.2f} | {r['max']:.2f} |")
    global BASELINES
    BASELINES = present_baselines()
    for title, names in GROUPS:
        print(f'\n#### {title}\n')
        print('| run | pairs | epochs | options | KT mean | KT min | KT max | '
              + ' | '.join(f'vs {b}' for b in BASELINES) + ' |')
        print('| --- ' * (7 + len(BASELINES)) + '|')
        for name in names:
            s = load(name)
            print(row(name, s) if s else f'| {name} | not run |' + ' |' * (5 + len(BASELINES)))
        means = [f"{name}: {s['rows']['Mean target']['mean']:.2f}" for name in names
                 if (s := load(name)) and 'Mean target' in s['rows']]
        print(f"\nMean target (depends on the pairs used): {', '.join(means) or 'n/a'}")
    # the faithful run of demo.sh (300 epochs); its functional run (100 epochs) sits beside it
    metrics = sorted(os.path.join(root, 'metrics.csv')
                     for root, _, files in os.walk(os.path.join(RESULTS, 'demo', 'logs'))
                     if 'metrics.csv' in files and '_ep300' + os.sep in root + os.sep and root.endswith('_seed0'))
    if metrics:
        print('\n#### Inside the main job (256 pairs, cosine schedule over 300 epochs): evaluations\n')
        print('| epoch | training loss | KT mean | KT min | KT max |\n| --- | --- | --- | --- | --- |')
        with open(metrics[0]) as f:
            for r in csv.DictReader(f):
                if r['mean']:
                    print(f"| {r['epoch']} | {float(r['loss']):.5f} | {float(r['mean']):.2f} | {float(r['min']):.2f} "
                          f"| {float(r['max']):.2f} |")
    scaling()
    paper_recipe()


if __name__ == '__main__':
    main()

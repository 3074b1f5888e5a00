"""Markdown tables for RESULTS.md from the runs in results/runs/ (each holds train.py's summary.json).

    python results/tables.py > results/tables.md
"""
import csv
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import report  # noqa: E402

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


def load(name):
    """summary.json of one run (results/demo holds the main job's), or None if it has not run."""
    path = os.path.join(HERE, 'demo' if name == 'demo' else os.path.join('runs', name), 'summary.json')
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


def row(name, s):
    """One markdown row: recipe, KT best mean/min/max, margins over the baselines."""
    r = s['rows']
    kt = r['KT (best)']
    margins = ' | '.join(f"{kt['mean'] - r[b]['mean']:+.2f}" if b in r else 'n/a' for b in report.BASELINES)
    return (f"| {name} | {s['train_pairs']} | {s['num_epochs']} | {options(s)} | {kt['mean']:.2f} | "
            f"{kt['min']:.2f} | {kt['max']:.2f} | {margins} |")


def main():
    first = next((s for name in ('demo', 'epochs_100', 'mse_64') if (s := load(name))), None)
    if first is None:
        sys.exit('no runs yet: bash results/run_results.sh 1 (and 2)')
    print('Reference rows (the same 100 validation networks in every run):\n')
    print('| row | mean | min | max |\n| --- | --- | --- | --- |')
    for name in ('Large (BasicBlock)', 'Random Init', 'Weight selection', 'Retrained'):
        r = first['rows'][name]
        print(f"| {name} | {r['mean']:.2f} | {r['min']:.2f} | {r['max']:.2f} |")
    for title, names in GROUPS:
        print(f'\n#### {title}\n')
        print('| run | pairs | epochs | options | KT mean | KT min | KT max | vs Random Init | vs Mean target '
              '| vs Weight selection |')
        print('| --- ' * 10 + '|')
        for name in names:
            s = load(name)
            print(row(name, s) if s else f'| {name} | not run | | | | | | | | |')
        means = [f"{name}: {s['rows']['Mean target']['mean']:.2f}" for name in names
                 if (s := load(name)) and 'Mean target' in s['rows']]
        print(f"\nMean target (depends on the pairs used): {', '.join(means) or 'n/a'}")
    metrics = [os.path.join(root, 'metrics.csv') for root, _, files in os.walk(os.path.join(HERE, 'demo', 'logs'))
               if 'metrics.csv' in files]
    if metrics:
        print('\n#### Inside the main job (256 pairs, cosine schedule over 300 epochs): evaluations\n')
        print('| epoch | training loss | KT mean | KT min | KT max |\n| --- | --- | --- | --- | --- |')
        with open(metrics[0]) as f:
            for r in csv.DictReader(f):
                if r['mean']:
                    print(f"| {r['epoch']} | {float(r['loss']):.5f} | {float(r['mean']):.2f} | {float(r['min']):.2f} "
                          f"| {float(r['max']):.2f} |")


if __name__ == '__main__':
    main()

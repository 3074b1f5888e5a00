"""The function-inputs study's table: each run's KT (best) mean, its paired margins over the training-free rules and,
from the identifiability report, how much its outputs differ between networks.

    python experiments/function_inputs_table.py > results/function_inputs/table.md
    python experiments/function_inputs_table.py --close   # seed-0 runs within 3 SE of a rule: they get a 2nd seed
"""
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate  # noqa: E402

RULES = ('Weight selection', 'Weight selection (folded)', 'Weight selection (folded, refit)')
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.join(HERE, 'results/function_inputs/runs')
IDENTIFIABILITY = os.path.join(HERE, 'results/identifiability/function_inputs_K12.json')


def margins(root=ROOT):
    """{run name: (KT (best) mean, [(margin, se) over each rule])} for every finished run under root, plus
    '<name> (2 seeds)' for a run with a _seed1 twin: the per-network mean of the two translators' accuracies."""
    rows = {os.path.basename(os.path.dirname(path)): json.load(open(path))['rows']
            for path in sorted(glob.glob(os.path.join(root, '*', 'summary.json')))}
    out = {}
    for name, r in rows.items():
        runs = [(name, r['KT (best)']['accs'])]
        if name + '_seed1' in rows:
            twin = rows[name + '_seed1']['KT (best)']['accs']
            runs.append((f'{name} (2 seeds)', [(a + b) / 2 for a, b in zip(r['KT (best)']['accs'], twin)]))
        for label, kt in runs:
            out[label] = (sum(kt) / len(kt), [evaluate.paired_margin(kt, r[rule]['accs']) for rule in RULES])
    return dict(sorted(out.items()))


def close(runs, within=3.0):
    """Seed-0 runs whose margin over some rule is within `within` standard errors of zero."""
    return [name for name, (_, ms) in runs.items()
            if '_seed' not in name and '(' not in name and any(abs(m) < within * se for m, se in ms)]


def agreement(path=IDENTIFIABILITY):
    """{run name: (outputs' cosine across networks, deltas' cosine across networks or None)} of the report."""
    if not os.path.exists(path):
        return {}
    report = json.load(open(path))['translators']
    return {os.path.basename(ckpt)[:-len('.pth')]: (tr['across']['mean'], tr.get('delta_across', {}).get('mean'))
            for ckpt, tr in report.items()}


def main(argv):
    """Print one Markdown row per run, or with --close the names of close runs."""
    runs = margins()
    if argv == ['--close']:
        print(' '.join(close(runs)))
        return
    if argv:
        sys.exit(f'usage: {sys.argv[0]} [--close]')
    agree = agreement()
    print('| run | KT (best) mean | ' + ' | '.join(f'vs {r}' for r in RULES) +
          ' | beats every rule by > 2 SE | outputs across networks | deltas across networks |')
    print('| --- ' * (5 + len(RULES)) + '|')
    for name, (mean, ms) in runs.items():
        across, delta = agree.get(name, (None, None))
        cos = lambda v: '' if v is None else f'{v:+.3f}'  # noqa: E731
        wins = 'yes' if all(m > 2 * se for m, se in ms) else 'no'
        print(f'| {name} | {mean:.2f} | ' + ' | '.join(f'{m:+.2f} ± {se:.2f}' for m, se in ms) +
              f' | {wins} | {cos(across)} | {cos(delta)} |')


if __name__ == '__main__':
    main(sys.argv[1:])

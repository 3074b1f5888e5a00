"""Print the results table of one or more train.py runs (their summary.json files).

    python report.py ckpts/nobn/<run>/summary.json [more summary.json ...] [--out table.md] [--hist]

One table per run: Large / Random Init / Mean target / Weight selection / KT / Retrained, with mean, min and
max test accuracy over the val networks, then one line saying plainly whether KT beat each baseline (evaluate.beats:
its margin, paired over the same val networks, is above two standard errors).
"""
import argparse
import json

import utils
from evaluate import BASELINES, verdict  # noqa: F401  (BASELINES: for the tables of experiments/)

ORDER = ['Large (BasicBlock)', 'Random Init', 'Mean target', 'Weight selection', 'KT (best)', 'KT (last)',
         'Retrained']
NETWORK_ROWS = ('Large (BasicBlock)', 'Weight selection', 'Retrained')  # fixed by the val networks and test images


def load_summary(path):
    """A train.py summary.json, or a clear error."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise utils.UserError(f'{path}: not a readable summary.json ({e}); train.py writes it at the end of a run')


def table(summary, hist=False):
    """Markdown table (and optional 5% histograms) of one run."""
    rows = summary['rows']
    lines = ['| row | mean | min | max |', '| --- | --- | --- | --- |']
    for name in [n for n in ORDER if n in rows] + [n for n in rows if n not in ORDER]:
        r = rows[name]
        lines.append(f"| {name} | {r['mean']:.2f} | {r['min']:.2f} | {r['max']:.2f} |")
    lines += ['', verdict(rows)]
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
    lines += [f'{label}: ' + verdict(s['rows']) for s, label in zip(summaries, labels)]
    return '\n'.join(lines)


def main():
    p = argparse.ArgumentParser(description='Results table of train.py runs.')
    p.add_argument('summaries', nargs='+', help='summary.json files written by train.py')
    p.add_argument('--out', default='', help='also write the tables to this markdown file')
    p.add_argument('--hist', action='store_true', help='add the 20-bin histograms of Random Init and KT')
    p.add_argument('--side_by_side', nargs='+', metavar='LABEL', default=None,
                   help='one table for runs on the same validation networks, a label per summary')
    args = p.parse_args()
    summaries = [load_summary(path) for path in args.summaries]
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

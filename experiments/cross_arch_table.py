"""The cross-architecture study's table: for each run under results/cross_arch/runs/<target>/<name>/, KT (best)
against Identity, the Universal block, the target's strongest training-free rule, Random Init and Retrained, with
paired margins over the same validation networks (evaluate.paired_margin; "beats": more than two standard errors),
then how alike each row's blocks are across networks (results/cross_arch/agreement.json, cross_arch_rows.py).
--plot OUTDIR draws one figure per target: every row's mean test accuracy with its standard error.

    python experiments/cross_arch_table.py > results/cross_arch/table.md
    python experiments/cross_arch_table.py --plot results/figures/cross_arch
"""
import argparse
import glob
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import evaluate  # noqa: E402
import report  # noqa: E402
import rules  # noqa: E402

COLUMNS = ('Identity (block skipped)', 'Universal block', 'Random Init', 'Retrained')
AGREEMENT = os.path.join(REPO, 'results', 'cross_arch', 'agreement.json')
COLOURS = {'baseline': 'tab:gray', 'rule': 'tab:blue', 'KT': 'tab:red', 'Retrained': 'tab:green'}


def margin(rows, name):
    """'+m ± se' of KT (best) over row `name`, starred when it beats it; blank when the run has no such row."""
    if name not in rows:
        return ''
    m, se = evaluate.paired_margin(rows['KT (best)']['accs'], rows[name]['accs'])
    return f'{m:+.2f} ± {se:.2f}{" *" if m > 2 * se else ""}'


def runs():
    """{target: [(run name, summary)]} of every run, in name order."""
    out = {}
    for path in sorted(glob.glob(os.path.join(REPO, 'results', 'cross_arch', 'runs', '*', '*', 'summary.json'))):
        summary = json.load(open(path))
        out.setdefault(summary.get('target', 'SimpleBlock_NoBn'), []).append(
            (os.path.basename(os.path.dirname(path)), summary))
    return out


def figure_rows(target, summaries):
    """[(label, per-network accuracies, kind)] of a target's figure: baselines, rules, each KT run, Retrained."""
    out, seen = [], set()

    def add(label, row, kind):
        if row is not None and label not in seen:
            seen.add(label)
            out.append((label, row['accs'], kind))
    for _, s in summaries:
        for name in ('Identity (block skipped)', 'Random Init'):
            add(name, s['rows'].get(name), 'baseline')
    for run, s in summaries:
        add('Universal block' + (' (+ CE)' if '_ce_' in run else ''), s['rows'].get('Universal block'), 'baseline')
    for _, s in summaries:
        for name in rules.rules_of(target):
            add(name, s['rows'].get(name), 'rule')
    for run, s in summaries:
        add(f'KT: {run}', s['rows']['KT (best)'], 'KT')
    for _, s in summaries:
        add('Retrained', s['rows'].get('Retrained'), 'Retrained')
    return out


def plot(outdir):
    """One PNG per target under outdir; returns their paths."""
    plt = report.pyplot()
    os.makedirs(outdir, exist_ok=True)
    written = []
    for target, summaries in runs().items():
        rows = figure_rows(target, summaries)
        fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(rows) + 1.2))
        for kind, colour in COLOURS.items():
            ys = [i for i, (_, _, k) in enumerate(rows) if k == kind]
            stats = [report.mean_se(rows[i][1]) for i in ys]
            ax.errorbar([m for m, _ in stats], ys, xerr=[2 * se for _, se in stats], fmt='o', color=colour,
                        label={'baseline': 'baselines', 'rule': 'training-free rule', 'KT': 'KT (best epoch)',
                               'Retrained': 'retrained in place'}[kind] if ys else None)
        ax.set_yticks(range(len(rows)), [label for label, _, _ in rows])
        ax.invert_yaxis()
        report.finish(fig, ax, 'mean test accuracy over the 100 validation networks (%), bars: 2 SE', '',
                      f'{target} written from a BasicBlock')
        written.append(os.path.join(outdir, f'{target}.png'))
        report.save_figure(fig, written[-1], plt)
    return written


def agreement_table():
    """Markdown lines: each target's rows by the mean cosine of their blocks' effects across networks."""
    if not os.path.exists(AGREEMENT):
        return []
    lines = ['', '| target | blocks | effects across networks (mean cosine) |', '| --- | --- | --- |']
    for target, rows in json.load(open(AGREEMENT)).items():
        lines += [f'| {target} | {name} | {value:+.3f} |' for name, value in rows.items()]
    return lines + ['', 'Effects: each block\'s output minus its input, on the same 64 inputs for every network '
                    '(Begin\'s outputs of validation network 0). +1: one block for every network.']


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--plot', metavar='OUTDIR', default=None, help='draw one figure per target there instead')
    args = p.parse_args()
    if args.plot:
        for path in plot(args.plot):
            print(f'wrote {os.path.relpath(path, REPO)}')
        return
    print('| target | run | KT (best) | strongest rule (mean) | vs the rule | '
          + ' | '.join(f'vs {c}' for c in COLUMNS) + ' |')
    print('|' + ' --- |' * (5 + len(COLUMNS)))
    every = runs()
    for target, run, summary in [(t, r, s) for t, summaries in every.items() for r, s in summaries]:
        rows = summary['rows']
        present = [name for name in rules.rules_of(target) if name in rows]
        best = max(present, key=lambda name: rows[name]['mean'], default=None)
        rule = f'{best} ({rows[best]["mean"]:.2f})' if best else 'none'
        print(f'| {target} | {run} | {rows["KT (best)"]["mean"]:.2f} | {rule} | '
              f'{margin(rows, best) if best else ""} | ' + ' | '.join(margin(rows, c) for c in COLUMNS) + ' |')
    fewer = sorted({(t, s['num_test_images']) for t, summaries in every.items() for _, s in summaries
                    if s['num_test_images'] != 10000})
    print('\n* KT (best) beats the row: its mean margin, paired over the same validation networks, is above two '
          'standard errors. Best epoch picked on 32 held-out training networks. Scored on all 10,000 test images'
          + ''.join(f'; {t}: the first {n:,}' for t, n in fewer) + '.')
    for line in agreement_table():
        print(line)


if __name__ == '__main__':
    main()

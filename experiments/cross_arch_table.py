"""The cross-architecture study's table: for each run under results/cross_arch/runs/<target>/<name>/, KT (best)
against Identity, the Universal block, the target's strongest training-free rule, Random Init and Retrained, with
paired margins over the same validation networks (evaluate.paired_margin; "beats": more than two standard errors).

    python experiments/cross_arch_table.py > results/cross_arch/table.md
"""
import glob
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import evaluate  # noqa: E402
import rules  # noqa: E402

COLUMNS = ('Identity (block skipped)', 'Universal block', 'Random Init', 'Retrained')


def margin(rows, name):
    """'+m ± se' of KT (best) over row `name`, starred when it beats it; blank when the run has no such row."""
    if name not in rows:
        return ''
    m, se = evaluate.paired_margin(rows['KT (best)']['accs'], rows[name]['accs'])
    return f'{m:+.2f} ± {se:.2f}{" *" if m > 2 * se else ""}'


def main():
    print('| target | run | KT (best) | strongest rule (mean) | vs the rule | '
          + ' | '.join(f'vs {c}' for c in COLUMNS) + ' |')
    print('|' + ' --- |' * (5 + len(COLUMNS)))
    for path in sorted(glob.glob(os.path.join(REPO, 'results', 'cross_arch', 'runs', '*', '*', 'summary.json'))):
        summary = json.load(open(path))
        rows, target = summary['rows'], summary.get('target', 'SimpleBlock_NoBn')
        present = [name for name in rules.rules_of(target) if name in rows]
        best = max(present, key=lambda name: rows[name]['mean'], default=None)
        rule = f'{best} ({rows[best]["mean"]:.2f})' if best else 'none'
        print(f'| {target} | {os.path.basename(os.path.dirname(path))} | {rows["KT (best)"]["mean"]:.2f} | {rule} | '
              f'{margin(rows, best) if best else ""} | ' + ' | '.join(margin(rows, c) for c in COLUMNS) + ' |')
    print('\n* KT (best) beats the row: its mean margin, paired over the same validation networks, is above two '
          'standard errors. Best epoch picked on 32 held-out training networks.')


if __name__ == '__main__':
    main()

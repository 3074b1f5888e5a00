"""The function-inputs study's table: each run's KT (best) mean and its paired margins over the training-free rules.

    python experiments/function_inputs_table.py > results/function_inputs/table.md
"""
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate  # noqa: E402

RULES = ('Weight selection', 'Weight selection (folded)', 'Weight selection (folded, refit)')


def main():
    """Print one Markdown row per run of results/function_inputs/runs."""
    print('| run | KT (best) mean | ' + ' | '.join(f'vs {r}' for r in RULES) + ' |')
    print('| --- ' * (2 + len(RULES)) + '|')
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'results/function_inputs/runs')
    for path in sorted(glob.glob(os.path.join(root, '*', 'summary.json'))):
        rows = json.load(open(path))['rows']
        kt = rows['KT (best)']['accs']
        margins = ['{:+.2f} ± {:.2f}'.format(*evaluate.paired_margin(kt, rows[r]['accs'])) for r in RULES]
        print(f'| {os.path.basename(os.path.dirname(path))} | {rows["KT (best)"]["mean"]:.2f} | ' + ' | '.join(margins) + ' |')


if __name__ == '__main__':
    main()

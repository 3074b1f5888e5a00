"""Add the reference rows evaluate.reference_rows gained later to the committed summaries scored on
data/demo/val (100 networks, all 10,000 MNIST test images): their KT rows keep per-network accuracies, so
the new rows and the verdicts need no retraining. Idempotent: a row already there must come out the same.
The Universal block row is added where universal.py has made one for the summary's training networks
(data/demo/train/universal/SimpleBlock_NoBn_n<train_pairs>[_ce<w>].pt, w the run's --ce_weight).

    python experiments/rescore_baselines.py > results/baselines/rescore.log
"""
import glob
import json
import os
import re
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import evaluate  # noqa: E402
import loader  # noqa: E402
import mnist  # noqa: E402
import rules  # noqa: E402
import universal  # noqa: E402
import utils  # noqa: E402

VAL, NUM_VAL, NUM_TEST, TRAIN = 'data/demo/val', 100, 10000, 'data/demo/train'
PATTERNS = ('results/demo/*.json', 'results/paper_recipe/runs/*/summary.json', 'results/runs/*/summary.json')
NEW_ROWS = {'Identity (block skipped)': lambda score, basic: score({}, 'identity'),
            'Weight selection (folded)': lambda score, basic: score(rules.folded_selection(basic)),
            'Weight selection (folded, refit)': lambda score, basic: score(rules.refit_selection(basic))}


def ce_weight_of(run):
    """The --ce_weight of a run, from the -ce<w> of its functional run name (0 without a functional term)."""
    m = re.search(r'functional-w[\d.e-]+-ce([\d.e-]+)-img', run)
    return float(m.group(1)) if m else 0.0


def val_path_of(path):
    """The --val_path a summary's run was given, from the train.log or command.txt beside it; None if not found."""
    for name in ('command.txt', 'train.log'):
        other = os.path.join(os.path.dirname(path), name)
        if os.path.exists(other):
            m = re.search(r'--val_path[ =](\S+)|"val_path": "([^"]+)"', open(other).read())
            if m:
                return m.group(1) or m.group(2)
    return None


def main():
    paths = sorted(p for pattern in PATTERNS for p in glob.glob(os.path.join(REPO, pattern)))
    summaries = {}
    for path in paths:
        with open(path) as f:
            s = json.load(f)
        if 'rows' not in s:
            continue
        where = val_path_of(path)
        if (s['num_val'], s['num_test_images']) != (NUM_VAL, NUM_TEST) or where not in (None, VAL, './' + VAL):
            print(f'skip {os.path.relpath(path, REPO)}: val {where}, {s["num_val"]} networks, '
                  f'{s["num_test_images"]} test images')
            continue
        summaries[path] = s
    os.chdir(REPO)
    val = loader.ValDataset(VAL, NUM_VAL)
    images, labels = mnist.load_mnist('data', train=False)
    score = evaluate.Scorer(images[:NUM_TEST], labels[:NUM_TEST], val.begin, val.last)
    selection = [round(a, 4) for a in score(rules.weight_selection(val.basic)).tolist()]
    rows = {name: evaluate.acc_row(rule(score, val.basic)) for name, rule in NEW_ROWS.items()}
    for name, row in rows.items():
        print(f'{name}: mean {row["mean"]:.2f}, paired vs Weight selection '
              f'{"%+.2f ± %.2f" % evaluate.paired_margin(row["accs"], selection)}')
    for path, s in summaries.items():
        rel = os.path.relpath(path, REPO)
        if s['rows']['Weight selection']['accs'] != selection:  # the same networks and images, or not at all
            raise utils.UserError(f'{rel}: its Weight selection row differs from {VAL}\'s: scored elsewhere')
        for name, row in rows.items():
            if name in s['rows'] and s['rows'][name] != row:
                raise utils.UserError(f'{rel}: its "{name}" row differs from the one measured now')
        made = universal.load_for(TRAIN, 'SimpleBlock_NoBn', s['train_pairs'], ce_weight_of(s['run']))
        new = dict(rows, **({evaluate.UNIVERSAL: evaluate.acc_row(score(
            {k: t.expand(NUM_VAL, *t.shape) for k, t in made.items()}))} if made is not None else {}))
        if evaluate.UNIVERSAL in s['rows'] and s['rows'][evaluate.UNIVERSAL] != new.get(evaluate.UNIVERSAL):
            raise utils.UserError(f'{rel}: its "{evaluate.UNIVERSAL}" row differs from the one measured now')
        # the new rows go after Weight selection (train.py writes them in reference_rows' order)
        ordered = {}
        for name, row in s['rows'].items():
            if name not in new:
                ordered[name] = row
            if name == 'Weight selection':
                ordered.update(new)
        s['rows'] = ordered
        utils.atomic_write(path, json.dumps(s, indent=1))
        print(f'{rel}: {evaluate.verdict(s["rows"])}')


if __name__ == '__main__':
    utils.run_main(main)

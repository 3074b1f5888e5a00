"""The one definition of "KT beats a baseline" and the tables built on it (report.py, experiments/tables.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import evaluate
import report
from conftest import ROOT


def test_paired_margin_and_beats():
    base = torch.linspace(10, 60, 50, dtype=torch.float64)
    noise = torch.tensor([0.5, -0.5] * 25, dtype=torch.float64)
    mean, se = evaluate.paired_margin(base + 1 + noise, base)
    assert mean == pytest.approx(1.0) and se == pytest.approx(noise.std().item() / 50 ** 0.5)
    assert evaluate.beats(base + 1 + noise, base)  # +1 with a standard error of 0.07
    assert not evaluate.beats(base + 0.1 + 10 * noise, base)  # +0.1 with a standard error of 0.7
    assert not evaluate.beats(base - 1 + noise, base)  # a loss is never a win
    # paired, not unpaired: a margin far below the spread of the accuracies themselves still counts
    assert evaluate.beats(base + 0.2, base + torch.tensor([0.0, 0.01] * 25, dtype=torch.float64))


def summary(kt, **refs):
    """A summary.json-like dict with per-network accuracies."""
    rows = {name: evaluate.acc_row(accs) for name, accs in {**refs, 'KT (best)': kt, 'KT (last)': kt}.items()}
    return {'run': 'r', 'train_pairs': 2, 'num_val': len(kt), 'num_test_images': 10, 'config': {}, 'best_epoch': 0,
            'num_epochs': 1, 'rows': rows}


def test_verdict_and_side_by_side(tmp_path):
    base = [10.0, 20.0, 30.0, 40.0]
    win = summary([12.0, 22.1, 31.9, 42.0], **{'Random Init': base, 'Mean target': base, 'Weight selection': base})
    lose = summary([10.5, 19.0, 30.2, 40.1], **{'Random Init': base, 'Mean target': base, 'Weight selection': base})
    assert evaluate.verdict(win['rows']).startswith('KT (best epoch) beat Random Init (+2.00 ± ')
    assert 'did NOT beat Mean target' in evaluate.verdict(lose['rows'])
    assert 'strongest' not in evaluate.verdict(lose['rows'])  # three equal baselines: none is the strongest
    folded = dict(lose['rows'], **summary(base, **{'Weight selection (folded)': [10.6, 20.1, 30.3, 40.2]})['rows'])
    folded['KT (best)'] = lose['rows']['KT (best)']
    assert 'did NOT beat Weight selection (folded), the strongest training-free rule (-0.35 ± ' in \
        evaluate.verdict(folded)
    for name, s in (('win', win), ('lose', lose)):
        with open(tmp_path / f'{name}.json', 'w') as f:
            json.dump(s, f)
    out = subprocess.run([sys.executable, 'report.py', str(tmp_path / 'win.json'), str(tmp_path / 'lose.json'),
                          '--side_by_side', 'A', 'B'], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert sum(line.startswith('| Random Init |') for line in lines) == 1  # the reference rows once
    assert '| KT (best), A | 27.00 | 12.00 | 42.00 |' in lines and any(x.startswith('| KT (last), B |') for x in lines)
    assert any(x.startswith('A: KT (best epoch) beat') for x in lines)
    # another translator seed draws another Random Init: its row is shown per run, not refused
    seed1 = summary(lose['rows']['KT (best)']['accs'], **{'Random Init': [11.0, 19.0, 31.0, 41.0],
                                                          'Mean target': base, 'Weight selection': base})
    with open(tmp_path / 'seed1.json', 'w') as f:
        json.dump(seed1, f)
    out = subprocess.run([sys.executable, 'report.py', str(tmp_path / 'win.json'), str(tmp_path / 'seed1.json'),
                          '--side_by_side', 'A', 'S'], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert '| Random Init, A | 25.00 | 10.00 | 40.00 |' in lines
    assert '| Random Init, S | 25.50 | 11.00 | 41.00 |' in lines
    assert sum(line.startswith('| Weight selection |') for line in lines) == 1
    assert any(x.startswith('S: KT (best epoch) did NOT beat Random Init') for x in lines)
    # runs on other validation networks are refused
    other = summary(win['rows']['KT (best)']['accs'], **{'Random Init': base, 'Mean target': base,
                                                         'Weight selection': [1.0, 2.0, 3.0, 4.0]})
    with open(tmp_path / 'other.json', 'w') as f:
        json.dump(other, f)
    out = subprocess.run([sys.executable, 'report.py', str(tmp_path / 'win.json'), str(tmp_path / 'other.json'),
                          '--side_by_side', 'A', 'C'], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and 'C: scored on other validation networks' in out.stderr


@pytest.mark.parametrize('script, committed', [('experiments/tables.py', 'results/tables.md'),
                                               ('experiments/dataset_accuracies.py', 'results/dataset_accuracies.txt')])
def test_committed_tables_regenerate(script, committed):
    """RESULTS.md's tables and quoted accuracies come out of the committed runs and data, unchanged."""
    run = subprocess.run([sys.executable, script], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(os.path.join(ROOT, committed)) as f:
        assert run.stdout == f.read()


def test_tables_say_where_the_best_epoch_was_picked():
    """A verdict names where KT (best) was picked: the reported networks (no --holdout_networks) or held-out ones."""
    with open(os.path.join(ROOT, 'results/demo/summary.json')) as f:
        demo = json.load(f)
    assert demo['selection'] == 'val'
    assert report.table(demo).endswith('Best epoch picked on the 100 reported validation networks themselves '
                                       "(the original's rule).")
    held = dict(demo, selection='holdout 32')
    assert 'Best epoch picked on 32 held-out training networks, not on the 100 reported ones.' in \
        report.side_by_side([demo, held], ['a', 'b']).splitlines()[-1]
    assert report.picked_on({k: v for k, v in demo.items() if k != 'selection'}) == report.picked_on(demo)

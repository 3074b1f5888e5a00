"""experiments/warm_start.py: starts scored as evaluate scores them, fine-tuned by small_phase itself, paired, resumable."""
import json
import os
import sys

import pytest
import torch

import construct
import evaluate
import generation
import loader
import mixer
import utils

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments'))
import warm_start  # noqa: E402

# 300 images in batches of 10: a 30-step epoch, scored at steps 0, 10 and 30
TINY = ['--num_networks', '2', '--num_mean_targets', '12', '--num_train_images', '300', '--batch_size', '10',
        '--num_test_images', '200']


@pytest.fixture(autouse=True)
def single_thread(one_thread):
    """Tiny CPU runs: one thread."""


@pytest.fixture(scope='module')
def residual_translator(tmp_path_factory):
    """An untrained --inputs folded --output residual translator as train.py saves one (<acc>.pth + .json): it writes
    Weight selection (folded) exactly."""
    config = {'num_layers': 1, 'S_dim': 72, 'C_dim': 8, 'hidden_S_dim': 8, 'hidden_C_dim': 8, 'dropout': 0.0}
    kt = {'inputs': 'folded', 'output': 'residual'}
    path = str(tmp_path_factory.mktemp('translator') / '12.34.pth')
    torch.manual_seed(0)
    utils.atomic_save(mixer.build_translator(config, kt).state_dict(), path)
    utils.atomic_write(path[:-4] + '.json', json.dumps({'config': config, 'kt': kt}))
    return path


def run(pair_sets, out, *extra):
    """warm_start.main on the tiny set; returns its JSON."""
    warm_start.main(['--val_path', pair_sets['val'], '--train_path', pair_sets['train'], '--out', str(out),
                     *TINY, *extra])
    with open(out) as f:
        return json.load(f)


def test_step0_is_evaluate_and_translator_starts(pair_sets, residual_translator, tmp_path):
    data = run(pair_sets, tmp_path / 'w.json', '--translator', f'kt={residual_translator}')
    assert data['steps'] == [0, 10, 30] and data['networks'] == [0, 1]
    args = warm_start.get_args(['--num_train_images', '300', '--num_test_images', '200'])
    mnist = generation.load_mnist_to(torch.device('cpu'), args)
    val, train = loader.ValDataset(pair_sets['val'], 2), loader.TrainDataset(pair_sets['train'], 12)
    rows = evaluate.reference_rows(evaluate.Scorer(mnist[2], mnist[3], val.begin, val.last), val,
                                   [train.simple['conv1.weight'], train.simple['conv2.weight']], 0)
    names = ['Random Init', 'Mean target', 'Weight selection', 'Weight selection (folded)',
             'Weight selection (folded, refit)', 'kt']
    assert list(data['starts']) == names
    for name in names[:-1]:
        assert [c[0] for c in data['starts'][name]] == pytest.approx(rows[name].tolist(), abs=1e-9), name
    assert data['retrained'] == pytest.approx(rows['Retrained'].tolist(), abs=1e-9)
    # the untrained residual translator writes Weight selection (folded): the same start, the same batches
    assert data['starts']['kt'] == data['starts']['Weight selection (folded)']
    assert all(len(c) == 3 for curves in data['starts'].values() for c in curves)
    table = (tmp_path / 'w.md').read_text()
    assert table.count('| kt |') == 3 and '| step 0 | step 10 | step 30 |' in table  # tables (a), (b), (c)
    # (c): kt is the folded rule, so its margin over the refit rule is the folded rule's, paired per network
    folded, refit = data['starts']['Weight selection (folded)'], data['starts'][warm_start.RULE]
    m, se = evaluate.paired_margin([c[0] for c in folded], [c[0] for c in refit])
    row_c = table.split('(c) Margin over')[1].split('| kt |')[1].splitlines()[0]
    assert row_c.split('|')[0].strip() == f'{m:+.2f} ± {se:.2f}'
    assert '| Weight selection (folded, refit) |' not in table.split('(c) Margin over')[1]


def tiny_setup(pair_sets):
    """The val networks, the starts, the recipe, MNIST and the grid of TINY."""
    args = warm_start.get_args(TINY)
    val, train = loader.ValDataset(pair_sets['val'], 2), loader.TrainDataset(pair_sets['train'], 12)
    blocks = warm_start.start_blocks(val, [train.simple['conv1.weight'], train.simple['conv2.weight']], 0, {})
    recipe = construct.Recipe(kind='val', num_epochs=1, batch_size=10, num_train_images=300,
                                    num_test_images=200)
    return val, blocks, recipe, generation.load_mnist_to(torch.device('cpu'), args), warm_start.step_grid(300, 10)


def test_last_step_is_small_phase(pair_sets):
    val, blocks, recipe, mnist, grid = tiny_setup(pair_sets)
    curves, tuned = warm_start.fine_tune(1, blocks, val, recipe, mnist, 0, grid, 1)
    start = 'Weight selection'
    one = {n: t[1:2].clone() for n, t in blocks[start].items()}
    begin, last = ({n: t[1:2].clone() for n, t in s.items()} for s in (val.begin, val.last))
    gens = [construct.data_generator(utils.seed_for(0, 'warm_start', 1))]
    acc0, acc_end = construct.small_phase(begin, last, one, gens, recipe, mnist)
    assert all(torch.equal(tuned[start][n], one[n][0]) for n in one)
    assert not torch.equal(tuned[start]['conv1.weight'], blocks[start]['conv1.weight'][1])  # it was trained
    assert curves[start][0] == acc0.item() and curves[start][-1] == acc_end.item()


def test_starts_see_the_same_batches(pair_sets):
    val, blocks, recipe, mnist, grid = tiny_setup(pair_sets)
    same = {'a': blocks['Random Init'], 'b': blocks['Random Init'], 'c': blocks['Weight selection']}
    for group in (1, 3):  # one at a time, and side by side
        curves, tuned = warm_start.fine_tune(0, same, val, recipe, mnist, 0, grid, group)
        assert curves['a'] == curves['b'] and curves['a'] != curves['c']
        assert all(torch.equal(tuned['a'][n], tuned['b'][n]) for n in tuned['a'])
    # another network draws other batches
    other = warm_start.fine_tune(1, {'a': {n: t.flip(0) for n, t in blocks['Random Init'].items()}}, val, recipe,
                                 mnist, 0, grid, 1)[1]['a']
    assert not torch.equal(other['conv1.weight'], tuned['a']['conv1.weight'])


def test_resume_skips_finished_networks_and_refuses_other_flags(pair_sets, tmp_path, monkeypatch):
    out = tmp_path / 'w.json'
    first = run(pair_sets, out, '--num_networks', '1')
    calls = []
    real = warm_start.fine_tune
    monkeypatch.setattr(warm_start, 'fine_tune', lambda i, *a: calls.append(i) or real(i, *a))
    both = run(pair_sets, out)
    assert calls == [1] and both['networks'] == [0, 1]
    assert all(both['starts'][name][0] == curves[0] for name, curves in first['starts'].items())
    run(pair_sets, out)
    assert calls == [1]
    with pytest.raises(utils.UserError, match='other flags'):
        run(pair_sets, out, '--lr', '0.02')
    (tmp_path / 'bad.json').write_text('not json')
    with pytest.raises(utils.UserError, match='bad.json: not a warm-start JSON'):
        run(pair_sets, tmp_path / 'bad.json')
    with pytest.raises(utils.UserError, match='NAME=PATH'):
        warm_start.get_args(['--translator', 'nopath'])


def test_split_parts_merge_to_the_whole_run(pair_sets, tmp_path):
    """--starts / --first_network parts joined by --merge give the curves of one run over all starts and networks."""
    whole = run(pair_sets, tmp_path / 'whole.json')
    names = list(whole['starts'])
    run(pair_sets, tmp_path / 'p1.json', '--num_networks', '1')
    run(pair_sets, tmp_path / 'p2.json', '--first_network', '1', '--starts', *names[:2])
    part = run(pair_sets, tmp_path / 'p3.json', '--first_network', '1', '--starts', *names[2:])
    assert list(part['starts']) == names[2:] and part['networks'] == [1]
    assert not os.path.exists(tmp_path / 'p3.md')  # no Random Init: no tables of its own
    out = tmp_path / 'merged.json'
    warm_start.main(['--out', str(out), '--merge', *(str(tmp_path / f'p{k}.json') for k in (3, 1, 2))])
    merged = json.loads(out.read_text())
    assert merged['networks'] == [0, 1] and merged['starts'] == whole['starts']
    assert merged['retrained'] == whole['retrained'] and merged['flags'] == whole['flags']
    assert (tmp_path / 'merged.md').read_text() == (tmp_path / 'whole.md').read_text()
    out1 = tmp_path / 'first.json'  # --num_networks keeps the networks below it: here those all parts have
    warm_start.main(['--out', str(out1), '--num_networks', '1', '--merge', str(tmp_path / 'p1.json'),
                     str(tmp_path / 'p2.json')])
    first = json.loads(out1.read_text())
    assert first['networks'] == [0] and first['starts'] == {n: c[:1] for n, c in whole['starts'].items()}
    with pytest.raises(utils.UserError, match='lacks networks'):
        warm_start.main(['--out', str(tmp_path / 'm2.json'), '--merge', str(tmp_path / 'p1.json'),
                         str(tmp_path / 'p2.json')])
    with pytest.raises(utils.UserError, match='no such start'):
        run(pair_sets, tmp_path / 'p4.json', '--starts', 'Nope')

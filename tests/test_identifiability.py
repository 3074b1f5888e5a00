"""experiments/identifiability.py: the recipe's own code, the report's fields, the orbit cosine, the errors."""
import json
import os
import sys

import pytest
import torch

import construct
import construct_train
import generation
import loader
import mixer
import net
import symmetry
import utils
from conftest import write_shards
from mixer import MLPMixer
import shards

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments'))
import identifiability  # noqa: E402

TINY = ['--num_epochs', '1', '--num_train_images', '256', '--num_test_images', '100', '--device', 'cpu']


@pytest.fixture(scope='module')
def val_root(tmp_path_factory):
    """Two validation networks with retrained small blocks, made by construct_val.py's code."""
    root = tmp_path_factory.mktemp('identifiability') / 'val'
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    generation.generate(construct_train.get_args(
        'val', ['--data_root', str(root), '--num_data', '2', '--train_simple', '--models_per_step', '1', *TINY]))
    torch.set_num_threads(threads)
    return str(root)


def in_range(row, lo=-1.0, hi=1.0):
    """A summary's mean, min and max lie in [lo, hi] (cosines up to rounding) and are ordered."""
    return lo - 1e-6 <= row['min'] <= row['mean'] <= row['max'] <= hi + 1e-6 and len(row['values']) == row['n']


def test_report_end_to_end(val_root, tmp_path, one_thread):
    model = MLPMixer(num_layers=1, C_dim=16, hidden_S_dim=32, hidden_C_dim=32)
    ckpt = str(tmp_path / 'translator.pth')
    torch.save({'config': model.config, 'model': model.state_dict()}, ckpt)
    kt = {'inputs': 'folded', 'output': 'residual'}  # untrained: it writes Weight selection (folded), delta 0
    residual = mixer.build_translator(model.config, kt)
    residual_ckpt = str(tmp_path / 'residual.pth')
    torch.save({'config': model.config, 'kt': kt, 'model': residual.state_dict()}, residual_ckpt)
    out = str(tmp_path / 'report')
    identifiability.main(['--data_root', val_root, '-K', '2', '-R', '2', '--translators', ckpt, residual_ckpt,
                          '--out', out])
    with open(out + '.json') as f:
        report = json.load(f)
    assert report['recipe'] == {'num_epochs': 1, 'lr': 0.01, 'batch_size': 128, 'num_train_images': 256,
                                'num_test_images': 100}
    counts = {'inits': 2, 'target': 4, 'across_retrained': 4, 'across_targets': 1, 'drift': 4, 'chance': 6}
    assert {key: row['n'] for key, row in report['cosine'].items()} == counts
    assert all(in_range(row) for row in report['cosine'].values())
    assert all(in_range(row, 0, 100) for row in report['acc'].values())
    tr = report['translators'][ckpt]
    assert [tr[key]['n'] for key in ('target', 'retrained', 'across', 'norm_ratio', 'acc')] == [2, 4, 1, 2, 2]
    assert all(in_range(tr[key]) for key in ('target', 'retrained', 'across'))
    assert tr['norm_ratio']['min'] > 0 and in_range(tr['acc'], 0, 100) and 'delta_norm' not in tr
    # the residual translator's rows are its rule's, and its delta is zero
    res, rule = report['translators'][residual_ckpt], report['rules']['Weight selection (folded)']
    assert all(res[key]['values'] == rule[key]['values'] for key in ('target', 'retrained', 'across', 'acc'))
    assert res['delta_norm']['max'] == 0 and res['delta_across']['n'] == 1
    assert set(report['rules']) == set(identifiability.RULES)
    with open(out + '.md') as f:
        table = f.read()
    assert '| retrained vs the stored target |' in table and f'| {ckpt} | ' in table
    assert f'| Weight selection (folded, refit) | ' in table and f'| {residual_ckpt} outputs | ' in table
    assert os.path.getsize(out + '.log') > 0
    # a second run (as after a kill) reuses the retrained blocks instead of training them again
    blocks = torch.load(out + '.blocks.pt', weights_only=True)['blocks']
    assert sorted(b['job'] for b in blocks.values()) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    stamp = os.path.getmtime(out + '.blocks.pt')
    identifiability.main(['--data_root', val_root, '-K', '2', '-R', '2', '--out', out])
    with open(out + '.json') as f:
        again = json.load(f)
    assert os.path.getmtime(out + '.blocks.pt') == stamp and again['cosine'] == report['cosine']
    # --blocks: another report on the same retrainings, without training them again
    other = str(tmp_path / 'other')
    identifiability.main(['--data_root', val_root, '-K', '2', '-R', '2', '--out', other, '--blocks', out + '.blocks.pt'])
    with open(other + '.json') as f:
        assert json.load(f)['cosine'] == report['cosine']
    assert os.path.getmtime(out + '.blocks.pt') == stamp and not os.path.exists(other + '.blocks.pt')
    # the 'target' row pairs retraining (i, s) with network i's own stored block
    val = loader.ValDataset(val_root, 2)
    trained = {tuple(b['job']): b['trained'] for b in blocks.values()}
    want = [symmetry.best_order_cosine((trained[(i, s)]['conv1.weight'], trained[(i, s)]['conv2.weight']),
                                  (val.simple['conv1.weight'][i:i + 1], val.simple['conv2.weight'][i:i + 1])).item()
            for i in range(2) for s in range(2)]
    assert report['cosine']['target']['values'] == pytest.approx(want, abs=1e-6)
    # other test images: the kept blocks' accuracies are not reused (they were scored on 100 images)
    identifiability.main(['--data_root', val_root, '-K', '2', '-R', '2', '--out', out, '--num_test_images', '50'])
    with open(out + '.json') as f:
        fifty = json.load(f)
    assert all((v * 50 / 100) == round(v * 50 / 100) for v in fifty['acc']['retrained']['values'])


def test_retraining_is_the_recipe(val_root, one_thread):
    """Given the generation's own init and data order, retrain() makes the stored target again."""
    data = loader.ValDataset(val_root, 2)
    recipe = identifiability.recipe_for(identifiability.get_args(['--data_root', val_root]), data.recipe)
    rargs = identifiability.recipe_args(recipe, 'data')
    mnist = generation.load_mnist_to(torch.device('cpu'), rargs)
    for i, seed in enumerate(shards.read_pairs(val_root, 2)['seed'].tolist()):
        init = net.stack_states([construct.init_pair(seed)[3]])
        gens = [construct.data_generator(seed)]
        for _ in range(recipe['num_epochs']):  # the large network's phase drew its shuffles first
            construct.draw_epoch(gens, recipe['num_train_images'], torch.device('cpu'))
        trained, _, acc = identifiability.retrain(data, [i], init, gens, rargs, mnist)
        for name, t in trained.items():
            torch.testing.assert_close(t[0], data.simple[name][i], atol=1e-6, rtol=1e-5)
        assert acc.item() == data.acc_small[i].item()


def test_block_against_itself_in_a_shuffled_order(val_root):
    targets = loader.ValDataset(val_root, 2).simple
    order, scale = torch.tensor([[2, 0, 1], [1, 2, 0]]), torch.tensor([[0.5, 3.0, 1.0], [2.0, 0.1, 7.0]])
    b = torch.arange(2)[:, None]
    shuffled = {'conv1.weight': targets['conv1.weight'][b, order] * scale[:, :, None, None, None],
                'conv2.weight': targets['conv2.weight'].transpose(1, 2)[b, order].transpose(1, 2)
                / scale[:, None, :, None, None]}
    cos = identifiability.pair_cosines(targets, shuffled, [(0, 0), (1, 1)])
    torch.testing.assert_close(cos, torch.ones(2), atol=1e-5, rtol=0)
    assert identifiability.pair_cosines(targets, shuffled, [(0, 1)]).item() < 0.99


def test_errors_are_clear(val_root, tmp_path):
    with pytest.raises(utils.UserError, match='asked for 3 pairs'):
        identifiability.main(['--data_root', val_root, '-K', '3'])
    with pytest.raises(utils.UserError, match='--num_inits must be >= 2'):
        identifiability.get_args(['--data_root', val_root, '-R', '1'])
    write_shards(tmp_path / 'no_simple', 2, simple=False)
    with pytest.raises(utils.UserError, match='holds no small blocks.*--train_simple'):
        identifiability.main(['--data_root', str(tmp_path / 'no_simple'), '-K', '2'])
    write_shards(tmp_path / 'other', 2)
    with pytest.raises(utils.UserError, match='momentum'):
        identifiability.main(['--data_root', str(tmp_path / 'other'), '-K', '2'])
    with pytest.raises(utils.UserError, match='does not exist'):
        identifiability.main(['--data_root', val_root, '-K', '2', '--translators', str(tmp_path / 'missing.pth')])

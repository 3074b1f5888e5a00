"""Cross-architecture translation: every small block of net.py generated, translated, scored and baselined."""
import dataclasses
import json
import os

import pytest
import torch

import construct
import construct_train
import generation
import net
import original_layout
import shards
import utils

TINY = ['--num_epochs', '1', '--num_train_images', '300', '--num_test_images', '200', '--device', 'cpu']
OTHERS = ('SimpleBlock', 'MLPBlock', 'AttnBlock')


def tiny_args(data_root, *extra, kind='train'):
    return construct_train.get_args(kind, ['--data_root', str(data_root), *TINY, *extra])


@pytest.fixture(autouse=True)
def single_thread(one_thread):
    """Single-threaded: tiny CPU ops on a shared machine."""


@pytest.fixture(scope='module')
def mnist():
    return generation.load_mnist_to(torch.device('cpu'), tiny_args('unused'))


def random_modules(name, n, seed=0):
    """n modules of a small block with random (not default) weights and BN statistics."""
    torch.manual_seed(seed)
    mods = [net.SMALL_BLOCKS[name]() for _ in range(n)]
    for m in mods:
        for key, t in m.state_dict().items():  # views of the module's tensors
            if 'running_var' in key:
                t.uniform_(0.5, 1.5)
            elif t.is_floating_point():
                t.normal_(0, 0.3)
    return mods


# ---------------------------------------------------------------------------------------- 1. generation

@pytest.mark.parametrize('name', tuple(net.SMALL_BLOCKS))
def test_stacked_forms_equal_the_modules(name):
    """net.small_forward of K stacked blocks equals each plain module, in eval and training mode (BN statistics)."""
    mods = random_modules(name, 2)
    x = torch.rand(3, 2 * net.PLANES, 14, 14)
    for training in (False, True):
        state = net.stack_states([m.state_dict() for m in mods])
        got = net.small_forward(x, state, training)
        want = torch.cat([m.train(training)(x[:, 6 * j:6 * j + 6].clone()) for j, m in enumerate(mods)], 1)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        after = net.stack_states([m.state_dict() for m in mods])  # training mode moved the BN statistics alike
        for key, t in after.items():
            torch.testing.assert_close(state[key], t, atol=1e-6, rtol=1e-6, msg=key)
    assert net.small_block_of(state) == name and net.small_block_of({'x': state[key]}) is None


def test_identity_middle_is_the_zero_block():
    """A SimpleBlock_NoBn of zero weights is the identity on Begin's (non-negative) outputs."""
    x = torch.rand(2, 12, 14, 14)
    zero = {k: torch.zeros(2, *s) for k, s in net.SIMPLE_SHAPES.items()}
    assert torch.equal(net.MIDDLE_FORWARD['identity'](x, {}), net.small_forward(x, zero))


@pytest.mark.parametrize('name', OTHERS)
def test_batched_equals_one_by_one(mnist, name):
    """make_pairs (stacked) against train_one (nn.Modules) for each small block; the large network is the same."""
    recipe = dataclasses.replace(tiny_args('unused').recipe, small_block=name)
    shard = construct.make_pairs(range(2), recipe, mnist, torch.device('cpu'))
    assert set(shard['simple']) == set(net.small_shapes(name))
    for j in range(2):
        ref = construct.train_one(recipe, j, mnist)
        for key in construct.PAIR_BLOCKS:
            for n, t in ref[key].items():
                torch.testing.assert_close(shard[key][n][j], t, atol=2e-5, rtol=1e-4, msg=f'{key}.{n}')
        assert abs(shard['acc_small'][j].item() - ref['acc_small']) <= 1.0


def test_recipe_records_the_block(tmp_path):
    assert 'small_block' not in tiny_args('unused').recipe.as_json()  # the default: recipe.json as before
    assert tiny_args('unused', '--small_block', 'MLPBlock').recipe.as_json()['small_block'] == 'MLPBlock'
    generation.generate(tiny_args(tmp_path / 'r', '--small_block', 'MLPBlock'))
    with open(tmp_path / 'r' / 'recipe.json') as f:
        assert json.load(f)['small_block'] == 'MLPBlock'
    with pytest.raises(utils.UserError, match='another recipe'):  # roots of different blocks never mix
        generation.generate(tiny_args(tmp_path / 'r', '--small_block', 'AttnBlock'))


def test_large_from_gives_the_pairs_of_a_full_run(tmp_path):
    """--large_from: the small-block phase only, the same pairs as a full run, in both layouts, resumed."""
    generation.generate(tiny_args(tmp_path / 'nobn', '--num_data', '3'))  # the default block's root
    generation.generate(tiny_args(tmp_path / 'full', '--num_data', '3', '--small_block', 'SimpleBlock'))
    flags = ('--small_block', 'SimpleBlock', '--large_from', str(tmp_path / 'nobn'))
    generation.generate(tiny_args(tmp_path / 'from', '--num_data', '1', '--start_index', '1', *flags))
    generation.generate(tiny_args(tmp_path / 'from', '--num_data', '3', '--models_per_step', '2', *flags))  # resumes
    generation.generate(tiny_args(tmp_path / 'orig', '--num_data', '3', '--layout', 'original', *flags))
    full, made = shards.read_pairs(str(tmp_path / 'full'), 3), shards.read_pairs(str(tmp_path / 'from'), 3)
    assert full['recipe'] == made['recipe'] and torch.equal(full['acc_large'], made['acc_large'])
    for block in construct.PAIR_BLOCKS:
        for name, t in full[block].items():
            torch.testing.assert_close(made[block][name], t, atol=1e-6, rtol=1e-5, msg=f'{block}.{name}')
    orig = original_layout.read_original(str(tmp_path / 'orig'), 3, original_layout.ORIGINAL_DIRS['train'],
                                         ('basic', 'simple'))
    for name, t in full['simple'].items():
        torch.testing.assert_close(orig['simple'][name], t, atol=1e-6, rtol=1e-5)
    # from an original-layout root: its accuracies are measured again
    generation.generate(tiny_args(tmp_path / 'from_orig', '--num_data', '3', '--small_block', 'SimpleBlock',
                                  '--large_from', str(tmp_path / 'orig')))
    again = shards.read_pairs(str(tmp_path / 'from_orig'), 3)
    assert torch.equal(again['simple']['conv1.weight'], made['simple']['conv1.weight'])
    assert (again['acc_large'] - full['acc_large']).abs().max() <= 0.5


def test_large_from_refuses_bad_roots(tmp_path):
    generation.generate(tiny_args(tmp_path / 'src', '--skip_simple'))
    with pytest.raises(utils.UserError, match='no such folder'):
        tiny_args(tmp_path / 'x', '--large_from', str(tmp_path / 'none'))
    with pytest.raises(utils.UserError, match='another recipe'):
        tiny_args(tmp_path / 'x', '--large_from', str(tmp_path / 'src'), '--lr', '0.02')
    with pytest.raises(utils.UserError, match='small-block phase'):
        tiny_args(tmp_path / 'x', '--large_from', str(tmp_path / 'src'), '--skip_simple')
    with pytest.raises(utils.UserError, match='another recipe'):  # validation networks are another recipe
        tiny_args(tmp_path / 'x', '--large_from', str(tmp_path / 'src'), '--train_simple', kind='val')
    os.makedirs(tmp_path / 'bare')
    with pytest.raises(utils.UserError, match='no recipe.json'):
        tiny_args(tmp_path / 'x', '--large_from', str(tmp_path / 'bare'))
    tiny_args(tmp_path / 'x', '--large_from', str(tmp_path / 'src'), '--small_block', 'AttnBlock')  # fine

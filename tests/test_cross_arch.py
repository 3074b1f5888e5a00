"""Cross-architecture translation: every small block of net.py generated, translated, scored and baselined."""
import dataclasses
import glob
import json
import math
import os

import pytest
import torch

import construct
import evaluate
import generation
import mixer
import net
import original_layout
import rules
import shards
import symmetry
import targets
import train
import translate
import universal
import utils
from mixer import MLPMixer
from conftest import tiny_args

OTHERS = ('SimpleBlock', 'MLPBlock', 'AttnBlock')



@pytest.fixture(autouse=True)
def single_thread(one_thread):
    """Single-threaded: tiny CPU ops on a shared machine."""


@pytest.fixture
def mnist(tiny_mnist):
    return tiny_mnist


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
    with pytest.raises(utils.UserError, match='lacks networks 1-2'):
        tiny_args(tmp_path / 'x', '--large_from', str(tmp_path / 'src'), '--num_data', '3')
    tiny_args(tmp_path / 'x', '--large_from', str(tmp_path / 'src'), '--small_block', 'AttnBlock')  # fine


# ---------------------------------------------------------------------------------------- 2. the translator

def test_heads_write_every_parameter_once():
    """Each target's head: its written tensors' shapes, every parameter value from its own token value; the
    original translator's head unchanged (36 tokens of 9 taps: the authors' state dicts still load)."""
    assert MLPMixer(num_layers=1).fc2.out_features == 36 and not hasattr(MLPMixer(num_layers=1, C_dim=9), 'map2')
    for name in net.SMALL_BLOCKS:
        num, width = mixer.OUT_TOKENS[name]
        out = mixer.split_tokens(name, torch.arange(2 * num * width, dtype=torch.float).view(2, num, width))
        assert [tuple(t.shape[1:]) for t in out] == list(targets.written_shapes(name).values())
        values = torch.cat([t.flatten(1) for t in out], 1)
        assert values.shape[1] == sum(math.prod(s) for s in targets.written_shapes(name).values())
        assert len(values[0].unique()) == values.shape[1]  # no value written twice
        model = MLPMixer(num_layers=1, C_dim=8, hidden_S_dim=8, hidden_C_dim=8, target=name)
        block = targets.state_of(name, model([torch.randn(2, 6, 6, 3, 3), torch.randn(2, 6, 6, 3, 3)]))
        net.SMALL_BLOCKS[name]().load_state_dict(net.unstack_state(block, 0), strict=True)


@pytest.mark.parametrize('name', tuple(net.SMALL_BLOCKS))
def test_written_form_and_permutations_keep_the_function(name):
    """written -> state_of is the same eval-mode block; permute_written follows a residual permutation P of
    the input; permute_hidden (the block's own symmetry) changes nothing."""
    state = net.stack_states([m.state_dict() for m in random_modules(name, 2)])
    x = torch.rand(3, 12, 14, 14)
    want = net.small_forward(x, state)
    torch.testing.assert_close(net.small_forward(x, targets.state_of(name, targets.written(name, state))), want,
                               atol=1e-5, rtol=1e-5)
    p = torch.stack([torch.randperm(6), torch.randperm(6)])
    moved = targets.state_of(name, symmetry.permute_written(name, targets.written(name, state), p))
    xp = x.view(3, 2, 6, 14, 14)[:, torch.arange(2)[:, None], p].flatten(1, 2)  # network j's channels by p[j]
    wantp = want.view(3, 2, 6, 14, 14)[:, torch.arange(2)[:, None], p].flatten(1, 2)
    torch.testing.assert_close(net.small_forward(xp, moved), wantp, atol=1e-5, rtol=1e-5)
    sizes = [state[key].shape[axis] for group in symmetry.HIDDEN_AXES[name] for key, axis in list(group.items())[:1]]
    perms = [torch.stack([torch.randperm(n) for _ in range(2)]) for n in sizes]
    torch.testing.assert_close(net.small_forward(x, symmetry.permute_hidden(name, state, perms)), want,
                               atol=1e-5, rtol=1e-5)


def folded_inputs(basic):
    """A FunctionTranslator's inputs for stacked BasicBlocks."""
    return [basic['conv1.weight'], basic['conv2.weight'], *rules.bn_inputs(basic)]


@pytest.mark.parametrize('name,output,row', [('SimpleBlock_NoBn', 'refit', 'Weight selection (folded, refit)'),
                                             ('SimpleBlock', 'residual', 'Weight selection (folded)'),
                                             ('SimpleBlock', 'refit', 'Weight selection (folded, refit)'),
                                             ('MLPBlock', 'residual', 'Centre taps (folded)')])
def test_untrained_residual_is_its_rule(name, output, row):
    basic = conftest_basic(4)
    model = mixer.build_translator(dict(num_layers=1, C_dim=8, hidden_S_dim=8, hidden_C_dim=8),
                                   {'inputs': 'folded', 'output': output}, name)
    got = evaluate.translate_blocks(model, basic)
    want = rules.rules_of(name)[row](basic)
    for key, t in got.items():
        torch.testing.assert_close(t, want[key].to(t.dtype), atol=1e-6, rtol=1e-5, msg=key)
    with pytest.raises(ValueError, match='no training-free rule'):
        mixer.build_translator(dict(num_layers=1), {'inputs': 'conv', 'output': 'residual'}, 'AttnBlock')


def conftest_basic(n):
    """n jittered BasicBlocks (running_var > 0)."""
    import conftest
    return conftest.make_pairs(n)['basic']


def test_rules_are_exact_where_their_derivation_says():
    """SimpleBlock's folded selection is the BasicBlock itself when the dropped hidden channels write nothing;
    MLPBlock's centre taps are when only centre taps are non-zero (and summed taps on constant inputs)."""
    basic = conftest_basic(2)
    basic['conv2.weight'][:, :, 3:] = 0  # hidden channels 3..5 write nothing
    x = torch.rand(2, 12, 14, 14)
    want = net.basic_forward(x, basic)
    for row in ('Weight selection (folded)', 'Weight selection (folded, refit)'):
        rule = rules.rules_of('SimpleBlock')[row](basic)
        torch.testing.assert_close(net.small_forward(x, rule), want, atol=1e-5, rtol=1e-5)
    centre = dict(basic)
    for key in ('conv1.weight', 'conv2.weight'):
        mask = torch.zeros(3, 3)
        mask[1, 1] = 1
        centre[key] = basic[key] * mask
    torch.testing.assert_close(net.small_forward(x, rules.rules_of('MLPBlock')['Centre taps (folded)'](centre)),
                               net.basic_forward(x, centre), atol=1e-5, rtol=1e-5)
    flat = torch.rand(2, 12, 1, 1).expand(2, 12, 14, 14).contiguous()  # constant inputs: away from the border
    summed = net.small_forward(flat, rules.rules_of('MLPBlock')['Summed taps (folded)'](basic))
    torch.testing.assert_close(summed[..., 2:12, 2:12], net.basic_forward(flat, basic)[..., 2:12, 2:12],
                               atol=1e-5, rtol=1e-5)
    assert rules.rules_of('AttnBlock') == {}


# ---------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope='module')
def roots(tmp_path_factory):
    """Tiny data roots: the default pairs, and each other block's pairs and retrained val blocks by --large_from."""
    base = tmp_path_factory.mktemp('cross')
    torch.set_num_threads(1)
    generation.generate(tiny_args(base / 'train', '--num_data', '6', '--models_per_step', '6'))
    generation.generate(tiny_args(base / 'val', '--num_data', '3', '--models_per_step', '3', kind='val'))
    for name in OTHERS:
        generation.generate(tiny_args(base / f'train_{name}', '--num_data', '6', '--models_per_step', '6',
                                      '--small_block', name, '--large_from', str(base / 'train')))
        generation.generate(tiny_args(base / f'val_{name}', '--num_data', '3', '--models_per_step', '3',
                                      '--small_block', name, '--train_simple', '--large_from', str(base / 'val'),
                                      kind='val'))
    return base


TRAIN = ['--train_data_length', '4', '--holdout_networks', '2', '--val_data_length', '3', '--num_test_images', '200',
         '--batch_size', '4', '--num_epochs', '2', '--log_step', '1', '--device', 'cpu', '--num_layers', '1',
         '--c_dim', '8', '--hidden_s_dim', '8', '--hidden_c_dim', '8']


@pytest.mark.parametrize('name', OTHERS)
def test_generate_train_translate(roots, tmp_path, name, capsys):
    """Each target: its pairs, the Universal block, a translator trained with every loss at once (weight MSE,
    functional with --perm_aug and --ce_weight), its JSON recording the target, translate.py writing the block."""
    train_path = str(roots / f'train_{name}')
    universal.main(['--train_path', train_path, '--train_data_length', '4', '--num_epochs', '2', '--batch_size', '2',
                    '--functional_images', '8', '--device', 'cpu', '--ce_weight', '1'])
    argv = ['--train_path', train_path, '--val_path', str(roots / f'val_{name}'), *TRAIN, '--loss', 'mse+functional',
            '--perm_aug', '--ce_weight', '1', '--functional_images', '8', '--ckpt_path', str(tmp_path / 'ck'),
            '--log_path', str(tmp_path / 'lg')]
    train.main(argv)
    summary_path, = glob.glob(str(tmp_path / 'ck' / '**' / 'summary.json'), recursive=True)
    with open(summary_path) as f:
        summary = json.load(f)
    assert summary['target'] == name and summary['run'].endswith(f'_to-{name}')
    rows = summary['rows']
    assert {'Identity (block skipped)', 'Universal block', 'Retrained', 'Mean target'} <= set(rows)
    assert set(rules.rules_of(name)) <= set(rows) and ('Weight selection' in rows) == (name == 'SimpleBlock')
    assert 'Universal block' in evaluate.verdict(rows)
    ckpt = summary['checkpoint']
    with open(os.path.splitext(ckpt)[0] + '.json') as f:
        assert json.load(f)['target'] == name
    translate.main(['--ckpt', ckpt, '--data_root', str(roots / f'val_{name}'), '--index', '2', '--out',
                    str(tmp_path / 'out.pth'), '--num_test_images', '200', '--device', 'cpu'])
    assert f'compressed (translated {name})' in capsys.readouterr().out
    written = torch.load(tmp_path / 'out.pth', weights_only=True)
    net.SMALL_BLOCKS[name]().load_state_dict(written, strict=True)


def test_target_flag_and_data(roots, tmp_path, capsys):
    """--small_block must agree with the small blocks the data holds; a default val set has no Retrained row for
    another target; options that only exist for SimpleBlock_NoBn are refused."""
    argv = ['--val_path', str(roots / 'val'), *TRAIN, '--ckpt_path', str(tmp_path / 'ck'), '--log_path',
            str(tmp_path / 'lg')]
    for extra, message in ((['--train_path', str(roots / 'train_MLPBlock'), '--small_block', 'AttnBlock'],
                            'holds MLPBlock small blocks'),
                           (['--train_path', str(roots / 'train_MLPBlock'), '--canonical_targets'],
                            'SimpleBlock_NoBn targets only'),
                           (['--train_path', str(roots / 'train_AttnBlock'), '--output', 'residual'],
                            'no training-free rule')):
        with pytest.raises(utils.UserError, match=message):
            train.main(argv + extra)
    train.main(argv + ['--train_path', str(roots / 'train_MLPBlock'), '--num_epochs', '1'])
    # the functional loss needs no targets: another block's pairs serve, without their Mean target
    train.main(argv + ['--train_path', str(roots / 'train'), '--num_epochs', '1', '--small_block', 'AttnBlock',
                       '--loss', 'functional', '--functional_images', '4'])
    found = {}
    for path in glob.glob(str(tmp_path / 'ck' / '**' / 'summary.json'), recursive=True):
        with open(path) as f:
            s = json.load(f)
        found[s.get('target')] = s['rows']
    assert set(found) == {'MLPBlock', 'AttnBlock'}
    assert 'Retrained' not in found['MLPBlock']  # the default val set's retrained blocks are SimpleBlock_NoBn
    assert 'Mean target' in found['MLPBlock'] and 'Mean target' not in found['AttnBlock']

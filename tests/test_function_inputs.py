"""train.py --inputs folded / --output residual, refit: translators that read the BasicBlock's BatchNorms."""
import json
import pathlib
import os

import pytest
import torch
import torch.nn.functional as F

import evaluate
import loader
import losses
import mixer
import mnist
import net
import rules
import runs
import train
import translate
from test_train import expect_user_error, run_dirs, train_argv

pytestmark = pytest.mark.usefixtures('one_thread')
CONFIG = dict(num_layers=1, S_dim=72, C_dim=16, hidden_S_dim=16, hidden_C_dim=16)


def folded_block(x, c1, c2, scale1, shift1, scale2, shift2, *_):
    """One BasicBlock computed from translator inputs: BN-folded convs plus shifts."""
    f1, f2 = rules.scale_convs(c1, c2, scale1, scale2)
    h = F.relu(F.conv2d(x, f1, padding=1) + shift1[:, None, None])
    return F.relu(F.conv2d(h, f2, padding=1) + shift2[:, None, None] + x)


def test_folded_inputs_compute_the_block_and_perm_aug_keeps_it():
    gen = torch.Generator().manual_seed(0)
    basic = {k: torch.randn(4, *shape, generator=gen) for k, shape in net.BASIC_SHAPES.items()}
    for i in (1, 2):
        basic[f'bn{i}.running_var'] = basic[f'bn{i}.running_var'].abs() + 0.3
    inputs = [basic['conv1.weight'], basic['conv2.weight'], *rules.bn_inputs(basic)]
    x = torch.randn(2, 6, 14, 14, generator=gen)
    perm_in, _, p = losses.perm_augment(inputs, [], gen)
    for j in range(4):
        block = net.BasicBlock().eval()
        block.load_state_dict(net.unstack_state(basic, j), strict=False)
        with torch.no_grad():
            want = block(x)
        assert torch.allclose(folded_block(x, *(t[j] for t in inputs)), want, rtol=1e-4, atol=1e-4)
        # the permuted inputs are the same function with the residual channels permuted by p
        assert torch.allclose(folded_block(x[:, p[j]], *(t[j] for t in perm_in)), want[:, p[j]], rtol=1e-4, atol=1e-4)


def test_folded_tokens_carry_the_shifts():
    gen = torch.Generator().manual_seed(1)
    model = mixer.build_translator(CONFIG, {'inputs': 'folded', 'output': 'direct'}).eval()
    assert model.map1.in_features == 10 and set(model.state_dict()) == set(mixer.MLPMixer(**CONFIG).state_dict())
    inputs = [torch.randn(2, 6, 6, 3, 3, generator=gen), torch.randn(2, 6, 6, 3, 3, generator=gen),
              *(torch.rand(2, 6, generator=gen) + 0.5 for _ in range(4))]
    with torch.no_grad():
        a = model(inputs)
        b = model(inputs[:3] + [inputs[3] + 1] + inputs[4:])  # another shift1
    assert not torch.allclose(a[0], b[0])
    assert mixer.build_translator(CONFIG, dict(mixer.DEFAULT_KT)).__class__ is mixer.MLPMixer


RULES = {'residual': rules.folded_selection, 'refit': rules.refit_selection}


@pytest.mark.parametrize('output', ['residual', 'refit'])
@pytest.mark.parametrize('inputs', ['conv', 'folded'])
def test_untrained_residual_translator_is_its_rule(pair_sets, inputs, output):
    val = loader.ValDataset(pair_sets['val'], 3)
    images, labels = mnist.load_mnist('data', train=False)
    score = evaluate.Scorer(images[:200], labels[:200], val.begin, val.last)
    model = mixer.build_translator(CONFIG, {'inputs': inputs, 'output': output})
    middle = evaluate.translate_blocks(model, val.basic)
    want = RULES[output](val.basic)
    assert all(torch.equal(middle[k], want[k]) for k in want)
    assert torch.equal(score(middle), score(want))


def test_refit_base_follows_perm_aug():
    """The refit rule of --perm_aug inputs is the same function with the residual channels permuted: gamma1 and
    beta1 move with the hidden channels."""
    gen = torch.Generator().manual_seed(2)
    basic = {k: torch.randn(4, *shape, generator=gen) for k, shape in net.BASIC_SHAPES.items()}
    for i in (1, 2):
        basic[f'bn{i}.running_var'] = basic[f'bn{i}.running_var'].abs() + 0.3
    inputs = [basic['conv1.weight'], basic['conv2.weight'], *rules.bn_inputs(basic)]
    perm_in, _, p = losses.perm_augment(inputs, [], gen)
    model = mixer.build_translator(CONFIG, {'inputs': 'conv', 'output': 'refit'}).eval()
    x = torch.randn(2, 4 * 6, 14, 14, generator=gen)
    xp = torch.cat([x[:, 6 * j:6 * j + 6][:, p[j]] for j in range(4)], 1)
    with torch.no_grad():
        want = net.simple_forward(x, dict(zip(('conv1.weight', 'conv2.weight'), model(inputs))))
        got = net.simple_forward(xp, dict(zip(('conv1.weight', 'conv2.weight'), model(perm_in))))
    for j in range(4):
        assert torch.allclose(got[:, 6 * j:6 * j + 6], want[:, 6 * j:6 * j + 6][:, p[j]], atol=1e-4)


@pytest.mark.parametrize('output', ['residual', 'refit'])
def test_run_with_folded_inputs_and_residual_output(pair_sets, tmp_path, capsys, output):
    argv = train_argv(pair_sets, tmp_path, '--inputs', 'folded', '--output', output, '--perm_aug',
                      '--loss', 'mse+functional', '--functional_images', '4', '--num_epochs', '2', '--log_step', '1')
    assert run_dirs(argv)[0].endswith(f'_perm_mse+functional-w1-ce0-img4_in-folded_out-{output}')
    train.main(argv)
    summary = json.load(open(os.path.join(run_dirs(argv)[0], 'summary.json')))
    assert summary['kt'] == {'inputs': 'folded', 'output': output}
    meta = runs.read_meta(summary['checkpoint'])  # the best translator is a plain state dict; its metadata beside
    assert meta['kt'] == summary['kt'] and meta['config'] == summary['config']
    # translate.py rebuilds the same translator from the checkpoint: the same accuracy for network k
    k = 1
    translate.main(['--ckpt', summary['checkpoint'], '--data_root', pair_sets['val'], '--index', str(k),
                    '--out', str(tmp_path / 'k.pth'), '--num_test_images', '200', '--device', 'cpu'])
    want = summary['rows']['KT (best)']['accs'][k]
    assert f'compressed (translated SimpleBlock_NoBn) {want:.2f}%' in capsys.readouterr().out
    expect_user_error(capsys, train.main, train_argv(pair_sets, tmp_path, '--output', 'residual',
                                                     '--canonical_targets'), '--output residual adds its delta')


def test_default_run_name_and_inputs_unchanged(pair_sets):
    args = train.get_args(train_argv(pair_sets, pathlib.Path('/tmp/unused')))
    assert mixer.kt_of(args.inputs, args.output) is None and not runs.research_suffix(args, train.PARSER.get_default).count('in-')
    objective = losses.Objective(args, loader.TrainDataset(pair_sets['train'], 12), 'cpu')
    assert len(objective.inputs) == 2

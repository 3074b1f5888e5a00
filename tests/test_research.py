"""train.py's research options: --perm_aug, --hidden_invariant_loss, --loss functional / mse+functional."""
import glob
import json
import os

import pytest
import torch
import torch.nn.functional as F

import construct_train
import generation
import loader
import losses
import mnist
import net
import runs
import shards
import symmetry
import train
from conftest import ROOT
from test_train import expect_user_error, read_metrics, run_dirs, train_argv

pytestmark = pytest.mark.usefixtures('one_thread')

MNIST = os.path.join(ROOT, 'data')


def random_pairs(n, seed=0):
    """Random (inputs, targets) of n pairs, shaped like the translator's."""
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(n, 6, 6, 3, 3, generator=g), torch.randn(n, 6, 6, 3, 3, generator=g)],
            [torch.randn(n, 3, 6, 3, 3, generator=g), torch.randn(n, 6, 3, 3, 3, generator=g)])


def test_perm_aug_is_permute_pairs_with_fresh_permutations():
    inputs, targets = random_pairs(5)
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    got_in, got_t, p = losses.perm_augment(inputs, targets, gen)
    gen.set_state(state)  # the same draws, by hand
    want_p, want_q = losses.random_perms(5, gen, 'cpu'), losses.random_perms(5, gen, 'cpu')
    assert torch.equal(p, want_p) and all(sorted(r) == list(range(6)) for r in want_p.tolist() + want_q.tolist())
    assert len({tuple(r) for r in want_p.tolist()}) > 1  # per pair, not one permutation for the batch
    for got, want in zip(got_in + got_t, symmetry.permute_pairs(*inputs, *targets, want_p, want_q)):
        assert torch.equal(got, want)
    # sample by sample it is symmetry.permute_network's permutation of the BasicBlock and the small block
    for i in range(5):
        basic = {'conv1.weight': inputs[0][i], 'conv2.weight': inputs[1][i],
                 **{f'bn{j}.{n}': torch.zeros(6) for j in (1, 2) for n in ('weight', 'bias', 'running_mean',
                                                                          'running_var')}}
        begin = {'conv.weight': torch.zeros(6, 1, 3, 3), **{f'bn.{n}': torch.zeros(6) for n in
                                                            ('weight', 'bias', 'running_mean', 'running_var')}}
        _, b, _, s = symmetry.permute_network(begin, basic, {'downsample.weight': torch.zeros(12, 6, 1, 1)},
                                         {'conv1.weight': targets[0][i], 'conv2.weight': targets[1][i]},
                                         want_p[i], want_q[i])
        assert torch.equal(got_in[0][i], b['conv1.weight']) and torch.equal(got_in[1][i], b['conv2.weight'])
        assert torch.equal(got_t[0][i], s['conv1.weight']) and torch.equal(got_t[1][i], s['conv2.weight'])
    # the small block's hidden channels stay where they are (only its 6 outer channels follow P)
    assert torch.equal(got_t[0].flatten(2).sort(2).values, targets[0].flatten(2).sort(2).values)
    # without targets (--loss functional on --skip_simple data) the inputs get the same transform
    gen.set_state(state)
    no_t_in, no_t, p2 = losses.perm_augment(inputs, [], gen)
    assert no_t == [] and torch.equal(p2, p) and all(torch.equal(a, b) for a, b in zip(no_t_in, got_in))
    # fresh permutations every call; and unpermute_small undoes the small-block part
    assert not torch.equal(losses.perm_augment(inputs, targets, gen)[2], p)
    back = losses.unpermute_small(got_t, p)
    assert torch.equal(back[0], targets[0]) and torch.equal(back[1], targets[1])


def test_hidden_invariant_loss():
    out, tgt = random_pairs(6, seed=1)[1], random_pairs(6, seed=2)[1]
    near = [o + 0.01 * torch.randn_like(o) for o in out]  # already in the best order
    torch.testing.assert_close(losses.hidden_invariant_loss(out, near), losses.mse_loss(out, near))
    # permuting each target's hidden channels (conv1 out-channels with conv2 in-channels) changes nothing
    orders = [list(symmetry.HIDDEN_ORDERS[i % 6]) for i in range(1, 7)]  # a different order per pair
    shuffled = [torch.stack([near[0][i][r] for i, r in enumerate(orders)]),
                torch.stack([near[1][i][:, r] for i, r in enumerate(orders)])]
    assert losses.hidden_invariant_loss(out, shuffled) == losses.hidden_invariant_loss(out, near)
    assert losses.mse_loss(out, shuffled) > 100 * losses.hidden_invariant_loss(out, shuffled)
    # never above the faithful loss; and it is the batch mean of per-pair minima over the 6 orders
    h = losses.hidden_invariant_loss(out, tgt)
    assert h <= losses.mse_loss(out, tgt)
    per_pair = [min(losses.mse_loss([out[0][i:i + 1], out[1][i:i + 1]],
                                   [tgt[0][i:i + 1, r], tgt[1][i:i + 1, :, r]]).item()
                    for r in map(list, symmetry.HIDDEN_ORDERS)) for i in range(6)]
    assert h.item() == pytest.approx(sum(per_pair) / 6, rel=1e-6)


@pytest.fixture(scope='module')
def train_networks(pair_sets):
    return loader.TrainDataset(pair_sets['train'], 12, with_networks=True)


def module_reference(train_set, idx, small, x, y, ce_weight):
    """The functional term with nn.Modules, one network at a time."""
    total = 0.
    for k, i in enumerate(idx.tolist()):
        mods = {b: net.BLOCKS[b]().eval() for b in ('begin', 'basic', 'last', 'simple')}
        for b in ('begin', 'basic', 'last'):
            mods[b].load_state_dict(net.unstack_state(getattr(train_set, b), i))
        mods['simple'].load_state_dict({'conv1.weight': small[0][k], 'conv2.weight': small[1][k]})
        with torch.no_grad():
            h = mods['begin'](x)
            got = mods['simple'](h)
            loss = F.mse_loss(got, mods['basic'](h)) + ce_weight * F.cross_entropy(mods['last'](got), y)
        total += loss.item() / len(idx)
    return total


def test_functional_loss_equals_per_network_modules(train_networks):
    args = train.get_args(['--loss', 'functional', '--ce_weight', '0.5', '--functional_images', '8',
                           '--mnist_root', MNIST])
    convs = (train_networks.basic['conv1.weight'], train_networks.basic['conv2.weight'])
    objective = losses.Objective(args, train_networks, torch.device('cpu'))
    idx = torch.tensor([7, 2, 10])
    small = [(train_networks.simple[k][idx] + 0.05).requires_grad_() for k in ('conv1.weight', 'conv2.weight')]
    gen = torch.Generator().manual_seed(5)
    j = torch.randint(60000, (8,), generator=torch.Generator().manual_seed(5))
    images, labels = mnist.load_mnist(MNIST, train=True)
    loss = objective.loss(small, losses.Batch([], [], idx), gen)
    want = module_reference(train_networks, idx, [s.detach() for s in small],
                            images[j].float().div(255).unsqueeze(1), labels[j], 0.5)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    loss.backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in small)
    # with --perm_aug the translation of permuted inputs is scored in the networks' own channel order:
    # the permuted retrained blocks score what the blocks themselves score
    inputs, targets = [c[idx] for c in convs], [train_networks.simple[k][idx] for k in ('conv1.weight', 'conv2.weight')]
    _, permuted, p = losses.perm_augment(inputs, targets, torch.Generator().manual_seed(1))
    assert not torch.equal(permuted[0], targets[0])
    a = objective.loss(permuted, losses.Batch([], [], idx, p), torch.Generator().manual_seed(2))
    b = objective.loss(targets, losses.Batch([], [], idx), torch.Generator().manual_seed(2))
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    # mse+functional: weight MSE + functional_weight x the functional term
    args2 = train.get_args(['--loss', 'mse+functional', '--functional_weight', '3', '--ce_weight', '0.5',
                            '--functional_images', '8', '--mnist_root', MNIST])
    tgt = [t + 1 for t in targets]
    c = losses.Objective(args2, train_networks, torch.device('cpu')).loss(
        targets, losses.Batch([], tgt, idx), torch.Generator().manual_seed(2))
    assert c.item() == pytest.approx(1.0 + 3 * b.item(), rel=1e-5)


def test_run_names_and_flag_checks(capsys):
    faithful = train.get_args([])
    assert runs.run_name(faithful, train.PARSER.get_default).endswith('mask-t0_noise-t0_n300000_seed0')
    args = train.get_args(['--perm_aug', '--hidden_invariant_loss', '--loss', 'mse+functional'])
    assert runs.run_name(args, train.PARSER.get_default).endswith('_seed0_perm_hinv_mse+functional-w1-ce0-img64')
    args = train.get_args(['--loss', 'functional', '--ce_weight', '0.1', '--functional_images', '32'])
    assert runs.run_name(args, train.PARSER.get_default).endswith('_seed0_functional-w1-ce0.1-img32')
    for flags, message in [(['--ce_weight', '1'], 'use them with --loss functional or mse+functional'),
                           (['--loss', 'functional', '--functional_weight', '2'], 'it is the only term'),
                           (['--loss', 'functional', '--hidden_invariant_loss'], 'which --loss functional does not'),
                           (['--loss', 'mse+functional', '--functional_images', '0'], '--functional_images 0 must')]:
        with pytest.raises(train.UserError, match=message.replace('+', r'\+')):
            train.check_args(train.get_args(flags))


def test_resume_exact_with_research_options(pair_sets, tmp_path):
    extra = ['--perm_aug', '--loss', 'mse+functional', '--hidden_invariant_loss', '--ce_weight', '0.5',
             '--functional_images', '16', '--mnist_root', MNIST, '--noise', '0.01', '--num_epochs', '3',
             '--log_step', '1']
    straight = train_argv(pair_sets, tmp_path / 'a', *extra)
    train.main(straight)
    broken = train_argv(pair_sets, tmp_path / 'b', *extra)
    train.main(broken + ['--stop_after_epoch', '0'])
    train.main(broken + ['--resume'])
    (ckpt_a, log_a), (ckpt_b, log_b) = run_dirs(straight), run_dirs(broken)
    assert ckpt_a.endswith('_seed0_val3_test200_perm_hinv_mse+functional-w1-ce0.5-img16')
    assert open(os.path.join(log_a, 'metrics.csv')).read() == open(os.path.join(log_b, 'metrics.csv')).read()
    a, b = (torch.load(os.path.join(d, 'last.pth'), weights_only=True)['model'] for d in (ckpt_a, ckpt_b))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m['mean'] != '' for m in read_metrics(log_a)] == [False, True, True]


@pytest.fixture(scope='module')
def skip_simple_set(tmp_path_factory):
    """Two networks from construct_train.py --skip_simple (no small blocks)."""
    d = str(tmp_path_factory.mktemp('skip') / 'train')
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    args = construct_train.get_args('train', ['--data_root', d, '--num_epochs', '1', '--num_train_images', '300',
                                              '--num_test_images', '200', '--device', 'cpu', '--num_data', '2',
                                              '--skip_simple', '--mnist_root', MNIST])
    generation.generate(args)
    torch.set_num_threads(n)
    return d


def test_functional_loss_trains_on_skip_simple_data(skip_simple_set, pair_sets, tmp_path, capsys):
    files = shards.list_shards(skip_simple_set)
    assert len(files) == 2 and all('simple' not in shards.load_shard(path) for _, _, path in files)
    base = train_argv({'train': skip_simple_set, 'val': pair_sets['val']}, tmp_path, '--train_data_length', '2',
                      '--batch_size', '2', '--num_epochs', '2', '--mnist_root', MNIST)
    argv = base + ['--loss', 'functional', '--perm_aug', '--functional_images', '8', '--ce_weight', '0.1']
    train.main(argv)
    ckpt_dir, log_dir = run_dirs(argv)
    summary = json.load(open(os.path.join(ckpt_dir, 'summary.json')))
    assert 'Mean target' not in summary['rows'] and len(summary['rows']['KT (best)']['accs']) == 3
    assert 'no "Mean target" row' in open(os.path.join(log_dir, 'train.log')).read()
    assert glob.glob(os.path.join(ckpt_dir, '[0-9]*.pth'))
    capsys.readouterr()
    for loss in ('mse', 'mse+functional'):  # the MSE needs small blocks: refused, naming --skip_simple
        expect_user_error(capsys, train.main, base + ['--loss', loss],
                          f'holds no small blocks (SimpleBlock_NoBn), needed for the MSE targets of training '
                          f'(--loss {loss}; --loss functional trains without them) (made with --skip_simple')


def test_canonical_targets_and_holdout_selection(pair_sets, tmp_path):
    """--canonical_targets trains on symmetry.canonical_simple of the targets (with its own mean-target row);
    --holdout_networks picks the best epoch on held-out training networks, never on the val networks."""
    argv = train_argv(pair_sets, tmp_path, '--canonical_targets', '--train_data_length', '9',
                      '--holdout_networks', '3', '--log_step', '1')
    train.main(argv)
    ckpt_dir, log_dir = run_dirs(argv)
    assert ckpt_dir.endswith('_n9_seed0_val3_test200_hold3_canon')
    summary = json.load(open(os.path.join(ckpt_dir, 'summary.json')))
    assert summary['selection'] == 'holdout 3' and summary['train_pairs'] == 9
    assert {'Mean target', 'Mean canonical target'} <= set(summary['rows'])
    rows = [r for r in read_metrics(log_dir) if r['mean']]
    best = max(rows, key=lambda r: float(r['holdout']))  # the first best held-out mean wins
    assert summary['best_epoch'] == int(best['epoch'])
    assert summary['best_step'] == (int(best['epoch']) + 1) * summary['steps_per_epoch']
    assert summary['rows']['KT (best)']['mean'] == pytest.approx(float(best['mean']))
    # the original's log line names the val mean, as the checkpoint does; the held-out mean that picked it beside
    log_text = open(os.path.join(log_dir, 'train.log')).read()
    assert (f"Best Mean Accuracy {float(best['mean']):.2f}% (picked on the held-out mean "
            f"{float(best['holdout']):.2f}%)") in log_text
    # the objective's targets are the canonical forms of pairs 0..8 (not the held-out 9..11)
    data = loader.TrainDataset(pair_sets['train'], 9)
    objective = losses.Objective(train.get_args(argv), data, torch.device('cpu'))
    want = symmetry.canonical_simple(data.simple['conv1.weight'], data.simple['conv2.weight'])
    assert all(torch.equal(a, b) for a, b in zip(objective.targets, want))
    assert not torch.equal(objective.targets[0], data.simple['conv1.weight'])

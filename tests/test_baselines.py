"""The training-free reference rules: BatchNorm folding, folded weight selection and its refit."""
import os
import sys

import torch
import torch.nn.functional as F

import net
import rules


def random_basic(gen, k=1):
    """Stacked BasicBlock states with BatchNorms far from the identity."""
    s = {key: torch.randn(k, *shape, generator=gen) for key, shape in net.BASIC_SHAPES.items()}
    for i in (1, 2):
        s[f'bn{i}.running_var'] = s[f'bn{i}.running_var'].abs() + 0.3
    return s


def test_fold_bn_computes_the_block(one_thread):
    """conv1, shift1, conv2, shift2 of fold_bn give the eval-mode BasicBlock's outputs."""
    gen = torch.Generator().manual_seed(0)
    basic = random_basic(gen)
    block = net.BasicBlock().eval()
    block.load_state_dict(net.unstack_state(basic, 0), strict=False)
    x = torch.randn(4, 6, 14, 14, generator=gen)
    c1, t1, c2, t2 = (t[0] for t in rules.fold_bn(basic))
    h = F.relu(F.conv2d(x, c1, padding=1) + t1[:, None, None])
    want = F.relu(F.conv2d(h, c2, padding=1) + t2[:, None, None] + x)
    with torch.no_grad():
        assert torch.allclose(block(x), want, atol=1e-5)


def test_folded_selection_keeps_the_important_channels():
    """By hand: importance = |gamma1/sigma1| ||conv1[h]|| x ||gamma2/sigma2 * conv2[:, h]||."""
    basic = {k: torch.ones(1, *shape) for k, shape in net.BASIC_SHAPES.items()}
    basic['bn1.running_var'] = torch.full((1, 6), 1 - net.BN_EPS)  # sigma = 1
    basic['bn2.running_var'] = torch.full((1, 6), 1 - net.BN_EPS)
    basic['bn1.weight'] = torch.tensor([[1., 4., 1., 3., 1., 2.]])  # folded conv1 norms 6 x these
    basic['conv2.weight'] = basic['conv2.weight'] * torch.tensor([1., 1., 5., 1., 1., 3.])[None, None, :, None, None]
    # importance per h (times 6 x 3 x 2): 1x1, 4x1, 1x5, 3x1, 1x1, 2x3 -> channels 5 (6), 2 (5), 1 (4)
    basic['bn2.weight'] = torch.full((1, 6), 2.)
    out = rules.folded_selection(basic)
    keep = [1, 2, 5]
    assert torch.equal(out['conv1.weight'], basic['conv1.weight'][:, keep] * basic['bn1.weight'][0, keep][:, None, None,
                                                                                                          None])
    assert torch.equal(out['conv2.weight'], 2 * basic['conv2.weight'][:, :, keep])
    # unfolded, only conv2's column norms differ: channels 2 and 5 and one of the tied others
    assert {2, 5} < set(rules.top_hidden(basic['conv1.weight'], basic['conv2.weight'])[0].tolist())


def test_relu_moments_match_sampling():
    """The Gaussian ReLU moments the refit uses, against a million samples."""
    z = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.7
    for m1, m2 in ((0.3, -0.8), (1.2, 1.2), (-2.0, 0.5)):
        a, b = F.relu(z + m1), F.relu(z + m2)
        m1, m2, g = (torch.tensor(v, dtype=torch.float64) for v in (m1, m2, 1.7))
        assert abs(rules.relu_cross_moment(m1, m2, g).item() - (a * b).mean().item()) < 0.02
        assert abs(rules.relu_mean(m1, g).item() - a.mean().item()) < 0.01


def test_refit_is_exact_when_nothing_is_dropped():
    """Dropped channels that write nothing, no bn2 shift and no lost bn1 shift: the refit keeps the folded conv2."""
    gen = torch.Generator().manual_seed(1)
    basic = random_basic(gen, k=2)
    basic['conv2.weight'][:, :, 3:] = 0  # channels 3..5 write nothing: the top 3 by importance are 0..2
    c1, _, c2, _ = rules.fold_bn(basic)
    scale1 = basic['bn1.weight'] / torch.sqrt(basic['bn1.running_var'] + net.BN_EPS)
    basic['bn1.bias'] = basic['bn1.running_mean'] * scale1  # shift1 = 0
    basic['bn2.bias'] = basic['bn2.running_mean'] * basic['bn2.weight'] / torch.sqrt(basic['bn2.running_var'] + net.BN_EPS)
    out = rules.refit_selection(basic)
    assert torch.allclose(out['conv1.weight'], c1[:, :3]) and torch.allclose(out['conv2.weight'], c2[:, :, :3], atol=1e-5)
    # a dropped channel that does write: the refit changes conv2, the folded selection does not see it
    basic['conv2.weight'][:, :, 5] = 0.01
    assert not torch.allclose(rules.refit_selection(basic)['conv2.weight'], c2[:, :, :3], atol=1e-3)


def test_data_refit_recovers_conv2_when_nothing_is_dropped():
    """experiments/data_refit.py: when the dropped hidden channels write nothing and no shift is lost, the least
    squares fit on real activations finds the kept channels' folded conv2 (and changes it when a dropped one writes)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments'))
    import data_refit
    gen = torch.Generator().manual_seed(3)
    basic = random_basic(gen, k=2)
    basic['conv2.weight'][:, :, 3:] = 0
    for key in ('conv1.weight', 'bn1.weight'):  # Begin's outputs are >= 0: no dead hidden channel
        basic[key] = basic[key].abs()
    for i in (1, 2):  # shift = 0: beta = running_mean x scale
        scale = basic[f'bn{i}.weight'] / torch.sqrt(basic[f'bn{i}.running_var'] + net.BN_EPS)
        basic[f'bn{i}.bias'] = basic[f'bn{i}.running_mean'] * scale
    begin = net.fresh_states('begin', [0, 1])
    images = torch.rand(8, 1, 28, 28, generator=gen)
    c1, _, c2, _ = rules.fold_bn(basic)
    out = data_refit.data_refit(basic, begin, images)
    assert torch.allclose(out['conv1.weight'], c1[:, :3]) and torch.allclose(out['conv2.weight'], c2[:, :, :3],
                                                                               atol=1e-4)
    basic['conv2.weight'][:, :, 5] = 0.5
    assert not torch.allclose(data_refit.data_refit(basic, begin, images)['conv2.weight'], c2[:, :, :3], atol=1e-3)


def test_data_refit_ridge_fit_is_unique_on_a_dead_channel():
    """experiments/data_refit.py: a dead hidden feature (an all-zero column) gets weight 0 from the ridge solve, the
    others match the least squares fit without it; ridge 0 is plain least squares."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments'))
    import data_refit
    gen = torch.Generator().manual_seed(0)
    feats = torch.rand(200, 5, generator=gen, dtype=torch.float64)
    target = torch.rand(200, 2, generator=gen, dtype=torch.float64)
    full = data_refit.ridge_fit(feats, target, 0)
    assert torch.allclose(full, torch.linalg.lstsq(feats, target).solution)
    assert torch.allclose(data_refit.ridge_fit(feats, target, data_refit.RIDGE), full, atol=1e-6)
    dead = torch.cat([feats[:, :2], torch.zeros(200, 1, dtype=torch.float64), feats[:, 2:]], 1)
    w = data_refit.ridge_fit(dead, target, data_refit.RIDGE)
    assert torch.equal(w[2], torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(torch.cat([w[:2], w[3:]]), full, atol=1e-6)

"""The training-free rules: a SimpleBlock_NoBn written from a BasicBlock's weights and BatchNorm buffers alone.

Weight selection keeps three hidden channels as they are; the folded form first multiplies each conv by its
BatchNorm's scale; the refit form also solves for conv2 under the BN buffers' model of the hidden activations.
evaluate.py scores them as reference rows; the translator's --inputs folded and --output refit build on them.
Every function takes one block's state or stacked states (a leading K axis).
"""
import math

import torch

import net
import targets


def bn_inputs(basic):
    """A BasicBlock's eval-mode BatchNorms as [scale1, shift1, scale2, shift2, gamma1, beta1] (stacked or one
    block): scale = gamma / sqrt(running_var + eps) and shift = beta - running_mean x scale per channel; gamma1 and
    beta1, bn1's own affine, are the std and mean of the hidden pre-activations under BN's model (refit_hidden)."""
    out = []
    for i in (1, 2):
        scale = basic[f'bn{i}.weight'] / torch.sqrt(basic[f'bn{i}.running_var'] + net.BN_EPS)
        out += [scale, basic[f'bn{i}.bias'] - basic[f'bn{i}.running_mean'] * scale]
    return out + [basic['bn1.weight'], basic['bn1.bias']]


def scale_convs(conv1, conv2, scale1, scale2):
    """The convs with each output channel multiplied by its BatchNorm scale (the folded convs of fold_bn)."""
    return conv1 * scale1[..., None, None, None], conv2 * scale2[..., None, None, None]


def fold_bn(basic):
    """A BasicBlock's eval-mode BatchNorms folded into its convs (stacked or one block): [conv1, shift1, conv2,
    shift2], each conv scaled per output channel by bn_inputs' scale, so that the block computes
    relu(conv2(relu(conv1(x) + shift1)) + shift2 + x)."""
    scale1, shift1, scale2, shift2, *_ = bn_inputs(basic)
    conv1, conv2 = scale_convs(basic['conv1.weight'], basic['conv2.weight'], scale1, scale2)
    return [conv1, shift1, conv2, shift2]


def select_hidden(conv1, conv2, keep):
    """The small blocks made of stacked BasicBlock convs' hidden channels keep (K, 3): conv1 rows, conv2 columns."""
    b = torch.arange(len(conv1), device=conv1.device)[:, None]
    return {'conv1.weight': conv1[b, keep], 'conv2.weight': conv2.transpose(1, 2)[b, keep].transpose(1, 2)}


def importance(conv1, conv2):
    """Per hidden channel h (K, 6): ||conv1[h]|| x ||conv2[:, h]||, how strongly h is driven times how strongly it
    writes to the output."""
    return torch.linalg.vector_norm(conv1.flatten(2), dim=2) * \
        torch.linalg.vector_norm(conv2.transpose(1, 2).flatten(2), dim=2)


def top_hidden(conv1, conv2):
    """The HIDDEN hidden channels of largest importance(), in ascending index order (K, 3)."""
    return importance(conv1, conv2).topk(net.HIDDEN, dim=1).indices.sort(dim=1).values


def relu_cross_moment(m1, m2, g):
    """E[relu(z + m1) relu(z + m2)] for z ~ N(0, g^2), elementwise (the same z: one channel with two shifts)."""
    lo = torch.minimum(m1, m2)
    t = lo / g
    pdf, cdf = torch.exp(-t * t / 2) / math.sqrt(2 * math.pi), torch.special.ndtr(t)
    return g * g * (cdf - t * pdf) + (m1 + m2) * g * pdf + m1 * m2 * cdf


def relu_mean(m, g):
    """E[relu(z + m)] for z ~ N(0, g^2), elementwise."""
    t = m / g
    return g * torch.exp(-t * t / 2) / math.sqrt(2 * math.pi) + m * torch.special.ndtr(t)


def refit_hidden(conv1, shift1, conv2, shift2, gamma1, beta1):
    """Weight selection (folded, refit) of stacked folded BasicBlocks (fold_bn's [conv1, shift1, conv2, shift2] and
    bn1's gamma1, beta1): the top_hidden channels, with conv2 refit by least squares to the BasicBlock's whole
    pre-residual output (all 6 hidden channels and shift2), under the BN buffers' model of the hidden activations:
    pre-activation N(beta1, gamma1^2) in the BasicBlock and the same minus shift1 in the small block (no bias),
    independent across channels and positions. No images: weights and BN buffers only."""
    dtype = conv1.dtype
    c1, shift1, c2, shift2 = (t.double() for t in (conv1, shift1, conv2, shift2))
    keep = top_hidden(c1, c2)
    b = torch.arange(len(c1), device=c1.device)[:, None]
    g = gamma1.double().abs().clamp_min(1e-12)
    big, small = beta1.double(), beta1.double() - shift1  # the hidden channels' mean shifts
    g_k, big_k, small_k = g[b, keep], big[b, keep], small[b, keep]
    taps = c2.shape[-1] * c2.shape[-2]
    mean_big, mean_k = relu_mean(big, g), relu_mean(small_k, g_k)  # (K, 6), (K, 3)
    var_k = relu_cross_moment(small_k, small_k, g_k) - mean_k ** 2
    cov_k = relu_cross_moment(small_k, big_k, g_k) - mean_k * mean_big[b, keep]  # kept channel, small vs large block
    m = mean_k.repeat_interleave(taps, 1)  # features: (kept channel, tap), 27
    second = torch.diag_embed(var_k.repeat_interleave(taps, 1)) + m[:, :, None] * m[:, None, :]
    w_k = c2.transpose(1, 2)[b, keep].transpose(1, 2).flatten(2)  # (K, 6, 27)
    mean_out = (c2.flatten(3).sum(3) * mean_big[:, None, :]).sum(2) + shift2  # (K, 6): the output's mean
    rhs = m[:, None, :] * mean_out[:, :, None] + cov_k.repeat_interleave(taps, 1)[:, None, :] * w_k
    v = torch.linalg.solve(second[:, None], rhs.unsqueeze(-1)).squeeze(-1)  # (K, 6, 27)
    return {'conv1.weight': conv1[b, keep],
            'conv2.weight': v.reshape(*c2.shape[:2], net.HIDDEN, *c2.shape[3:]).to(dtype)}


def weight_selection(basic):
    """Weight selection: the BasicBlock's first 3 hidden channels, conv1 rows and conv2 columns, as they are."""
    return {'conv1.weight': basic['conv1.weight'][:, :net.HIDDEN],
            'conv2.weight': basic['conv2.weight'][:, :, :net.HIDDEN]}


def folded_selection(basic):
    """Weight selection (folded): fold each BatchNorm's scale gamma / sqrt(var + eps) into its conv (fold_bn),
    then keep the 3 hidden channels h of largest ||conv1[h]|| x ||conv2[:, h]|| (the shifts are dropped: the small
    block has no bias)."""
    c1, _, c2, _ = fold_bn(basic)
    return select_hidden(c1, c2, top_hidden(c1, c2))


def refit_selection(basic):
    """Weight selection (folded, refit): folded_selection's hidden channels with conv2 refit by least squares to the
    BasicBlock's whole pre-residual output, from the weights and BN buffers alone (refit_hidden)."""
    return refit_hidden(*fold_bn(basic), basic['bn1.weight'], basic['bn1.bias'])


# ----------------------------------------------------------------------------------------
# The other small blocks of net.py (--small_block): the same BN-folded BasicBlock, other blocks written from it.

def simple_bn_rule(conv1, shift1, conv2, shift2, gamma1, beta1, refit=False):
    """SimpleBlock's Weight selection (folded) / (folded, refit) of stacked folded BasicBlocks (rules_of)."""
    keep = top_hidden(conv1, conv2)
    b = torch.arange(len(conv1), device=conv1.device)[:, None]
    sel = select_hidden(conv1, conv2, keep)
    bias2 = shift2
    if refit:
        dropped = torch.ones_like(shift1, dtype=torch.bool)
        dropped[b, keep] = False
        mean = relu_mean(beta1.double(), gamma1.double().abs().clamp_min(1e-12)) * dropped  # (K, 6)
        bias2 = (shift2.double() + (conv2.double().flatten(3).sum(3) * mean[:, None, :]).sum(2)).to(shift2.dtype)
    return targets.state_of('SimpleBlock', [sel['conv1.weight'], sel['conv2.weight'],
                                            targets.bn_weight(torch.ones_like(shift1[:, :net.HIDDEN])),
                                            shift1[b, keep], targets.bn_weight(torch.ones_like(shift2)), bias2])


def mlp_rule(conv1, shift1, conv2, shift2, taps='centre'):
    """MLPBlock's Centre taps / Summed taps (folded) of stacked folded BasicBlocks (rules_of)."""
    tap = (lambda c: c[..., 1, 1]) if taps == 'centre' else (lambda c: c.sum((-2, -1)))
    spare = net.small_shapes('MLPBlock')['fc1_c.weight'][0] - net.PLANES  # hidden units left dead
    w1, w2 = tap(conv1), tap(conv2)  # (K, 6 hidden, 6 in), (K, 6 out, 6 hidden)
    return dict(zip(targets.KEYS['MLPBlock'], (
        torch.cat([w1, w1.new_zeros(len(w1), spare, net.PLANES)], 1),
        torch.cat([shift1, shift1.new_zeros(len(w1), spare)], 1),
        torch.cat([w2, w2.new_zeros(len(w2), net.PLANES, spare)], 2), shift2)))


def simple_bn_selection(basic):
    """SimpleBlock's Weight selection: the first 3 hidden channels of conv1, bn1 and conv2 as they are, and bn2."""
    out = {k: t[:, :net.HIDDEN] for k, t in basic.items() if k.startswith(('conv1.', 'bn1.')) and t.ndim > 1}
    out['conv2.weight'] = basic['conv2.weight'][:, :, :net.HIDDEN]
    out.update({k: t for k, t in basic.items() if k.startswith('bn2.') or k == 'bn1.num_batches_tracked'})
    return out


def _folded(fn, **kw):
    """A rule of folded BasicBlocks (and bn1's affine) as a rule of BasicBlock states."""
    def rule(basic):
        return fn(*fold_bn(basic), basic['bn1.weight'], basic['bn1.bias'], **kw)
    return rule


# target -> {reference row: rule of stacked BasicBlock states -> stacked small-block states}
RULES = {
    'SimpleBlock_NoBn': {'Weight selection': weight_selection, 'Weight selection (folded)': folded_selection,
                         'Weight selection (folded, refit)': refit_selection},
    'SimpleBlock': {'Weight selection': simple_bn_selection, 'Weight selection (folded)': _folded(simple_bn_rule),
                    'Weight selection (folded, refit)': _folded(simple_bn_rule, refit=True)},
    'MLPBlock': {'Centre taps (folded)': lambda basic: mlp_rule(*fold_bn(basic)),
                 'Summed taps (folded)': lambda basic: mlp_rule(*fold_bn(basic), taps='summed')},
    'AttnBlock': {},
}


def rules_of(target):
    """{reference row: rule} of a target: the training-free rules of each small block, derived here once for the
    blocks beyond SimpleBlock_NoBn (its rules: above); each rule reads the BasicBlock in
    fold_bn's form, relu(x + f2 * relu(f1 * x + shift1) + shift2), and the BN model of refit_hidden.

    SimpleBlock (SimpleBlock_NoBn with a BatchNorm after each conv): its eval-mode BatchNorms are per-channel
    affine maps, so it can carry the shifts that SimpleBlock_NoBn must drop. Weight selection (folded) keeps the
    top_hidden channels of f1 and f2 with bn1 = (scale 1, shift1 of the kept channels) and bn2 = (scale 1, shift2):
    each kept hidden channel is then exactly the BasicBlock's. Weight selection (folded, refit) refits it under the
    BN model (hidden pre-activations N(beta1, gamma1^2), independent): the least-squares conv2 of a kept channel
    is its own f2 column (its covariance with the output is its own contribution) and the intercept, bn2's shift,
    gains each dropped channel's mean output, sum over taps of f2[:, h] x E[relu(N(beta1_h, gamma1_h^2))].
    Weight selection keeps the first 3 hidden channels with their own BatchNorms, unfolded.

    MLPBlock (a channel MLP 6 -> 12 -> 6 at each position, with biases): it sees one position, the convs 3x3.
    Centre taps: fc1 = f1's centre taps and bias shift1 on 6 of its 12 hidden units (the other 6 zero: dead),
    fc2 = f2's centre taps and bias shift2; exact where the off-centre taps vanish. Summed taps: the sums over
    each 3x3 kernel instead; exact on inputs constant over each 3x3 window (feature maps are smooth). Both keep
    all 6 hidden channels, so the BN model's refit, which only absorbs dropped channels, changes nothing.

    AttnBlock: none; its attention mixes all 196 positions with input-dependent weights, a map no choice of its
    four 1x1 projections makes local, so no closed form links it to a 3x3 conv block (its proj = 0 is the
    identity, the "Identity (block skipped)" row)."""
    return RULES[target]


def residual_base(target, output, conv1, shift1, conv2, shift2, gamma1, beta1):
    """The rule train.py --output residual / refit adds its delta to, as a stacked state of the target, from
    folded BasicBlocks (fold_bn) and bn1's affine; None where the target has no such rule."""
    if target == 'SimpleBlock_NoBn':
        if output == 'refit':
            return refit_hidden(conv1, shift1, conv2, shift2, gamma1, beta1)
        return select_hidden(conv1, conv2, top_hidden(conv1, conv2))
    if target == 'SimpleBlock':
        return simple_bn_rule(conv1, shift1, conv2, shift2, gamma1, beta1, refit=output == 'refit')
    if target == 'MLPBlock' and output == 'residual':
        return mlp_rule(conv1, shift1, conv2, shift2, taps=RESIDUAL_TAPS)
    return None


RESIDUAL_TAPS = 'centre'  # MLPBlock's --output residual base
RESIDUAL_OUTPUTS = {'SimpleBlock_NoBn': ('residual', 'refit'), 'SimpleBlock': ('residual', 'refit'),
                    'MLPBlock': ('residual',), 'AttnBlock': ()}  # the --output values residual_base serves

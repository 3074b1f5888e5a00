"""The channel symmetries: permutations and rescalings that leave a network's function unchanged.

Begin -> BasicBlock -> Last computes the same function after any permutation P of the 6 residual channels and
any permutation Q of BasicBlock's 6 hidden channels; a SimpleBlock_NoBn in the middle follows P on its outer
channels. --perm_aug draws them; the functional loss and the identifiability study compare blocks up to them.

SimpleBlock_NoBn has symmetries of its own: it computes the same function after multiplying hidden filter
conv1[h] by any c > 0 and dividing conv2[:, h] by c (ReLU is positively homogeneous), and after any permutation
of its 3 hidden channels. A weight-space target is one arbitrary member of that orbit; canonical_simple picks a
fixed one, best_order_cosine compares orbits.
"""
import itertools

import torch
import torch.nn.functional as F

import net
import targets

HIDDEN_ORDERS = tuple(itertools.permutations(range(net.HIDDEN)))  # the 3! orders of the small block's hidden channels


def permute_network(begin, basic, last, simple, p, q):
    """State dicts of the same networks with residual channels permuted by p and hidden ones by q."""
    bn = ('weight', 'bias', 'running_mean', 'running_var')
    begin = dict(begin, **{'conv.weight': begin['conv.weight'][p]}, **{f'bn.{n}': begin[f'bn.{n}'][p] for n in bn})
    basic = dict(basic, **{'conv1.weight': basic['conv1.weight'][q][:, p],
                           'conv2.weight': basic['conv2.weight'][p][:, q]},
                 **{f'bn1.{n}': basic[f'bn1.{n}'][q] for n in bn}, **{f'bn2.{n}': basic[f'bn2.{n}'][p] for n in bn})
    last = dict(last, **{'downsample.weight': last['downsample.weight'][:, p]})
    simple = {'conv1.weight': simple['conv1.weight'][:, p], 'conv2.weight': simple['conv2.weight'][p]}
    return begin, basic, last, simple


def permute_pairs(c1, c2, s1, s2, p, q):
    """Batched pair (BasicBlock convs c1, c2 -> small convs s1, s2) under per-sample permutations p, q (B, 6)."""
    b = torch.arange(len(c1), device=c1.device)[:, None, None]
    c1 = c1[b, q[:, :, None], p[:, None, :]]  # c1'[o, i] = c1[q[o], p[i]]
    c2 = c2[b, p[:, :, None], q[:, None, :]]  # c2'[o, i] = c2[p[o], q[i]]
    b2 = b[:, :, 0]
    s1 = s1.transpose(1, 2)[b2, p].transpose(1, 2)  # s1'[:, i] = s1[:, p[i]]
    s2 = s2[b2, p]  # s2'[o] = s2[p[o]]
    return c1, c2, s1, s2


def permute_bn(bn, p, q):
    """bn_inputs [scale1, shift1, scale2, shift2, gamma1, beta1] (B, 6) each under per-sample permutations p
    (residual channels, bn2) and q (hidden channels, bn1), as permute_pairs permutes the convs."""
    return [t.gather(1, p if i in (2, 3) else q) for i, t in enumerate(bn)]


def rescale_simple(conv1, conv2):
    """Stacked small blocks (B, 3, 6, 3, 3), (B, 6, 3, 3, 3) with every hidden filter conv1[:, h] of unit
    L2 norm, its scale moved into conv2[:, :, h]: the same functions.

    A zero filter makes its channel 0 on every input, so conv2[:, :, h] is set to 0 with it (the same
    function again): no division by zero, and the form does not depend on what a dead channel once fed."""
    norm = torch.linalg.vector_norm(conv1.flatten(2), dim=2)  # (B, 3)
    conv1 = conv1 / torch.where(norm > 0, norm, torch.ones_like(norm))[:, :, None, None, None]
    return conv1, conv2 * norm[:, None, :, None, None]


def _lexsort_desc(feats):
    """Per row, the order (B, n) that sorts the items of feats (B, n, f) by descending features, first column first."""
    order = torch.arange(feats.shape[1], device=feats.device).expand(feats.shape[:2])
    for j in reversed(range(feats.shape[2])):  # least significant column first; stable sorts keep earlier work
        key = feats[:, :, j].gather(1, order)
        order = order.gather(1, key.argsort(dim=1, descending=True, stable=True))
    return order


def canonical_simple(conv1, conv2):
    """The canonical form of stacked small blocks conv1 (B, 3, 6, 3, 3), conv2 (B, 6, 3, 3, 3): same functions.

    Rule: rescale_simple (unit-norm hidden filters), then the hidden channels in descending order of the
    L2 norm of conv2[:, :, h] (how strongly the channel writes to the output); exact ties (e.g. dead
    channels) are broken by the channels' weights, conv1[:, h] then conv2[:, :, h], compared
    lexicographically, so the result depends only on the orbit, not on the order the block came in."""
    conv1, conv2 = rescale_simple(conv1, conv2)
    out_w = conv2.transpose(1, 2).flatten(2)  # (B, 3, 54): what each hidden channel writes
    strength = torch.linalg.vector_norm(out_w, dim=2)
    order = strength.argsort(dim=1, descending=True, stable=True)
    ranked = strength.gather(1, order)
    tied = (ranked[:, 1:] == ranked[:, :-1]).any(dim=1)
    if tied.any():  # rare (dead channels): the full lexicographic sort only there, it is 100x slower
        order[tied] = _lexsort_desc(torch.cat([strength[:, :, None], conv1.flatten(2), out_w], dim=2)[tied])
    b = torch.arange(len(conv1), device=conv1.device)[:, None]
    return conv1[b, order], conv2.transpose(1, 2)[b, order].transpose(1, 2)


def best_order_cosine(a, b):
    """Cosine similarity (B,) of stacked small blocks a = (conv1, conv2) and b, both in canonical scale
    (rescale_simple), under the best of the 3! orders of b's hidden channels."""
    a1, a2 = rescale_simple(*a)
    b1, b2 = rescale_simple(*b)
    va = torch.cat([a1.flatten(1), a2.flatten(1)], dim=1)
    cos = [F.cosine_similarity(va, torch.cat([b1[:, o].flatten(1), b2[:, :, o].flatten(1)], dim=1), dim=1)
           for o in map(list, HIDDEN_ORDERS)]
    return torch.stack(cos).max(dim=0).values


# ----------------------------------------------------------------------------------------
# Every small block of net.py (--small_block): how the residual permutation P acts on it, and its own symmetry.

def take(t, dim, p):
    """t (B, ...) with axis dim permuted per sample by p (B, n): t'[b, .., i, ..] = t[b, .., p[b, i], ..]."""
    shape = [len(p)] + [1] * (t.ndim - 1)
    shape[dim] = p.shape[1]
    return t.gather(dim, p.view(shape).expand(*t.shape[:dim], p.shape[1], *t.shape[dim + 1:]))


# target -> {written tensor (targets.KEYS): the axis that the residual channels' permutation P permutes}
RESIDUAL_AXES = {
    'SimpleBlock_NoBn': {'conv1.weight': 2, 'conv2.weight': 1},
    'SimpleBlock': {'conv1.weight': 2, 'conv2.weight': 1, 'bn2.weight': 1, 'bn2.bias': 1},
    'MLPBlock': {'fc1_c.weight': 2, 'fc2_c.weight': 1, 'fc2_c.bias': 1},
    'AttnBlock': {'proj_q.weight': 2, 'proj_k.weight': 2, 'proj_v.weight': 2, 'proj.weight': 1},
}
# target -> groups of {tensor: axis} that one permutation of the block's own hidden channels permutes together
# (the same function): SimpleBlock(_NoBn) its 3 hidden channels, MLPBlock its 12 hidden units; AttnBlock has two,
# the channels of q and k jointly (q.k sums over them) and those of v with proj's columns (proj reads them).
HIDDEN_AXES = {
    'SimpleBlock_NoBn': [{'conv1.weight': 1, 'conv2.weight': 2}],
    'SimpleBlock': [{'conv1.weight': 1, 'conv2.weight': 2, 'bn1.weight': 1, 'bn1.bias': 1, 'bn1.running_mean': 1,
                     'bn1.running_var': 1}],
    'MLPBlock': [{'fc1_c.weight': 1, 'fc1_c.bias': 1, 'fc2_c.weight': 2}],
    'AttnBlock': [{'proj_q.weight': 1, 'proj_k.weight': 1}, {'proj_v.weight': 1, 'proj.weight': 2}],
}


def permute_written(block, tensors, p):
    """A target's written tensors (targets.KEYS order, batched) for networks whose residual channels are permuted
    by p (B, 6), as permute_pairs permutes a SimpleBlock_NoBn's."""
    axes = RESIDUAL_AXES[block]
    return [take(t, axes[k], p) if k in axes else t for k, t in zip(targets.KEYS[block], tensors)]


def permute_hidden(block, state, perms):
    """A stacked small-block state (or its written tensors as a dict) with its own hidden channels permuted,
    perms[g] (B, n) for each group of HIDDEN_AXES[block]: the same functions."""
    state = dict(state)
    for group, p in zip(HIDDEN_AXES[block], perms):
        state.update({k: take(state[k], axis, p) for k, axis in group.items() if k in state})
    return state

"""The small blocks a translator can write: which parameters it writes, and how they become a block again.

A translator writes a block's trainable tensors in a fixed order (KEYS), never its BatchNorm statistics: a
SimpleBlock's BatchNorms are written in eval form, running_mean 0 and running_var 1, so that only weight and bias
carry them. written() reads a block in that form (a trained SimpleBlock's BN statistics folded into its weight and
bias: the same eval-mode function); state_of() makes the full state dict again. Every function takes stacked
tensors (a leading axis of blocks). SimpleBlock_NoBn's written form is its state dict itself, as before.
"""
import math

import torch

import net

KEYS = {
    'SimpleBlock_NoBn': ('conv1.weight', 'conv2.weight'),
    'SimpleBlock': ('conv1.weight', 'conv2.weight', 'bn1.weight', 'bn1.bias', 'bn2.weight', 'bn2.bias'),
    'MLPBlock': ('fc1_c.weight', 'fc1_c.bias', 'fc2_c.weight', 'fc2_c.bias'),
    'AttnBlock': ('proj_q.weight', 'proj_k.weight', 'proj_v.weight', 'proj.weight'),
}
EVAL_VAR = 1.0  # running_var of a written BatchNorm: eval-mode y = weight * x / sqrt(1 + eps) + bias


def check(block):
    """Refuse a name that is not one of net.SMALL_BLOCKS."""
    if block not in net.SMALL_BLOCKS:
        raise ValueError(f'unknown small block {block!r}; one of {", ".join(net.SMALL_BLOCKS)}')
    return block


def written(block, state):
    """The tensors a translator writes for stacked blocks `state` (KEYS order), BatchNorms in eval form."""
    state = dict(state)
    for bn in ('bn1.', 'bn2.') if block == 'SimpleBlock' else ():
        scale = state[bn + 'weight'] / torch.sqrt(state[bn + 'running_var'] + net.BN_EPS)
        state[bn + 'bias'] = state[bn + 'bias'] - state[bn + 'running_mean'] * scale
        state[bn + 'weight'] = bn_weight(scale)
    return [state[k] for k in KEYS[block]]


def bn_weight(scale):
    """The weight of an eval-form BatchNorm (running_var EVAL_VAR) whose eval-mode scale is `scale`."""
    return scale * math.sqrt(EVAL_VAR + net.BN_EPS)


def state_of(block, tensors):
    """The stacked state dict of the written `tensors` (KEYS order), with eval-form BatchNorm statistics."""
    state = dict(zip(KEYS[block], tensors))
    if block == 'SimpleBlock':
        for bn in ('bn1.', 'bn2.'):
            w = state[bn + 'weight']
            state[bn + 'running_mean'] = torch.zeros_like(w)
            state[bn + 'running_var'] = torch.full_like(w, EVAL_VAR)
            state[bn + 'num_batches_tracked'] = torch.zeros(len(w), dtype=torch.long, device=w.device)
    return state


def written_shapes(block):
    """{key: shape} of one block's written tensors."""
    shapes = net.small_shapes(block)
    return {k: shapes[k] for k in KEYS[block]}

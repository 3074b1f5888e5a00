"""The translator: an MLP-Mixer that reads a BasicBlock's two conv weights and writes a SimpleBlock_NoBn's.

Tokens are the (out, in) channel pairs of the conv weights, each token's channels the 9 taps
of its 3x3 kernel: 36 + 36 = 72 tokens in, 18 + 18 = 36 tokens out. Parameter names follow
the original implementation, so its state dicts load with strict=True.
"""
from collections import OrderedDict

import torch
import torch.nn as nn

import net
import rules
import targets
from net import BASIC_SHAPES, SIMPLE_SHAPES

KERNEL = 9  # taps of a 3x3 kernel: a token's width before map1 and after map2
IN_SHAPES = (BASIC_SHAPES['conv1.weight'], BASIC_SHAPES['conv2.weight'])
OUT_SHAPES = (SIMPLE_SHAPES['conv1.weight'], SIMPLE_SHAPES['conv2.weight'])
NUM_TOKENS = sum(s[0] * s[1] for s in IN_SHAPES)  # 72: S_dim must equal this
NUM_OUT_TOKENS = sum(s[0] * s[1] for s in OUT_SHAPES)  # 36
MLP_HIDDEN = net.small_shapes('MLPBlock')['fc1_c.weight'][0]  # 12
OUT_TOKENS = {'SimpleBlock_NoBn': (NUM_OUT_TOKENS, KERNEL),
              'SimpleBlock': (NUM_OUT_TOKENS + net.HIDDEN + net.PLANES, KERNEL),
              'MLPBlock': (MLP_HIDDEN + 1, 2 * net.PLANES + 1), 'AttnBlock': (2 * net.PLANES, 2 * net.PLANES)}


def split_tokens(target, x):
    """The head's tokens x (B, *OUT_TOKENS[target]) as the target's written tensors (targets.KEYS order)."""
    b, n1, p = x.shape[0], OUT_SHAPES[0][0] * OUT_SHAPES[0][1], net.PLANES
    if target in ('SimpleBlock_NoBn', 'SimpleBlock'):
        convs = [x[:, :n1].reshape(b, *OUT_SHAPES[0]), x[:, n1:NUM_OUT_TOKENS].reshape(b, *OUT_SHAPES[1])]
        if target == 'SimpleBlock_NoBn':
            return convs
        bn1, bn2 = x[:, NUM_OUT_TOKENS:NUM_OUT_TOKENS + net.HIDDEN], x[:, NUM_OUT_TOKENS + net.HIDDEN:]
        return convs + [bn1[..., 0], bn1[..., 1], bn2[..., 0], bn2[..., 1]]
    if target == 'MLPBlock':
        units = x[:, :MLP_HIDDEN]
        return [units[..., :p], units[..., p], units[..., p + 1:].transpose(1, 2), x[:, MLP_HIDDEN, :p]]
    qk, vo = x[:, :p], x[:, p:]  # AttnBlock
    return [t.reshape(b, p, p, 1, 1) for t in (qk[..., :p], qk[..., p:], vo[..., :p], vo[..., p:].transpose(1, 2))]


class MixingMLP(nn.Module):
    """Pre-LayerNorm MLP with a residual, mixing along the tokens or along the channels."""

    def __init__(self, norm_dim, dim, hidden_dim, dropout=0., token_mixing=False):
        super().__init__()
        self.token_mixing = token_mixing
        self.layernorm = nn.LayerNorm(norm_dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.gelu = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        y = self.layernorm(x)  # LayerNorm is always over channels, even for token mixing
        if self.token_mixing:
            y = y.transpose(1, 2)
        y = self.dropout(self.fc2(self.dropout(self.gelu(self.fc1(y)))))
        if self.token_mixing:
            y = y.transpose(1, 2)
        return x + y


class MLPMixer(nn.Module):
    """[conv1 (B, 6, 6, 3, 3), conv2 (B, 6, 6, 3, 3)] -> (conv1 (B, 3, 6, 3, 3), conv2 (B, 6, 3, 3, 3)), or the
    written tensors of another target (a name of net.SMALL_BLOCKS; not part of config)."""
    in_width = KERNEL  # values per input token

    def __init__(self, num_layers=24, S_dim=72, C_dim=128, hidden_S_dim=256, hidden_C_dim=512, dropout=0.,
                 target=net.DEFAULT_SMALL):
        super().__init__()
        self.config = dict(num_layers=num_layers, S_dim=S_dim, C_dim=C_dim, hidden_S_dim=hidden_S_dim,
                           hidden_C_dim=hidden_C_dim, dropout=dropout)
        self.target = targets.check(target)
        out_tokens, out_width = OUT_TOKENS[target]
        if C_dim != KERNEL or self.in_width != KERNEL:  # with C_dim == 9 the taps are the channels
            self.map1 = nn.Linear(self.in_width, C_dim)
        if C_dim != out_width:
            self.map2 = nn.Linear(C_dim, out_width)
        self.layers = nn.Sequential(OrderedDict(
            (f'mixer_layer_{i}', nn.Sequential(
                MixingMLP(C_dim, S_dim, hidden_S_dim, dropout, token_mixing=True),
                MixingMLP(C_dim, C_dim, hidden_C_dim, dropout)))
            for i in range(num_layers)))
        self.layernorm = nn.LayerNorm(C_dim)
        self.fc1 = nn.Linear(S_dim, hidden_S_dim)
        self.gelu = nn.GELU()
        self.fc2 = nn.Linear(hidden_S_dim, out_tokens)

    def compile_blocks(self):
        """torch.compile every mixing MLP in place (train.py --compile blocks): the blocks share their code, so
        one compilation serves all of them, where compiling the whole model traces every layer."""
        for block in self.layers.modules():
            if isinstance(block, MixingMLP):
                block.compile()

    def forward(self, weights):
        conv1, conv2 = weights
        # (B, o, i, 3, 3) -> (B, o*i, 9), tokens in (o, i) row-major order
        return self.mix(torch.cat([conv1.reshape(len(conv1), -1, KERNEL), conv2.reshape(len(conv2), -1, KERNEL)], dim=1))

    def mix(self, x):
        """Input tokens (B, 72, in_width) -> the small block's (conv1, conv2), or the target's written tensors."""
        if hasattr(self, 'map1'):
            x = self.map1(x)
        x = self.layers(x)
        x = self.fc2(self.gelu(self.fc1(self.layernorm(x).transpose(1, 2)))).transpose(1, 2)  # (B, 36, C)
        if hasattr(self, 'map2'):
            x = self.map2(x)
        return tuple(split_tokens(self.target, x))


class FunctionTranslator(MLPMixer):
    """The translator of train.py --inputs / --output (research): reads [conv1, conv2, *rules.bn_inputs] (the
    BasicBlock's BatchNorms), same parameter names as MLPMixer.

    inputs 'folded': the tokens are those of the BN-folded convs (rules.scale_convs), each token with one more value,
    the shift of its output channel (conv1 token (o, i): shift1[o]; conv2 token (o, i): shift2[o]): 72 tokens of 10
    values, so only map1 changes (9 -> 10 inputs). 'conv': the raw convs' tokens, as MLPMixer.
    output 'residual' / 'refit': the Mixer writes a delta added to a training-free rule applied to the same block,
    rules.residual_base (SimpleBlock_NoBn: Weight selection (folded) / (folded, refit)); its last layer starts at
    zero, so the untrained translator is that rule exactly. 'direct': the Mixer writes the block, as MLPMixer."""

    def __init__(self, inputs='conv', output='direct', **config):
        self.in_width = KERNEL + (inputs == 'folded')
        super().__init__(**config)
        self.kt = {'inputs': inputs, 'output': output}
        if output != 'direct' and output not in rules.RESIDUAL_OUTPUTS[self.target]:
            raise ValueError(f'--output {output}: no training-free rule of {self.target} to add a delta to')
        if output != 'direct':
            last = self.map2 if hasattr(self, 'map2') else self.fc2
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, weights):
        conv1, conv2, scale1, shift1, scale2, shift2, *bn1 = weights  # bn1: gamma1, beta1, for the refit rule
        f1, f2 = rules.scale_convs(conv1, conv2, scale1, scale2)
        if self.kt['inputs'] == 'folded':
            t1 = torch.cat([f1.flatten(3), shift1[:, :, None, None].expand(*f1.shape[:3], 1)], dim=3)
            t2 = torch.cat([f2.flatten(3), shift2[:, :, None, None].expand(*f2.shape[:3], 1)], dim=3)
            out = self.mix(torch.cat([t1.flatten(1, 2), t2.flatten(1, 2)], dim=1))
        else:
            out = super().forward([conv1, conv2])
        if self.kt['output'] != 'direct':
            base = self.base(f1, shift1, f2, shift2, *bn1)
            out = tuple(base[k] + o for k, o in zip(targets.KEYS[self.target], out))
        return out

    def base(self, conv1, shift1, conv2, shift2, gamma1=None, beta1=None):
        """The rule a residual output adds its delta to, from folded convs (rules.fold_bn) and bn1's affine."""
        return rules.residual_base(self.target, self.kt['output'], conv1, shift1, conv2, shift2, gamma1, beta1)


DEFAULT_KT = {'inputs': 'conv', 'output': 'direct'}


def kt_of(inputs, output):
    """train.py's --inputs / --output as build_translator's kt (None for the original translator)."""
    kt = {'inputs': inputs, 'output': output}
    return None if kt == DEFAULT_KT else kt


def build_translator(config, kt=None, target=net.DEFAULT_SMALL):
    """MLPMixer(**config) writing `target` blocks, or a FunctionTranslator when kt ({'inputs', 'output'}) is not the
    default."""
    if kt is None or kt == DEFAULT_KT:
        return MLPMixer(**config, target=target)
    return FunctionTranslator(**kt, **config, target=target)


def needs_bn(model):
    """Whether the translator reads the BasicBlock's BatchNorm inputs beside its convs."""
    return isinstance(model, FunctionTranslator)


def mixer_flops(num_layers=24, S_dim=72, C_dim=128, hidden_S_dim=256, hidden_C_dim=512, dropout=0.,
                batch=1, backward=False):
    """Matmul FLOPs of MLPMixer(same arguments) on `batch` blocks: 2*M*N*K per Linear (M rows, K in, N out),
    summed over every Linear (map1/map2, the mixing MLPs, the head); with backward=True the training
    step's forward + backward, counted as 3x the forward. LayerNorm, GELU, adds and biases are not
    counted (a few percent). Takes MLPMixer's arguments, so mixer_flops(**model.config, batch=b) works."""
    def linear(rows, k, n):
        return 2 * rows * k * n
    f = 0
    if C_dim != KERNEL:
        f += linear(S_dim, KERNEL, C_dim) + linear(NUM_OUT_TOKENS, C_dim, KERNEL)  # map1, map2
    token = linear(C_dim, S_dim, hidden_S_dim) + linear(C_dim, hidden_S_dim, S_dim)  # along tokens, per channel
    channel = linear(S_dim, C_dim, hidden_C_dim) + linear(S_dim, hidden_C_dim, C_dim)  # along channels, per token
    f += num_layers * (token + channel)
    f += linear(C_dim, S_dim, hidden_S_dim) + linear(C_dim, hidden_S_dim, NUM_OUT_TOKENS)  # head fc1, fc2
    return f * batch * (3 if backward else 1)


def config_from_state_dict(sd):
    """The MLPMixer keyword arguments a state dict's shapes imply (dropout cannot be seen: 0; without
    layers hidden_C_dim is irrelevant: 512)."""
    layers = {k.split('.')[1] for k in sd if k.startswith('layers.mixer_layer_')}
    return dict(num_layers=len(layers), S_dim=sd['fc1.weight'].shape[1], C_dim=sd['layernorm.weight'].shape[0],
                hidden_S_dim=sd['fc1.weight'].shape[0],
                hidden_C_dim=sd['layers.mixer_layer_0.1.fc1.weight'].shape[0] if layers else 512, dropout=0.)

"""The MNIST networks of Knowledge Translation.

Two halves:
  * the original blocks (same class names, arguments and parameter names, so the authors'
    state dicts load with strict=True), and builders for the large and the small network;
  * "stacked" functional forms that run K independent networks side by side with grouped
    convolutions. A stacked state is a dict with the original state-dict keys, each tensor
    carrying a leading K axis. Generation trains K networks at once with them, train.py
    scores all val networks at once, and the functional loss runs translated blocks.
"""
import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# The block shapes every other file uses (the translator, the datasets, the caches).
PLANES = 6  # residual channels: Begin's output and the BasicBlock's width
HIDDEN = PLANES // 2  # SimpleBlock_NoBn's hidden channels
FEATURE = (PLANES, 14, 14)  # Begin's output for one 28x28 image
FEATURE_NUMEL = PLANES * 14 * 14
CPU_CHUNK_BYTES = 8 << 20  # Begin's activations per chunk on a CPU: 2.3x faster at K = 100 (bench_begin_cache.py)
BASIC_SHAPES = {'conv1.weight': (PLANES, PLANES, 3, 3), 'conv2.weight': (PLANES, PLANES, 3, 3),
                **{f'bn{i}.{n}': (PLANES,) for i in (1, 2) for n in ('weight', 'bias', 'running_mean', 'running_var')}}
SIMPLE_SHAPES = {'conv1.weight': (HIDDEN, PLANES, 3, 3), 'conv2.weight': (PLANES, HIDDEN, 3, 3)}
HIDDEN_ORDERS = tuple(itertools.permutations(range(HIDDEN)))  # the 3! orders of the small block's hidden channels


def conv3x3(in_planes, out_planes, stride=1):
    """3x3 convolution with padding 1 and no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    """1x1 convolution with no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BeginBlock(nn.Module):
    """Stem: 1x28x28 image -> inplanes x 14 x 14."""

    def __init__(self, inplanes=6):
        super().__init__()
        self.conv = nn.Conv2d(1, inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x):
        return self.maxpool(self.relu(self.bn(self.conv(x))))


class BasicBlock(nn.Module):
    """The large block: ResNet basic block, inplanes -> planes -> planes, with BatchNorm."""

    def __init__(self, inplanes=6, planes=6):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class SimpleBlock(nn.Module):
    """A half-width basic block (hidden width planes // 2), with BatchNorm."""

    def __init__(self, inplanes=6, planes=6):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes // 2)
        self.bn1 = nn.BatchNorm2d(planes // 2)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes // 2, planes)
        self.bn2 = nn.BatchNorm2d(planes)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class SimpleBlock_NoBn(nn.Module):
    """The small block KT translates into: 3x3 convs inplanes -> planes // 2 -> planes, no BN."""

    def __init__(self, inplanes=6, planes=6):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes // 2)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes // 2, planes)

    def forward(self, x):
        out = self.relu(self.conv1(x))
        out = self.conv2(out)
        return self.relu(out + x)


class MLPBlock(nn.Module):
    """Per-position channel MLP c -> c_dim -> c with a residual (hw and hw_dim kept for API)."""

    def __init__(self, c=6, hw=196, c_dim=12, hw_dim=14):
        super().__init__()
        self.fc1_c = nn.Linear(c, c_dim)
        self.fc2_c = nn.Linear(c_dim, c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        t = self.fc2_c(self.relu(self.fc1_c(t)))
        out = t.transpose(1, 2).reshape(b, c, h, w)
        return self.relu(out + x)


class AttnBlock(nn.Module):
    """Single-head self-attention over spatial positions with 1x1-conv projections."""

    def __init__(self, in_ch=6):
        super().__init__()
        self.proj_q = nn.Conv2d(in_ch, in_ch, 1, bias=False)
        self.proj_k = nn.Conv2d(in_ch, in_ch, 1, bias=False)
        self.proj_v = nn.Conv2d(in_ch, in_ch, 1, bias=False)
        self.proj = nn.Conv2d(in_ch, in_ch, 1, bias=False)

    def forward(self, x):
        b, c, h, w = x.shape
        q = self.proj_q(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        k = self.proj_k(x).flatten(2)  # (B, C, HW)
        v = self.proj_v(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        attn = torch.softmax(torch.bmm(q, k) * (c ** -0.5), dim=-1)
        out = torch.bmm(attn, v).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj(out)


class LastBlock(nn.Module):
    """Head: 1x1 conv stride 2 -> BN -> ReLU -> flatten -> Linear to 10 classes."""

    def __init__(self, inplanes=6, planes=12, stride=2):
        super().__init__()
        self.downsample = conv1x1(inplanes, planes, stride)
        self.bn = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(planes * 7 * 7, 10)

    def forward(self, x):
        x = self.relu(self.bn(self.downsample(x)))
        return self.fc(torch.flatten(x, 1))


def large_network():
    """Begin -> BasicBlock -> Last, freshly initialised."""
    return nn.Sequential(BeginBlock(), BasicBlock(), LastBlock())


def small_network(begin, last):
    """The given Begin and Last around a fresh SimpleBlock_NoBn."""
    return nn.Sequential(begin, SimpleBlock_NoBn(), last)


# ----------------------------------------------------------------------------------------
# Stacked networks: K independent copies run side by side with grouped convolutions.

BLOCKS = {'begin': BeginBlock, 'basic': BasicBlock, 'simple': SimpleBlock_NoBn, 'last': LastBlock}
BN_MOMENTUM = 0.1  # nn.BatchNorm2d's default, which the original used
BN_EPS = 1e-5  # nn.BatchNorm2d's default


def stack_states(state_dicts):
    """Stack a list of state dicts of one block into one dict with a leading K axis."""
    return {k: torch.stack([sd[k] for sd in state_dicts]) for k in state_dicts[0]}


def unstack_state(state, k):
    """The plain state dict of network k of a stacked state."""
    return {name: t[k].clone() for name, t in state.items()}


def fresh_states(block, seeds, device='cpu'):
    """Stacked default-initialised states of `block`, network j built under torch seed seeds[j]."""
    sds = []
    for seed in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            sds.append(BLOCKS[block]().state_dict())
    return {k: v.to(device) for k, v in stack_states(sds).items()}


def _conv(x, w, k, conv_kernel=None, **kw):
    """Grouped conv: x (B, K*Cin, H, W), w (K, Cout, Cin, kh, kw) -> (B, K*Cout, H', W'); conv_kernel(x, w, groups),
    when given, runs the 3x3 ones (stride 1, padding 1) instead of torch's operator (speed/triton_conv.py's)."""
    if conv_kernel is not None and w.shape[-1] == 3 and kw == {'padding': 1}:
        return conv_kernel(x, w.reshape(-1, *w.shape[2:]), k)
    return F.conv2d(x, w.reshape(-1, *w.shape[2:]), groups=k, **kw)


def _bn(x, s, prefix, training):
    """BatchNorm over K*C channels; in training mode updates the stacked running stats in place."""
    if training:
        s[prefix + 'num_batches_tracked'] += 1
    return F.batch_norm(x, s[prefix + 'running_mean'].view(-1), s[prefix + 'running_var'].view(-1),
                        s[prefix + 'weight'].reshape(-1), s[prefix + 'bias'].reshape(-1),
                        training, BN_MOMENTUM, BN_EPS)


def begin_forward(x, s, training=False, conv_kernel=None):
    """x (B, K, 28, 28), one image per network, or (B, 1, 28, 28) shared by all -> (B, K*6, 14, 14)."""
    k = s['conv.weight'].shape[0]
    if x.shape[1] == 1 and k > 1:  # same images for every network: one ordinary conv
        x = F.conv2d(x, s['conv.weight'].reshape(-1, 1, 3, 3), padding=1)
    else:
        x = _conv(x, s['conv.weight'], k, conv_kernel, padding=1)
    x = F.relu(_bn(x, s, 'bn.', training))
    return F.max_pool2d(x, 3, 2, 1)


def bn_inputs(basic):
    """A BasicBlock's eval-mode BatchNorms as [scale1, shift1, scale2, shift2, gamma1, beta1] (stacked or one
    block): scale = gamma / sqrt(running_var + eps) and shift = beta - running_mean x scale per channel; gamma1 and
    beta1, bn1's own affine, are the std and mean of the hidden pre-activations under BN's model (refit_hidden)."""
    out = []
    for i in (1, 2):
        scale = basic[f'bn{i}.weight'] / torch.sqrt(basic[f'bn{i}.running_var'] + BN_EPS)
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
    return importance(conv1, conv2).topk(HIDDEN, dim=1).indices.sort(dim=1).values


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
            'conv2.weight': v.reshape(*c2.shape[:2], HIDDEN, *c2.shape[3:]).to(dtype)}


def permute_bn(bn, p, q):
    """bn_inputs [scale1, shift1, scale2, shift2, gamma1, beta1] (B, 6) each under per-sample permutations p
    (residual channels, bn2) and q (hidden channels, bn1), as net.permute_pairs permutes the convs."""
    return [t.gather(1, p if i in (2, 3) else q) for i, t in enumerate(bn)]


def basic_forward(x, s, training=False, conv_kernel=None):
    """Stacked BasicBlock on (B, K*6, H, W)."""
    k = s['conv1.weight'].shape[0]
    out = F.relu(_bn(_conv(x, s['conv1.weight'], k, conv_kernel, padding=1), s, 'bn1.', training))
    out = _bn(_conv(out, s['conv2.weight'], k, conv_kernel, padding=1), s, 'bn2.', training)
    return F.relu(out + x)


def simple_forward(x, s, training=False, conv_kernel=None):
    """Stacked SimpleBlock_NoBn on (B, K*6, H, W); s needs only conv1.weight and conv2.weight."""
    k = s['conv1.weight'].shape[0]
    out = F.relu(_conv(x, s['conv1.weight'], k, conv_kernel, padding=1))
    return F.relu(_conv(out, s['conv2.weight'], k, conv_kernel, padding=1) + x)


def last_forward(x, s, training=False):
    """Stacked LastBlock on (B, K*6, 14, 14) -> logits (K, B, 10)."""
    return last_head(_conv(x, s['downsample.weight'], s['downsample.weight'].shape[0], stride=2), s, training)


def last_head(x, s, training=False):
    """The stacked LastBlock after its 1x1 convolution: BatchNorm, ReLU, fc on (B, K*12, 7, 7) -> logits (K, B, 10)."""
    k = s['fc.weight'].shape[0]
    x = F.relu(_bn(x, s, 'bn.', training))
    x = x.reshape(x.shape[0], k, -1).transpose(0, 1)  # (K, B, 588)
    return torch.baddbmm(s['fc.bias'].unsqueeze(1), x, s['fc.weight'].transpose(1, 2))


MIDDLE_FORWARD = {'basic': basic_forward, 'simple': simple_forward}


def stacked_logits(x, begin, middle, last, middle_kind):
    """Eval-mode logits (K, B, 10) of K networks Begin -> middle -> Last on images x."""
    h = begin_forward(x, begin)
    h = MIDDLE_FORWARD[middle_kind](h, middle)
    return last_forward(h, last)


@torch.no_grad()
def begin_outputs(images, begin, chunk_images=1000, out=None):
    """Eval-mode Begin output of K networks on the same images (N, 28, 28): (K, N, 6, 14, 14)."""
    k = begin['conv.weight'].shape[0]
    if images.device.type == 'cpu':  # a chunk's K*6 channels of 28x28 activations stay in the CPU's caches
        chunk_images = max(1, min(chunk_images, CPU_CHUNK_BYTES // (k * PLANES * 28 * 28 * 4)))
    if out is None:
        out = torch.empty(k, len(images), *FEATURE, device=images.device)
    for i0 in range(0, len(images), chunk_images):
        x = to_float(images[i0:i0 + chunk_images]).unsqueeze(1)
        out[:, i0:i0 + chunk_images] = begin_forward(x, begin).view(len(x), k, *FEATURE).transpose(0, 1)
    return out


@torch.no_grad()
def stacked_accuracy(images, labels, begin, middle, last, middle_kind, chunk_images=1000, chunk_nets=None,
                     begin_out=None):
    """Test accuracy in % (K,) of K eval-mode networks on the same images (N, 28, 28) uint8 or float.

    begin_out: the networks' begin_outputs(images, begin), when already computed (it is the same for
    every middle block scored inside the same networks)."""
    k = begin['conv.weight'].shape[0]
    chunk_nets = chunk_nets or k
    correct = torch.zeros(k, dtype=torch.long, device=labels.device)
    for n0 in range(0, k, chunk_nets):
        sl = slice(n0, n0 + chunk_nets)
        b, m, l = ({n: t[sl] for n, t in d.items()} for d in (begin, middle, last))
        for i0 in range(0, len(images), chunk_images):
            if begin_out is None:
                h = begin_forward(to_float(images[i0:i0 + chunk_images]).unsqueeze(1), b)
            else:
                h = begin_out[sl, i0:i0 + chunk_images].transpose(0, 1).flatten(1, 2)
            pred = last_forward(MIDDLE_FORWARD[middle_kind](h, m), l).argmax(-1)
            correct[sl] += (pred == labels[i0:i0 + chunk_images]).sum(1)
    return correct.double() * 100.0 / len(images)


def to_float(images):
    """uint8 pixels -> float in [0, 1] (torchvision's ToTensor, no normalisation)."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images


def num_params(module):
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())



# ----------------------------------------------------------------------------------------
# Channel symmetries. Begin -> BasicBlock -> Last computes the same function after any
# permutation P of the 6 residual channels and any permutation Q of BasicBlock's 6 hidden
# channels; a SimpleBlock_NoBn in the middle follows P on its outer channels.

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


# SimpleBlock_NoBn has symmetries of its own: it computes the same function after multiplying hidden
# filter conv1[h] by any c > 0 and dividing conv2[:, h] by c (ReLU is positively homogeneous), and
# after any permutation of its 3 hidden channels. A weight-space target is one arbitrary member of
# that orbit; canonical_simple picks a fixed one, best_order_cosine compares orbits.

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

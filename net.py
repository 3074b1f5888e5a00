"""The MNIST networks of Knowledge Translation.

Two halves:
  * the original blocks (same class names, arguments and parameter names, so the authors'
    state dicts load with strict=True), and builders for the large and the small network;
  * "stacked" functional forms that run K independent networks side by side with grouped
    convolutions. A stacked state is a dict with the original state-dict keys, each tensor
    carrying a leading K axis. Generation trains K networks at once with them, train.py
    scores all val networks at once, and the functional loss runs translated blocks.
"""
import functools

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
DEFAULT_SMALL = 'SimpleBlock_NoBn'  # the small block of the original's scripts


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


SMALL_BLOCKS = {'SimpleBlock_NoBn': SimpleBlock_NoBn, 'SimpleBlock': SimpleBlock, 'MLPBlock': MLPBlock,
                'AttnBlock': AttnBlock}  # the small blocks of the original's net.py that fit between Begin and Last


def small_network(begin, last, small_block=DEFAULT_SMALL):
    """The given Begin and Last around a fresh small block (a name of SMALL_BLOCKS)."""
    return nn.Sequential(begin, SMALL_BLOCKS[small_block](), last)


@functools.cache
def _small_shapes(small_block):
    """small_shapes, built once; under fork_rng, as building a module draws its initial weights."""
    with torch.random.fork_rng(devices=[]):
        return tuple((k, tuple(t.shape)) for k, t in SMALL_BLOCKS[small_block]().state_dict().items())


def small_shapes(small_block):
    """{state-dict key: shape} of a small block (its buffers included); draws nothing from torch's generator."""
    return dict(_small_shapes(small_block))


def small_block_of(state):
    """The SMALL_BLOCKS name whose state-dict keys `state` has (stacked or not); None when none fits."""
    for name in SMALL_BLOCKS:
        if set(state) == set(small_shapes(name)):
            return name
    return None


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
    """Stacked default-initialised states of `block` (a BLOCKS key or a SMALL_BLOCKS name), network j built under
    torch seed seeds[j]."""
    sds = []
    for seed in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            sds.append({**BLOCKS, **SMALL_BLOCKS}[block]().state_dict())
    return {k: v.to(device) for k, v in stack_states(sds).items()}


def _conv(x, w, k, **kw):
    """Grouped conv: x (B, K*Cin, H, W), w (K, Cout, Cin, kh, kw) -> (B, K*Cout, H', W')."""
    return F.conv2d(x, w.reshape(-1, *w.shape[2:]), groups=k, **kw)


def batch_norm(x, s, prefix, training):
    """BatchNorm over K*C channels; in training mode updates the stacked running stats in place."""
    if training:
        s[prefix + 'num_batches_tracked'] += 1
    return F.batch_norm(x, s[prefix + 'running_mean'].view(-1), s[prefix + 'running_var'].view(-1),
                        s[prefix + 'weight'].reshape(-1), s[prefix + 'bias'].reshape(-1),
                        training, BN_MOMENTUM, BN_EPS)


def begin_forward(x, s, training=False):
    """x (B, K, 28, 28), one image per network, or (B, 1, 28, 28) shared by all -> (B, K*6, 14, 14)."""
    k = s['conv.weight'].shape[0]
    if x.shape[1] == 1 and k > 1:  # same images for every network: one ordinary conv
        x = F.conv2d(x, s['conv.weight'].reshape(-1, 1, 3, 3), padding=1)
    else:
        x = _conv(x, s['conv.weight'], k, padding=1)
    x = F.relu(batch_norm(x, s, 'bn.', training))
    return F.max_pool2d(x, 3, 2, 1)


def basic_forward(x, s, training=False):
    """Stacked BasicBlock on (B, K*6, H, W)."""
    k = s['conv1.weight'].shape[0]
    out = F.relu(batch_norm(_conv(x, s['conv1.weight'], k, padding=1), s, 'bn1.', training))
    out = batch_norm(_conv(out, s['conv2.weight'], k, padding=1), s, 'bn2.', training)
    return F.relu(out + x)


def simple_forward(x, s, training=False):
    """Stacked SimpleBlock_NoBn on (B, K*6, H, W); s needs only conv1.weight and conv2.weight."""
    k = s['conv1.weight'].shape[0]
    out = F.relu(_conv(x, s['conv1.weight'], k, padding=1))
    return F.relu(_conv(out, s['conv2.weight'], k, padding=1) + x)


def simple_bn_forward(x, s, training=False):
    """Stacked SimpleBlock (SimpleBlock_NoBn with a BatchNorm after each conv) on (B, K*6, H, W)."""
    k = s['conv1.weight'].shape[0]
    out = F.relu(batch_norm(_conv(x, s['conv1.weight'], k, padding=1), s, 'bn1.', training))
    return F.relu(batch_norm(_conv(out, s['conv2.weight'], k, padding=1), s, 'bn2.', training) + x)


def _linear(x, w, b, k):
    """Per-position Linear of K networks as a grouped 1x1 conv: x (B, K*Cin, H, W), w (K, Cout, Cin), b (K, Cout)."""
    return F.conv2d(x, w.reshape(-1, w.shape[2], 1, 1), None if b is None else b.reshape(-1), groups=k)


def mlp_forward(x, s, training=False):
    """Stacked MLPBlock on (B, K*6, H, W): the channel MLP at every position, as grouped 1x1 convolutions."""
    k = s['fc1_c.weight'].shape[0]
    out = _linear(F.relu(_linear(x, s['fc1_c.weight'], s['fc1_c.bias'], k)), s['fc2_c.weight'], s['fc2_c.bias'], k)
    return F.relu(out + x)


def attn_forward(x, s, training=False):
    """Stacked AttnBlock on (B, K*C, H, W): each network's single-head attention over its H*W positions."""
    k, c = s['proj_q.weight'].shape[:2]
    b, _, h, w = x.shape

    def proj(name, t):  # (B, K*C, H, W) -> (B, K, C, HW)
        return _linear(t, s[name].flatten(2), None, k).view(b, k, c, h * w)
    q, key, v = (proj(n, x) for n in ('proj_q.weight', 'proj_k.weight', 'proj_v.weight'))
    attn = torch.softmax(q.transpose(2, 3) @ key * (c ** -0.5), dim=-1)  # (B, K, HW, HW)
    out = (v @ attn.transpose(2, 3)).reshape(b, k * c, h, w)  # out[:, :, n] = sum_m attn[n, m] v[:, m]
    return x + _linear(out, s['proj.weight'].flatten(2), None, k)


def identity_forward(x, s=None, training=False):
    """No middle block at all (the block skipped): Begin's output goes straight to Last."""
    return x


SMALL_FORWARD = {'SimpleBlock_NoBn': simple_forward, 'SimpleBlock': simple_bn_forward, 'MLPBlock': mlp_forward,
                 'AttnBlock': attn_forward}


def small_forward(x, s, training=False):
    """Stacked small block of any SMALL_BLOCKS kind, told apart by its state's keys (SimpleBlock_NoBn's: the
    two convs)."""
    if 'conv1.weight' in s and 'bn1.weight' not in s:  # the original pair's block: no key lookup on its hot path
        return simple_forward(x, s, training)
    kind = small_block_of(s)
    if kind is None:
        raise ValueError(f'not the state of a small block: keys {sorted(s)}')
    return SMALL_FORWARD[kind](x, s, training)


def last_forward(x, s, training=False):
    """Stacked LastBlock on (B, K*6, 14, 14) -> logits (K, B, 10)."""
    return last_head(_conv(x, s['downsample.weight'], s['downsample.weight'].shape[0], stride=2), s, training)


def last_head(x, s, training=False):
    """The stacked LastBlock after its 1x1 convolution: BatchNorm, ReLU, fc on (B, K*12, 7, 7) -> logits (K, B, 10)."""
    k = s['fc.weight'].shape[0]
    x = F.relu(batch_norm(x, s, 'bn.', training))
    x = x.reshape(x.shape[0], k, -1).transpose(0, 1)  # (K, B, 588)
    return torch.baddbmm(s['fc.bias'].unsqueeze(1), x, s['fc.weight'].transpose(1, 2))


MIDDLE_FORWARD = {'basic': basic_forward, 'simple': small_forward, 'identity': identity_forward}


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

"""triton_conv's kernels against torch: the convolutions against F.conv2d (forward, input and weight gradients),
the fused Begin block against net.begin_forward, the fused small step against autograd, generation with each
Triton flag, and every kernel compiled for a GPU.

They run on the CPU in Triton's interpreter (this file sets TRITON_INTERPRET=1 before triton is imported), or
compiled on a CUDA GPU with TRITON_INTERPRET=0 (speed/gpu_check.sh; the generation tests, which compare
with the plain path on the CPU, are then skipped). Skipped where triton is not installed (it is not a
dependency: it comes with CUDA builds of torch; `pip install triton` adds it on a CPU machine)."""
import os
import re
import subprocess
import sys

# Triton reads TRITON_INTERPRET when first imported: the kernels run in its interpreter on a CPU unless it is set
# (speed/gpu_check.sh sets 0)
os.environ.setdefault('TRITON_INTERPRET', '1')

import numpy
import pytest
import torch
import torch.nn.functional as F

SPEED = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, SPEED)
import construct  # noqa: E402
import construct_train  # noqa: E402
import generate  # noqa: E402  (speed/generate.py)
import generation  # noqa: E402
import mnist  # noqa: E402
import net  # noqa: E402

triton = pytest.importorskip('triton')


def _minor(version):
    """(major, minor) of a version string such as '3.6.0'."""
    return tuple(int(part) for part in version.split('.')[:2])


def assert_close(got, ref, atol, rtol, what):
    """torch.testing.assert_close with what prefixed to its message (msg=what alone would hide the mismatch)."""
    torch.testing.assert_close(got, ref, atol=atol, rtol=rtol, msg=lambda message: f'{what}: {message}')


DEVICE = 'cpu' if os.environ.get('TRITON_INTERPRET') == '1' else 'cuda'  # where the kernels run


@pytest.fixture(scope='module')
def triton_conv():
    """triton_conv, its kernels interpreted on the CPU or compiled for the GPU (DEVICE)."""
    if DEVICE == 'cuda' and not torch.cuda.is_available():
        pytest.skip('TRITON_INTERPRET is not 1 and there is no CUDA GPU: the kernels cannot run')
    if DEVICE == 'cpu' and _minor(triton.__version__) < (3, 7) and _minor(numpy.__version__) >= (2, 4):
        # seen with triton 3.6.0 and numpy 2.4.6: every loop of run-time length raises (triton-lang/triton#9171,
        # fixed in triton 3.7)
        pytest.skip(f'triton {triton.__version__}\'s interpreter fails under numpy {numpy.__version__}: '
                    'pip install "numpy<2.4" (or triton>=3.7) to run these tests on the CPU')
    import triton_conv
    return triton_conv


@pytest.fixture
def interpreted():
    """Only in Triton's interpreter: the test compares with the plain path on the CPU."""
    if DEVICE != 'cpu':
        pytest.skip('compares with the plain path on the CPU: runs in Triton\'s interpreter only')


# (images, networks, channels in, channels out, side): every 3x3 convolution of generation
SHAPES = [(3, 2, 1, 6, 28), (3, 2, 6, 6, 14), (2, 3, 6, 3, 14), (2, 3, 3, 6, 14)]


@pytest.mark.parametrize('n, k, cin, cout, side', SHAPES)
def test_forward_and_gradients_equal_conv2d(triton_conv, n, k, cin, cout, side):
    gen = torch.Generator().manual_seed(cin * 10 + cout)
    x = torch.randn(n, k * cin, side, side, generator=gen)
    w = torch.randn(k * cout, cin, 3, 3, generator=gen)
    dy = torch.randn(n, k * cout, side, side, generator=gen)
    results = []
    for conv, dtype, device in ((lambda a, b: F.conv2d(a, b, padding=1, groups=k), torch.float64, 'cpu'),
                                (lambda a, b: triton_conv.grouped_conv3x3(a, b, k), torch.float32, DEVICE)):
        a, b = (t.to(device, dtype, copy=True).requires_grad_() for t in (x, w))
        y = conv(a, b)
        y.backward(dy.to(device, dtype))
        results.append([t.cpu().float() for t in (y.detach(), a.grad, b.grad)])
    for name, ref, got in zip(('output', 'input gradient', 'weight gradient'), *results):
        assert_close(got, ref, 1e-4, 1e-5, name)


def test_float32_only(triton_conv):
    with pytest.raises(TypeError, match='float32 only'):
        triton_conv.grouped_conv3x3(torch.zeros(1, 6, 14, 14, dtype=torch.bfloat16, device=DEVICE),
                                    torch.zeros(6, 6, 3, 3, device=DEVICE), 1)


def begin_state(k, seed):
    """A stacked Begin state whose BatchNorm is not the identity, in float64."""
    gen = torch.Generator().manual_seed(seed)
    s = net.fresh_states('begin', range(k))
    for name in ('conv.weight', 'bn.weight', 'bn.bias', 'bn.running_mean'):
        s[name] = s[name] + 0.2 * torch.randn(s[name].shape, generator=gen)
    s['bn.running_var'] = s['bn.running_var'] + torch.rand(s['bn.running_var'].shape, generator=gen)
    return {n: t.double() if t.is_floating_point() else t for n, t in s.items()}


def begin_run(forward, x, s, training, dtype):
    """Output, parameter gradients (training) and the state after one forward of the Begin block on a copy of s
    (on x's device), all on the CPU."""
    s = {n: t.to(x.device, dtype if t.is_floating_point() else t.dtype, copy=True) for n, t in s.items()}
    params = [s[n].requires_grad_(training) for n in ('conv.weight', 'bn.weight', 'bn.bias')]
    with torch.set_grad_enabled(training):
        y = forward(x.to(dtype), s, training=training)
    grads = []
    if training:
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y))
        grads = [p.grad.cpu() for p in params]
    return y.detach().cpu(), grads, {n: t.detach().cpu() for n, t in s.items()}


def mnist_planes(n, k):
    """n x k MNIST training images as (n, k, 28, 28) floats: flat backgrounds, so max-pool windows have ties."""
    images = mnist.load_mnist('data', train=True)[0][:n * k]
    return net.to_float(images).view(n, k, 28, 28)


def nan_framed(x):
    """x (N, K, 28, 28) as a view into a buffer whose every plane is framed by NaNs: a kernel that reads a pixel
    outside its plane (a wrong mask) makes NaNs."""
    frame = torch.full((*x.shape[:2], 30, 32), float('nan'), device=x.device)
    frame[:, :, 1:29, 2:30] = x
    return frame[:, :, 1:29, 2:30]


@pytest.mark.parametrize('images', ['random', 'mnist', 'channels_last', 'shared', 'nan_framed'])
@pytest.mark.parametrize('training', [True, False])
def test_fused_begin_equals_begin_forward(triton_conv, images, training):
    k, n = 2, 3
    planes = 1 if images == 'shared' else k
    x = mnist_planes(n, k) if images == 'mnist' else \
        torch.rand(n, planes, 28, 28, generator=torch.Generator().manual_seed(len(images)))
    arrange = {'channels_last': lambda t: t.contiguous(memory_format=torch.channels_last),
               'nan_framed': nan_framed}.get(images, lambda t: t)
    s = begin_state(k, seed=len(images))
    y_ref, grads_ref, s_ref = begin_run(net.begin_forward, arrange(x), s, training, torch.float64)  # exact
    y, grads, s_out = begin_run(triton_conv.begin_block, arrange(x.to(DEVICE)), s, training, torch.float32)
    assert_close(y, y_ref.float(), 1e-5, 1e-5, 'output')
    assert y.is_contiguous(memory_format=torch.channels_last if images == 'channels_last' else torch.contiguous_format)
    for name, got, ref in zip(('conv.weight', 'bn.weight', 'bn.bias'), grads, grads_ref):
        assert_close(got, ref.float(), 1e-4, 1e-5, f'gradient of {name}')
    for name, ref in s_ref.items():  # running statistics updated in training mode only, as F.batch_norm does
        assert_close(s_out[name], ref.to(s_out[name].dtype), 1e-6, 1e-6, name)
    assert torch.equal(s_out['bn.num_batches_tracked'], s['bn.num_batches_tracked'] + training)


def test_fused_begin_refuses_what_it_cannot_do(triton_conv):
    s = {n: t.float() for n, t in begin_state(1, 0).items()}
    with pytest.raises(TypeError, match='float32 only'):
        triton_conv.begin_block(torch.zeros(1, 1, 28, 28, dtype=torch.bfloat16), s)
    with pytest.raises(ValueError, match='no gradient for its input'):
        triton_conv.begin_block(torch.zeros(1, 1, 28, 28, requires_grad=True), s, training=True)
    s['conv.weight'].requires_grad_()
    with pytest.raises(ValueError, match='no backward in eval mode'):
        triton_conv.begin_block(torch.zeros(1, 1, 28, 28), s)


def jittered(block, k, gen):
    """Stacked fresh states of `block` with every float tensor moved off its default (BN's are 1 and 0)."""
    s = net.fresh_states(block, range(k))
    return {n: t + 0.2 * torch.randn(t.shape, generator=gen) if t.is_floating_point() else t for n, t in s.items()}


def basic_run(forward, h, basic, last, dtype, device):
    """Output, gradients (of the input, then of the trainable tensors of basic and of Last's convolution, for a
    fixed random output gradient) and the Basic block's state after one training forward on copies (on device),
    all on the CPU."""
    basic = {n: t.to(device, dtype if t.is_floating_point() else t.dtype, copy=True) for n, t in basic.items()}
    last = {n: t.to(device, dtype, copy=True) for n, t in last.items()}
    h = h.to(device, dtype, copy=True).requires_grad_()
    params = [h] + construct.trainable(basic) + [last['downsample.weight'].requires_grad_()]
    d = forward(h, basic, last)
    d.backward(torch.randn(d.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(d))
    return d.detach().cpu(), [p.grad.cpu() for p in params], {n: t.detach().cpu() for n, t in basic.items()}


def basic_then_downsample(h, basic, last):
    """The reference: Last's 1x1 stride-2 convolution of net.basic_forward in training mode."""
    k = last['downsample.weight'].shape[0]
    y = net.basic_forward(h, basic, training=True)
    return F.conv2d(y, last['downsample.weight'].flatten(0, 1), stride=2, groups=k)


@pytest.mark.parametrize('n, k', [(3, 2), (5, 1)])
def test_fused_basic_equals_autograd(triton_conv, n, k):
    gen = torch.Generator().manual_seed(n)
    basic, last = jittered('basic', k, gen), jittered('last', k, gen)
    for i in (1, 2):
        basic[f'bn{i}.running_var'] = basic[f'bn{i}.running_var'].abs() + 0.5
    h = torch.randn(n, k * net.PLANES, 14, 14, generator=gen).relu()  # a Begin output: ReLU'd
    d_ref, grads_ref, s_ref = basic_run(basic_then_downsample, h, basic, last, torch.float64, 'cpu')  # exact
    d, grads, s_out = basic_run(triton_conv.basic_block_train, h, basic, last, torch.float32, DEVICE)
    assert_close(d, d_ref.float(), 1e-5, 1e-5, 'output')
    trained = [name for name in basic if 'running' not in name and 'num_batches' not in name]
    names = ['input'] + trained + ['downsample.weight']
    for name, got, ref in zip(names, grads, grads_ref, strict=True):
        assert_close(got, ref.float(), 1e-4, 1e-5, f'gradient of {name}')
    for name, ref in s_ref.items():  # running statistics and batch counts, as F.batch_norm updates them
        assert_close(s_out[name], ref.to(s_out[name].dtype), 1e-6, 1e-6, name)
    assert torch.equal(s_out['bn1.num_batches_tracked'], basic['bn1.num_batches_tracked'] + 1)


def test_fused_basic_refuses_what_it_cannot_do(triton_conv):
    basic, last = net.fresh_states('basic', [0]), net.fresh_states('last', [0])
    with pytest.raises(TypeError, match='float32 only'):
        triton_conv.basic_block_train(torch.zeros(1, 6, 14, 14, dtype=torch.bfloat16), basic, last)
    with pytest.raises(ValueError, match='even planes of at most 16x16'):
        triton_conv.basic_block_train(torch.zeros(1, 6, 15, 15), basic, last)


@pytest.mark.parametrize('layout', ['batch', 'cache'])
def test_fused_small_step_equals_autograd(triton_conv, layout):
    k, n, images = 2, 3, 5
    gen = torch.Generator().manual_seed(3)
    simple, last = jittered('simple', k, gen), jittered('last', k, gen)
    last['bn.running_var'] = last['bn.running_var'].abs() + 0.5
    idx = torch.randint(0, images, (k, n), generator=gen)
    flip = torch.rand(k, n, generator=gen) < 0.5
    labels = torch.randint(0, 10, (k, n), generator=gen)
    cache = torch.randn(k, 2, images, *net.FEATURE, generator=gen)  # (network, flipped, image): Begin outputs
    knets = torch.arange(k)[:, None]
    h = cache[knets, flip.long(), idx].transpose(0, 1)  # (B, K, 6, 14, 14), what each program must read
    # the exact reference: autograd in float64
    s64 = {name: t.double().requires_grad_() for name, t in simple.items()}
    last64 = {name: t.double() for name, t in last.items()}
    logits = net.last_forward(net.simple_forward(h.double().flatten(1, 2), s64), last64)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 10), labels.reshape(-1), reduction='sum') / n
    ref.backward()
    if layout == 'cache':  # read in place, as generation does with its Begin cache; the entries not read are NaN
        unread = torch.ones(k, 2, images, dtype=torch.bool)
        unread[knets, flip.long(), idx] = False
        source = cache.masked_fill(unread[..., None, None, None], float('nan'))
        offsets = ((knets * 2 + flip.long()) * images + idx).T * net.FEATURE_NUMEL
    else:
        source, offsets = h.contiguous(), torch.arange(n * k).view(n, k) * net.FEATURE_NUMEL
    source, offsets, labels, h = (t.to(DEVICE) for t in (source, offsets, labels, h))
    s32 = {name: t.to(DEVICE, copy=True).requires_grad_() for name, t in simple.items()}
    last32 = {name: t.to(DEVICE) for name, t in last.items()}
    loss = triton_conv.small_step_loss(source, offsets, labels.T, s32, last32)
    loss.backward()
    torch.testing.assert_close(loss.detach().cpu(), ref.detach().float(), atol=1e-5, rtol=1e-6)
    for name in simple:
        assert_close(s32[name].grad.cpu(), s64[name].grad.float(), 1e-6, 1e-5, name)
    with pytest.raises(TypeError, match='float32 only'):
        triton_conv.small_step_loss(source.bfloat16(), offsets, labels.T, s32, last32)
    with pytest.raises(ValueError, match='contiguous'):
        triton_conv.small_step_loss(h, offsets, labels.T, s32, last32)


# the last: compiled around the kernels
@pytest.mark.parametrize('flags', [['--conv', 'triton'], ['--fused_begin'], ['--fused_basic'], ['--fused_small'],
                                   ['--fused_small', '--begin_cache', 'off'],
                                   ['--fused_begin', '--fused_basic', '--fused_small', '--compile']])
def test_generation_with_triton_kernels_is_close(triton_conv, interpreted, flags):
    # the interpreter runs programs one by one in Python: a few images only
    tiny = ['--num_epochs', '1', '--num_train_images', '16', '--batch_size', '8', '--num_test_images', '8',
            '--device', 'cpu']
    cpu = torch.device('cpu')
    mnist = generation.load_mnist_to(cpu, construct_train.get_args('train', tiny))
    args = generate.get_args(tiny + flags)
    cache = args.begin_cache != 'off'
    plain = construct.make_pairs(range(2), args.recipe, mnist, cpu, cache)
    fast = construct.make_pairs(range(2), args.recipe, mnist, cpu, cache, steps=generate.FastSteps(args, cpu))
    for block in ('begin', 'basic', 'last', 'simple'):
        for name, t in plain[block].items():
            assert_close(fast[block][name], t, 1e-4, 1e-4, f'{block}.{name}')
    assert torch.equal(fast['acc_large'], plain['acc_large'])


def test_every_kernel_compiles_for_a_gpu():
    # the interpreter accepts what the compiler may refuse: speed/kernel_resources.py compiles every kernel of
    # triton_conv.py for sm_90 (no GPU needed), in a process of its own without TRITON_INTERPRET
    root = SPEED
    with open(os.path.join(root, 'triton_conv.py')) as f:
        kernels = set(re.findall(r'^def (_\w+_kernel)\(', f.read(), re.M))
    with open(os.path.join(root, 'kernel_resources.py')) as f:
        script = f.read()
    assert kernels and all(f'tc.{k},' in script for k in kernels), 'kernel_resources.py misses a kernel'
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    out = subprocess.run([sys.executable, 'kernel_resources.py'], cwd=root, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count(' warps: REG:') == script.count("': (tc._")

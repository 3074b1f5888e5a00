"""triton_conv's kernels against F.conv2d, run on the CPU in Triton's interpreter: the forward, the input and
weight gradients, and generation with --conv triton. Skipped where triton is not installed (it is not a
dependency: it comes with CUDA builds of torch; `pip install triton` adds it on a CPU machine)."""
import os

import pytest
import torch
import torch.nn.functional as F

import construct_train
import net

pytest.importorskip('triton')


@pytest.fixture(scope='module')
def triton_conv():
    """triton_conv in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1 before triton is imported)."""
    if os.environ.get('TRITON_INTERPRET') != '1':
        pytest.skip('TRITON_INTERPRET is not 1: the kernels cannot run on a CPU')
    import triton_conv
    yield triton_conv
    net.set_conv3x3(None)


# (images, networks, channels in, channels out, side): every 3x3 convolution of generation
SHAPES = [(3, 2, 1, 6, 28), (3, 2, 6, 6, 14), (2, 3, 6, 3, 14), (2, 3, 3, 6, 14)]


@pytest.mark.parametrize('n, k, cin, cout, side', SHAPES)
def test_forward_and_gradients_equal_conv2d(triton_conv, n, k, cin, cout, side):
    gen = torch.Generator().manual_seed(cin * 10 + cout)
    x = torch.randn(n, k * cin, side, side, generator=gen)
    w = torch.randn(k * cout, cin, 3, 3, generator=gen)
    dy = torch.randn(n, k * cout, side, side, generator=gen)
    results = []
    for conv in (lambda a, b: F.conv2d(a, b, padding=1, groups=k), lambda a, b: triton_conv.grouped_conv3x3(a, b, k)):
        a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = conv(a, b)
        y.backward(dy)
        results.append((y.detach(), a.grad, b.grad))
    for name, ref, got in zip(('output', 'input gradient', 'weight gradient'), *results):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5, msg=name)


def test_float32_only(triton_conv):
    with pytest.raises(TypeError, match='float32 only'):
        triton_conv.grouped_conv3x3(torch.zeros(1, 6, 14, 14, dtype=torch.bfloat16), torch.zeros(6, 6, 3, 3), 1)


def test_generation_with_triton_convolutions_is_close(triton_conv):
    # the interpreter runs programs one by one in Python: a few images only
    tiny = ['--num_epochs', '1', '--num_train_images', '16', '--batch_size', '8', '--num_test_images', '8',
            '--device', 'cpu']
    mnist = construct_train.load_mnist_to(torch.device('cpu'), construct_train.get_args('train', tiny))
    args = construct_train.get_args('train', tiny + ['--conv', 'triton'])
    plain = construct_train.make_pairs(range(2), construct_train.get_args('train', tiny), mnist, torch.device('cpu'), True)
    construct_train.use_conv('triton', torch.device('cpu'))
    try:
        fast = construct_train.make_pairs(range(2), args, mnist, torch.device('cpu'), True)
    finally:
        construct_train.use_conv('cudnn', torch.device('cpu'))
    for block in ('begin', 'basic', 'last', 'simple'):
        for name, t in plain[block].items():
            torch.testing.assert_close(fast[block][name], t, atol=1e-4, rtol=1e-4, msg=f'{block}.{name}')
    assert torch.equal(fast['acc_large'], plain['acc_large'])

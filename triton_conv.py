"""Grouped 3x3 convolutions (stride 1, padding 1, no bias) of K stacked networks as Triton kernels, for
construct_train.py --conv triton: the training convolutions of generation, forward and backward.

Generation trains K tiny networks side by side, so every convolution is a grouped one with 1, 3 or 6
channels per group, far from the shapes cuDNN's kernels are tuned for (how far: bench/profile_step.py on a
GPU, with and without --conv triton). Here one program computes one image of one network:
all its output channels over the whole plane, from all its input channels, each weight a scalar broadcast
over the plane. The input gradient is the same kernel with each network's weights transposed and flipped;
the weight gradient is, per network and input channel, one dot product of the output gradient with the 9
shifted input planes, summed over a block of images (then over blocks, in torch).

Triton is not a dependency of this repository: it comes with CUDA builds of torch. On a CPU the kernels
run in Triton's interpreter (TRITON_INTERPRET=1 before the first import), which the tests use.
"""
import torch
import triton
import triton.language as tl

TAPS = 9  # a 3x3 kernel
OUT_PAD = 16  # tl.dot's smallest size: output channels are padded to it in the weight gradient


@triton.jit
def _conv3x3_kernel(x_ptr, w_ptr, y_ptr, groups, CIN: tl.constexpr, COUT: tl.constexpr, H: tl.constexpr,
                    W: tl.constexpr, BLOCK: tl.constexpr, CPAD: tl.constexpr):
    """y[n, g*COUT + o] = sum over i, taps of w[g*COUT + o, i, tap] * x[n, g*CIN + i] shifted by the tap."""
    pid = tl.program_id(0)  # n * groups + g
    g = pid % groups
    p = tl.arange(0, BLOCK)
    row, col = p // W, p % W
    inside = p < H * W
    o = tl.arange(0, CPAD)
    acc = tl.zeros((CPAD, BLOCK), dtype=tl.float32)
    x_base = x_ptr + pid.to(tl.int64) * CIN * H * W
    for i in tl.static_range(CIN):
        for t in tl.static_range(9):
            r, c = row + (t // 3 - 1), col + (t % 3 - 1)
            m = inside & (r >= 0) & (r < H) & (c >= 0) & (c < W)
            xv = tl.load(x_base + i * H * W + r * W + c, mask=m, other=0.0)
            wv = tl.load(w_ptr + ((g * COUT + o) * CIN + i) * 9 + t, mask=o < COUT, other=0.0)
            acc += wv[:, None] * xv[None, :]
    y_base = y_ptr + pid.to(tl.int64) * COUT * H * W
    tl.store(y_base + o[:, None] * H * W + p[None, :], acc, mask=(o[:, None] < COUT) & inside[None, :])


@triton.jit
def _conv3x3_wgrad_kernel(x_ptr, dy_ptr, part_ptr, n_images, groups, per_block, CIN: tl.constexpr,
                          COUT: tl.constexpr, H: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr,
                          CHUNK: tl.constexpr, CPAD: tl.constexpr):
    """part[b, g, o, i, tap] = sum over the images of block b of dy[n, g*COUT + o] . (x[n, g*CIN + i] shifted);
    the plane in chunks of CHUNK pixels, so that a dot's operands stay small."""
    g = tl.program_id(0)
    b = tl.program_id(1)
    o = tl.arange(0, CPAD)
    t = tl.arange(0, 16)  # the 9 taps, padded
    first = b * per_block
    last = tl.minimum(first + per_block, n_images)
    for i in tl.static_range(CIN):
        acc = tl.zeros((CPAD, 16), dtype=tl.float32)
        for p0 in tl.static_range(0, BLOCK, CHUNK):
            p = p0 + tl.arange(0, CHUNK)
            row, col = p // W, p % W
            inside = p < H * W
            r = row[None, :] + (t[:, None] // 3 - 1)
            c = col[None, :] + (t[:, None] % 3 - 1)
            m9 = (t[:, None] < 9) & inside[None, :] & (r >= 0) & (r < H) & (c >= 0) & (c < W)
            m_dy = (o[:, None] < COUT) & inside[None, :]
            for n in range(first, last):
                plane = (n * groups + g).to(tl.int64)
                dy = tl.load(dy_ptr + plane * COUT * H * W + o[:, None] * H * W + p[None, :], mask=m_dy, other=0.0)
                x9 = tl.load(x_ptr + (plane * CIN + i) * H * W + r * W + c, mask=m9, other=0.0)
                acc += tl.dot(dy, tl.trans(x9), input_precision='ieee')
        out = part_ptr + (((b * groups + g) * COUT + o[:, None]) * CIN + i) * 9 + t[None, :]
        tl.store(out, acc, mask=(o[:, None] < COUT) & (t[None, :] < 9))


def _block(h, w):
    """Lanes of a program: the plane's pixels, rounded up to a power of two."""
    return triton.next_power_of_2(h * w)


def conv3x3(x, w, groups):
    """Grouped 3x3 convolution, stride 1, padding 1, no bias: x (N, G*Cin, H, W), w (G*Cout, Cin, 3, 3)."""
    n, _, h, wd = x.shape
    cin, cout = w.shape[1], w.shape[0] // groups
    x = x.contiguous()
    y = torch.empty(n, groups * cout, h, wd, device=x.device, dtype=x.dtype)
    _conv3x3_kernel[(n * groups,)](x, w.contiguous(), y, groups, CIN=cin, COUT=cout, H=h, W=wd,
                                   BLOCK=_block(h, wd), CPAD=triton.next_power_of_2(cout))
    return y


def conv3x3_weight_grad(x, dy, groups, cin, images_per_block=8):
    """The weight gradient (G*Cout, Cin, 3, 3) of conv3x3 from its input x and output gradient dy."""
    n, _, h, wd = x.shape
    cout = dy.shape[1] // groups
    blocks = triton.cdiv(n, images_per_block)
    part = torch.empty(blocks, groups, cout, cin, TAPS, device=x.device, dtype=torch.float32)
    _conv3x3_wgrad_kernel[(groups, blocks)](x.contiguous(), dy.contiguous(), part, n, groups, images_per_block,
                                            CIN=cin, COUT=cout, H=h, W=wd, BLOCK=_block(h, wd),
                                            CHUNK=min(_block(h, wd), 256), CPAD=OUT_PAD)
    return part.sum(0).reshape(groups * cout, cin, 3, 3)


def transposed_flipped(w, groups):
    """Each network's weights (Cout, Cin, 3, 3) as (Cin, Cout, 3, 3) with the taps reversed: the convolution
    with them is the input gradient of the convolution with w."""
    cout, cin = w.shape[0] // groups, w.shape[1]
    return w.reshape(groups, cout, cin, 3, 3).transpose(1, 2).flip(-1, -2).reshape(groups * cin, cout, 3, 3)


class GroupedConv3x3(torch.autograd.Function):
    """conv3x3 with its gradients, both by the kernels above."""

    @staticmethod
    def forward(ctx, x, w, groups):
        ctx.save_for_backward(x, w)
        ctx.groups = groups
        return conv3x3(x, w, groups)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dx = conv3x3(dy, transposed_flipped(w, ctx.groups), ctx.groups) if ctx.needs_input_grad[0] else None
        dw = conv3x3_weight_grad(x, dy, ctx.groups, w.shape[1]) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def grouped_conv3x3(x, w, groups):
    """F.conv2d(x, w, padding=1, groups=groups) for float32 3x3 weights, by Triton kernels, differentiable."""
    if x.dtype != torch.float32 or w.dtype != torch.float32:
        raise TypeError(f'the Triton convolutions are float32 only (got {x.dtype} and {w.dtype}): '
                        f'--conv triton does not combine with --amp bf16')
    return GroupedConv3x3.apply(x, w, groups)

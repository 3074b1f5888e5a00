"""Triton kernels of generation (speed/generate.py): the grouped 3x3 convolutions of K stacked networks
(stride 1, padding 1, no bias; --conv triton); the whole Begin block, convolution + BatchNorm + ReLU +
max-pool, forward and backward, without its 28x28 activations in memory (--fused_begin); the first phase's
Basic block with training BatchNorms and Last's convolution, forward and backward (--fused_basic); and the
second phase's whole step (--fused_small).

Generation trains K tiny networks side by side, so every convolution is a grouped one with 1, 3 or 6
channels per group, far from the shapes cuDNN's kernels are tuned for (how far: speed/profile_step.py on a
GPU, with and without --conv triton). Here one program computes one image of one network:
all its output channels over the whole plane, from all its input channels, each weight a scalar broadcast
over the plane. The input gradient is the same kernel with each network's weights transposed and flipped;
the weight gradient is, per network and input channel, one dot product of the output gradient with the 9
shifted input planes, summed over a block of images (then over blocks, in torch).

The Begin block's activations at 28x28 are the largest tensors of a step (one image of a network reads one
28x28 plane and its convolution writes six). Its convolution has one input channel, so recomputing it is
cheaper than storing it: the fused Begin reads only the images, in three kernels (see BeginBlockTrain).

Triton is not a dependency of this repository: it comes with CUDA builds of torch. On a CPU the kernels
run in Triton's interpreter (TRITON_INTERPRET=1 before the first import), which the tests use.
"""
import torch
import triton
import triton.language as tl

import net

TAPS = 9  # a 3x3 kernel
BN_EPS = 1e-5  # nn.BatchNorm2d's default, which the original used
OUT_PAD = 16  # tl.dot's smallest size: output channels are padded to it in the weight gradient


@triton.jit
def _shift(row, col, t, H, W, valid):
    """Pixels (row, col) shifted by tap t of a 3x3 kernel, and where they are valid and inside the (H, W) plane."""
    r, q = row + (t // 3 - 1), col + (t % 3 - 1)
    return r, q, valid & (r >= 0) & (r < H) & (q >= 0) & (q < W)


@triton.jit
def _tap(plane, sh, sw, row, col, t, H, W, valid):
    """The (H, W) plane (strides sh, sw) at pixels (row, col) shifted by tap t of a 3x3 kernel, 0 outside the
    plane (padding 1) and where not valid."""
    r, q, inside = _shift(row, col, t, H, W, valid)
    return tl.load(plane + r * sh + q * sw, mask=inside, other=0.0)


@triton.jit
def _bn_relu_tap(plane, row, col, t, H, W, valid, a, b):
    """relu(a * plane + b) of a contiguous (H, W) plane, shifted as _tap; 0 outside the plane (the convolution
    that reads it pads with zeros, after the ReLU)."""
    r, q, inside = _shift(row, col, t, H, W, valid)
    return tl.where(inside, tl.maximum(a * tl.load(plane + r * W + q, mask=inside, other=0.0) + b, 0.0), 0.0)


@triton.jit
def _conv3x3(x, sc, sh, sw, w, o, row, col, valid, CIN: tl.constexpr, COUT: tl.constexpr, H, W, OPAD: tl.constexpr,
             BLOCK: tl.constexpr):
    """sum over input channels i and taps t of w[o, i, t] * x[i] shifted by t (padding 1), at pixels (row, col)
    where valid: (OPAD, BLOCK). x: CIN planes (H, W) with strides sc, sh, sw; w: (COUT, CIN, 9) contiguous."""
    acc = tl.zeros((OPAD, BLOCK), dtype=tl.float32)
    for i in tl.static_range(CIN):
        for t in tl.static_range(9):
            xv = _tap(x + i * sc, sh, sw, row, col, t, H, W, valid)
            wv = tl.load(w + (o * CIN + i) * 9 + t, mask=o < COUT, other=0.0)
            acc += wv[:, None] * xv[None, :]
    return acc


@triton.jit
def _conv3x3_bn_relu(x, w, a, b, o, row, col, valid, CIN: tl.constexpr, COUT: tl.constexpr, H, W,
                     OPAD: tl.constexpr, BLOCK: tl.constexpr):
    """_conv3x3 of relu(a[i] * x[i] + b[i]) (a BatchNorm's affine map and ReLU, applied as the planes are read):
    x: CIN contiguous (H, W) planes one after another; a, b: CIN scalars each."""
    acc = tl.zeros((OPAD, BLOCK), dtype=tl.float32)
    for i in tl.static_range(CIN):
        ai, bi = tl.load(a + i), tl.load(b + i)
        for t in tl.static_range(9):
            xv = _bn_relu_tap(x + i * H * W, row, col, t, H, W, valid, ai, bi)
            wv = tl.load(w + (o * CIN + i) * 9 + t, mask=o < COUT, other=0.0)
            acc += wv[:, None] * xv[None, :]
    return acc


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
    acc = _conv3x3(x_ptr + pid.to(tl.int64) * CIN * H * W, H * W, W, 1, w_ptr + g * COUT * CIN * 9, o, row, col, inside,
                   CIN, COUT, H, W, CPAD, BLOCK)
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


def float32_only(what, flag, *tensors):
    """Refuse tensors of other dtypes: every kernel here computes in float32."""
    if any(t.dtype != torch.float32 for t in tensors):
        raise TypeError(f'{what}: float32 only (got {", ".join(str(t.dtype) for t in tensors)}); {flag} does not '
                        f'combine with --amp bf16')


def batch_stats(mom, pixels, gamma, beta, running_mean, running_var):
    """A training BatchNorm's batch statistics from each image's per-channel mean and squared deviations
    (mom: (N, K, 2, C), over `pixels` pixels an image), combined (Chan et al.) in float64: no cancellation; the
    running statistics updated in place as F.batch_norm does. (mean, rstd, scale, shift), each (K, C) float64."""
    image_mean, image_m2 = mom.double().unbind(2)
    mean = image_mean.mean(0)
    m2 = image_m2.sum(0) + pixels * (image_mean - mean).square().sum(0)
    count = mom.shape[0] * pixels
    rstd = (m2 / count + BN_EPS).rsqrt()
    scale = gamma.double() * rstd
    with torch.no_grad():
        running_mean.lerp_(mean.to(running_mean.dtype), net.BN_MOMENTUM)
        running_var.lerp_((m2 / max(count - 1, 1)).to(running_var.dtype), net.BN_MOMENTUM)
    return mean, rstd, scale, beta.double() - mean * scale


def eval_bn_affine(s):
    """An eval-mode BatchNorm (a stacked state's 'bn.' entries) as the affine map it is: (scale, shift)."""
    scale = s['bn.weight'] * (s['bn.running_var'] + BN_EPS).rsqrt()
    return scale.contiguous(), (s['bn.bias'] - s['bn.running_mean'] * scale).contiguous()


def grouped_conv3x3(x, w, groups):
    """F.conv2d(x, w, padding=1, groups=groups) for float32 3x3 weights, by Triton kernels, differentiable."""
    float32_only('the Triton convolutions', '--conv triton', x, w)
    return GroupedConv3x3.apply(x, w, groups)


# ----------------------------------------------------------------------------------------
# The fused Begin block: max_pool(relu(batch_norm(conv(x))), 3, 2, 1) of K stacked networks, one image each.
#
# Forward: kernel 1 computes the convolution of every pixel and keeps only per-image sums (each channel's mean
# and squared deviations, for the batch statistics, and the sums the weight gradient needs); kernel 2
# recomputes the convolution at the 9 pixels of every pooling window, normalises, rectifies and keeps the
# window's maximum. Backward: kernel 3 finds every window's maximum again, routes the output gradient to it and
# sums what BatchNorm's and the convolution's weight gradients need; no input gradient (the input is images).
#
# The weight gradient needs no 28x28 tensor: with z = conv(x), xhat = (z - mean) * rstd and g the gradient at
# BatchNorm's output (non-zero only at the windows' maxima),
#     dW[c, t] = scale[c] * (sum g x_t - sum(g)/M * sum x_t - sum(g xhat)/M * rstd * sum (z - mean) x_t),
# sums over the batch's pixels p, x_t the image shifted by tap t, M the pixels of the batch, scale = gamma rstd.
# The first sum is over the maxima only; the last two do not depend on the gradient, so kernel 1 makes them.


@triton.jit
def _begin_program(x_ptr, sn, sk, K):
    """This program's index n*K + k (image n of network k), k, and the start of its input plane."""
    pid = tl.program_id(0)
    n, k = pid // K, pid % K
    return pid, k, x_ptr + n.to(tl.int64) * sn + k.to(tl.int64) * sk


@triton.jit
def _pooled_pixels(H: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr):
    """The BLOCK pooled-pixel indices p of a (H/2, W/2) output, their rows, columns and which lie inside."""
    p = tl.arange(0, BLOCK)
    return p, p // (W // 2), p % (W // 2), p < (H // 2) * (W // 2)


@triton.jit
def _begin_stats_kernel(x_ptr, sn, sk, sh, sw, w_ptr, mom_ptr, zx_ptr, xs_ptr, K, C: tl.constexpr,
                        H: tl.constexpr, W: tl.constexpr, CPAD: tl.constexpr, BLOCK: tl.constexpr,
                        CHUNK: tl.constexpr):
    """Per image n of network k (program n*K + k) and channel c: the mean of z = conv(x) over the plane and the
    sum of (z - mean)^2 -> mom[n, k, 0:2, c]; sum (z - mean) x_t -> zx[n, k, c, t]; sum x_t -> xs[n, k, t].
    The plane in chunks of CHUNK pixels, twice (the mean first): fewer registers, so more programs at once."""
    pid, k, plane = _begin_program(x_ptr, sn, sk, K)
    c = tl.arange(0, CPAD)
    taps = tl.arange(0, 16)
    w = w_ptr + k * C * 9
    total = tl.zeros((CPAD,), dtype=tl.float32)
    for p0 in range(0, BLOCK, CHUNK):  # a loop, not unrolled: fewer registers
        p = p0 + tl.arange(0, CHUNK)
        total += tl.sum(_conv3x3(plane, 0, sh, sw, w, c, p // W, p % W, p < H * W, 1, C, H, W, CPAD, CHUNK), axis=1)
    mean = total / (H * W)
    m2 = tl.zeros((CPAD,), dtype=tl.float32)
    zx = tl.zeros((CPAD, 16), dtype=tl.float32)
    xs = tl.zeros((16,), dtype=tl.float32)
    for p0 in range(0, BLOCK, CHUNK):  # a loop, not unrolled: fewer registers
        p = p0 + tl.arange(0, CHUNK)
        row, col, inside = p // W, p % W, p < H * W
        z = _conv3x3(plane, 0, sh, sw, w, c, row, col, inside, 1, C, H, W, CPAD, CHUNK)  # 0 outside the plane
        dev = tl.where(inside[None, :], z - mean[:, None], 0.0)
        m2 += tl.sum(dev * dev, axis=1)
        for t in range(9):
            xv = _tap(plane, sh, sw, row, col, t, H, W, inside)
            zx += tl.where(taps[None, :] == t, tl.sum(dev * xv[None, :], axis=1)[:, None], 0.0)
            xs += tl.where(taps == t, tl.sum(xv, axis=0), 0.0)
    tl.store(mom_ptr + pid * 2 * C + c, mean, mask=c < C)
    tl.store(mom_ptr + pid * 2 * C + C + c, m2, mask=c < C)
    tl.store(zx_ptr + (pid * C + c[:, None]) * 9 + taps[None, :], zx, mask=(c[:, None] < C) & (taps[None, :] < 9))
    tl.store(xs_ptr + pid * 9 + taps, xs, mask=taps < 9)


@triton.jit
def _begin_maxima(x_ptr, sn, sk, sh, sw, w_ptr, scale_ptr, shift_ptr, K, C: tl.constexpr, H: tl.constexpr,
                  W: tl.constexpr, CPAD: tl.constexpr, BLOCK: tl.constexpr):
    """Every pooling window of relu(scale * conv(x) + shift) over image n of network k (program n*K + k): its
    maximum, the convolution there and the maximum's position s (row-major in the window; as max_pool2d, the
    first maximum wins and padding never does), each (CPAD, BLOCK) over the pooled pixels."""
    _, k, plane = _begin_program(x_ptr, sn, sk, K)
    p, pi, pj, pin = _pooled_pixels(H, W, BLOCK)
    c = tl.arange(0, CPAD)
    a = tl.load(scale_ptr + k * C + c, mask=c < C, other=0.0)
    b = tl.load(shift_ptr + k * C + c, mask=c < C, other=0.0)
    best = tl.full((CPAD, BLOCK), float('-inf'), tl.float32)
    best_z = tl.zeros((CPAD, BLOCK), dtype=tl.float32)
    best_s = tl.zeros((CPAD, BLOCK), dtype=tl.int32)
    for s in range(9):  # a loop, not unrolled: fewer registers
        r, q = pi * 2 + (s // 3 - 1), pj * 2 + (s % 3 - 1)
        valid = pin & (r >= 0) & (r < H) & (q >= 0) & (q < W)
        z = _conv3x3(plane, 0, sh, sw, w_ptr + k * C * 9, c, r, q, valid, 1, C, H, W, CPAD, BLOCK)
        y = tl.where(valid[None, :], tl.maximum(z * a[:, None] + b[:, None], 0.0), float('-inf'))
        better = y > best
        best, best_z, best_s = tl.where(better, y, best), tl.where(better, z, best_z), tl.where(better, s, best_s)
    return best, best_z, best_s


@triton.jit
def _begin_pool_kernel(x_ptr, sn, sk, sh, sw, w_ptr, scale_ptr, shift_ptr, y_ptr, K, C: tl.constexpr,
                       H: tl.constexpr, W: tl.constexpr, CPAD: tl.constexpr, BLOCK: tl.constexpr):
    """y[n, k*C + c] = max_pool(relu(scale * conv(x) + shift), 3, 2, 1) of image n of network k."""
    best, _, _ = _begin_maxima(x_ptr, sn, sk, sh, sw, w_ptr, scale_ptr, shift_ptr, K, C, H, W, CPAD, BLOCK)
    p, _, _, pin = _pooled_pixels(H, W, BLOCK)
    c = tl.arange(0, CPAD)
    out = y_ptr + (tl.program_id(0).to(tl.int64) * C + c[:, None]) * ((H // 2) * (W // 2)) + p[None, :]
    tl.store(out, best, mask=(c[:, None] < C) & pin[None, :])


@triton.jit
def _begin_grad_kernel(x_ptr, sn, sk, sh, sw, w_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, dy_ptr, sums_ptr,
                       gx_ptr, K, C: tl.constexpr, H: tl.constexpr, W: tl.constexpr, CPAD: tl.constexpr,
                       BLOCK: tl.constexpr):
    """With g the output gradient dy routed to each window's maximum (the forward's: the same values) and masked
    by its ReLU: sum g -> sums[n, k, 0, c], sum g xhat -> sums[n, k, 1, c], sum g x_t -> gx[n, k, c, t]."""
    best, best_z, best_s = _begin_maxima(x_ptr, sn, sk, sh, sw, w_ptr, scale_ptr, shift_ptr, K, C, H, W, CPAD,
                                         BLOCK)
    pid, k, plane = _begin_program(x_ptr, sn, sk, K)
    p, pi, pj, pin = _pooled_pixels(H, W, BLOCK)
    c = tl.arange(0, CPAD)
    mask = (c[:, None] < C) & pin[None, :]
    g = tl.load(dy_ptr + (pid.to(tl.int64) * C + c[:, None]) * ((H // 2) * (W // 2)) + p[None, :], mask=mask, other=0.0)
    g = tl.where(best > 0, g, 0.0)
    mean = tl.load(mean_ptr + k * C + c, mask=c < C, other=0.0)
    rstd = tl.load(rstd_ptr + k * C + c, mask=c < C, other=0.0)
    tl.store(sums_ptr + pid * 2 * C + c, tl.sum(g, axis=1), mask=c < C)
    tl.store(sums_ptr + pid * 2 * C + C + c, tl.sum(g * (best_z - mean[:, None]) * rstd[:, None], axis=1), mask=c < C)
    row, col = pi[None, :] * 2 + (best_s // 3 - 1), pj[None, :] * 2 + (best_s % 3 - 1)  # each maximum's pixel
    for t in range(9):  # a loop, not unrolled: fewer registers
        xv = _tap(plane, sh, sw, row, col, t, H, W, mask)
        tl.store(gx_ptr + (pid * C + c) * 9 + t, tl.sum(g * xv, axis=1), mask=c < C)


def _begin_launch(kernel, x, c, block, *args, **meta):
    """Run a Begin kernel with one program per (image, network) of x (N, K, H, W), for C = c channels."""
    n, k, h, w = x.shape
    kernel[(n * k,)](x, *x.stride(), *args, k, C=c, H=h, W=w, CPAD=triton.next_power_of_2(c), BLOCK=block, **meta)


def _begin_pool(x, w, scale, shift):
    """max_pool(relu(scale * conv(x, w) + shift), 3, 2, 1) for x (N, K, H, W) and w (K, C, 1, 3, 3):
    (N, K*C, H/2, W/2)."""
    n, k, h, wd = x.shape
    c = w.shape[1]
    y = torch.empty(n, k * c, h // 2, wd // 2, device=x.device)
    _begin_launch(_begin_pool_kernel, x, c, _block(h // 2, wd // 2), w, scale, shift, y)
    return y


class BeginBlockTrain(torch.autograd.Function):
    """The Begin block in training mode (batch statistics; the running ones updated in place, as F.batch_norm
    does): gradients for the convolution weight and BatchNorm's weight and bias, none for the images."""

    @staticmethod
    def forward(ctx, x, w, gamma, beta, running_mean, running_var):
        n, k, h, wd = x.shape
        c, pixels = w.shape[1], h * wd
        mom = torch.empty(n, k, 2, c, device=x.device)
        zx = torch.empty(n, k, c, TAPS, device=x.device)
        xs = torch.empty(n, k, TAPS, device=x.device)
        _begin_launch(_begin_stats_kernel, x, c, _block(h, wd), w, mom, zx, xs, CHUNK=min(_block(h, wd), 256))
        mean, rstd, scale, shift = batch_stats(mom, pixels, gamma, beta, running_mean, running_var)
        image_mean = mom[:, :, 0].double()
        scale32, shift32, mean32, rstd32 = (t.float().contiguous() for t in (scale, shift, mean, rstd))
        y = _begin_pool(x, w, scale32, shift32)
        sum_x = xs.double().sum(0)  # (K, 9)
        sum_dev_x = (zx.double() + (image_mean - mean)[..., None] * xs.double()[:, :, None, :]).sum(0)  # (K, C, 9)
        ctx.save_for_backward(x, w, scale32, shift32, mean32, rstd32, scale, rstd, sum_x, sum_dev_x)
        ctx.count = n * pixels
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, scale32, shift32, mean32, rstd32, scale, rstd, sum_x, sum_dev_x = ctx.saved_tensors
        n, k, h, wd = x.shape
        c = w.shape[1]
        sums = torch.empty(n, k, 2, c, device=x.device)
        gx = torch.empty(n, k, c, TAPS, device=x.device)
        _begin_launch(_begin_grad_kernel, x, c, _block(h // 2, wd // 2), w, scale32, shift32, mean32, rstd32,
                      dy.contiguous(), sums, gx)
        dbeta, dgamma = sums.double().sum(0).unbind(1)  # (K, C)
        dw = scale[..., None] * (gx.double().sum(0) - (dbeta / ctx.count)[..., None] * sum_x[:, None, :]
                                 - (dgamma / ctx.count * rstd)[..., None] * sum_dev_x)
        return None, dw.float().view_as(w), dgamma.float(), dbeta.float(), None, None


# --compile leaves the fused kernels alone (a graph break): they are fused already, and on a CPU Dynamo would trace
# into Triton's interpreter
@torch.compiler.disable
def begin_block(x, s, training=False):
    """net.begin_forward(x, s, training) by the kernels above (float32): x (B, K, 28, 28), one image per network,
    or (B, 1, 28, 28) shared by all -> (B, K*6, 14, 14), channels-last if x is (--channels_last), else
    contiguous. In eval mode without gradients only."""
    k = s['conv.weight'].shape[0]
    float32_only('the fused Begin', '--fused_begin', x, s['conv.weight'])
    if x.requires_grad:
        raise ValueError('the fused Begin computes no gradient for its input (in generation it is images)')
    nhwc = x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last)
    x = x.expand(-1, k, -1, -1)  # images shared by all networks: a zero stride, no copy
    w = s['conv.weight'].contiguous()
    if training:
        s['bn.num_batches_tracked'] += 1
        y = BeginBlockTrain.apply(x, w, s['bn.weight'].contiguous(), s['bn.bias'].contiguous(),
                                  s['bn.running_mean'], s['bn.running_var'])
    elif torch.is_grad_enabled() and any(t.requires_grad for t in s.values()):
        raise ValueError('the fused Begin has no backward in eval mode (generation evaluates it without gradients)')
    else:
        y = _begin_pool(x, w, *eval_bn_affine(s))
    return y.contiguous(memory_format=torch.channels_last) if nhwc else y


# ----------------------------------------------------------------------------------------
# The fused Basic block of the first phase: BasicBlock in training mode (batch statistics in both BatchNorms)
# and Last's 1x1 stride-2 convolution after it, forward and backward, one image of one network per program.
# The batch statistics couple the images, so every BatchNorm ends a kernel:
#   forward   1. conv1 and each image's moments; 1 again: BatchNorm 1 and the ReLU applied as conv2 reads its
#                input, conv2 and its moments; 2. the block's output, relu(bn2(conv2) + input), at the 7x7 pixels
#                Last's stride-2 convolution reads, and that convolution;
#   backward  3. back through Last's convolution and the block's ReLU at those pixels (g, the gradient at
#                BatchNorm 2's output and at the residual, is 0 elsewhere), and the sums BatchNorm 2's backward
#                needs; 4. through BatchNorm 2, conv2 (its weight gradient), conv2 transposed and the ReLU, and
#                the sums of BatchNorm 1's; 5. through BatchNorm 1 and conv1 (its weight gradient) to the block's
#                input, plus the residual's g.
# A training BatchNorm's input gradient, with M the pixels of the batch, xhat = (z - mean) rstd and g the gradient
# at its output: scale (g - sum(g)/M - xhat sum(g xhat)/M) = a g + b (z - mean) + c, a = scale,
# b = -scale rstd sum(g xhat)/M, c = -scale sum(g)/M (bn_input_grad_coef). Each image's weight gradients are
# summed over the batch in torch. Kept between kernels: both convolutions' outputs, the gradients at conv1's and
# conv2's outputs (N*K*6*14*14 floats each) and g at the 7x7 pixels.


@triton.jit
def _plane_program(K, C: tl.constexpr, S: tl.constexpr, CPAD: tl.constexpr, BLOCK: tl.constexpr):
    """This program's index n*K + k (image n of network k) and k; its pixels' rows, columns and which lie inside the
    (S, S) plane; the channels c (padded to CPAD), where (c, pixel) is real; the start of its C planes in an
    (N*K, C, S, S) tensor and each (c, pixel)'s offset from there."""
    pid = tl.program_id(0)
    p = tl.arange(0, BLOCK)
    inside = p < S * S
    c = tl.arange(0, CPAD)
    return (pid, pid % K, p // S, p % S, inside, c, (c[:, None] < C) & inside[None, :], pid.to(tl.int64) * C * S * S,
            c[:, None] * S * S + p[None, :])


@triton.jit
def _stride2_pixels(S: tl.constexpr):
    """The (S/2)^2 pixels (2i, 2j) a stride-2 1x1 convolution reads: their index s, offset in the (S, S) plane
    and which are real (s is padded to 64)."""
    s = tl.arange(0, 64)
    half = S // 2
    return s, (s // half) * 2 * S + (s % half) * 2, s < half * half


@triton.jit
def _at_stride2(g, c, row, col, mask, S: tl.constexpr):
    """A (C, S/2, S/2) tensor g at the (S, S) pixels (row, col): g[c, row/2, col/2] at even ones, else 0."""
    even = mask & ((row % 2 == 0) & (col % 2 == 0))[None, :]
    return tl.load(g + c[:, None] * (S // 2) * (S // 2) + ((row // 2) * (S // 2) + col // 2)[None, :], mask=even,
                   other=0.0)


@triton.jit
def _stride2_program(h_ptr, z_ptr, K, C: tl.constexpr, S: tl.constexpr):
    """This program's index n*K + k (image n of network k) and k, _stride2_pixels, and the starts of its C planes
    (S, S) in h and z, two (N*K, C, S, S) tensors."""
    pid = tl.program_id(0)
    s, pix, sin = _stride2_pixels(S)
    start = pid.to(tl.int64) * C * S * S
    return pid, pid % K, s, pix, sin, h_ptr + start, z_ptr + start


@triton.jit
def _block_output(h, z, a, b, o, S: tl.constexpr, pix, valid):
    """Channel o of the Basic block's output, relu(a[o] z[o] + b[o] + h[o]) (BatchNorm 2's affine map a, b on
    conv2's output z, the residual h; h, z: C planes (S, S) one after another), at pixels pix; 0 where not valid."""
    at = o * S * S + pix
    zv, hv = tl.load(z + at, mask=valid, other=0.0), tl.load(h + at, mask=valid, other=0.0)
    return tl.where(valid, tl.maximum(tl.load(a + o) * zv + tl.load(b + o) + hv, 0.0), 0.0)


@triton.jit
def _bn_input_grad(coef, c, g, z, mask, C: tl.constexpr):
    """A training BatchNorm's input gradient a g + b (z - mean) + c, coef = (a, b, c, mean) each (C,); 0 outside
    mask."""
    a = tl.load(coef + c, mask=c < C, other=0.0)
    b = tl.load(coef + C + c, mask=c < C, other=0.0)
    cc = tl.load(coef + 2 * C + c, mask=c < C, other=0.0)
    mean = tl.load(coef + 3 * C + c, mask=c < C, other=0.0)
    return tl.where(mask, a[:, None] * g + b[:, None] * (z - mean[:, None]) + cc[:, None], 0.0)


@triton.jit
def _basic_conv_kernel(x_ptr, w_ptr, a_ptr, b_ptr, z_ptr, mom_ptr, K, NORM: tl.constexpr, C: tl.constexpr,
                       S: tl.constexpr, CPAD: tl.constexpr, BLOCK: tl.constexpr):
    """z = conv(x) of image n of network k (program n*K + k; x, z: (N*K, C, S, S), w: (K, C, C, 3, 3)), or with
    NORM conv(relu(a x + b)) (a, b: (K, C), the previous BatchNorm's affine map); each channel's mean over the plane
    and sum of squared deviations -> mom[n*K + k, 0:2]."""
    pid, k, row, col, inside, c, mask, base, plane = _plane_program(K, C, S, CPAD, BLOCK)
    w = w_ptr + k * C * C * 9
    if NORM:
        z = _conv3x3_bn_relu(x_ptr + base, w, a_ptr + k * C, b_ptr + k * C, c, row, col, inside, C, C, S, S, CPAD,
                             BLOCK)
    else:
        z = _conv3x3(x_ptr + base, S * S, S, 1, w, c, row, col, inside, C, C, S, S, CPAD, BLOCK)
    tl.store(z_ptr + base + plane, z, mask=mask)
    mean = tl.sum(z, axis=1) / (S * S)  # z is 0 outside the plane
    dev = tl.where(mask, z - mean[:, None], 0.0)
    tl.store(mom_ptr + pid * 2 * C + c, mean, mask=c < C)
    tl.store(mom_ptr + pid * 2 * C + C + c, tl.sum(dev * dev, axis=1), mask=c < C)


@triton.jit
def _basic_out_kernel(h_ptr, z_ptr, a_ptr, b_ptr, wd_ptr, d_ptr, K, C: tl.constexpr, OUT: tl.constexpr,
                      S: tl.constexpr):
    """d[n*K + k] (OUT, S/2, S/2) = Last's 1x1 stride-2 convolution wd (K, OUT, C) of the block's output for image
    n of network k, relu(a z + b + h) (z: conv2's output, a, b: BatchNorm 2's affine map), at the pixels it reads."""
    pid, k, s, pix, sin, h, z = _stride2_program(h_ptr, z_ptr, K, C, S)
    m = tl.arange(0, 16)
    d = tl.zeros((16, 64), dtype=tl.float32)
    for o in tl.static_range(C):
        u = _block_output(h, z, a_ptr + k * C, b_ptr + k * C, o, S, pix, sin)
        d += tl.load(wd_ptr + (k * OUT + m) * C + o, mask=m < OUT, other=0.0)[:, None] * u[None, :]
    out = d_ptr + (pid.to(tl.int64) * OUT + m[:, None]) * (S // 2) * (S // 2) + s[None, :]
    tl.store(out, d, mask=(m[:, None] < OUT) & sin[None, :])


@triton.jit
def _basic_out_grad_kernel(h_ptr, z_ptr, a_ptr, b_ptr, stats_ptr, wd_ptr, dd_ptr, g_ptr, sums_ptr, gwd_ptr, K,
                           C: tl.constexpr, OUT: tl.constexpr, S: tl.constexpr):
    """Back from dd, the gradient of _basic_out_kernel's d, for image n of network k: g, the gradient at BatchNorm
    2's output and at the residual, at the pixels Last reads (through its convolution and the block's ReLU) ->
    g[n*K + k] (C, S/2, S/2); sum g and sum g xhat per channel (stats: (K, 2, C), BatchNorm 2's mean and rstd)
    -> sums[n*K + k, 0:2]; Last's convolution's weight gradient -> gwd[n*K + k] (OUT, C)."""
    pid, k, s, pix, sin, h, z = _stride2_program(h_ptr, z_ptr, K, C, S)
    m = tl.arange(0, 16)
    msin = (m[:, None] < OUT) & sin[None, :]
    dd = tl.load(dd_ptr + (pid.to(tl.int64) * OUT + m[:, None]) * (S // 2) * (S // 2) + s[None, :], mask=msin,
                 other=0.0)
    for o in tl.static_range(C):
        u = _block_output(h, z, a_ptr + k * C, b_ptr + k * C, o, S, pix, sin)
        tl.store(gwd_ptr + (pid * OUT + m) * C + o, tl.sum(dd * u[None, :], axis=1), mask=m < OUT)
        wd = tl.load(wd_ptr + (k * OUT + m) * C + o, mask=m < OUT, other=0.0)
        g = tl.where(u > 0, tl.sum(wd[:, None] * dd, axis=0), 0.0)
        tl.store(g_ptr + (pid * C + o) * (S // 2) * (S // 2) + s, g, mask=sin)
        xhat = (tl.load(z + o * S * S + pix, mask=sin, other=0.0) - tl.load(stats_ptr + k * 2 * C + o)) \
            * tl.load(stats_ptr + k * 2 * C + C + o)
        tl.store(sums_ptr + pid * 2 * C + o, tl.sum(g, axis=0))
        tl.store(sums_ptr + pid * 2 * C + C + o, tl.sum(g * xhat, axis=0))


@triton.jit
def _basic_mid_grad_kernel(z1_ptr, a_ptr, b_ptr, stats_ptr, z2_ptr, g_ptr, coef_ptr, w2t_ptr, dz_ptr, gw_ptr,
                           da_ptr, sums_ptr, K, C: tl.constexpr, S: tl.constexpr, CPAD: tl.constexpr,
                           BLOCK: tl.constexpr):
    """Back through BatchNorm 2 and conv2 for image n of network k: dz2, BatchNorm 2's input gradient (coef: (K, 4,
    C), bn_input_grad_coef's) -> dz[n*K + k]; conv2's weight gradient, dz2 against the hidden activation relu(a z1
    + b) shifted by each tap -> gw[n*K + k] (C, C, 9); da1, the gradient at conv1's output (conv2 transposed, w2t,
    then the ReLU) -> da[n*K + k], and its sums for BatchNorm 1 (stats: its mean and rstd) -> sums[n*K + k, 0:2]."""
    pid, k, row, col, inside, c, mask, base, plane = _plane_program(K, C, S, CPAD, BLOCK)
    g = _at_stride2(g_ptr + pid.to(tl.int64) * C * (S // 2) * (S // 2), c, row, col, mask, S)
    dz = _bn_input_grad(coef_ptr + k * 4 * C, c, g, tl.load(z2_ptr + base + plane, mask=mask, other=0.0), mask, C)
    tl.store(dz_ptr + base + plane, dz, mask=mask)
    for i in tl.static_range(C):
        ai, bi = tl.load(a_ptr + k * C + i), tl.load(b_ptr + k * C + i)
        for t in tl.static_range(9):
            hidden = _bn_relu_tap(z1_ptr + base + i * S * S, row, col, t, S, S, inside, ai, bi)
            tl.store(gw_ptr + ((pid * C + c) * C + i) * 9 + t, tl.sum(dz * hidden[None, :], axis=1), mask=c < C)
    tl.debug_barrier()  # dz stored by every thread of the program before the convolution reads it shifted
    dr = _conv3x3(dz_ptr + base, S * S, S, 1, w2t_ptr + k * C * C * 9, c, row, col, inside, C, C, S, S, CPAD, BLOCK)
    z1 = tl.load(z1_ptr + base + plane, mask=mask, other=0.0)
    a = tl.load(a_ptr + k * C + c, mask=c < C, other=0.0)
    b = tl.load(b_ptr + k * C + c, mask=c < C, other=0.0)
    da = tl.where(mask & (a[:, None] * z1 + b[:, None] > 0), dr, 0.0)
    tl.store(da_ptr + base + plane, da, mask=mask)
    mean = tl.load(stats_ptr + k * 2 * C + c, mask=c < C, other=0.0)
    rstd = tl.load(stats_ptr + k * 2 * C + C + c, mask=c < C, other=0.0)
    tl.store(sums_ptr + pid * 2 * C + c, tl.sum(da, axis=1), mask=c < C)
    tl.store(sums_ptr + pid * 2 * C + C + c, tl.sum(da * (z1 - mean[:, None]) * rstd[:, None], axis=1), mask=c < C)


@triton.jit
def _basic_in_grad_kernel(h_ptr, z1_ptr, da_ptr, coef_ptr, w1t_ptr, g_ptr, dz_ptr, gw_ptr, dh_ptr, K,
                          C: tl.constexpr, S: tl.constexpr, CPAD: tl.constexpr, BLOCK: tl.constexpr):
    """Back through BatchNorm 1 and conv1 for image n of network k: dz1, BatchNorm 1's input gradient -> dz[n*K +
    k]; conv1's weight gradient, dz1 against the block's input h shifted by each tap -> gw[n*K + k] (C, C, 9); the
    gradient at h, conv1 transposed (w1t) of dz1 plus the residual's g -> dh[n*K + k]."""
    pid, k, row, col, inside, c, mask, base, plane = _plane_program(K, C, S, CPAD, BLOCK)
    da = tl.load(da_ptr + base + plane, mask=mask, other=0.0)
    dz = _bn_input_grad(coef_ptr + k * 4 * C, c, da, tl.load(z1_ptr + base + plane, mask=mask, other=0.0), mask, C)
    tl.store(dz_ptr + base + plane, dz, mask=mask)
    for i in tl.static_range(C):
        for t in tl.static_range(9):
            hv = _tap(h_ptr + base + i * S * S, S, 1, row, col, t, S, S, inside)
            tl.store(gw_ptr + ((pid * C + c) * C + i) * 9 + t, tl.sum(dz * hv[None, :], axis=1), mask=c < C)
    tl.debug_barrier()  # as in _basic_mid_grad_kernel
    dh = _conv3x3(dz_ptr + base, S * S, S, 1, w1t_ptr + k * C * C * 9, c, row, col, inside, C, C, S, S, CPAD, BLOCK)
    dh += _at_stride2(g_ptr + pid.to(tl.int64) * C * (S // 2) * (S // 2), c, row, col, mask, S)
    tl.store(dh_ptr + base + plane, dh, mask=mask)


def bn_input_grad_coef(sums, count, mean, rstd, scale):
    """From each image's sums (N, K, 2, C) of g and g xhat (g: the gradient at a training BatchNorm's output):
    its weight and bias gradients (K, C), and the coefficients (a, b, c, mean) of its input gradient
    a g + b (z - mean) + c as one float32 (K, 4, C) tensor (computed in float64)."""
    dbeta, dgamma = sums.double().sum(0).unbind(1)
    coef = torch.stack([scale, -scale * rstd * dgamma / count, -scale * dbeta / count, mean], 1)
    return dgamma.float(), dbeta.float(), coef.float().contiguous()


def _plane_meta(c, side):
    """The constexprs of the fused Basic's whole-plane kernels, for c channels of (side, side) planes."""
    return dict(C=c, S=side, CPAD=triton.next_power_of_2(c), BLOCK=_block(side, side))


class BasicBlockTrain(torch.autograd.Function):
    """The Basic block in training mode (the running statistics updated in place, as F.batch_norm does) and Last's
    1x1 stride-2 convolution after it: gradients for the block's input and every weight."""

    @staticmethod
    def forward(ctx, h, w1, gamma1, beta1, running_mean1, running_var1, w2, gamma2, beta2, running_mean2,
                running_var2, wd):
        n, k, c, side = h.shape[0], w1.shape[0], w1.shape[1], h.shape[-1]
        pixels, grid = side * side, (n * k,)
        meta = _plane_meta(c, side)
        z1, z2 = (torch.empty(n * k, c, side, side, device=h.device) for _ in range(2))
        mom = torch.empty(n, k, 2, c, device=h.device)
        _basic_conv_kernel[grid](h, w1, w1, w1, z1, mom, k, NORM=False, **meta)  # (w1 as a, b: not read)
        mean1, rstd1, scale1, shift1 = batch_stats(mom, pixels, gamma1, beta1, running_mean1, running_var1)
        a1, b1 = scale1.float().contiguous(), shift1.float().contiguous()
        _basic_conv_kernel[grid](z1, w2, a1, b1, z2, mom, k, NORM=True, **meta)
        mean2, rstd2, scale2, shift2 = batch_stats(mom, pixels, gamma2, beta2, running_mean2, running_var2)
        a2, b2 = scale2.float().contiguous(), shift2.float().contiguous()
        out = wd.shape[1]
        d = torch.empty(n, k * out, side // 2, side // 2, device=h.device)
        _basic_out_kernel[grid](h, z2, a2, b2, wd, d, k, C=c, OUT=out, S=side)
        ctx.save_for_backward(h, w1, w2, wd, z1, z2, a1, b1, a2, b2, mean1, rstd1, scale1, mean2, rstd2, scale2)
        return d

    @staticmethod
    def backward(ctx, dd):
        h, w1, w2, wd, z1, z2, a1, b1, a2, b2, mean1, rstd1, scale1, mean2, rstd2, scale2 = ctx.saved_tensors
        stats1, stats2 = (torch.stack(s, 1).float().contiguous() for s in ((mean1, rstd1), (mean2, rstd2)))
        n, k, c, side = h.shape[0], w1.shape[0], w1.shape[1], h.shape[-1]
        out, count, grid = wd.shape[1], n * side * side, (n * k,)
        meta = _plane_meta(c, side)
        g = torch.empty(n * k, c, side // 2, side // 2, device=h.device)
        sums = torch.empty(n, k, 2, c, device=h.device)
        gwd = torch.empty(n, k, out, c, device=h.device)
        _basic_out_grad_kernel[grid](h, z2, a2, b2, stats2, wd, dd.contiguous(), g, sums, gwd, k, C=c, OUT=out, S=side)
        dgamma2, dbeta2, coef2 = bn_input_grad_coef(sums, count, mean2, rstd2, scale2)
        dz, da = torch.empty_like(z1), torch.empty_like(z1)
        gw1, gw2 = (torch.empty(n, k, c, c, TAPS, device=h.device) for _ in range(2))
        w1t, w2t = (transposed_flipped(w.view(k * c, c, 3, 3), k).contiguous() for w in (w1, w2))
        _basic_mid_grad_kernel[grid](z1, a1, b1, stats1, z2, g, coef2, w2t, dz, gw2, da, sums, k, **meta)
        dgamma1, dbeta1, coef1 = bn_input_grad_coef(sums, count, mean1, rstd1, scale1)
        dh = torch.empty_like(h)
        _basic_in_grad_kernel[grid](h, z1, da, coef1, w1t, g, dz, gw1, dh, k, **meta)
        return (dh, gw1.sum(0).view_as(w1), dgamma1, dbeta1, None, None, gw2.sum(0).view_as(w2), dgamma2, dbeta2,
                None, None, gwd.sum(0).view_as(wd))


@torch.compiler.disable  # as begin_block
def basic_block_train(h, basic, last):
    """Last's 1x1 stride-2 convolution (last['downsample.weight']) of net.basic_forward(h, basic, training=True),
    by the kernels above: h (B, K*6, 14, 14) -> (B, K*12, 7, 7), what Last's BatchNorm reads; the Basic block's
    running statistics updated. Float32."""
    w1, w2, wd = basic['conv1.weight'], basic['conv2.weight'], last['downsample.weight']
    float32_only('the fused Basic block', '--fused_basic', h, w1, w2, wd)
    side = h.shape[-1]
    if side > 16 or side % 2:
        raise ValueError(f'the fused Basic block is written for even planes of at most 16x16 (got {side}x{side})')
    if wd.shape[1] > 16:
        raise ValueError(f'the fused Basic block is written for at most 16 channels out of Last\'s convolution '
                         f'(got {wd.shape[1]})')
    for i in (1, 2):
        basic[f'bn{i}.num_batches_tracked'] += 1
    bn = [basic[f'bn{i}.{name}'] for i in (1, 2) for name in ('weight', 'bias', 'running_mean', 'running_var')]
    return BasicBlockTrain.apply(h.contiguous(), w1.contiguous(), *bn[:4], w2.contiguous(), *bn[4:],
                                 wd.contiguous())


# ----------------------------------------------------------------------------------------
# The fused small-block step: the whole SGD step of generation's second phase but the update, for one image of
# one network per program: SimpleBlock_NoBn -> the frozen, eval-mode LastBlock -> cross-entropy, and back to
# the small block's two weight gradients. No batch statistics couple the images here (Begin and Last are in
# eval mode), so one kernel does it all; its inputs are the Begin outputs (read in place from the Begin cache)
# and its outputs the per-image gradients, summed over the batch in torch. Last reads its input at stride 2, so
# the small block's second convolution is computed at those 7x7 pixels only: no gradient reaches the others.
# The hidden activation and the gradient at those pixels go through a per-program scratch buffer (the
# convolutions need them at shifted pixels).

@triton.jit
def _small_step_kernel(h_ptr, off_ptr, label_ptr, w1_ptr, w2_ptr, dw_ptr, scale_ptr, shift_ptr, fcw_ptr, fcb_ptr,
                       loss_ptr, g1_ptr, g2_ptr, hid_ptr, grad_ptr, K, inv_batch, C: tl.constexpr,
                       HID: tl.constexpr, OUT: tl.constexpr, CLASSES: tl.constexpr, S: tl.constexpr):
    """Program n*K + k, image n of network k, its Begin output at h_ptr + off[n, k] (C, S, S): the loss of its
    logits / batch -> loss[n, k], its gradients of conv1 -> g1[n, k] (HID, C, 3, 3), of conv2 -> g2[n, k]
    (C, HID, 3, 3)."""
    pid = tl.program_id(0)
    k = pid % K
    h = h_ptr + tl.load(off_ptr + pid)
    # the small block's first convolution and its ReLU, every pixel p: a1, r1 (4, 256)
    p = tl.arange(0, 256)
    pr, pc, pin = p // S, p % S, p < S * S
    j = tl.arange(0, 4)
    a1 = _conv3x3(h, S * S, S, 1, w1_ptr + k * HID * C * 9, j, pr, pc, pin, C, HID, S, S, 4, 256)
    hid = hid_ptr + pid.to(tl.int64) * HID * S * S
    tl.store(hid + j[:, None] * S * S + p[None, :], tl.maximum(a1, 0.0), mask=(j[:, None] < HID) & pin[None, :])
    tl.debug_barrier()
    # the second convolution, the residual and the ReLU at the pixels Last reads, (2 si, 2 sj): u (8, 64)
    s = tl.arange(0, 64)
    half = S // 2
    sr, sc, sin = (s // half) * 2, (s % half) * 2, s < half * half
    o = tl.arange(0, 8)
    a2 = _conv3x3(hid, S * S, S, 1, w2_ptr + k * C * HID * 9, o, sr, sc, sin, HID, C, S, S, 8, 64)
    osin = (o[:, None] < C) & sin[None, :]
    u = tl.maximum(a2 + tl.load(h + o[:, None] * S * S + (sr * S + sc)[None, :], mask=osin, other=0.0), 0.0)
    # Last: the 1x1 convolution, its BatchNorm (eval: an affine map) and ReLU, v (16, 64); the logits (16,)
    m = tl.arange(0, 16)
    d = tl.zeros((16, 64), dtype=tl.float32)
    for oo in tl.static_range(C):  # channel by channel: a (16, 8, 64) product would take many registers
        u_o = tl.sum(tl.where(o[:, None] == oo, u, 0.0), axis=0)
        d += tl.load(dw_ptr + (k * OUT + m) * C + oo, mask=m < OUT, other=0.0)[:, None] * u_o[None, :]
    bs = tl.load(scale_ptr + k * OUT + m, mask=m < OUT, other=0.0)
    bb = tl.load(shift_ptr + k * OUT + m, mask=m < OUT, other=0.0)
    msin = (m[:, None] < OUT) & sin[None, :]
    v = tl.where(msin, tl.maximum(d * bs[:, None] + bb[:, None], 0.0), 0.0)
    cls = tl.arange(0, 16)
    fc = fcw_ptr + k * CLASSES * OUT * half * half + m[:, None] * half * half + s[None, :]
    logits = tl.load(fcb_ptr + k * CLASSES + cls, mask=cls < CLASSES, other=float('-inf'))
    for c in range(CLASSES):  # a loop, not unrolled: fewer registers
        logit = tl.sum(tl.sum(tl.load(fc + c * OUT * half * half, mask=msin, other=0.0) * v, axis=1), axis=0)
        logits += tl.where(cls == c, logit, 0.0)
    # cross-entropy and its gradient, divided by the batch (the step's loss is each network's batch mean)
    top = tl.max(logits, axis=0)
    lse = top + tl.log(tl.sum(tl.exp(logits - top), axis=0))
    label = tl.load(label_ptr + pid)
    tl.store(loss_ptr + pid, (lse - tl.sum(tl.where(cls == label, logits, 0.0), axis=0)) * inv_batch)
    dlogits = (tl.exp(logits - lse) - tl.where(cls == label, 1.0, 0.0)) * inv_batch
    # back through Last: dv, then du at the pixels Last reads, then da2 through the ReLU
    dv = tl.zeros((16, 64), dtype=tl.float32)
    for c in range(CLASSES):
        fc_c = tl.load(fc + c * OUT * half * half, mask=msin, other=0.0)
        dv += tl.sum(tl.where(cls == c, dlogits, 0.0), axis=0) * fc_c
    dd = tl.where(v > 0, dv, 0.0) * bs[:, None]
    du = tl.zeros((8, 64), dtype=tl.float32)
    for oo in tl.static_range(C):
        du_o = tl.sum(tl.load(dw_ptr + (k * OUT + m) * C + oo, mask=m < OUT, other=0.0)[:, None] * dd, axis=0)
        du += tl.where(o[:, None] == oo, du_o[None, :], 0.0)
    da2 = tl.where(u > 0, du, 0.0)  # (8, 64)
    # conv2's weight gradient: da2 against the hidden activation shifted by each tap
    for jj in tl.static_range(HID):
        for t in tl.static_range(9):
            rv = _tap(hid + jj * S * S, S, 1, sr, sc, t, S, S, sin)
            tl.store(g2_ptr + ((pid * C + o) * HID + jj) * 9 + t, tl.sum(da2 * rv[None, :], axis=1), mask=o < C)
    grad = grad_ptr + pid.to(tl.int64) * C * half * half
    tl.store(grad + o[:, None] * half * half + s[None, :], da2, mask=osin)
    tl.debug_barrier()
    # the gradient at the hidden activation (conv2 transposed: da2 lives on the even pixels only), its ReLU
    dr1 = tl.zeros((4, 256), dtype=tl.float32)
    for oo in tl.static_range(C):
        for t in tl.static_range(9):
            r, q = pr - (t // 3 - 1), pc - (t % 3 - 1)
            ok = pin & (r >= 0) & (r < S) & (q >= 0) & (q < S) & (r % 2 == 0) & (q % 2 == 0)
            gv = tl.load(grad + oo * half * half + (r // 2) * half + q // 2, mask=ok, other=0.0)
            wv = tl.load(w2_ptr + ((k * C + oo) * HID + j) * 9 + t, mask=j < HID, other=0.0)
            dr1 += wv[:, None] * gv[None, :]
    da1 = tl.where(a1 > 0, dr1, 0.0)
    # conv1's weight gradient: da1 against the Begin output shifted by each tap
    for i in tl.static_range(C):
        for t in tl.static_range(9):
            hv = _tap(h + i * S * S, S, 1, pr, pc, t, S, S, pin)
            tl.store(g1_ptr + ((pid * HID + j) * C + i) * 9 + t, tl.sum(da1 * hv[None, :], axis=1), mask=j < HID)


class SmallStepLoss(torch.autograd.Function):
    """The second phase's loss (the sum over networks of each one's batch-mean cross-entropy) with the small
    blocks' weight gradients computed in the same kernel; backward only hands them out."""

    @staticmethod
    def forward(ctx, w1, w2, h, offsets, labels, last):
        n, k = offsets.shape
        c, hid, side = w1.shape[2], w1.shape[1], h.shape[-1]
        loss = torch.empty(n, k, device=h.device)
        g1 = torch.empty(n, k, *w1.shape[1:], device=h.device)
        g2 = torch.empty(n, k, *w2.shape[1:], device=h.device)
        hidden = torch.empty(n * k, hid, side, side, device=h.device)
        grad = torch.empty(n * k, c, side // 2, side // 2, device=h.device)
        scale, shift = eval_bn_affine(last)
        out, classes = last['downsample.weight'].shape[1], last['fc.weight'].shape[1]
        _small_step_kernel[(n * k,)](h, offsets, labels, w1, w2, last['downsample.weight'].contiguous(),
                                     scale, shift, last['fc.weight'].contiguous(),
                                     last['fc.bias'].contiguous(), loss, g1, g2, hidden, grad, k, 1.0 / n, C=c,
                                     HID=hid, OUT=out, CLASSES=classes, S=side)
        ctx.save_for_backward(g1.sum(0), g2.sum(0))
        return loss.sum()

    @staticmethod
    def backward(ctx, dloss):
        g1, g2 = ctx.saved_tensors
        return dloss * g1, dloss * g2, None, None, None, None


@torch.compiler.disable  # as begin_block
def small_step_loss(h, offsets, labels, simple, last):
    """The second phase's loss of K small blocks `simple` (their gradients ready for backward) inside their frozen,
    eval-mode `last`: image n of network k is the Begin output at h.view(-1)[offsets[n, k]:][:6*14*14] (a
    contiguous (6, 14, 14)), its label labels[n, k]. The same loss as last_forward(simple_forward(...)) and
    cross-entropy; float32 only."""
    w1, w2 = simple['conv1.weight'], simple['conv2.weight']
    float32_only('the fused small step', '--fused_small', h, w1)
    if not h.is_contiguous():
        raise ValueError('the fused small step reads the Begin outputs from a contiguous tensor')
    side = h.shape[-1]
    if side > 16 or side % 2:
        raise ValueError(f'the fused small step is written for even planes of at most 16x16 (got {side}x{side})')
    return SmallStepLoss.apply(w1.contiguous(), w2.contiguous(), h, offsets.contiguous(), labels.contiguous(), last)

"""The routes to a faster CPU training step of generation, measured in one run on the same machine: each operator of
a step (batch 128) by aten and by its alternatives, then the whole first-phase step (one large network) by
today's default and by each whole-step route. Ratios are against today's default in the same run.

Routes: convolutions by channels-last, by unfold + matmul, and their backward as two plain convolutions; the max-pool
by channels-last and by a compiled separable scan that returns the same indices (alone, and in the eager step);
BatchNorm + ReLU compiled into one pass; bf16 autocast; torch.compile of the whole step; a batch-last layout
(C, H, W, B) where every convolution is a sum of shifted slices, compiled by inductor into C++ loops vectorised over
the batch; threads.

    python bench/step_routes.py > results/bench_cpu/step_routes.log    # needs a quiet machine (say so in the log)
    python bench/step_routes.py --quick                                  # checks that it runs; numbers mean nothing
    for i in 1 2 3; do for r in eager batch-last bf16 'separable pool'; do python bench/step_routes.py --route "$r" \
      --steps 200; done; done                                            # each route alone, processes alternating
"""
import argparse
import threading
import time

import torch
import torch.nn.functional as F

import common
import construct
import net

BATCH = 128


def ms(fn, repeats):
    """Median milliseconds of fn() over `repeats` calls, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    return 1e3 * common.median([common.timed(fn, 'cpu') for _ in range(repeats)])


def fwd_bwd(fn, *inputs):
    """fn(*inputs) then its backward with a ones gradient: the op's share of a training step."""
    return lambda: fn(*inputs).sum().backward()


def separable_pool(x):
    """3x3/2 max-pool (padding 1) of (N, C, H, W), H and W even, by rows then columns: the values and flat indices of
    max_pool2d_with_indices, bit for bit (first maximum in row-major order)."""
    h, w = x.shape[-2:]
    xp = F.pad(x, (1, 0, 1, 0), value=float('-inf'))
    cols = torch.arange(-1, w)
    m, i = xp[..., 0:w - 1:2], cols[0:w - 1:2].expand(xp.shape[:-1] + (w // 2,))
    for s in (1, 2):
        c = xp[..., s:w + s - 1:2]
        m, i = torch.where(c > m, c, m), torch.where(c > m, cols[s:w + s - 1:2], i)
    idx = i + torch.arange(-1, h)[:, None] * w
    vm, vi = m[..., 0:h - 1:2, :], idx[..., 0:h - 1:2, :]
    for s in (1, 2):
        c, ci = m[..., s:h + s - 1:2, :], idx[..., s:h + s - 1:2, :]
        vm, vi = torch.where(c > vm, c, vm), torch.where(c > vm, ci, vi)
    return vm, vi


class PoolWithIndices(torch.autograd.Function):
    """The max-pool of net.begin_forward by `scan` (separable_pool, compiled or not), backward by aten's own kernel
    from its indices: the same values and gradients, bit for bit."""

    @staticmethod
    def forward(ctx, x, scan):
        values, indices = scan(x)
        ctx.save_for_backward(x, indices)
        return values

    @staticmethod
    def backward(ctx, grad):
        x, indices = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, [3, 3], [2, 2], [1, 1], [1, 1], False,
                                                               indices), None


def separable_pool_loss(images, labels, begin, basic, last, scan=separable_pool):
    """The plain first-phase loss of one network (K = 1) with Begin's max-pool by PoolWithIndices."""
    def logits(idx, flip):
        x = F.conv2d(construct.augment(images, idx, flip), begin['conv.weight'][0], padding=1)
        h = PoolWithIndices.apply(F.relu(net.batch_norm(x, begin, 'bn.', True)), scan)
        return net.last_forward(net.basic_forward(h, basic, training=True), last, training=True)
    return construct.cross_entropy(logits, labels)


def bn_relu(x, w, b):
    """Training-mode BatchNorm (batch statistics) then ReLU, written out for inductor to fuse."""
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    scale = torch.rsqrt(var + net.BN_EPS) * w
    return F.relu((x - mean[:, None, None]) * scale[:, None, None] + b[:, None, None])


def operator_rows(repeats):
    """[(operator, route, ms)] for each operator of a step at batch 128, aten first."""
    rows = []
    for ci, co, hw in [(1, 6, 28), (6, 6, 14), (6, 3, 14), (3, 6, 14)]:
        x, w = torch.randn(BATCH, ci, hw, hw, requires_grad=ci > 1), torch.randn(co, ci, 3, 3, requires_grad=True)
        g = torch.randn(BATCH, co, hw, hw)
        xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(ci > 1)
        name = f'conv {ci}->{co} at {hw}x{hw}'

        def two_convs():  # grad_input = conv with the flipped kernel, grad_weight = conv of input by gradient
            if ci > 1:
                F.conv2d(g, w.detach().transpose(0, 1).flip(-1, -2), padding=1)
            F.conv2d(x.detach().transpose(0, 1), g.transpose(0, 1), padding=1)
        rows += [(name, route, ms(fn, repeats)) for route, fn in [
            ('aten forward', lambda: F.conv2d(x.detach(), w.detach(), padding=1)),
            ('aten forward + backward', lambda: F.conv2d(x, w, padding=1).backward(g)),
            ('channels-last forward + backward', lambda: F.conv2d(xc, w, padding=1).backward(g)),
            ('unfold + matmul forward', lambda: w.detach().view(co, -1) @ F.unfold(x.detach(), 3, padding=1)),
            ('aten forward + backward as two convolutions',
             lambda: (F.conv2d(x.detach(), w.detach(), padding=1), two_convs()))]]
    x = torch.randn(BATCH, 6, 28, 28).relu()
    compiled_pool = torch.compile(separable_pool, dynamic=False)
    ref, mine = F.max_pool2d(x, 3, 2, 1, return_indices=True), compiled_pool(x)
    assert all(torch.equal(a, b) for a, b in zip(ref, mine)), 'the separable max-pool differs from aten'
    xc = x.contiguous(memory_format=torch.channels_last)
    rows += [('max-pool 3x3/2 with indices', route, ms(fn, repeats)) for route, fn in [
        ('aten', lambda: F.max_pool2d(x, 3, 2, 1, return_indices=True)),
        ('channels-last', lambda: F.max_pool2d(xc, 3, 2, 1, return_indices=True)),
        ('compiled separable scan (same indices)', lambda: compiled_pool(x))]]
    x = torch.randn(BATCH, 6, 28, 28, requires_grad=True)
    w, b = torch.ones(6, requires_grad=True), torch.zeros(6, requires_grad=True)
    rm, rv = torch.zeros(6), torch.ones(6)
    fused = torch.compile(bn_relu, dynamic=False)
    rows += [('BatchNorm + ReLU at 28x28', 'aten forward + backward',
              ms(fwd_bwd(lambda: F.relu(F.batch_norm(x, rm, rv, w, b, True))), repeats)),
             ('BatchNorm + ReLU at 28x28', 'compiled into one pass, forward + backward',
              ms(fwd_bwd(fused, x, w, b), repeats))]
    return rows


# ---- the whole first-phase step, batch-last: activations (K, C, H, W, B), the batch innermost

def shifted_conv(x, w):
    """3x3 convolution (padding 1) of x (K, Ci, H, W, B) by w (K, Co, Ci, 3, 3) as a sum of shifted slices."""
    h, wd = x.shape[2:4]
    xp = F.pad(x, (0, 0, 1, 1, 1, 1))
    out = 0
    for ci in range(w.shape[2]):
        for dh in range(3):
            for dw in range(3):
                out = out + w[:, :, ci, dh, dw, None, None, None] * xp[:, ci:ci + 1, dh:dh + h, dw:dw + wd]
    return out


def batch_last_bn(x, s, prefix):
    """Training-mode BatchNorm over (H, W, B) of (K, C, H, W, B), running statistics updated as nn.BatchNorm2d's."""
    mean, var = x.mean((2, 3, 4)), x.var((2, 3, 4), unbiased=False)
    n = x[0, 0].numel()
    with torch.no_grad():
        s[prefix + 'num_batches_tracked'] += 1
        s[prefix + 'running_mean'].lerp_(mean, net.BN_MOMENTUM)
        s[prefix + 'running_var'].lerp_(var * n / (n - 1), net.BN_MOMENTUM)
    scale = torch.rsqrt(var + net.BN_EPS) * s[prefix + 'weight']
    return (x - mean[..., None, None, None]) * scale[..., None, None, None] + s[prefix + 'bias'][..., None, None, None]


def batch_last_pool(x):
    """3x3/2 max-pool, padding 1, over (H, W) of (K, C, H, W, B)."""
    xp = F.pad(x, (0, 0, 1, 1, 1, 1), value=float('-inf'))
    h, w = x.shape[2:4]
    taps = [xp[:, :, dh:dh + h - 1:2, dw:dw + w - 1:2] for dh in range(3) for dw in range(3)]
    out = taps[0]
    for t in taps[1:]:
        out = torch.maximum(out, t)
    return out


def batch_last_loss(images, labels, idx, flip, begin, basic, last):
    """The large networks' loss (the sum of their mean cross-entropies), batch-last."""
    x = images[idx]
    x = torch.where(flip[..., None, None], x.flip(-1), x).float().div(255).permute(0, 2, 3, 1).unsqueeze(1)
    h = batch_last_pool(F.relu(batch_last_bn(shifted_conv(x, begin['conv.weight']), begin, 'bn.')))
    out = F.relu(batch_last_bn(shifted_conv(h, basic['conv1.weight']), basic, 'bn1.'))
    h = F.relu(batch_last_bn(shifted_conv(out, basic['conv2.weight']), basic, 'bn2.') + h)
    w, hs = last['downsample.weight'][..., 0, 0], h[:, :, ::2, ::2]
    d = sum(w[:, :, ci, None, None, None] * hs[:, ci:ci + 1] for ci in range(w.shape[2]))
    d = F.relu(batch_last_bn(d, last, 'bn.')).flatten(1, 3)  # (K, 588, B)
    logits = torch.baddbmm(last['fc.bias'][..., None], last['fc.weight'], d).transpose(1, 2)
    return F.cross_entropy(logits.reshape(-1, 10), labels[idx].reshape(-1), reduction='sum') / idx.shape[1]


def bf16(loss_fn):
    """loss_fn run under CPU bf16 autocast."""
    def run(idx, flip):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            return loss_fn(idx, flip)
    return run


def large_step(images, labels, seed, route):
    """(step(idx, flip), params) of one large network, its loss by `route`."""
    sd = construct.init_pair(seed)
    begin, basic, last = (net.stack_states([sd[j]]) for j in range(3))
    params = construct.trainable(begin) + construct.trainable(basic) + construct.trainable(last)
    if route == 'batch-last':
        loss = torch.compile(lambda idx, flip: batch_last_loss(images, labels, idx, flip, begin, basic, last),
                             dynamic=False)
    elif route == 'separable pool':
        loss = separable_pool_loss(images, labels, begin, basic, last, torch.compile(separable_pool, dynamic=False))
    else:
        loss = construct.PLAIN.large_loss(images, labels, begin, basic, last)
        if route == 'compiled':
            loss = torch.compile(loss, dynamic=False)
        elif route == 'bf16':
            loss = bf16(loss)
    step, _ = construct.sgd_steps(params, loss, construct.Recipe(), [torch.zeros_like(p) for p in params])
    return step, params


def synthetic_data(steps):
    """MNIST-sized random images and labels, and `steps` batches (indices, flips) of one network, drawn from seed 0."""
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randint(0, 256, (60000, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (60000,))
    batches = [(torch.randint(0, 60000, (1, BATCH), generator=g), torch.rand(1, BATCH, generator=g) < 0.5)
               for _ in range(steps)]
    return images, labels, batches


ROUTES = ('eager', 'bf16', 'separable pool', 'compiled', 'batch-last')  # large_step's


def alone(route, steps):
    """ms a step of one large network by `route`, timed over `steps` steps after 10 warm-up steps."""
    images, labels, batches = synthetic_data(steps)
    step = large_step(images, labels, 0, route)[0]
    for b in batches[:10]:
        step(*b)
    t0 = time.perf_counter()
    for b in batches:
        step(*b)
    return 1e3 * (time.perf_counter() - t0) / steps


def step_rows(steps, threads, rounds=6):
    """[(route, ms per network-step)] of the first-phase step, today's default first: the median over `rounds`
    rounds, each timing steps // rounds steps of every route in turn (so that a drift of the machine hits all)."""
    images, labels, batches = synthetic_data(max(steps // rounds, 1))

    def one(step):  # run(batches) -> network-steps made
        return lambda bs: len([step(*b) for b in bs])

    def two_threads(steps_of_two):
        def run(bs):
            workers = [threading.Thread(target=one(s), args=(bs,)) for s in steps_of_two]
            for t in workers:
                t.start()
            for t in workers:
                t.join()
            return 2 * len(bs)
        return run

    routes = [(f"today's default: eager, {threads} threads", threads, 'eager'),
              ('eager, bf16 autocast', threads, 'bf16'),
              ("eager, Begin's max-pool by the compiled separable scan", threads, 'separable pool'),
              ('torch.compile of the step (aten convolutions)', threads, 'compiled'),
              ('batch-last, convolutions as shifted sums, compiled', threads, 'batch-last'),
              ('eager, 1 thread', 1, 'eager')]
    runs = {label: (n, one(large_step(images, labels, 0, route)[0])) for label, n, route in routes}
    runs['two networks in two Python threads, 1 torch thread each'] = (1, two_threads(
        [large_step(images, labels, seed, 'eager')[0] for seed in (0, 1)]))
    times = {label: [] for label in runs}
    for r in range(rounds + 1):  # round 0 warms up (and compiles)
        for label, (n, run) in runs.items():
            torch.set_num_threads(n)
            t0 = time.perf_counter()
            made = run(batches)
            if r:
                times[label].append(1e3 * (time.perf_counter() - t0) / made)
    torch.set_num_threads(threads)
    return [(label, common.median(t)) for label, t in times.items()]


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--repeats', type=int, default=30, help='timed calls of each operator')
    p.add_argument('--steps', type=int, default=120, help='timed steps of each whole-step route, in 6 rounds')
    p.add_argument('--threads', type=int, default=2, help='torch threads (the machine\'s cores)')
    p.add_argument('--quick', action='store_true', help='a short run that checks the script')
    p.add_argument('--route', choices=ROUTES, default=None,
                   help='time only this whole-step route, alone in this process (--steps steps after 10 warm-up '
                        'steps); run routes in alternating processes to compare them')
    args = p.parse_args()
    if args.quick:
        args.repeats, args.steps = 3, 6
    torch.set_num_threads(args.threads)
    if args.route:
        print(f'{args.route}: {alone(args.route, args.steps):.2f} ms a step')
        return
    print(f'machine: {common.machine("cpu")}\n\n## Operators at batch 128 (median ms of {args.repeats} calls)\n')
    rows, base = [], {}
    for op, route, t in operator_rows(args.repeats):
        base.setdefault(op, t)
        rows.append([op, route, f'{t:.3f}', f'{base[op] / t:.2f}x'])
    common.print_table(['operator', 'route', 'ms', 'vs the first row'], rows)
    print(f'\n## The first-phase step, one large network (ms per network-step: median of 6 rounds of '
          f'{max(args.steps // 6, 1)} steps, the routes interleaved)\n')
    rows = step_rows(args.steps, args.threads)
    common.print_table(['route', 'ms', "vs today's default"],
                       [[r, f'{t:.2f}', f'{rows[0][1] / t:.2f}x'] for r, t in rows])


if __name__ == '__main__':
    main()

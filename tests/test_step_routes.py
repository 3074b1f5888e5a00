"""bench/step_routes.py times the same computation by each route: its separable max-pool and its batch-last
step must equal aten's and the plain step's (checked here without compiling; the benchmark compiles them)."""
import copy
import os
import sys

import torch
import torch.nn.functional as F

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'bench'))
import construct  # noqa: E402
import net  # noqa: E402
import step_routes  # noqa: E402


def test_separable_pool_gives_atens_values_and_indices_ties_included():
    x = torch.randn(4, 6, 28, 28).relu()
    x[:, :, 8:20, 8:20] = 0.5  # a flat patch: every window in it is a tie
    values, indices = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    mine = step_routes.separable_pool(x)
    assert torch.equal(mine[0], values) and torch.equal(mine[1], indices)


def test_the_step_with_the_separable_pool_is_the_plain_step_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randint(0, 256, (300, 28, 28), dtype=torch.uint8, generator=g), torch.randint(0, 10, (300,))
    idx, flip = torch.randint(0, 300, (1, 32), generator=g), torch.rand(1, 32, generator=g) < 0.5
    states = [net.stack_states([sd]) for sd in construct.init_pair(5)[:3]]
    grads = []
    for loss_of in (construct.PLAIN.large_loss, step_routes.separable_pool_loss):
        blocks = copy.deepcopy(states)
        params = [t for state in blocks for t in construct.trainable(state)]
        grads.append(torch.autograd.grad(loss_of(images, labels, *blocks)(idx, flip), params))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_batch_last_loss_and_gradients_equal_the_plain_step():
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randint(0, 256, (300, 28, 28), dtype=torch.uint8, generator=g), torch.randint(0, 10, (300,))
    idx, flip = torch.randint(0, 300, (2, 16), generator=g), torch.rand(2, 16, generator=g) < 0.5
    sds = [construct.init_pair(seed) for seed in (3, 4)]
    states = [net.stack_states([sd[j] for sd in sds]) for j in range(3)]
    twin = copy.deepcopy(states)
    losses, grads = [], []
    for (begin, basic, last), fn in [(states, construct.PLAIN.large_loss(images, labels, *states)),
                                     (twin, lambda i, f: step_routes.batch_last_loss(images, labels, i, f, *twin))]:
        params = construct.trainable(begin) + construct.trainable(basic) + construct.trainable(last)
        loss = fn(idx, flip)
        losses.append(loss.item())
        grads.append(torch.autograd.grad(loss, params))
    assert abs(losses[0] - losses[1]) < 1e-5 * abs(losses[0])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    for plain, mine in zip(states, twin):  # the BatchNorm running statistics too
        for name in plain:
            assert torch.allclose(plain[name].float(), mine[name].float(), atol=1e-6), name

"""The plain step's own speed work against what it replaces: the SGD update against torch.optim.SGD, the reused
workspace against fresh ones (speed/tests/test_generate_speed.py has the faster paths)."""
import pytest
import torch

import construct
import construct_train
import generation

TINY = ['--num_epochs', '1', '--num_train_images', '300', '--num_test_images', '200', '--device', 'cpu']
STATES = ('begin', 'basic', 'last', 'simple')


@pytest.fixture(autouse=True)
def single_thread(one_thread):
    """Single-threaded, so that sums run in one fixed order."""


@pytest.fixture(scope='module')
def mnist():
    return generation.load_mnist_to(torch.device('cpu'), construct_train.get_args('train', TINY))


def tiny_args(*extra):
    return construct_train.get_args('train', TINY + list(extra)).recipe


def max_diff(a, b):
    """Largest absolute difference between two shards' float tensors."""
    return max((a[s][n] - b[s][n]).abs().max().item() for s in STATES for n in a[s] if a[s][n].is_floating_point())


def test_sgd_update_equals_torch_sgd():
    torch.manual_seed(0)
    ours = [torch.randn(5, 3), torch.randn(7)]
    theirs = [p.clone().requires_grad_() for p in ours]
    bufs = [torch.zeros_like(p) for p in ours]
    opt = torch.optim.SGD(theirs, lr=0.01, momentum=0.9, foreach=True)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in ours]
        construct.sgd_update(ours, grads, bufs, 0.01)
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        opt.step()
    assert all(torch.equal(a, b.detach()) for a, b in zip(ours, theirs))  # bit for bit


def test_reused_workspace_is_exact_and_shards_do_not_alias_it(mnist):
    args = tiny_args()
    fresh = [construct.make_pairs(range(a, a + 2), args, mnist, torch.device('cpu')) for a in (0, 2)]
    workspaces = {}
    first = construct.make_pairs(range(0, 2), args, mnist, torch.device('cpu'), workspaces=workspaces)
    kept = {n: t.clone() for n, t in first['basic'].items()}
    second = construct.make_pairs(range(2, 4), args, mnist, torch.device('cpu'), workspaces=workspaces)
    assert list(workspaces) == [2]
    assert max_diff(first, fresh[0]) == 0 and max_diff(second, fresh[1]) == 0
    assert all(torch.equal(first['basic'][n], t) for n, t in kept.items())  # the next group did not overwrite it

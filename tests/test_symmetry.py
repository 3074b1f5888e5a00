"""SimpleBlock_NoBn's symmetries: the canonical form (symmetry.canonical_simple) and the orbit cosine."""
import pytest
import torch

import net
import symmetry


def random_blocks(n, gen):
    """n stacked small blocks with weights of unequal scales, like trained ones."""
    conv1 = torch.randn(n, 3, 6, 3, 3, generator=gen) * torch.rand(n, 3, 1, 1, 1, generator=gen).add(0.1)
    conv2 = torch.randn(n, 6, 3, 3, 3, generator=gen) * torch.rand(n, 1, 3, 1, 1, generator=gen).add(0.1)
    return conv1, conv2


def shuffle_hidden(conv1, conv2, gen):
    """The same blocks with their hidden channels rescaled by random c > 0 and permuted at random."""
    b = torch.arange(len(conv1))[:, None]
    perm = torch.stack([torch.randperm(3, generator=gen) for _ in range(len(conv1))])
    c = torch.exp(2 * torch.randn(len(conv1), 3, generator=gen))  # scales from about 0.02 to 50
    conv1 = conv1[b, perm] * c[:, :, None, None, None]
    conv2 = conv2.transpose(1, 2)[b, perm].transpose(1, 2) / c[:, None, :, None, None]
    return conv1, conv2


def outputs(conv1, conv2, x):
    """Stacked SimpleBlock_NoBn outputs of the n blocks on the same inputs x (B, 6, 14, 14)."""
    n = len(conv1)
    return net.simple_forward(x.repeat(1, n, 1, 1), {'conv1.weight': conv1, 'conv2.weight': conv2})


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def test_canonical_computes_the_same_function(gen, one_thread):
    conv1, conv2 = random_blocks(8, gen)
    x = torch.randn(16, 6, 14, 14, generator=gen)
    c1, c2 = symmetry.canonical_simple(conv1, conv2)
    assert c1.shape == conv1.shape and c2.shape == conv2.shape
    ref = outputs(conv1, conv2, x)  # entries up to about 80: float32 rounding is about 1e-5 there
    torch.testing.assert_close(outputs(c1, c2, x), ref, atol=1e-4, rtol=1e-5)
    d1, d2 = symmetry.canonical_simple(conv1.double(), conv2.double())  # in float64 the match is exact to 1e-12
    torch.testing.assert_close(outputs(d1, d2, x.double()), ref.double(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(outputs(d1, d2, x.double()), outputs(conv1.double(), conv2.double(), x.double()),
                               atol=1e-12, rtol=0)
    module = net.SimpleBlock_NoBn()  # the original module agrees too
    module.load_state_dict({'conv1.weight': c1[3], 'conv2.weight': c2[3]})
    with torch.no_grad():
        torch.testing.assert_close(module(x), ref[:, 18:24], atol=1e-4, rtol=1e-5)
    norms = torch.linalg.vector_norm(c1.flatten(2), dim=2)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    strength = torch.linalg.vector_norm(c2.transpose(1, 2).flatten(2), dim=2)
    assert (strength[:, :-1] >= strength[:, 1:]).all()  # the documented order: descending


def test_canonical_is_idempotent_and_orbit_invariant(gen, one_thread):
    conv1, conv2 = random_blocks(32, gen)
    c1, c2 = symmetry.canonical_simple(conv1, conv2)
    again = symmetry.canonical_simple(c1, c2)
    torch.testing.assert_close(again[0], c1, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(again[1], c2, atol=1e-6, rtol=1e-6)
    s1, s2 = symmetry.canonical_simple(*shuffle_hidden(conv1, conv2, gen))
    torch.testing.assert_close(s1, c1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s2, c2, atol=1e-5, rtol=1e-5)


def test_zero_filters_are_finite_and_canonical(gen, one_thread):
    conv1, conv2 = random_blocks(4, gen)
    conv1[0, 1] = 0  # one dead hidden channel
    conv1[1, :2] = 0  # two: a tie that the weights break
    conv1[2] = 0  # the whole block is the identity-then-ReLU
    conv2[3] = 0  # conv2 zero: every channel has strength 0
    x = torch.randn(8, 6, 14, 14, generator=gen)
    c1, c2 = symmetry.canonical_simple(conv1, conv2)
    assert torch.isfinite(c1).all() and torch.isfinite(c2).all()
    torch.testing.assert_close(outputs(c1, c2, x), outputs(conv1, conv2, x), atol=1e-4, rtol=1e-5)
    assert (c1[2] == 0).all() and (c2[2] == 0).all()
    s1, s2 = symmetry.canonical_simple(*shuffle_hidden(conv1, conv2, gen))
    torch.testing.assert_close(s1, c1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s2, c2, atol=1e-5, rtol=1e-5)
    cos = symmetry.best_order_cosine((conv1, conv2), (conv1, conv2))
    assert torch.isfinite(cos).all()


def test_best_order_cosine(gen, one_thread):
    a, b = random_blocks(16, gen), random_blocks(16, gen)
    same = symmetry.best_order_cosine(a, shuffle_hidden(*a, gen))
    torch.testing.assert_close(same, torch.ones(16), atol=1e-5, rtol=0)
    ab, ba = symmetry.best_order_cosine(a, b), symmetry.best_order_cosine(b, a)
    torch.testing.assert_close(ab, ba)  # reordering b by o matches a reordered by o's inverse
    assert (ab < 0.9).all() and (ab > -1).all()
    mirrored = symmetry.best_order_cosine(a, (a[0], -a[1]))  # conv1 part equal, conv2 part opposite
    assert (mirrored < 1 - 1e-3).all()

"""experiments/cross_arch_rows.py's measure of "one block for every network": the mean cosine of the blocks'
effects (output - input) on shared inputs, across networks."""
import os
import sys

import torch

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'experiments'))
import cross_arch_rows  # noqa: E402
import net  # noqa: E402
import rules  # noqa: E402


def test_the_same_block_everywhere_agrees_fully_and_different_blocks_less():
    probe = torch.rand(8, 6, 14, 14)
    one = net.fresh_states('MLPBlock', [0])
    same = {k: t.expand(5, *t.shape[1:]) for k, t in one.items()}
    assert abs(cross_arch_rows.effect_agreement(same, probe) - 1.0) < 1e-5
    different = net.fresh_states('MLPBlock', range(5))
    assert cross_arch_rows.effect_agreement(different, probe) < 0.99


def test_a_block_without_effect_counts_as_zero():
    probe = torch.rand(8, 6, 14, 14)  # >= 0, as Begin's outputs: a zero SimpleBlock_NoBn is the identity there
    zero = {k: torch.zeros_like(t) for k, t in net.fresh_states('SimpleBlock_NoBn', range(3)).items()}
    assert cross_arch_rows.effect_agreement(zero, probe) == 0.0


def test_the_rules_blocks_are_measured_too():
    probe = torch.rand(8, 6, 14, 14)
    basic = net.fresh_states('basic', range(3))
    for rule in rules.rules_of('SimpleBlock').values():  # their BatchNorm tensors may be views
        assert -1.0 <= cross_arch_rows.effect_agreement(rule(basic), probe) <= 1.0

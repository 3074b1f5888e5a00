"""The translator matches the original implementation exactly (fixture made with the authors' code)."""
import pytest
import torch

from mixer import MLPMixer
from net import num_params

FIXTURE = 'tests/fixtures/original_mixer.pt'


@pytest.fixture(scope='module')
def original():
    return torch.load(FIXTURE, weights_only=True)


@pytest.mark.parametrize('name', ['L2_C16', 'L1_C9'])
def test_outputs_match_original(original, name):
    case = original[name]
    model = MLPMixer(**case['config'])
    model.load_state_dict(case['state_dict'], strict=True)
    model.eval()
    with torch.no_grad():
        out = model(case['inputs'])
    assert len(out) == 2
    for got, want in zip(out, case['outputs']):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_c_dim_9_has_no_maps(original):
    names = set(MLPMixer(**original['L1_C9']['config']).state_dict())
    assert not any(n.startswith(('map1', 'map2')) for n in names)
    assert {'map1.weight', 'map2.bias'} <= set(MLPMixer(C_dim=16).state_dict())


def test_full_config_params_and_names(original):
    model = MLPMixer(num_layers=24, S_dim=72, C_dim=128, hidden_S_dim=256, hidden_C_dim=512)
    assert num_params(model) == original['full_config_param_count'] == 4_096_621
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    assert shapes == {n: tuple(s) for n, s in original['full_config_state_dict_shapes'].items()}
    assert list(shapes) == list(original['full_config_state_dict_shapes'])


def test_batch_items_are_independent():
    """Each block is translated on its own: a batch gives the same as one at a time."""
    torch.manual_seed(0)
    model = MLPMixer(num_layers=1, C_dim=16, hidden_S_dim=8, hidden_C_dim=8).eval()
    c1, c2 = torch.randn(4, 6, 6, 3, 3), torch.randn(4, 6, 6, 3, 3)
    with torch.no_grad():
        batch = model([c1, c2])
        single = model([c1[2:3], c2[2:3]])
    assert batch[0].shape == (4, 3, 6, 3, 3) and batch[1].shape == (4, 6, 3, 3, 3)
    torch.testing.assert_close(batch[0][2:3], single[0])
    torch.testing.assert_close(batch[1][2:3], single[1])


def test_mixer_flops_hand_count():
    """mixer_flops against a hand count of every Linear of a tiny config (2 * rows * in * out each)."""
    from mixer import mixer_flops
    # L=1, S=72, C=16, hS=8, hC=4: map1 72x9->16, token fc1 16x72->8, fc2 16x8->72, channel fc1 72x16->4,
    # fc2 72x4->16, head fc1 16x72->8, fc2 16x8->36, map2 36x16->9
    hand = 2 * (72 * 9 * 16 + 16 * 72 * 8 + 16 * 8 * 72 + 72 * 16 * 4 + 72 * 4 * 16 + 16 * 72 * 8 + 16 * 8 * 36
                + 36 * 16 * 9)
    assert mixer_flops(1, 72, 16, 8, 4) == hand
    assert mixer_flops(1, 72, 16, 8, 4, batch=5, backward=True) == 15 * hand
    model = MLPMixer(num_layers=1, C_dim=16, hidden_S_dim=8, hidden_C_dim=4)
    assert mixer_flops(**model.config) == hand
    # C_dim == 9: no map1 / map2
    assert mixer_flops(1, 72, 9, 8, 4) == 2 * (9 * 72 * 8 * 2 + 72 * 9 * 4 * 2 + 9 * 72 * 8 + 9 * 8 * 36)
    # the README configuration: about 0.68 GFLOP per block forward
    assert 0.67e9 < mixer_flops(24, 72, 128, 256, 512) < 0.70e9


def test_mixer_flops_counts_every_linear():
    """Counting with hooks on the actual model's Linear layers gives the same number."""
    from mixer import mixer_flops
    model = MLPMixer(num_layers=2, C_dim=16, hidden_S_dim=8, hidden_C_dim=4)
    counted = []

    def hook(mod, inp, out):
        counted.append(2 * inp[0].numel() * mod.out_features)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model([torch.randn(3, 6, 6, 3, 3), torch.randn(3, 6, 6, 3, 3)])
    assert sum(counted) == mixer_flops(**model.config, batch=3)

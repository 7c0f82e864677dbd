"""LEMON's point: the copies are not symmetric, and the seed alone decides the weights."""

import pytest
import torch
from torch import nn

import lemon_fx
from lemon_fx import Plan


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.fc2(torch.relu(self.fc1(x))))


@pytest.fixture()
def gm():
    torch.manual_seed(0)
    return lemon_fx.trace(_MLP().double(), (torch.randn(4, 6, dtype=torch.float64),))


def _grow(gm, **kw):
    plan = Plan(width=2.0, **kw)
    return lemon_fx.grow(gm, plan)


def test_fan_out_columns_of_copies_differ_and_sum_to_the_source(gm):
    big = _grow(gm, seed=0)
    w, w2 = gm.fc2.weight, big.fc2.weight  # fc2 reads the copied hidden units
    copies = w2[:, :8], w2[:, 8:]
    assert not torch.allclose(copies[0][:6], copies[1][:6], atol=1e-3)
    # rows 0..5 are the original outputs; each pair of copies sums to the source column
    torch.testing.assert_close(copies[0][:6] + copies[1][:6], w, rtol=0, atol=1e-12)


def test_fan_in_rows_of_copies_are_identical(gm):
    big = _grow(gm, seed=0)
    assert torch.equal(big.fc1.weight[:8], gm.fc1.weight)
    assert torch.equal(big.fc1.weight[8:], gm.fc1.weight)
    assert torch.equal(big.fc1.bias[8:], gm.fc1.bias)


def test_net2net_splits_equally(gm):
    big = _grow(gm, method="net2net")
    torch.testing.assert_close(big.fc2.weight[:6, :8], big.fc2.weight[:6, 8:], rtol=0, atol=0)
    torch.testing.assert_close(big.fc2.weight[:6, :8], gm.fc2.weight / 2, rtol=0, atol=1e-15)


def test_same_seed_same_weights_other_seed_other_weights(gm):
    a, b, c = _grow(gm, seed=1), _grow(gm, seed=1), _grow(gm, seed=2)
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    assert any(not torch.equal(t, c.state_dict()[n]) for n, t in a.state_dict().items())


def test_noise_is_at_the_layers_own_weight_scale(gm):
    big = _grow(gm, seed=0)
    # split columns = W/2 + (R - mean of R over the copies); R ~ U(+-sqrt(3) std(W))
    bound = 3**0.5 * gm.fc2.weight.std().item()
    deviation = big.fc2.weight[:6, :8] - gm.fc2.weight / 2
    assert deviation.abs().max() <= bound + 1e-12
    assert deviation.std() > bound / 4


def test_every_seed_is_lossless(gm):
    x = torch.randn(9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    for seed in range(3):
        big = _grow(gm, seed=seed)
        torch.testing.assert_close(big(x), gm(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("scale", [0.0, 0.25, 3.0])
def test_noise_scale_multiplies_the_bound_and_stays_lossless(gm, scale):
    big = _grow(gm, seed=0, noise_scale=scale)
    deviation = big.fc2.weight[:6, :8] - gm.fc2.weight / 2
    bound = scale * 3**0.5 * gm.fc2.weight.std().item()
    assert deviation.abs().max() <= bound + 1e-12
    if scale:
        assert deviation.std() > bound / 4
    x = torch.randn(9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(big(x), gm(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("scale", [-0.5, "1", True, float("nan")])
def test_noise_scale_must_be_a_non_negative_number(scale):
    with pytest.raises(lemon_fx.PlanError) as info:
        Plan(width=2.0, noise_scale=scale)
    assert info.value.problems[0].node == "noise_scale"

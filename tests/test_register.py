"""Users' own layers: a rule registered through the public API grows their module."""

import pytest
import torch
from torch import nn

import lemon_fx
from lemon_fx.analysis.registry import Registry
from passes.rules import default_registry


class ChannelScale(nn.Module):
    """A user's layer: multiply the last axis by a learned per-channel scale."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        return x * self.weight


class ChannelScaleRule(lemon_fx.Rule):
    """``y = x * w`` along the last axis: same axes, w expanded like the channel.

    A product of two tensors along a grown axis is exact in the circ or zero form.
    """

    def analyze(self, node, ctx):
        x = node.args[0]
        ctx.pass_through(x, node)
        weight = ctx.param("weight")
        ctx.unify(ctx.param_dims(weight)[0], ctx.dims(node)[-1])
        ctx.require_form(ctx.slot(node, -1), {"circ", "zero"}, "a per-channel product")
        ctx.claim(weight, [lemon_fx.AxisUse("expand", ctx.slot(node, -1))])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.scale = ChannelScale(8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.scale(self.fc1(x))))


@pytest.fixture()
def registered():
    registry = default_registry()
    lemon_fx.register(ChannelScale)(ChannelScaleRule)
    yield
    registry._modules.pop(ChannelScale)


def test_traced_through_the_users_layer_needs_no_rule():
    net = Net().double()
    gm = lemon_fx.trace(net, (torch.randn(3, 4, dtype=torch.float64),))
    big = lemon_fx.grow(gm, lemon_fx.Plan(width=1.5))
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(big(x), net(x), rtol=0, atol=1e-12)


def test_an_opaque_layer_without_a_rule_blocks_growth():
    gm = lemon_fx.trace(Net().double(), (torch.randn(3, 4, dtype=torch.float64),),
                        leaf_modules=(ChannelScale,))
    with pytest.raises(lemon_fx.UnsupportedOpError) as info:
        lemon_fx.grow(gm, lemon_fx.Plan(width=2.0))
    assert info.value.problems[0].node == "scale"
    assert "test_register.ChannelScale" in info.value.problems[0].op


def test_a_registered_rule_grows_the_users_layer_losslessly(registered):
    net = Net().double()
    gm = lemon_fx.trace(net, (torch.randn(3, 4, dtype=torch.float64),))
    assert any(n.op == "call_module" and n.target == "scale" for n in gm.graph.nodes)
    for width in (2.0, 1.5):
        big = lemon_fx.grow(gm, lemon_fx.Plan(width=width))
        assert big.scale.weight.shape == (int(8 * width),)
        x = torch.randn(5, 4, dtype=torch.float64)
        torch.testing.assert_close(big(x), net(x), rtol=0, atol=1e-12)


def test_registering_an_op_twice_is_an_error():
    registry = Registry()
    registry.add(ChannelScaleRule(), [ChannelScale])
    with pytest.raises(ValueError, match="already has the rule ChannelScaleRule"):
        registry.add(ChannelScaleRule(), [ChannelScale])
    registry.add(ChannelScaleRule(), [ChannelScale], replace=True)


class CumulativeScale(nn.Module):
    """A user's layer that mixes channels (a cumulative sum), so no per-channel rule fits."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        return torch.cumsum(x * self.weight, dim=-1)


def test_a_wrong_user_rule_is_caught_before_grow_returns():
    """The rule claims a per-channel product, but the layer sums over channels: grow must
    not hand out the grown model (its last guard runs both on the example inputs)."""
    registry = default_registry()
    lemon_fx.register(CumulativeScale)(ChannelScaleRule)
    try:
        class Wrong(Net):
            def __init__(self):
                super().__init__()
                self.scale = CumulativeScale(8)

        gm = lemon_fx.trace(Wrong().double(), (torch.randn(3, 4, dtype=torch.float64),))
        with pytest.raises(lemon_fx.VerificationError,
                           match="does not compute the source model's function") as info:
            lemon_fx.grow(gm, lemon_fx.Plan(width=2.0))
        assert "custom rule registered with lemon_fx.register" in info.value.problems[0].fix
    finally:
        registry._modules.pop(CumulativeScale)

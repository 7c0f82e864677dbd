"""lemon_fx.trace: shapes and values on every node, inputs remembered, model untouched."""

import pytest
import torch
from torch import nn

import lemon_fx
from lemon_fx.tracing.graph_facts import EXAMPLE_INPUTS_KEY, plain_value, source_line, tensor_shape


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x, scale=None):
        B, C = x.shape
        y = self.bn(self.fc(x)).view(B, 2, C // 2)
        if scale is not None:
            y = y * scale
        return y


def test_every_tensor_node_has_a_shape_and_plain_values_are_recorded():
    gm = lemon_fx.trace(_Net(), (torch.randn(3, 8),))
    shapes = {n.name: tensor_shape(n) for n in gm.graph.nodes}
    assert shapes["x"] == (3, 8)
    assert shapes["view"] == (3, 2, 4)
    floordiv = next(n for n in gm.graph.nodes if n.name == "floordiv")
    assert plain_value(floordiv) == 4
    assert gm.meta[EXAMPLE_INPUTS_KEY][0].shape == (3, 8)


def test_source_lines_point_at_the_users_code():
    gm = lemon_fx.trace(_Net(), (torch.randn(3, 8),))
    view = next(n for n in gm.graph.nodes if n.name == "view")
    assert "test_tracing.py" in source_line(view)
    assert ".view(B, 2, C // 2)" in source_line(view)


def test_the_users_model_is_not_touched_by_tracing():
    net = _Net().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    lemon_fx.trace(net, (torch.randn(3, 8) * 5 + 2,))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm running stats unchanged


def test_example_kwargs_follow_the_signature():
    gm = lemon_fx.trace(_Net(), (torch.randn(3, 8),), example_kwargs={"scale": torch.ones(4)})
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x", "scale"]


def test_example_kwargs_with_a_gap_are_a_trace_error():
    class Two(nn.Module):
        def forward(self, a, b=None, c=None):
            return a

    with pytest.raises(lemon_fx.TraceError, match="leave a gap"):
        lemon_fx.trace(Two(), (torch.randn(2),), example_kwargs={"c": torch.randn(2)})


def test_leaf_modules_are_kept_whole():
    class Inner(nn.Module):
        def forward(self, x):
            return x * 2

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

        def forward(self, x):
            return self.inner(x)

    gm = lemon_fx.trace(Outer(), (torch.randn(2),), leaf_modules=(Inner,))
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "output"]


def test_not_a_module_is_a_trace_error():
    with pytest.raises(lemon_fx.TraceError, match="needs an nn.Module"):
        lemon_fx.trace(lambda x: x, (torch.randn(2),))


def test_inputs_that_do_not_fit_are_a_trace_error():
    with pytest.raises(lemon_fx.TraceError, match="failed on the example inputs"):
        lemon_fx.trace(_Net(), (torch.randn(3, 5),))

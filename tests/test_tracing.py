"""lemon_fx.trace: shapes and values on every node, inputs remembered, model untouched."""

import collections
import dataclasses

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


def test_example_kwargs_may_skip_arguments_and_pin_python_values():
    # no positional gap rule: b keeps its default, flag=False is pinned, c is a graph input
    class Gap(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.out = nn.Linear(6, 4)

        def forward(self, a, b=None, flag=True, c=None):
            h = torch.relu(self.fc(a))
            if b is not None:
                h = h * b
            if flag:
                h = h + 100.0
            return self.out(h) + c

    model = Gap().double()
    a, c = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    gm = lemon_fx.trace(model, (a,), example_kwargs={"flag": False, "c": c})
    torch.testing.assert_close(gm(a, c=c), model(a, flag=False, c=c), rtol=0, atol=0)
    big = lemon_fx.grow(gm, lemon_fx.Plan(width=2.0))
    a2, c2 = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(big(a2, c=c2), model(a2, flag=False, c=c2), rtol=0, atol=1e-12)


def test_an_example_kwarg_forward_does_not_take_is_a_trace_error():
    class Two(nn.Module):
        def forward(self, a, b=None):
            return a

    with pytest.raises(lemon_fx.TraceError, match="no argument 'c'"):
        lemon_fx.trace(Two(), (torch.randn(2),), example_kwargs={"c": torch.randn(2)},
                       frontend="fx")


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


_Out = collections.namedtuple("_Out", "logits extra")


@dataclasses.dataclass
class _DataOut:
    logits: torch.Tensor
    pooled: torch.Tensor


class _Structured(nn.Module):
    """Returns a namedtuple, a dataclass or both nested, as model code does."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y = self.head(torch.relu(self.fc(x)))
        if self.kind == "namedtuple":
            return _Out(y, y * 2)
        if self.kind == "dataclass":
            return _DataOut(y, y.mean(-1))
        return _Out(_DataOut(y, y.sum(-1)), {"none": None, "scaled": y / 3})


@pytest.mark.parametrize("kind", ["namedtuple", "dataclass", "nested"])
def test_the_grown_module_returns_the_models_own_output_structure(kind: str):
    # on the fx frontend the constructors were ops without a rule: growth was refused
    model = _Structured(kind).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    gm = lemon_fx.trace(model, (torch.randn(2, 4, dtype=torch.float64),), frontend="fx")
    big = lemon_fx.grow(gm, lemon_fx.Plan(width=2.0))
    fresh = torch.randn(5, 4, dtype=torch.float64)
    assert type(big(fresh)) is type(model(fresh))
    assert lemon_fx.verify(model, big, (fresh,)).ok

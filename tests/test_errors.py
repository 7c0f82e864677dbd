"""Errors: typed, complete, raised before anything is built, inputs untouched."""

import copy

import pytest
import torch
import torch.fx
from torch import nn

import lemon_fx
from lemon_fx import NotLosslessError, Plan, Problem, TraceError, UnsupportedOpError


class _TwoUnknownOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        x = torch.flip(x, [0])  # unknown, but only on the input's fixed axes
        h = torch.cumsum(self.fc1(x), dim=-1)
        h = torch.logcumsumexp(self.fc2(h), dim=-1)
        return self.out(h)


def _snapshot(gm):
    return copy.deepcopy(gm.state_dict()), gm.code


def _assert_untouched(gm, snapshot):
    state, code = snapshot
    assert gm.code == code
    assert state.keys() == gm.state_dict().keys()
    for k, v in gm.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_every_unknown_op_on_a_grown_axis_is_listed_once():
    torch.manual_seed(0)
    gm = lemon_fx.trace(_TwoUnknownOps(), (torch.randn(3, 4),))
    before = _snapshot(gm)
    with pytest.raises(UnsupportedOpError) as info:
        lemon_fx.grow(gm, Plan(width=2.0))
    err = info.value
    nodes = {p.node for p in err.problems}
    assert {"cumsum", "logcumsumexp"} <= nodes
    assert "flip" not in nodes
    text = str(err)
    assert "torch.cumsum" in text and "torch.logcumsumexp" in text
    assert "no rule for this op" in text
    assert "fix: register a rule" in text
    assert "test_errors.py" in text  # the user's source line
    _assert_untouched(gm, before)


def test_inspect_says_which_op_blocks_a_group():
    torch.manual_seed(0)
    gm = lemon_fx.trace(_TwoUnknownOps(), (torch.randn(3, 4),))
    report = lemon_fx.inspect(gm)
    blocked = [g for g in report.groups if g.blocked_by]
    assert blocked and any("cumsum" in why for g in blocked for why in g.blocked_by)
    assert "blocked" in str(report)


class _SoftmaxOverWidth(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.softmax(self.fc(x), dim=-1))


def test_softmax_over_a_grown_axis_is_not_lossless():
    gm = lemon_fx.trace(_SoftmaxOverWidth(), (torch.randn(3, 4),))
    with pytest.raises(NotLosslessError) as info:
        lemon_fx.grow(gm, Plan(width=2.0))
    problem = info.value.problems[0]
    assert problem.node == "softmax"
    assert "normalizer" in problem.reason
    assert problem.fix


class _PostLN(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.fc = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 8)
        self.ln2 = nn.LayerNorm(8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        x = self.ln(self.inp(x) + self.fc(self.inp(x)))
        return self.out(self.ln2(x + self.fc2(x)))


def test_post_ln_at_a_non_multiple_width_names_the_norms_and_the_fix():
    gm = lemon_fx.trace(_PostLN(), (torch.randn(3, 4),))
    before = _snapshot(gm)
    with pytest.raises(NotLosslessError) as info:
        lemon_fx.grow(gm, Plan(width=1.5))
    text = str(info.value)
    assert "zero form" in text and "avg form" in text
    assert "whole multiple" in text
    _assert_untouched(gm, before)


def test_trace_error_names_the_line_and_the_fix():
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x

    with pytest.raises(TraceError) as info:
        lemon_fx.trace(DataDependent(), (torch.randn(2),))
    text = str(info.value)
    assert "if x.sum() > 0" in text
    assert "leaf_modules" in text and "concrete_args" in text


def test_plain_symbolic_trace_needs_example_inputs():
    gm = torch.fx.symbolic_trace(_SoftmaxOverWidth())
    with pytest.raises(TraceError, match="no shape metadata"):
        lemon_fx.grow(gm, Plan(width={"@hidden": 8}))
    with pytest.raises(TraceError, match="no shape metadata"):
        lemon_fx.inspect(gm)


def test_plain_symbolic_trace_grows_with_example_inputs():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 8)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            return self.out(torch.relu(self.fc(x)))

    net = Net().double()
    gm = torch.fx.symbolic_trace(net)
    big = lemon_fx.grow(gm, Plan(width=2.0), example_inputs=(torch.randn(3, 4).double(),))
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(big(x), net(x), rtol=0, atol=1e-12)
    assert big.fc.out_features == 16


def test_grow_rejects_a_module_that_is_not_a_graph_module():
    with pytest.raises(TraceError, match="lemon_fx.trace"):
        lemon_fx.grow(nn.Linear(2, 2), Plan(width=2.0))


def test_lemon_error_lists_all_problems_in_its_text():
    err = lemon_fx.LemonError("two things", [
        lemon_fx.Problem(reason="a", fix="fa", node="n1", op="op1", source="f.py:1: x"),
        lemon_fx.Problem(reason="b", fix="fb", node="n2"),
    ])
    text = str(err)
    assert text.startswith("two things (2 problems):")
    assert "1. node 'n1' op op1: a" in text and "at f.py:1: x" in text
    assert "2. node 'n2': b" in text and "fix: fb" in text


def _raise_bare(x):
    raise RuntimeError()  # no message


torch.fx.wrap("_raise_bare")  # traced as one call, raised when the graph runs


class _RaisesBare(nn.Module):
    """forward raises an exception with an empty message."""

    def forward(self, x):
        raise ValueError()


class _RaisesBareWhenRun(nn.Module):
    def forward(self, x):
        return _raise_bare(x)


def test_an_exception_with_an_empty_message_is_still_a_trace_error() -> None:
    # reporting it used str(exc).splitlines()[0], an IndexError inside the except block
    with pytest.raises(lemon_fx.TraceError) as caught:
        lemon_fx.trace(_RaisesBare(), (torch.randn(2, 4),))
    assert "ValueError" in str(caught.value)


def test_a_graph_failing_with_an_empty_message_is_a_trace_error_in_grow() -> None:
    gm = torch.fx.symbolic_trace(_RaisesBareWhenRun())
    with pytest.raises(lemon_fx.TraceError, match="RuntimeError"):
        lemon_fx.grow(gm, lemon_fx.Plan(width=2.0), example_inputs=(torch.randn(2, 4),))


def test_first_line_names_the_type_when_the_message_is_empty() -> None:
    from lemon_fx.errors import first_line

    assert first_line(ValueError()) == "ValueError"
    assert first_line(ValueError("  \n")) == "ValueError"
    assert first_line(ValueError("first\nsecond")) == "ValueError: first"


def test_the_same_cause_at_many_nodes_is_one_problem():
    from lemon_fx.errors import merge_repeated

    same = [Problem(reason="softmax over a growing axis", fix="keep it", node=f"n{i}", op="op")
            for i in range(5)]
    other = Problem(reason="something else", fix="keep it", node="m")
    merged = merge_repeated(same + [other])
    assert len(merged) == 2
    assert "(at 5 nodes: 'n0', 'n1', 'n2' and 2 more)" in merged[0].reason
    error = lemon_fx.NotLosslessError("no", same + [other])
    assert len(error.problems) == 2 and len(error.details) == 6


def test_a_refusal_is_one_line_per_width_group_not_one_per_node(capsys):
    timm = pytest.importorskip("timm")
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=10).eval()
    gm = lemon_fx.trace(model, (torch.randn(1, 3, 64, 64),))
    with pytest.raises(lemon_fx.NotLosslessError) as err:
        lemon_fx.grow(gm, lemon_fx.Plan(width=1.5))
    # four stage widths: four problems, each naming its group and every distinct need
    assert len(err.value.problems) == 4
    assert len(str(err.value).splitlines()) <= 16
    assert err.value.problems[0].reason.startswith("residual_1 (40 -> 60 entries): ")
    assert "LayerNorm needs its input in the avg form (3 nodes, e.g. " in \
        err.value.problems[0].reason
    assert len(err.value.details) > 40  # every node, for --debug

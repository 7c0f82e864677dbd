"""Depth asks the rules: a user's module ends a residual branch when its rule says so.

A Pre-LN model whose attention is the user's own module (kept whole by ``trace`` because
a rule is registered for it) grows in depth exactly when that rule answers
``branch_end``, and is refused with depth's usual error when it does not: depth keeps no
list of ops of its own.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lemon_fx
from lemon_fx import Plan
from passes.rules import default_registry

DIM = 8


class TinyAttention(nn.Module):
    """A user's single-head self-attention: ``softmax(q k^T / sqrt(d)) v W_o^T + b_o``."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.qkv = nn.Parameter(torch.randn(3 * dim, dim) / dim ** 0.5)
        self.out_weight = nn.Parameter(torch.randn(dim, dim) / dim ** 0.5)
        self.out_bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        q, k, v = F.linear(x, self.qkv).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-2, -1) / self.dim ** 0.5, dim=-1)
        return F.linear(att @ v, self.out_weight, self.out_bias)


class TinyAttentionRule(lemon_fx.Rule):
    """The user's attention kept at its width: same axes in and out, none of them grows.

    It does not say how it could end a residual branch (no ``branch_end``).
    """

    def analyze(self, node, ctx):
        x = node.args[0]
        ctx.pass_through(x, node)
        dims = [d for name in ("qkv", "out_weight", "out_bias")
                for d in ctx.param_dims(ctx.param(name))]
        ctx.forbid_growth(dims + ctx.dims(node), "the user's attention keeps its width",
                          "keep the width")


class EndingTinyAttentionRule(TinyAttentionRule):
    """As ``TinyAttentionRule``, and its output ``h W_o^T + b_o`` writes zero when the
    output projection is zero: it may end a residual branch."""

    def branch_end(self, node, root):
        return lemon_fx.BranchEnd(node, f"{node.target}.out_weight", f"{node.target}.out_bias")


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TinyAttention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Net(nn.Module):
    def __init__(self, dim: int = DIM, depth: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _registered(rule: type[lemon_fx.Rule]):
    registry = default_registry()
    lemon_fx.register(TinyAttention)(rule)
    try:
        yield
    finally:
        registry._modules.pop(TinyAttention)


@pytest.fixture()
def ending_rule():
    yield from _registered(EndingTinyAttentionRule)


@pytest.fixture()
def plain_rule():
    yield from _registered(TinyAttentionRule)


def _model_and_graph():
    torch.manual_seed(0)
    model = Net().double().eval()
    with torch.no_grad():
        for p in model.parameters():  # away from the init: LN gamma != 1, biases != 0
            p.add_(0.3 * torch.randn_like(p))
    gm = lemon_fx.trace(model, (torch.randn(2, 5, DIM, dtype=torch.float64),))
    assert any(n.op == "call_module" and n.target == "blocks.0.attn" for n in gm.graph.nodes)
    return model, gm


@pytest.mark.parametrize("placement", ["interleave", "stack"])
@pytest.mark.parametrize("depth", [2.0, {"blocks": 3}])
def test_a_user_module_whose_rule_answers_branch_end_grows_in_depth_exactly(
        ending_rule, placement, depth):
    model, gm = _model_and_graph()
    (stack,) = lemon_fx.inspect(gm).stacks
    assert (stack.name, stack.count, stack.kind) == ("blocks", 2, "pre_ln")
    assert stack.problem is None
    ends = [(e.weight, e.bias, e.kind) for e in stack.blocks[0].branch_ends]
    # found walking back from the block's output: the MLP's add first
    assert ends == [("blocks.0.fc2.weight", "blocks.0.fc2.bias", "layer"),
                    ("blocks.0.attn.out_weight", "blocks.0.attn.out_bias", "layer")]
    big = lemon_fx.grow(gm, Plan(depth=depth, placement=placement))
    target = 4 if depth == 2.0 else 3
    attns = [big.get_submodule(f"blocks.{i}.attn") for i in range(target)]
    assert all(isinstance(a, TinyAttention) for a in attns)
    # no width grows, so LEMON's cancelling weights W_c (W_c E = 0 with E = I) are zero
    zeroed = [a for a in attns if not a.out_weight.any() and not a.out_bias.any()]
    assert len(zeroed) == target - 2
    fresh = torch.randn(3, 6, DIM, dtype=torch.float64, generator=torch.Generator()
                        .manual_seed(1))
    with torch.no_grad():
        want = model(fresh)
        torch.testing.assert_close(big(fresh), want, rtol=0,
                                   atol=1e-10 * (1 + want.abs().max().item()))


def test_a_user_module_whose_rule_does_not_answer_branch_end_is_refused(plain_rule):
    model, gm = _model_and_graph()
    (stack,) = lemon_fx.inspect(gm).stacks
    assert stack.problem is not None
    assert "does not end in a layer with weights" in stack.problem
    with pytest.raises(lemon_fx.UnsupportedOpError) as info:
        lemon_fx.grow(gm, Plan(depth=2.0))
    (problem,) = info.value.problems
    assert problem.node == "blocks_0_attn"
    assert "does not end in a layer with weights" in problem.reason
    assert "stack 'blocks' cannot grow in depth" in problem.reason
    assert problem.op == "module blocks.0.attn"


def test_user_rules_leave_the_default_registry():
    assert default_registry().module_rule(TinyAttention) is None

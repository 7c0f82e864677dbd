"""Property tests: random small architectures, random plans drawn from their own report.

The architectures are assembled from a drawn ``ArchSpec`` (printed by hypothesis on
failure, and turned into Python source by ``ArchSpec.source()``), so a failing example
reads as a model, not as a tree of draws. The plans are drawn from the traced graph's
``lemon_fx.inspect`` report: bare multipliers, or mappings from drawn group names and
roles to absolute sizes or multipliers.

The definition checked: ``grow`` returns a model computing the source's function on
inputs it never saw (another generator, another batch size, another sequence length), in
float64, or raises a ``lemon_fx.LemonError``; the source GraphModule is never touched.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

import lemon_fx

IN_FEATURES = 6
CLASSES = 5
TRACE_SHAPE = {True: (2, 5), False: (2,)}  # (batch, time) for sequences, (batch,) otherwise
FRESH_SHAPE = {True: (3, 7), False: (3,)}
ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "sigmoid")
BARE_WIDTHS = (1.0, 1.25, 1.5, 2.0, 3.0)

# derandomized and database-free: CI draws the same examples on every run
PROFILE = dict(deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------------------
# architectures
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NormSpec:
    kind: str  # "ln" (nn.LayerNorm) or "rms" (nn.RMSNorm, always with an explicit eps)
    affine: bool = True
    eps: float = 1e-5

    def __repr__(self) -> str:
        flags = "" if self.affine else ", affine=False"
        return f"NormSpec({self.kind!r}, eps={self.eps}{flags})"

    def build(self, d: int) -> nn.Module:
        if self.kind == "ln":
            return nn.LayerNorm(d, eps=self.eps, elementwise_affine=self.affine)
        return nn.RMSNorm(d, eps=self.eps, elementwise_affine=self.affine)


@dataclass(frozen=True)
class BlockSpec:
    """One residual block around a branch ``f``:

    ``"pre"``    ``x + f(norm(x))``            (norm optional)
    ``"scale"``  ``x + gamma * f(norm(x))``    (layer scale; norm optional)
    ``"post"``   ``norm(x + f(x))``            (Post-LN; norm required)

    ``f`` is ``"mlp"`` (Linear, activation, Linear), ``"gated"`` (``down(silu(gate(x)) *
    up(x))``) or ``"attn"`` (q/k/v Linears, heads split with view/transpose from
    ``x.shape``, ``F.scaled_dot_product_attention``, output Linear).
    """

    wrap: str
    branch: str
    norm: NormSpec | None = None
    act: str = "relu"
    act_module: bool = False  # nn.GELU() etc. instead of F.gelu etc.
    hidden: int = 16
    heads: int = 1
    causal: bool = False
    bias: bool = True

    def __repr__(self) -> str:
        parts = [repr(self.wrap), repr(self.branch), f"norm={self.norm!r}"]
        if self.branch == "mlp":
            parts += [f"act={self.act!r}", f"act_module={self.act_module}"]
        if self.branch == "attn":
            parts += [f"heads={self.heads}", f"causal={self.causal}"]
        else:
            parts.append(f"hidden={self.hidden}")
        parts.append(f"bias={self.bias}")
        return f"BlockSpec({', '.join(parts)})"


@dataclass(frozen=True)
class ArchSpec:
    width: int
    blocks: tuple[BlockSpec, ...]
    final_norm: NormSpec | None
    seq: bool  # inputs [B, T, IN_FEATURES] when True, [B, IN_FEATURES] otherwise
    init_seed: int = 0

    def build(self) -> nn.Module:
        return Net(self)

    def source(self) -> str:
        """The model as a constructor call, for bug reports."""
        return f"Net({self!r}).double().eval()"


ACT_FUNCTIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh,
                 "sigmoid": torch.sigmoid}
ACT_MODULES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh,
               "sigmoid": nn.Sigmoid}


class MLP(nn.Module):
    def __init__(self, d: int, hidden: int, act: str, act_module: bool, bias: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden, bias=bias)
        self.act = ACT_MODULES[act]() if act_module else ACT_FUNCTIONS[act]
        self.fc2 = nn.Linear(hidden, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GatedMLP(nn.Module):
    def __init__(self, d: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.gate = nn.Linear(d, hidden, bias=bias)
        self.up = nn.Linear(d, hidden, bias=bias)
        self.down = nn.Linear(hidden, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, causal: bool, bias: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q = nn.Linear(d, d, bias=bias)
        self.k = nn.Linear(d, d, bias=bias)
        self.v = nn.Linear(d, d, bias=bias)
        self.o = nn.Linear(d, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q = self.q(x).view(b, t, self.heads, c // self.heads).transpose(1, 2)
        k = self.k(x).view(b, t, self.heads, c // self.heads).transpose(1, 2)
        v = self.v(x).view(b, t, self.heads, c // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.o(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, d: int, spec: BlockSpec) -> None:
        super().__init__()
        self.wrap = spec.wrap
        self.norm = spec.norm.build(d) if spec.norm else nn.Identity()
        if spec.branch == "attn":
            self.branch = Attention(d, spec.heads, spec.causal, spec.bias)
        elif spec.branch == "gated":
            self.branch = GatedMLP(d, spec.hidden, spec.bias)
        else:
            self.branch = MLP(d, spec.hidden, spec.act, spec.act_module, spec.bias)
        if spec.wrap == "scale":
            self.gamma = nn.Parameter(torch.full((d,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.wrap == "post":
            return self.norm(x + self.branch(x))
        if self.wrap == "scale":
            return x + self.gamma * self.branch(self.norm(x))
        return x + self.branch(self.norm(x))


class Net(nn.Module):
    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(spec.init_seed)
            self.inp = nn.Linear(IN_FEATURES, spec.width)
            self.blocks = nn.ModuleList(Block(spec.width, b) for b in spec.blocks)
            self.final_norm = spec.final_norm.build(spec.width) if spec.final_norm else None
            self.out = nn.Linear(spec.width, CLASSES)
            # trained-looking norms and layer scales: growth must carry their values, not
            # just default ones and zeros
            with torch.no_grad():
                for name, p in self.named_parameters():
                    leaf = name.rsplit(".", 1)[-1]
                    if leaf == "gamma" or (leaf == "weight" and p.dim() == 1):
                        p.copy_(1.0 + 0.5 * torch.randn_like(p))
                    elif leaf == "bias" and "norm" in name:
                        p.copy_(0.2 * torch.randn_like(p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.out(x)


@st.composite
def norm_specs(draw, required: bool = False) -> NormSpec | None:
    kinds = ("ln", "rms") if required else (None, "ln", "rms")
    kind = draw(st.sampled_from(kinds), label="norm")
    if kind is None:
        return None
    # a large eps makes a wrong eps' = alpha * eps visible beyond the tolerance
    eps = draw(st.sampled_from((1e-5, 1e-6, 0.1)), label="eps")
    return NormSpec(kind, affine=draw(st.booleans(), label="affine"), eps=eps)


@st.composite
def block_specs(draw, width: int, seq: bool) -> BlockSpec:
    wrap = draw(st.sampled_from(("pre", "scale", "post")), label="wrap")
    branches = ("mlp", "gated", "attn") if seq else ("mlp", "gated")
    branch = draw(st.sampled_from(branches), label="branch")
    norm = draw(norm_specs(required=wrap == "post"), label="norm")
    bias = draw(st.booleans(), label="bias")
    if branch == "attn":
        divisors = [h for h in range(1, width + 1) if width % h == 0 and width // h >= 2]
        heads = draw(st.sampled_from(divisors), label="heads")
        return BlockSpec(wrap, branch, norm, heads=heads,
                         causal=draw(st.booleans(), label="causal"), bias=bias)
    hidden = draw(st.integers(4, 2 * width), label="hidden")
    if branch == "gated":
        return BlockSpec(wrap, branch, norm, hidden=hidden, bias=bias)
    return BlockSpec(wrap, branch, norm, act=draw(st.sampled_from(ACTIVATIONS), label="act"),
                     act_module=draw(st.booleans(), label="act_module"), hidden=hidden,
                     bias=bias)


@st.composite
def arch_specs(draw) -> ArchSpec:
    width = draw(st.integers(8, 24), label="width")
    seq = draw(st.booleans(), label="seq")
    n = draw(st.integers(1, 3), label="n_blocks")
    blocks = tuple(draw(block_specs(width, seq), label=f"block{i}") for i in range(n))
    final_norm = draw(norm_specs(), label="final_norm")
    return ArchSpec(width, blocks, final_norm, seq, draw(st.integers(0, 3), label="init_seed"))


def _inputs(spec: ArchSpec, fresh: bool) -> torch.Tensor:
    shape = (FRESH_SHAPE if fresh else TRACE_SHAPE)[spec.seq]
    gen = torch.Generator().manual_seed(1234 if fresh else 0)
    return torch.randn(*shape, IN_FEATURES, generator=gen, dtype=torch.float64)


def _traced(spec: ArchSpec) -> tuple[nn.Module, torch.fx.GraphModule]:
    model = spec.build().double().eval()
    return model, lemon_fx.trace(model, (_inputs(spec, fresh=False),))


# --------------------------------------------------------------------------------------
# plans, drawn from the traced graph's own report
# --------------------------------------------------------------------------------------


@st.composite
def width_targets(draw, size: int):
    """An int target >= size or a float multiplier >= 1."""
    if draw(st.booleans(), label="absolute"):
        return draw(st.integers(size, 3 * size), label="size")
    return draw(st.one_of(st.sampled_from(BARE_WIDTHS),
                          st.floats(1.0, 3.0, allow_nan=False, allow_infinity=False)),
                label="multiplier")


@st.composite
def plans(draw, report, method=None, seed=None) -> lemon_fx.Plan:
    groups = list(report.groups)
    if not groups or draw(st.booleans(), label="bare"):
        width = draw(st.sampled_from(BARE_WIDTHS), label="width")
    else:
        selectors = {g.name: g.size for g in groups}
        for g in groups:  # a role's int target must not shrink its largest member
            key = "@" + g.role
            selectors[key] = max(selectors.get(key, g.size), g.size)
        names = sorted(selectors)
        count = draw(st.integers(1, min(4, len(names))), label="n_selectors")
        chosen = draw(st.permutations(names), label="selectors")[:count]
        width = {sel: draw(width_targets(selectors[sel]), label=sel) for sel in chosen}
    method = method or draw(st.sampled_from(("lemon", "net2net")), label="method")
    seed = draw(st.integers(0, 2**31 - 1), label="seed") if seed is None else seed
    return lemon_fx.Plan(width=width, method=method, seed=seed)


# --------------------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------------------


def _assert_same_function(source: nn.Module, grown: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        want, got = source(x), grown(x)
    assert got.dtype == torch.float64 and got.shape == want.shape
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10 * scale)


def _snapshot(gm: torch.fx.GraphModule, x: torch.Tensor):
    with torch.no_grad():
        out = gm(x)
    return copy.deepcopy(gm.state_dict()), gm.code, out


def _assert_untouched(gm: torch.fx.GraphModule, x: torch.Tensor, before) -> None:
    state, code, out = before
    now = gm.state_dict()
    assert list(now) == list(state), "the source's state_dict keys changed"
    for key, tensor in state.items():
        assert torch.equal(now[key], tensor), f"grow modified the source's {key}"
    assert gm.code == code, "grow modified the source's code"
    with torch.no_grad():
        assert torch.equal(gm(x), out), "the source's output changed"


def _grow_or_lemon_error(gm, plan):
    """The grown module, or None when grow refused with a LemonError (any other
    exception propagates and fails the test)."""
    try:
        return lemon_fx.grow(gm, plan)
    except lemon_fx.LemonError:
        return None


@settings(max_examples=150, **PROFILE)
@given(spec=arch_specs(), data=st.data())
def test_grow_is_lossless_or_refuses_and_never_touches_the_source(spec, data):
    model, gm = _traced(spec)
    plan = data.draw(plans(lemon_fx.inspect(gm)), label="plan")
    x = _inputs(spec, fresh=True)
    before = _snapshot(gm, x)
    big = _grow_or_lemon_error(gm, plan)
    _assert_untouched(gm, x, before)
    if big is None:
        return
    assert big is not gm
    assert set(big.state_dict()) == set(gm.state_dict()), "grown state_dict keys differ"
    _assert_same_function(model, big, x)
    _assert_same_function(gm, big, x)


@settings(max_examples=50, **PROFILE)
@given(spec=arch_specs(), data=st.data())
def test_growth_is_deterministic_in_the_seed(spec, data):
    model, gm = _traced(spec)
    report = lemon_fx.inspect(gm)
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    plan = data.draw(plans(report, seed=seed), label="plan")
    first = _grow_or_lemon_error(gm, plan)
    second = _grow_or_lemon_error(gm, plan)
    assert (first is None) == (second is None), "the same plan both grew and refused"
    if first is not None:
        a, b = first.state_dict(), second.state_dict()
        assert list(a) == list(b)
        for key in a:
            assert torch.equal(a[key], b[key]), f"same seed, different {key}"

    # a bare width >= 1.5 grows the residual stream, the fan-in of the output layer (and of
    # every branch reading the stream), so LEMON's random split must depend on the seed
    grows_fan_in = lemon_fx.Plan(width=data.draw(st.sampled_from((1.5, 2.0, 3.0)),
                                                 label="fan_in_width"),
                                 method="lemon", seed=seed)
    other = lemon_fx.Plan(width=grows_fan_in.width, method="lemon", seed=seed + 1)
    one = _grow_or_lemon_error(gm, grows_fan_in)
    two = _grow_or_lemon_error(gm, other)
    if one is None or two is None:
        assert one is None and two is None, "whether grow refuses depends on the seed"
        return
    a, b = one.state_dict(), two.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a), "a different seed gave equal weights"
    x = _inputs(spec, fresh=True)
    _assert_same_function(model, one, x)
    _assert_same_function(model, two, x)


# --------------------------------------------------------------------------------------
# the properties are not vacuous: whole-multiple growth of these architectures succeeds
# --------------------------------------------------------------------------------------

LN, RMS = NormSpec("ln", eps=1e-5), NormSpec("rms", eps=1e-6)
ONE_OF_EACH = [
    ArchSpec(8, (BlockSpec("pre", "mlp", None, "relu", hidden=12),), None, False),
    ArchSpec(12, (BlockSpec("pre", "mlp", LN, "gelu", True, hidden=20),), LN, True),
    ArchSpec(10, (BlockSpec("pre", "mlp", RMS, "silu", hidden=16, bias=False),), RMS, True),
    ArchSpec(16, (BlockSpec("pre", "attn", LN, heads=4, causal=True),), LN, True),
    ArchSpec(12, (BlockSpec("pre", "attn", RMS, heads=3, causal=False),), RMS, True),
    ArchSpec(16, (BlockSpec("pre", "gated", RMS, hidden=24, bias=False),), RMS, True),
    ArchSpec(8, (BlockSpec("scale", "mlp", LN, "tanh", True, hidden=8),), None, False),
    ArchSpec(8, (BlockSpec("post", "mlp", LN, "sigmoid", hidden=8),), None, False),
    ArchSpec(8, (BlockSpec("post", "mlp", RMS, "gelu", hidden=12),), None, True),
    ArchSpec(8, (BlockSpec("post", "attn", NormSpec("ln", affine=False), heads=2),), LN, True),
    ArchSpec(24, (BlockSpec("pre", "attn", LN, heads=6, causal=True),
                  BlockSpec("pre", "mlp", NormSpec("ln", eps=0.1), "gelu", hidden=48),
                  BlockSpec("scale", "gated", NormSpec("rms", False, 0.1), hidden=20)),
             LN, True),
]


def _spec_id(spec: ArchSpec) -> str:
    return "-".join(f"{b.wrap}_{b.branch}_{b.norm.kind if b.norm else 'none'}"
                    for b in spec.blocks)


@pytest.mark.parametrize("method", ["lemon", "net2net"])
@pytest.mark.parametrize("spec", ONE_OF_EACH, ids=_spec_id)
def test_each_building_block_grows_at_twice_the_width(spec, method):
    model, gm = _traced(spec)
    big = lemon_fx.grow(gm, lemon_fx.Plan(width=2.0, method=method, seed=0))
    assert sum(p.numel() for p in big.parameters()) > sum(p.numel() for p in gm.parameters())
    _assert_same_function(model, big, _inputs(spec, fresh=True))


@pytest.mark.parametrize("width", [1.25, 1.5, 3.0])
@pytest.mark.parametrize("spec", ONE_OF_EACH[:6], ids=_spec_id)
def test_consistent_pre_norm_stacks_grow_at_any_width(spec, width):
    # one norm kind per residual stream, affine, Pre-LN: LEMON has an exact answer at
    # non-multiple widths too, so a refusal here would make the property vacuous
    model, gm = _traced(spec)
    big = lemon_fx.grow(gm, lemon_fx.Plan(width=width, method="lemon", seed=1))
    _assert_same_function(model, big, _inputs(spec, fresh=True))


def test_most_drawn_architectures_grow_at_twice_the_width():
    outcomes: list[bool] = []

    @settings(max_examples=30, phases=[Phase.generate], **PROFILE)
    @given(spec=arch_specs())
    def draw_and_grow(spec):
        model, gm = _traced(spec)
        big = _grow_or_lemon_error(gm, lemon_fx.Plan(width=2.0, seed=0))
        outcomes.append(big is not None)
        if big is not None:
            _assert_same_function(model, big, _inputs(spec, fresh=True))

    draw_and_grow()
    assert len(outcomes) >= 20
    assert sum(outcomes) >= 0.9 * len(outcomes), f"{sum(outcomes)}/{len(outcomes)} grew"

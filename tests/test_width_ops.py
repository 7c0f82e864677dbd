"""Width growth through roll, stack, norm, addcmul, baddbmm, repeat and where, each used the
way a real model uses it (Swin, GPT-J, ConvNeXtV2, ResMLP, Bloom, DeBERTa-v2, T5), and
each refusal with its typed error and its reason.

Every model has its weights moved off their init (``real_zoo.trained``: float64, eval),
is grown with the guard switched off (``unguarded``: a wrong rule fails here instead of
being caught by the check on the example), and is compared on fresh inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from real_zoo import trained
from torch import nn

import lemon_fx

pytestmark = pytest.mark.usefixtures("unguarded")

NL = lemon_fx.NotLosslessError
C = 8  # the growable width of the small models
T = 5  # tokens


def _tokens(shape=(2, T, 4)) -> Callable[[int], tuple]:
    def make(seed: int) -> tuple:
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(shape, generator=g, dtype=torch.float64),)
    return make


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _outputs(o)]
    if hasattr(out, "to_tuple"):  # a transformers ModelOutput
        return _outputs(out.to_tuple())
    return []


def assert_lossless(model: nn.Module, inputs: Callable[[int], tuple], width,
                    frontend: str = "auto", kwargs: dict | None = None,
                    atol: float = 1e-10) -> torch.fx.GraphModule:
    """Grow ``trained(model)`` by ``width`` and check it on inputs it was not traced on."""
    torch.manual_seed(0)
    model = trained(model)
    gm = lemon_fx.trace(model, inputs(0), kwargs, frontend=frontend)
    big = lemon_fx.grow(gm, lemon_fx.Plan(width=width))
    assert _params(big) > _params(model)
    fresh = inputs(1)
    got, want = _outputs(big(*fresh, **(kwargs or {}))), _outputs(model(*fresh, **(kwargs or {})))
    assert got and len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=atol * (1 + w.abs().max().item()))
    return big


def assert_refused(model: nn.Module, inputs: Callable[[int], tuple], width, error: type,
                   *words: str, frontend: str = "auto") -> lemon_fx.LemonError:
    """Growing by ``width`` raises ``error`` whose text holds every one of ``words``."""
    torch.manual_seed(0)
    gm = lemon_fx.trace(trained(model), inputs(0), frontend=frontend)
    with pytest.raises(error) as info:
        lemon_fx.grow(gm, lemon_fx.Plan(width=width))
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    return info.value


class Ops(nn.Module):
    """``out(op(self, inp(x)))``: ``inp`` makes a growable width C, ``out`` reads it."""

    def __init__(self, op: Callable, d_out: int = C, **modules: nn.Module):
        super().__init__()
        self.inp = nn.Linear(4, C)
        self.mods = nn.ModuleDict(modules)
        self.op = op
        self.out = nn.Linear(d_out, 3)

    def forward(self, x):
        return self.out(self.op(self, self.inp(x)))


def _ln(**kw) -> dict:
    return dict(ln=nn.LayerNorm(C), **kw)


# -- roll ---------------------------------------------------------------------------------


class ShiftedWindows(nn.Module):
    """Swin's shifted windows: the token grid is rolled, mixed, rolled back; channels pass."""

    def __init__(self, method: bool = False):
        super().__init__()
        self.method = method
        self.inp = nn.Linear(3, C)
        self.norm = nn.LayerNorm(C)
        self.fc1, self.fc2 = nn.Linear(C, 2 * C), nn.Linear(2 * C, C)
        # mixes the 4 positions of a row, so the roll matters; no bias: a token-mixing
        # bias added to the zero-formed channels of a LayerNorm's output is not zero at
        # 1.5x (LinearRule passes a leading axis in its form whatever the bias does)
        self.mix = nn.Linear(4, 4, bias=False)
        self.out = nn.Linear(C, 5)

    def forward(self, x):  # [B, H, W, 3]
        h = self.inp(x)
        s = torch.roll(self.norm(h), shifts=(-1, -2), dims=(1, 2))
        s = self.mix(s.transpose(2, 3)).transpose(2, 3)
        s = self.fc2(F.gelu(self.fc1(s)))
        s = s.roll((1, 2), (1, 2)) if self.method else torch.roll(s, (1, 2), (1, 2))
        return self.out((h + s).mean((1, 2)))


class Heads(nn.Module):
    """q/k/v with 2 heads of 4, scaled dot-product attention, heads merged to
    ``[H, Dh]`` and handed to ``after`` (the op under test) before the output layer."""

    def __init__(self, after: Callable):
        super().__init__()
        self.inp = nn.Linear(4, C)
        self.q, self.k, self.v = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)
        self.after = after
        self.out = nn.Linear(C, 3)

    def forward(self, x):
        h = self.inp(x)
        B, L, _ = h.shape

        def split(t):
            return t.view(B, L, 2, 4).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
        return self.out(self.after(y.transpose(1, 2).reshape(B, L, C)))


def _cat_then_roll():
    class CatRoll(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, C), nn.Linear(4, C)
            self.out = nn.Linear(2 * C, 3)

        def forward(self, x):
            return self.out(torch.cat([self.a(x), F.gelu(self.b(x))], -1).roll(1, -1))
    return CatRoll()


@pytest.mark.parametrize("width", [2.0, 1.5])
@pytest.mark.parametrize("method", [False, True], ids=["torch.roll", "Tensor.roll"])
def test_roll_of_token_axes_passes_the_channels(width, method):
    assert_lossless(ShiftedWindows(method), _tokens((2, 4, 4, 3)), width)


def test_roll_export_spelling():
    assert_lossless(ShiftedWindows(), _tokens((2, 4, 4, 3)), 2.0, frontend="export")


def test_roll_along_a_grown_width_is_exact_at_whole_multiples():
    model = Ops(lambda s, h: F.gelu(h).roll(3, -1))
    assert_lossless(model, _tokens(), 2.0)
    assert_lossless(model, _tokens(), 3.0)
    assert_refused(model, _tokens(), 1.5, NL, "roll along axis 2 moves entries by position",
                   "grow this width by a whole multiple")


def test_roll_along_heads_times_head_dim_tiles_when_only_the_heads_grow():
    """``[H, Dh]`` with Dh kept: the grown axis tiles the source's, any shift is exact
    (3 moves entries across heads); 2 heads at 1.5x are 3: a non-multiple, refused."""
    model = Heads(lambda y: y.roll(3, -1))
    assert_lossless(model, _tokens(), 2.0)
    assert_refused(model, _tokens(), 1.5, NL, "roll along axis 2")


def test_roll_along_a_grown_inner_factor_is_refused():
    """``[Dh, H]`` (heads inner): growing the heads does not tile the rolled axis."""
    model = Heads(lambda y: y.unflatten(-1, (2, 4)).transpose(-1, -2).flatten(-2).roll(1, -1))
    error = assert_refused(model, _tokens(), 2.0, NL, "this is an inner factor")
    assert [p.node for p in error.problems] == ["roll"]


def test_roll_along_a_concatenation_is_refused():
    assert_refused(_cat_then_roll(), _tokens(), 2.0, NL, "a part of a concatenation")


def test_roll_without_dims_is_refused():
    assert_refused(Ops(lambda s, h: h.roll(1)), _tokens(), 2.0, NL, "roll without dims",
                   "pass dims")


# -- stack --------------------------------------------------------------------------------


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """GPT-J's interleaved rotary half-turn."""
    x1 = x[:, :, :, ::2]
    x2 = x[:, :, :, 1::2]
    x = torch.stack((-x2, x1), dim=-1)
    return x.flatten(-2)


class InterleavedRotary(nn.Module):
    """GPT-J attention: q/k ``[B, T, H, Dh]`` rotated in interleaved pairs (stack + flatten),
    causal attention masked by ``torch.where(mask, scores, -1e9)``, heads merged."""

    def __init__(self, heads: int = 2, head_dim: int = 4):
        super().__init__()
        self.h, self.dh = heads, head_dim
        width = heads * head_dim
        self.inp = nn.Linear(4, width)
        self.q, self.k, self.v = (nn.Linear(width, width, bias=False) for _ in range(3))
        self.o = nn.Linear(width, width)
        self.out = nn.Linear(width, 3)
        pos = torch.arange(T, dtype=torch.float64)[:, None]
        freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = (pos * freq).repeat_interleave(2, dim=-1)[:, None, :]  # [T, 1, Dh]
        self.register_buffer("sin", angles.sin())
        self.register_buffer("cos", angles.cos())
        self.register_buffer("causal", torch.tril(torch.ones(T, T, dtype=torch.bool)))

    def forward(self, x):
        h = self.inp(x)
        B = h.shape[0]
        q = self.q(h).view(B, T, self.h, self.dh)
        k = self.k(h).view(B, T, self.h, self.dh)
        v = self.v(h).view(B, T, self.h, self.dh).transpose(1, 2)
        q = q * self.cos + rotate_every_two(q) * self.sin
        k = k * self.cos + rotate_every_two(k) * self.sin
        scores = q.transpose(1, 2) @ k.permute(0, 2, 3, 1) / math.sqrt(self.dh)
        scores = torch.where(self.causal, scores, -1e9)
        y = scores.softmax(-1) @ v
        return self.out(h + self.o(y.transpose(1, 2).reshape(B, T, -1)))


@pytest.mark.parametrize("width", [2.0, 1.5])
def test_stack_interleaved_rotary(width):
    assert_lossless(InterleavedRotary(), _tokens(), width)


def test_stack_export_spelling():
    assert_lossless(InterleavedRotary(), _tokens(), 2.0, frontend="export")


@pytest.mark.parametrize("width", [2.0, 1.5])
@pytest.mark.parametrize("op, d_out", [
    (lambda s, h: torch.stack([h, F.gelu(h)], dim=-1).flatten(-2), 2 * C),
    (lambda s, h: torch.stack(h.chunk(2, -1)[::-1], -1).flatten(-2), C),
    (lambda s, h: torch.stack((h, torch.tanh(h)), dim=1).mean(1), C),
], ids=["channels inner", "chunk tuple interleaved", "new axis reduced"])
def test_stack_of_grown_widths(op, d_out, width):
    assert_lossless(Ops(op, d_out=d_out), _tokens(), width)


# -- norm ---------------------------------------------------------------------------------


class GRN(nn.Module):
    """ConvNeXtV2's global response norm, channels last (timm's GlobalResponseNorm)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        g = x.norm(p=2, dim=(1, 2), keepdim=True)
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        return x + torch.addcmul(self.bias.view(1, 1, 1, -1), self.weight.view(1, 1, 1, -1),
                                 x * n)


class ConvNeXtV2Mlp(nn.Module):
    """A channels-last ConvNeXtV2 block's MLP: ``fc2(GRN(gelu(fc1(x))))`` on a residual."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, C)
        self.fc1, self.grn, self.fc2 = nn.Linear(C, 4 * C), GRN(4 * C), nn.Linear(4 * C, C)
        self.out = nn.Linear(C, 5)

    def forward(self, x):  # [B, H, W, 3]
        h = self.inp(x)
        h = h + self.fc2(self.grn(F.gelu(self.fc1(h))))
        return self.out(h.mean((1, 2)))


def test_norm_over_spatial_axes_grn_at_whole_multiples():
    assert_lossless(ConvNeXtV2Mlp(), _tokens((2, 4, 4, 3)), 2.0)


def test_norm_grn_export_spelling():
    assert_lossless(ConvNeXtV2Mlp(), _tokens((2, 4, 4, 3)), 2.0, frontend="export")


def test_norm_grn_at_a_non_multiple_width_is_refused():
    """The spatial norm keeps circ or zero on the channels, its mean over them needs avg."""
    assert_refused(ConvNeXtV2Mlp(), _tokens((2, 4, 4, 3)), 1.5, NL,
                   "a norm over other axes needs this axis in the circ or zero form",
                   "a mean over this axis needs the avg form")


@pytest.mark.parametrize("width", [2.0, 1.5])
@pytest.mark.parametrize("op", [
    lambda s, h: F.gelu(h) / torch.linalg.vector_norm(h, 2, dim=1, keepdim=True),
    lambda s, h: F.gelu(h) * torch.norm(h, dim=1, keepdim=True),
    lambda s, h: F.gelu(h) - torch.norm(F.gelu(h), p=1, dim=1, keepdim=True),
], ids=["linalg.vector_norm", "torch.norm fro", "p=1"])
def test_norm_over_tokens(op, width):
    assert_lossless(Ops(op), _tokens(), width)


def test_norm_over_tokens_on_an_avg_stream_is_refused_at_a_non_multiple_width():
    """The norm of the avg form's extra channel (the mean of the channels) is not the mean
    of the channels' norms: the other axes of a norm take circ or zero, a LayerNorm's
    input avg (without the refusal this grew 1.6 off)."""
    model = Ops(lambda s, h: s.mods["ln"](h + torch.linalg.vector_norm(h, dim=1,
                                                                      keepdim=True)), **_ln())
    assert_lossless(model, _tokens(), 2.0)
    assert_refused(model, _tokens(), 1.5, NL, "a norm over other axes needs this axis in "
                   "the circ or zero form", "LayerNorm needs its input in the avg form")


@pytest.mark.parametrize("width", [2.0, 1.5])
def test_norm_inf_over_a_grown_avg_axis_is_exact(width):
    """``max |x_i|`` over an avg-formed stream (a LayerNorm reads it): every copy, and
    ``|mean(x)| <= max |x_i|``."""
    model = Ops(lambda s, h: s.mods["ln"](
        h / (1 + h.norm(p=math.inf, dim=-1, keepdim=True))
        + h * torch.linalg.vector_norm(h, ord=math.inf, dim=-1, keepdim=True)), **_ln())
    assert_lossless(model, _tokens(), width)


def test_norm_minus_inf_over_a_grown_axis_needs_circ():
    exact = Ops(lambda s, h: F.gelu(h) / (1 + h.norm(p=-math.inf, dim=-1, keepdim=True)))
    assert_lossless(exact, _tokens(), 1.5)
    on_avg = Ops(lambda s, h: s.mods["ln"](h / (1 + h.norm(p=-math.inf, dim=-1,
                                                             keepdim=True))), **_ln())
    assert_lossless(on_avg, _tokens(), 2.0)
    assert_refused(on_avg, _tokens(), 1.5, NL, "a norm of order -inf) needs the circ form")


@pytest.mark.parametrize("width", [2.0, 1.5])
@pytest.mark.parametrize("op, order", [
    (lambda s, h: F.gelu(h) / h.norm(dim=-1, keepdim=True), "2"),
    (lambda s, h: F.gelu(h) / torch.linalg.vector_norm(h, 1, dim=-1, keepdim=True), "1"),
    (lambda s, h: F.gelu(h) * torch.norm(h, keepdim=True), "2"),
], ids=["Tensor.norm", "linalg.vector_norm ord=1", "torch.norm of all axes"])
def test_norm_over_a_grown_axis_is_refused(op, order, width):
    error = assert_refused(Ops(op), _tokens(), width, NL,
                           f"a norm of order {order} over this axis counts every copy",
                           "normalize with a mean over this axis instead")
    assert "norm" in error.problems[0].node


# -- addcmul ------------------------------------------------------------------------------


class Affine(nn.Module):
    """ResMLP's Affine: ``addcmul(beta, alpha, x)``, a per-channel affine norm."""

    def __init__(self, dim: int, spelling: str = "torch"):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones((1, 1, dim)))
        self.beta = nn.Parameter(torch.zeros((1, 1, dim)))
        self.spelling = spelling

    def forward(self, x):
        if self.spelling == "method":
            return self.beta.addcmul(self.alpha, x, value=0.5)
        return torch.addcmul(self.beta, self.alpha, x)


class ResMLP(nn.Module):
    """ResMLP blocks: Affine norms, a token-mixing linear and a channel MLP, layer scale."""

    def __init__(self, spelling: str = "torch"):
        super().__init__()
        self.inp = nn.Linear(4, C)
        self.norm1, self.norm2, self.norm = (Affine(C, spelling) for _ in range(3))
        self.linear_tokens = nn.Linear(T, T)
        self.fc1, self.fc2 = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)
        self.ls1 = nn.Parameter(0.1 * torch.ones(C))
        self.ls2 = nn.Parameter(0.1 * torch.ones(C))
        self.head = nn.Linear(C, 5)

    def forward(self, x):
        x = self.inp(x)
        x = x + self.ls1 * self.linear_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.ls2 * self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(self.norm(x).mean(1))


@pytest.mark.parametrize("width", [2.0, 1.5])
@pytest.mark.parametrize("spelling", ["torch", "method"])
def test_addcmul_resmlp_affine(spelling, width):
    assert_lossless(ResMLP(spelling), _tokens(), width)


def test_addcmul_export_spelling():
    assert_lossless(ResMLP(), _tokens(), 1.5, frontend="export")


def test_addcmul_deprecated_value_first_spelling():
    with pytest.warns(UserWarning, match="deprecated"):
        assert_lossless(Ops(lambda s, h: torch.addcmul(h, 0.5, h, F.gelu(h))), _tokens(), 1.5)


def test_addcmul_of_two_activations_on_an_avg_stream():
    """``h + h * h`` before a LayerNorm: exact at 2x, no form at 1.5x (avg extras would
    hold ``mean(h)**2``, not ``mean(h**2)``)."""
    model = Ops(lambda s, h: s.mods["ln"](torch.addcmul(h, h, h, value=0.1)), **_ln())
    assert_lossless(model, _tokens(), 2.0)
    assert_refused(model, _tokens(), 1.5, NL, "(addcmul's t1 * t2) needs the circ or zero "
                   "form", "LayerNorm needs its input in the avg form")


def test_addcmul_with_a_parameter_on_an_avg_stream_needs_circ_or_zero():
    """``beta + alpha * h`` on a LayerNorm's avg input: ``mean(alpha) mean(h)`` is not
    ``mean(alpha h)``, so 1.5x is refused (2x is exact)."""
    model = ResMLP()
    model.norm1 = nn.Sequential(Affine(C), nn.LayerNorm(C))
    assert_lossless(model, _tokens(), 2.0)
    assert_refused(model, _tokens(), 1.5, NL, "addcmul's t1 * t2")


# -- baddbmm ------------------------------------------------------------------------------


class BiasedScores(nn.Module):
    """Bloom's attention: ``bias.baddbmm(q, k^T, beta=1, alpha=1/sqrt(head_dim))`` on
    ``[B * H, T, Dh]``, with a per-head bias ``[B * H, 1, T]`` (a parameter standing in for
    ALiBi), then softmax, ``bmm`` with v, heads merged."""

    def __init__(self, spelling: str = "method", heads: int = 2, head_dim: int = 4):
        super().__init__()
        self.h, self.dh, self.spelling = heads, head_dim, spelling
        width = heads * head_dim
        self.inp = nn.Linear(4, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.bias = nn.Parameter(torch.randn(heads, 1, T))
        self.dense = nn.Linear(width, width)
        self.out = nn.Linear(width, 3)
        self.inv_norm = 1.0 / math.sqrt(head_dim)

    def forward(self, x):
        h = self.inp(x)
        B = h.shape[0]
        q, k, v = self.qkv(h).view(B, T, self.h, 3, self.dh).unbind(3)
        q = q.transpose(1, 2).reshape(B * self.h, T, self.dh)
        k = k.permute(0, 2, 3, 1).reshape(B * self.h, self.dh, T)
        v = v.transpose(1, 2).reshape(B * self.h, T, self.dh)
        bias = self.bias.repeat(B, 1, 1)
        if self.spelling == "method":
            scores = bias.baddbmm(batch1=q, batch2=k, beta=1.0, alpha=self.inv_norm)
        else:
            scores = torch.baddbmm(bias, q, k, beta=0.5, alpha=self.inv_norm)
        y = torch.bmm(scores.softmax(-1), v).view(B, self.h, T, self.dh)
        return self.out(h + self.dense(y.permute(0, 2, 1, 3).reshape(B, T, -1)))


@pytest.mark.parametrize("width", [2.0, 1.5])
@pytest.mark.parametrize("spelling", ["method", "torch"])
def test_baddbmm_bloom_scores(spelling, width):
    assert_lossless(BiasedScores(spelling), _tokens(), width)


def test_baddbmm_export_spelling():
    assert_lossless(BiasedScores(), _tokens(), 2.0, frontend="export")


def test_baddbmm_growing_head_dim_is_refused():
    assert_refused(BiasedScores(), _tokens(), {"@head_dim": 2.0}, NL,
                   "a matmul of two activations sums over this axis",
                   "grow the number of heads instead")


# -- repeat -------------------------------------------------------------------------------


class RelativePositions(nn.Module):
    """DeBERTa-v2-style: a projected position table repeated over the batch and added; and
    ``h.repeat(1, 1, 2)`` along the grown width."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, C)
        self.rel = nn.Parameter(torch.randn(T, C))
        self.pos_proj = nn.Linear(C, C)
        self.out = nn.Linear(2 * C, 3)

    def forward(self, x):
        h = self.inp(x)
        pos = self.pos_proj(self.rel).unsqueeze(0).repeat(h.size(0), 1, 1)
        return self.out(F.gelu(h + pos).repeat(1, 1, 2))


@pytest.mark.parametrize("width", [2.0, 1.5])
def test_repeat_over_batch_and_along_the_width(width):
    assert_lossless(RelativePositions(), _tokens(), width)


def test_repeat_export_spelling():
    assert_lossless(RelativePositions(), _tokens(), 2.0, frontend="export")


class DisentangledScores(nn.Module):
    """DeBERTa-v2's content-to-position scores: the position keys ``[H, 2T, Dh]`` are
    repeated ``q.size(0) // num_heads`` times (the batch, read from a size)."""

    def __init__(self, heads: int = 2, head_dim: int = 4):
        super().__init__()
        self.h, self.dh = heads, head_dim
        self.inp = nn.Linear(4, C)
        self.q = nn.Linear(C, C)
        self.rel = nn.Parameter(torch.randn(2 * T, C))
        self.pos_key = nn.Linear(C, C)
        self.out = nn.Linear(2 * T, 3)

    def forward(self, x):
        h = self.inp(x)
        B = h.shape[0]
        q = self.q(h).view(B, T, self.h, self.dh).transpose(1, 2).reshape(-1, T, self.dh)
        pos = self.pos_key(self.rel).view(2 * T, self.h, self.dh).transpose(0, 1)
        pos = pos.repeat(q.size(0) // self.h, 1, 1)
        return self.out(torch.bmm(q, pos.transpose(-1, -2)).mean(0))


def test_repeat_count_read_from_a_growing_axis_is_refused():
    assert_refused(DisentangledScores(), _tokens(), 2.0, NL, "is used as a number here")


# -- where --------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [2.0, 1.5])
@pytest.mark.parametrize("op", [
    lambda s, h: torch.where(h > 0, h, 0.1 * h),
    lambda s, h: h.where(h > 0, torch.zeros_like(h)),
    lambda s, h: torch.where(h.amax(-1, keepdim=True) > 0, F.gelu(h), -1.0),
], ids=["torch.where", "Tensor.where", "broadcast condition, scalar other"])
def test_where_on_the_grown_width(op, width):
    assert_lossless(Ops(op), _tokens(), width)


def test_where_export_spellings():
    """``aten.where.ScalarOther`` (a number as ``other``) and ``aten.where.self``."""
    assert_lossless(Ops(lambda s, h: torch.where(h > 0, h, 0.0) + torch.where(
        h < 0, 0.5 * h, F.gelu(h))), _tokens(), 2.0, frontend="export")


def test_where_on_an_avg_stream_is_refused_at_a_non_multiple_width():
    model = Ops(lambda s, h: s.mods["ln"](torch.where(h > 0, h, 0.5 * h)), **_ln())
    assert_lossless(model, _tokens(), 2.0)
    assert_refused(model, _tokens(), 1.5, NL, "torch.where needs the circ form",
                   "LayerNorm needs its input in the avg form")


def test_where_with_one_argument_is_refused():
    model = Ops(lambda s, h: h * torch.where(h > 0)[2].to(h.dtype).mean())
    assert_refused(model, _tokens(), 2.0, NL, "positions of the nonzero entries")


# -- the real classes ---------------------------------------------------------------------


def _images(size: int = 32) -> Callable[[int], tuple]:
    return _tokens((2, 3, size, size))


def _ids(seed: int) -> tuple:
    return (torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(seed)),)


def test_real_gptj_interleaved_rotary():
    """transformers' GPT-J (stack in its rotary). A bare width also grows the keys' and
    queries' head_dim, which partial rotary slices (``key[..., :rotary_dim]``) and is not
    recognised as a head_dim: refused there, so the plan names the roles."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPTJConfig(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                     rotary_dim=4, n_positions=32)
    model = transformers.GPTJForCausalLM(config)
    kwargs = {"use_cache": False}
    assert_lossless(model, _ids, {"@residual": 2.0, "@heads": 2.0, "@ffn": 2.0},
                    kwargs=kwargs)


def test_real_timm_resmlp_affine():
    pytest.importorskip("timm")
    from timm.models.mlp_mixer import Affine as TimmAffine
    from timm.models.mlp_mixer import MlpMixer, ResBlock

    def build():
        return MlpMixer(num_classes=5, img_size=32, patch_size=8, num_blocks=2, embed_dim=32,
                        mlp_ratio=4, block_layer=ResBlock, norm_layer=TimmAffine)
    assert_lossless(build(), _images(), 2.0)
    assert_lossless(build(), _images(), 1.5)


@pytest.mark.parametrize("conv_mlp", [False, True], ids=["channels last", "channels first"])
def test_real_timm_convnextv2_grn(conv_mlp):
    """timm's ConvNeXt with ConvNeXtV2's GRN (``convnextv2_*``: ``use_grn=True``, no layer
    scale), small; its norms and depthwise convs keep non-multiple widths out anyway."""
    pytest.importorskip("timm")
    from timm.models.convnext import ConvNeXt

    model = ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 16, 32), use_grn=True, ls_init_value=None,
                     conv_mlp=conv_mlp, num_classes=5)
    targets = [n.target for n in lemon_fx.trace(model.double(), _images()(0)).graph.nodes]
    assert "norm" in targets and torch.addcmul in targets
    assert_lossless(model, _images(), 2.0)


def test_real_timm_swin_shifted_windows():
    timm = pytest.importorskip("timm")
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32,
                              patch_size=4, window_size=4, embed_dim=16, depths=(2, 2),
                              num_heads=(2, 4), num_classes=5)
    assert any("roll" in str(n.target) for n in lemon_fx.trace(
        model.double(), _images()(0)).graph.nodes)
    assert_lossless(model, _images(), 2.0)  # a width the position bias indexes is kept


def test_real_bloom_baddbmm():
    """Bloom's scores are ``alibi.baddbmm(q, k^T)``; its ALiBi slopes are a power of
    created tensors (``aten.pow.Tensor_Tensor``) that count its heads, so the heads keep
    their number while a bare width grows the stream and the MLP."""
    transformers = pytest.importorskip("transformers")
    model = transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=64, hidden_size=32, n_layer=2, n_head=4))
    kwargs = {"use_cache": False}
    assert_lossless(model, _ids, {"@ffn": 2.0}, kwargs=kwargs)
    big = assert_lossless(model, _ids, 2.0, kwargs=kwargs)
    gm = lemon_fx.trace(trained(model), _ids(0), kwargs)
    assert any(n.target is torch.ops.aten.baddbmm.default for n in gm.graph.nodes)
    assert not any(g.role == "heads" for g in lemon_fx.inspect(gm).analysis.groups)
    assert big.state_dict()["transformer.h.0.mlp.dense_h_to_4h.weight"].shape == (256, 64)


# --- F.normalize, clamp, square (Swin V2's cosine attention, XCiT, Nemotron) ------------


class Normalized(nn.Module):
    """``F.normalize`` over ``dim``: the tokens (XCiT-style) or the channels."""

    def __init__(self, dim: int, p: float = 2.0) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(4, C), nn.Linear(C, 3)
        self.dim, self.p = dim, p

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.out(F.normalize(h, p=self.p, dim=self.dim))


@pytest.mark.parametrize("width", [2.0, 1.5])
def test_normalize_over_tokens_grows_the_channels(width):
    assert_lossless(Normalized(dim=1), _tokens(), width)


@pytest.mark.parametrize("width", [2.0, 1.5])
def test_normalize_by_the_max_over_a_grown_axis_is_exact(width):
    assert_lossless(Normalized(dim=-1, p=math.inf), _tokens(), width)


def test_normalize_over_a_grown_axis_is_refused():
    assert_refused(Normalized(dim=-1), _tokens(), 2.0, NL, "counts every copy")


class ClampedSquare(nn.Module):
    """``square`` (f(0) = 0) and two clamps: ``clamp(-1, 1)`` keeps zero, ``clamp_min(0.1)``
    does not, so only the first may see the zero form."""

    def __init__(self, low: float) -> None:
        super().__init__()
        self.inp, self.ln, self.out = nn.Linear(4, C), nn.LayerNorm(C), nn.Linear(C, 3)
        self.low = low

    def forward(self, x):
        h = self.ln(self.inp(x))  # the zero form at a non-multiple width
        return self.out(torch.square(h) + torch.clamp(h, min=self.low, max=1.0))


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("width", [2.0, 1.5])
def test_square_and_a_clamp_that_keeps_zero_grow(width, frontend):
    assert_lossless(ClampedSquare(low=-1.0), _tokens(), width, frontend=frontend)


def test_a_clamp_that_moves_zero_needs_a_whole_multiple():
    assert_lossless(ClampedSquare(low=0.1), _tokens(), 2.0)
    assert_refused(ClampedSquare(low=0.1), _tokens(), 1.5, NL, "no exact answer")

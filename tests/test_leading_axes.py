"""Ops that map a tensor row by row (a Linear with a bias, LayerNorm, RMSNorm) over the
rows of a grown axis: a zero-form row is mapped to the bias (or beta), not to zero, and an
avg row's norm is not the mean of the norms. At a non-multiple width such axes are refused
unless their form is one the op keeps; with the guard switched off, so a wrong rule would
fail here instead of being caught by grow's last check."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from real_zoo import trained
from torch import nn

import lemon_fx
from lemon_fx import NotLosslessError, Plan


class TokenMap(nn.Module):
    """The stream's LayerNorm (zero-form output), then a map over the token axis whose
    rows are the grown channels: ``mix`` (a Linear over tokens) or ``norm`` (a LayerNorm
    or RMSNorm over tokens)."""

    def __init__(self, over_tokens: nn.Module) -> None:
        super().__init__()
        self.inp, self.ln, self.head = nn.Linear(3, 8), nn.LayerNorm(8), nn.Linear(8, 5)
        self.over_tokens = over_tokens

    def forward(self, x):  # x: [B, T=4, 3]
        h = self.ln(self.inp(x)).transpose(1, 2)  # [B, C, T]: C in the zero form
        return self.head(self.over_tokens(h).transpose(1, 2)).mean(1)


def _check(over_tokens: nn.Module, width: float):
    torch.manual_seed(0)
    model = trained(TokenMap(over_tokens))
    gm = lemon_fx.trace(model, (torch.randn(2, 4, 3, dtype=torch.float64),))
    big = lemon_fx.grow(gm, Plan(width=width))
    x = torch.randn(3, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(big(x), want, rtol=0, atol=1e-10 * (1 + want.abs().max()))


ZERO_ROWS_KEPT = {"linear without bias": lambda: nn.Linear(4, 4, bias=False),
                  "layer norm without beta": lambda: nn.LayerNorm(4, bias=False),
                  "rms norm": lambda: nn.RMSNorm(4, eps=1e-6)}
ZERO_ROWS_LOST = {"linear with bias": (lambda: nn.Linear(4, 4), "maps a zero row to its bias"),
                  "layer norm with beta": (lambda: nn.LayerNorm(4),
                                           "a zero row becomes beta")}


@pytest.mark.usefixtures("unguarded")
@pytest.mark.parametrize("width", [1.5, 2.0])
@pytest.mark.parametrize("case", sorted(ZERO_ROWS_KEPT))
def test_a_row_map_that_keeps_zero_rows_grows_exactly(case, width):
    _check(ZERO_ROWS_KEPT[case](), width)


@pytest.mark.usefixtures("unguarded")
@pytest.mark.parametrize("case", sorted(ZERO_ROWS_LOST))
def test_a_row_map_that_fills_zero_rows_is_exact_at_multiples_and_refused_between(case):
    build, reason = ZERO_ROWS_LOST[case]
    _check(build(), 2.0)
    with pytest.raises(NotLosslessError, match=reason):
        _check(build(), 1.5)  # before the fix: a model off by 0.1, returned


class LayerNorm1P(nn.Module):
    """Nemotron's norm: ``F.layer_norm(x, shape, weight + 1, bias)``, a weight computed at
    run time (grown by the ``+ 1`` that computes it)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.zeros(d)), nn.Parameter(torch.zeros(d))
        self.shape = (d,)

    def forward(self, x):
        return F.layer_norm(x, self.shape, self.weight + 1, self.bias, 1e-5)


class ComputedWeightNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.norm, self.head = nn.Linear(3, 8), LayerNorm1P(8), nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.norm(self.inp(x))).mean(1)


@pytest.mark.usefixtures("unguarded")
def test_a_norm_weight_computed_at_run_time_grows_at_whole_multiples_only():
    """Before: the normalized width grew and the computed weight did not, a model that
    could not run (grow's last check caught it as a bug)."""
    torch.manual_seed(0)
    model = trained(ComputedWeightNorm())
    gm = lemon_fx.trace(model, (torch.randn(2, 4, 3, dtype=torch.float64),))
    big = lemon_fx.grow(gm, Plan(width=2.0))
    x = torch.randn(3, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(big(x), want, rtol=0, atol=1e-10 * (1 + want.abs().max()))
    with pytest.raises(NotLosslessError, match="computed at run time"):
        lemon_fx.grow(gm, Plan(width=1.5))

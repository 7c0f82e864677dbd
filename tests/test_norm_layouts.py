"""Norms over an axis made of several width groups, checked with grow's guard switched off.

The guard (grow runs both models on the example inputs) hid a wrong LayerNorm rule: over
``cat([h[:, 0::2], h[:, 1::2]], -1)`` (Swin's PatchMerging) gamma was tiled as if the
concatenation were one width group. These tests switch the guard off so that a wrong
rule fails here, on fresh inputs, instead of relying on the guard.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lemon_fx
from lemon_fx import NotLosslessError, Plan


class PatchMerging(nn.Module):
    """Two strided slices of the stream, concatenated, then LayerNorm(2C) (Swin)."""

    def __init__(self, C: int = 8, norm: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.inp = nn.Linear(3, C)
        self.ln0 = nn.LayerNorm(C)
        self.fc = nn.Linear(C, C)
        self.norm = norm(2 * C)
        self.red = nn.Linear(2 * C, 6)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.fc(self.ln0(h))
        h = torch.cat([h[:, 0::2], h[:, 1::2]], -1)
        return self.head(torch.relu(self.red(self.norm(h)))).mean(1)


class StreamAndHidden(nn.Module):
    """LayerNorm over ``cat([stream, ffn hidden])``: two width groups in one norm."""

    def __init__(self, C: int = 8, F: int = 12):
        super().__init__()
        self.inp = nn.Linear(3, C)
        self.up = nn.Linear(C, F)
        self.norm = nn.LayerNorm(C + F)
        self.head = nn.Linear(C + F, 5)

    def forward(self, x):
        h = self.inp(x)
        return self.head(self.norm(torch.cat([h, torch.relu(self.up(h))], -1)))


def _trained_looking(model: nn.Module) -> nn.Module:
    """float64, every parameter moved off its init (gamma 1 / beta 0 hide misplacements)."""
    model = model.double().eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def _grow_and_compare(model: nn.Module, plan: Plan) -> float:
    trace_x = torch.randn(2, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gm = lemon_fx.trace(model, (trace_x,))
    big = lemon_fx.grow(gm, plan)
    fresh = torch.randn(3, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return float((big(fresh) - model(fresh)).abs().max())


@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.RMSNorm], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("width", [2.0, 3.0])
def test_norm_over_a_concatenation_of_slices_is_exact(unguarded, norm, width: float) -> None:
    model = _trained_looking(PatchMerging(norm=norm))
    assert _grow_and_compare(model, Plan(width=width, seed=0)) <= 1e-10


def test_norm_over_a_concatenation_gives_each_part_its_gamma(unguarded) -> None:
    model = _trained_looking(PatchMerging())
    gm = lemon_fx.trace(model, (torch.randn(2, 6, 3, dtype=torch.float64),))
    big = lemon_fx.grow(gm, Plan(width=2.0, seed=0))
    gamma, grown = model.norm.weight, big.norm.weight
    # cat([a, b]) grows to cat([a, a, b, b]): a's entries first, twice, then b's
    assert torch.equal(grown, torch.cat([gamma[:8], gamma[:8], gamma[8:], gamma[8:]]))


def test_norm_over_parts_grown_by_different_factors_is_refused(unguarded) -> None:
    model = _trained_looking(StreamAndHidden())
    gm = lemon_fx.trace(model, (torch.randn(2, 6, 3, dtype=torch.float64),))
    stream, hidden = (g.name for g in lemon_fx.inspect(gm).groups)
    with pytest.raises(NotLosslessError, match="different or non-whole factors"):
        lemon_fx.grow(gm, Plan(width={stream: 2.0, hidden: 3.0}))
    # the same factor everywhere is exact
    assert _grow_and_compare(model, Plan(width=2.0, seed=0)) <= 1e-10


class TiedHead(nn.Module):
    """An LM head tied to the embedding, reading a final LayerNorm."""

    def __init__(self, affine: bool, vocab: int = 11, C: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, C)
        self.fc = nn.Linear(C, C)
        self.ln1 = nn.LayerNorm(C)
        self.norm = nn.LayerNorm(C, elementwise_affine=affine)
        self.head = nn.Linear(C, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.fc(self.ln1(h))
        return self.head(self.norm(h))


def test_a_tied_head_divides_its_norms_gamma_by_the_copy_count(unguarded) -> None:
    model = _trained_looking(TiedHead(affine=True))
    ids = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    big = lemon_fx.grow(lemon_fx.trace(model, (ids,)), Plan(width=2.0, seed=0))
    fresh = torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert float((big(fresh) - model(fresh)).abs().max()) <= 1e-10


def test_a_tied_head_after_a_norm_without_gamma_is_refused(unguarded) -> None:
    # the head's logits grow k-fold and the norm has no weight to divide by k: this grew
    # silently wrong (caught only by grow's guard, error 8.2 at 2x)
    model = _trained_looking(TiedHead(affine=False))
    ids = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(NotLosslessError, match="emb.weight. is shared by ops"):
        lemon_fx.grow(lemon_fx.trace(model, (ids,)), Plan(width=2.0, seed=0))

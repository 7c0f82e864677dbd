"""passes.cleanup: dead code goes, but never a node that writes into a tensor.

torch.fx counts ``call_method`` nodes as pure, so ``a.mul_(2.0)`` with its result unused
was deleted from the grown graph and the model changed. Each case below writes in place
and drops the result; the grown model must still compute the source's function.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lemon_fx


class InPlace(nn.Module):
    def __init__(self, write) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.relu = nn.ReLU(inplace=True)
        self.h = nn.Linear(8, 3)
        self.write = write

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        self.write(self, y)  # the result is not used: only the write into y counts
        return self.h(y)


WRITES = {
    "method mul_": lambda m, y: y.mul_(2.0),
    "method add_ of a tensor": lambda m, y: y.add_(torch.ones_like(y)),
    "torch.relu_": lambda m, y: torch.relu_(y),
    "F.relu(inplace=True)": lambda m, y: F.relu(y, inplace=True),
    "nn.ReLU(inplace=True)": lambda m, y: m.relu(y),
}


@pytest.mark.parametrize("name", sorted(WRITES))
def test_in_place_writes_with_unused_results_survive_growth(name: str) -> None:
    torch.manual_seed(0)
    model = InPlace(WRITES[name]).double().eval()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    gm = lemon_fx.trace(model, (x,))
    big = lemon_fx.grow(gm, lemon_fx.Plan(width=2.0))
    fresh = torch.randn(3, 7, 4, dtype=torch.float64)
    with torch.no_grad():
        want = model(fresh.clone())
        got = big(fresh.clone())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10 * (1 + want.abs().max().item()))


def test_dead_pure_nodes_still_go() -> None:
    class Dead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.h = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            unused = y.mean() * 2  # noqa: F841 - pure and unused: cleanup removes it
            return self.h(y)

    gm = lemon_fx.trace(Dead(), (torch.randn(2, 4),))
    assert any(n.target == "mean" for n in gm.graph.nodes)
    big = lemon_fx.grow(gm, lemon_fx.Plan(width=2.0))
    assert not any(n.target == "mean" or n.target is operator.mul for n in big.graph.nodes)

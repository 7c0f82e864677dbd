"""grow's last guard (lemon_fx.verification.guard) and the state it must leave alone.

The guard runs source and grown model once on the example inputs; the models must come
out of it, and out of tracing, as they went in (running statistics, train/eval flags).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lemon_fx
from lemon_fx.verification.guard import RANDOM_NOTE


class _BNBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(8, 8), nn.BatchNorm1d(8)

    def forward(self, x):
        return x + self.bn(self.fc(x))


class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
        self.blocks = nn.ModuleList(_BNBlock() for _ in range(2))

    def forward(self, x):
        x = self.a(x)
        for block in self.blocks:
            x = block(x)
        return self.b(x)


@pytest.mark.parametrize("plan", [lemon_fx.Plan(width=2.0), lemon_fx.Plan(depth=2.0)],
                         ids=["width", "depth"])
def test_a_model_in_train_mode_keeps_its_running_statistics(plan):
    """Tracing and grow's runs went through BatchNorm in train mode and updated its
    running statistics: the grown model differed from the user's by 0.07 in eval mode."""
    torch.manual_seed(0)
    model = _BNNet().double().train()
    gm = lemon_fx.trace(model, (torch.randn(6, 4, dtype=torch.float64),))
    big = lemon_fx.grow(gm, plan)
    assert model.training and gm.training and big.training
    assert int(gm.get_buffer("blocks.0.bn.num_batches_tracked")) == 0
    assert int(big.get_buffer("blocks.0.bn.num_batches_tracked")) == 0
    torch.testing.assert_close(gm.get_buffer("blocks.0.bn.running_mean"),
                               model.blocks[0].bn.running_mean, rtol=0, atol=0)
    model.eval()
    big.eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(big(x), want, rtol=0, atol=1e-10 * (1 + want.abs().max()))


def test_a_model_mixing_float64_and_float32_layers_grows():
    """The guard used to cast the whole model to one dtype, which such a model refuses."""
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16).double(), nn.Linear(16, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(x.double())).float())

    torch.manual_seed(0)
    model = Mixed()
    big = lemon_fx.grow(lemon_fx.trace(model, (torch.randn(2, 8),)), lemon_fx.Plan(width=2.0))
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(big(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_random_model_is_grown_with_a_note_instead_of_a_false_bug_report():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.b(F.dropout(torch.relu(self.a(x)), 0.5, training=True))

    torch.manual_seed(0)
    model = Noisy()
    big = lemon_fx.grow(lemon_fx.trace(model, (torch.randn(2, 8),)), lemon_fx.Plan(width=2.0))
    assert lemon_fx.growth_report(big).notes == [RANDOM_NOTE]

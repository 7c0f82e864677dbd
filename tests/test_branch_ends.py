"""Residual branches that end in something other than a Linear or Conv: a gate computed
from the branch (squeeze-excitation), a norm after the branch (Swin V2, OLMo2), a layer
scale with no weighted layer behind it (PoolFormer's pooling mixer). Each new block must
compute the identity; every check runs with grow's last guard switched off, on fresh
inputs, every parameter moved off its init."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from real_zoo import trained
from torch import nn

import lemon_fx
from lemon_fx import Plan, UnsupportedOpError


class SqueezeExcite(nn.Module):
    """``h * sigmoid(fc2(relu(fc1(mean(h)))))``: the gate is computed from ``h``."""

    def __init__(self, c: int, gate_first: bool) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)
        self.gate_first = gate_first

    def forward(self, h):
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(h.mean((2, 3), keepdim=True)))))
        return gate * h if self.gate_first else h * gate  # torchvision / timm spellings


class SEBlock(nn.Module):
    def __init__(self, c: int, gate_first: bool) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.se = SqueezeExcite(c, gate_first)

    def forward(self, x):
        return torch.relu(x + self.se(self.bn(self.conv(x))))


class PostNormBlock(nn.Module):
    """``x + norm(fc2(gelu(fc1(x))))``: a norm closes the branch (Swin V2's res-post-norm
    with a LayerNorm, OLMo2's with an RMSNorm)."""

    def __init__(self, d: int, norm: str) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.norm = {"layer": nn.LayerNorm(d), "layer_no_beta": nn.LayerNorm(d, bias=False),
                     "rms": nn.RMSNorm(d, eps=1e-6)}[norm]
        self.kind = norm

    def forward(self, x):
        h = self.fc2(F.gelu(self.fc1(x)))
        return x + self.norm(h)


class DecomposedPostNormBlock(nn.Module):
    """OLMo2 / Gemma2 write the norm after the branch by hand:
    ``w * (h * rsqrt(mean(h ** 2) + eps))``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        h = self.fc(x)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x + self.weight * h


class PoolMixerBlock(nn.Module):
    """PoolFormer: ``x + gamma * (pool(x) - x)``, no layer with weights in the branch."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.gamma = nn.Parameter(torch.full((c,), 0.1))

    def forward(self, x):
        return x + self.gamma.view(-1, 1, 1) * (self.pool(x) - x)


class Net(nn.Module):
    def __init__(self, block, image: bool) -> None:
        super().__init__()
        self.image = image
        self.stem = nn.Conv2d(3, 8, 3, padding=1) if image else nn.Linear(3, 8)
        self.blocks = nn.ModuleList([block(), block()])
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x)) if self.image else self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean((2, 3)) if self.image else x.mean(1))


CASES = {
    "se gate second": (lambda: SEBlock(8, gate_first=False), True),
    "se gate first": (lambda: SEBlock(8, gate_first=True), True),
    "post layer norm": (lambda: PostNormBlock(8, "layer"), False),
    "post layer norm without beta": (lambda: PostNormBlock(8, "layer_no_beta"), False),
    "post rms norm": (lambda: PostNormBlock(8, "rms"), False),
    "decomposed post rms norm": (lambda: DecomposedPostNormBlock(8), False),
    "pool mixer with layer scale": (lambda: PoolMixerBlock(8), True),
}


def _inputs(image: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    shape = (2, 3, 8, 8) if image else (2, 5, 3)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


@pytest.mark.usefixtures("unguarded")
@pytest.mark.parametrize("plan", [Plan(depth=2.0), Plan(width=2.0, depth=2.0)],
                         ids=["depth2", "width2+depth2"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_new_block_is_the_identity(case, plan):
    block, image = CASES[case]
    torch.manual_seed(0)
    model = trained(Net(block, image))
    gm = lemon_fx.trace(model, (_inputs(image, 0),))
    big = lemon_fx.grow(gm, plan)
    assert len(list(big.blocks.children())) == 4
    x = _inputs(image, 1)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(big(x), want, rtol=0, atol=1e-10 * (1 + want.abs().max()))


def test_a_layer_scale_ends_the_branch_only_without_a_layer_behind_it():
    """LEMON's cancelling weights go to the last Linear when there is one (every new
    weight learns); a layer scale is set to zero only when the branch has no weights."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.gamma = nn.Parameter(torch.full((8,), 0.1))

        def forward(self, x):
            return x + self.fc(x) * self.gamma

    torch.manual_seed(0)
    scaled = lemon_fx.trace(trained(Net(Scaled, False)), (_inputs(False, 0),))
    (stack,) = lemon_fx.inspect(scaled).stacks
    assert [e.kind for e in stack.blocks[0].branch_ends] == ["layer"]
    pooled = lemon_fx.trace(trained(Net(lambda: PoolMixerBlock(8), True)), (_inputs(True, 0),))
    (stack,) = lemon_fx.inspect(pooled).stacks
    assert [(e.kind, e.weight) for e in stack.blocks[0].branch_ends] == [
        ("scale", "blocks.0.gamma")]
    big = lemon_fx.grow(pooled, Plan(depth=2.0))
    assert torch.count_nonzero(big.state_dict()["blocks.1.gamma"]) == 0
    assert torch.equal(big.state_dict()["blocks.0.gamma"], pooled.state_dict()["blocks.0.gamma"])


def test_a_branch_with_neither_weights_nor_a_scale_is_refused():
    class Pooled(nn.Module):  # x + (pool(x) - x): nothing can make it write zero
        def __init__(self):
            super().__init__()
            self.pool = nn.AvgPool2d(3, 1, 1)

        def forward(self, x):
            return x + (self.pool(x) - x)

    gm = lemon_fx.trace(trained(Net(Pooled, True)), (_inputs(True, 0),))
    with pytest.raises(UnsupportedOpError, match="does not end in a layer with weights"):
        lemon_fx.grow(gm, Plan(depth=2.0))

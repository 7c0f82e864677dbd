"""Depth growth of CNN-style stages: stacks whose blocks are not all copyable.

A stage starts with a block that changes the stream (a stride, more channels), may hold
plain blocks (no residual add) between residual ones, may be numbered from 1 (timm's
RegNet ``s1.b1``) and may mix block classes (torchvision's ``features``). Kept blocks stay
where they are; copies of the residual blocks compute the identity. Every check here runs
with grow's last guard switched off, so a wrong rewiring fails the test itself."""

from __future__ import annotations

import warnings

import pytest
import torch
from real_zoo import trained
from torch import nn

import lemon_fx
from lemon_fx import Plan, PlanError, UnsupportedOpError


class Res(nn.Module):
    """``relu(x + bn(conv(relu(bn(conv(x))))))``: a ResNet basic block at fixed width."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class Down(nn.Module):
    """A stage's first block: strided conv to more channels, then a ReLU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class Plain(nn.Module):
    """A same-shape block with no residual add: kept, never copied."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return torch.relu(self.conv(x))


class Stages(nn.Module):
    """``stem``, a stage of one downsampling block, a stage ``[Down, Res, Res]`` and a
    ``features`` Sequential mixing classes: ``[Res, Plain, Down, Res]``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Sequential(Down(8, 8))
        self.layer2 = nn.Sequential(Down(8, 12), Res(12), Res(12))
        self.features = nn.Sequential(Res(12), Plain(12), Down(12, 16), Res(16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = self.features(self.layer2(self.layer1(x)))
        return self.head(x.mean((2, 3)))


class RegStage(nn.Module):
    """timm's RegNet naming: blocks ``b1``, ``b2``, ... and no block numbered 0."""

    def __init__(self, c: int, count: int) -> None:
        super().__init__()
        for i in range(count):
            self.add_module(f"b{i + 1}", Res(c))

    def forward(self, x):
        for block in self.children():
            x = block(x)
        return x


class RegNetLike(nn.Module):
    def __init__(self, count: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.s1 = RegStage(8, count)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.s1(torch.relu(self.stem(x))).mean((2, 3)))


class TwoStacks(nn.Module):
    """Two stacks back to back, the second's first block copyable: growing both rewires
    the second onto the first's last new block (a copy must still read its source's
    output, not the first stack's)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.ModuleList([Res(8), Res(8)])
        self.b = nn.ModuleList([Res(8), Res(8)])
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for block in self.a:
            x = block(x)
        for block in self.b:
            x = block(x)
        return self.head(x.mean((2, 3)))


def _images(seed: int) -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def _grow(model, plan):
    torch.manual_seed(0)
    model = trained(model)
    gm = lemon_fx.trace(model, (_images(0),))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        big = lemon_fx.grow(gm, plan)
    with torch.no_grad():
        want, got = model(_images(1)), big(_images(1))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10 * (1 + want.abs().max().item()))
    return gm, big, [str(w.message) for w in caught]


def test_stages_analysis_keeps_what_cannot_be_copied():
    torch.manual_seed(0)
    gm = lemon_fx.trace(trained(Stages()), (_images(0),))
    stacks = {s.name: s for s in lemon_fx.inspect(gm).stacks}
    assert stacks["layer1"].nothing_to_copy and stacks["layer1"].copyable == []
    assert stacks["layer2"].copyable == [1, 2] and stacks["layer2"].kept == [0]
    assert stacks["features"].copyable == [0, 3] and stacks["features"].kept == [1, 2]
    assert stacks["features"].problem is None and stacks["features"].kind == "residual"


@pytest.mark.usefixtures("unguarded")
@pytest.mark.parametrize("width", [None, 2.0])
def test_a_bare_depth_grows_what_it_can_and_says_what_it_kept(width):
    gm, big, caught = _grow(Stages(), Plan(width=width, depth=2.0))
    counts = {s.name: s.count for s in lemon_fx.inspect(big).stacks}
    assert counts["layer1"] == 1  # a stage of one downsampling block keeps its depth
    assert counts["layer2"] == 6 and counts["features"] == 8
    assert any("'layer1' keep" in w for w in caught)
    notes = lemon_fx.growth_report(big).notes
    assert any("'layer1' keep" in n for n in notes)
    assert any("features.1, features.2" in n for n in notes)
    # new blocks are numbered in place; the kept blocks are never copied
    names = [n for n, _ in big.named_children()]
    assert names == ["stem", "layer1", "layer2", "features", "head"]
    kinds = {("conv1", "bn1", "conv2", "bn2"): "Res", ("conv",): "Plain",
             ("conv", "bn"): "Down"}
    assert [kinds[tuple(n for n, _ in m.named_children())] for m in big.features.children()
            ] == ["Res", "Res", "Res", "Plain", "Down", "Res", "Res", "Res"]


def test_a_stage_of_one_downsampling_block_alone_is_refused():
    class OnlyDown(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer1 = nn.Sequential(Down(3, 8))
            self.head = nn.Linear(8, 5)

        def forward(self, x):
            return self.head(self.layer1(x).mean((2, 3)))

    gm = lemon_fx.trace(trained(OnlyDown()), (_images(0),))
    with pytest.raises(UnsupportedOpError) as raised:
        lemon_fx.grow(gm, Plan(depth=2.0))
    assert "no block can be copied as an identity" in raised.value.problems[0].reason


@pytest.mark.usefixtures("unguarded")
def test_blocks_numbered_from_one_grow_in_place():
    gm, big, _ = _grow(RegNetLike(), Plan(depth=2.0))
    assert [n for n, _ in big.s1.named_children()] == ["b1", "b2", "b3", "b4"]
    torch.manual_seed(1)
    target = RegNetLike(count=4).double()
    target.load_state_dict(big.state_dict(), strict=True)


def test_numbered_parts_of_one_block_are_no_stack():
    class Scales(nn.Module):  # ``ls1``, ``ls2``: two layer scales of one block
        def __init__(self):
            super().__init__()
            self.gamma = nn.Parameter(torch.ones(8))

        def forward(self, x):
            return x * self.gamma

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)
            self.ls1, self.ls2 = Scales(), Scales()

        def forward(self, x):
            x = x + self.ls1(self.fc1(x))
            return x + self.ls2(self.fc2(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    x = torch.randn(2, 8, dtype=torch.float64)
    gm = lemon_fx.trace(trained(Net()), (x,))
    assert [s.name for s in lemon_fx.inspect(gm).stacks] == ["blocks"]


@pytest.mark.usefixtures("unguarded")
@pytest.mark.parametrize("placement", ["interleave", "stack"])
def test_two_stacks_back_to_back_grow_exactly(placement):
    gm, big, _ = _grow(TwoStacks(), Plan(depth=2.0, placement=placement))
    assert len(list(big.a.children())) == 4 and len(list(big.b.children())) == 4


def test_a_relu_block_copied_after_a_block_without_one_is_refused():
    class Mixed(nn.Module):  # relu(x + F(x)) blocks, then a last block with no ReLU
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.blocks = nn.Sequential(Res(8), Res(8), nn.Sequential(nn.Conv2d(8, 8, 1)))
            self.head = nn.Linear(8, 5)

        def forward(self, x):
            return self.head(self.blocks(torch.relu(self.stem(x))).mean((2, 3)))

    torch.manual_seed(0)
    gm = lemon_fx.trace(trained(Mixed()), (_images(0),))
    with pytest.raises(PlanError) as raised:
        lemon_fx.grow(gm, Plan(depth={"blocks": 5}, placement="stack"))
    assert "would not be x" in raised.value.problems[0].reason
    _grow(Mixed(), Plan(depth={"blocks": 5}))  # interleaved copies follow their source

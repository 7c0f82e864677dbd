"""Convolutional networks grown in width: ResNet/ResNeXt, MobileNet/EfficientNet, DenseNet,
Inception, GroupNorm nets, flatten-into-Linear heads and ConvNeXt (``tests/cnn_zoo.py``).

Each is grown at 2x and at 1.5x and must compute the source's function in float64 on fresh
inputs (another generator, another batch size), with BatchNorm in eval mode and in train
mode (batch statistics), or raise the documented ``LemonError`` where the exact answer only
exists for whole multiples (GroupNorm with one group, a depthwise convolution feeding a
LayerNorm). Grouped convolutions and GroupNorm grow by whole groups: their per-group widths
are kept and ``groups``/``num_groups`` rewritten. One model per family also goes through
onnxruntime.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from cnn_zoo import CNN_ZOO
from torch import nn

import lemon_fx
from lemon_fx import Plan
from lemon_fx.axes.expansion import LeafGrowth, embed

FRESH_BATCH = 3
ONNX_CHECKED = sorted({e.family: name for name, e in reversed(CNN_ZOO.items())}.values())


def _traced(name: str):
    entry = CNN_ZOO[name]
    torch.manual_seed(0)
    model = entry.build().double().eval()
    gm = lemon_fx.trace(model, entry.example_inputs(torch.Generator().manual_seed(0)))
    return entry, model, gm


def _fresh(entry, seed: int = 1, batch: int = FRESH_BATCH):
    return entry.example_inputs(torch.Generator().manual_seed(seed), batch)


def _assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = 1.0 + want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10 * scale)


def _expected_error(entry):
    kind, text = entry.at_1_5x
    return getattr(lemon_fx, kind), text


def _partial_plan(gm, entry) -> Plan:
    """1.5x everywhere except the groups that only grow by whole multiples (2x there)."""
    whole = {g.name for g in lemon_fx.inspect(gm).groups
             if g.whole_multiples_only or g.role == "residual"}
    assert whole, "a refused 1.5x must come from a group that a partial plan can name"
    return Plan(width={g.name: (2.0 if g.name in whole else 1.5)
                       for g in lemon_fx.inspect(gm).groups}, seed=4)


@pytest.mark.parametrize("name", sorted(CNN_ZOO))
def test_grows_2x_losslessly(name):
    entry, model, gm = _traced(name)
    big = lemon_fx.grow(gm, Plan(width=2.0, seed=1))
    before = {g.name: g.size for g in lemon_fx.inspect(gm).groups}
    after = {g.name: g.size for g in lemon_fx.inspect(big).groups}
    assert before and all(after[n] == 2 * s for n, s in before.items()), (before, after)
    x = _fresh(entry)
    _assert_same(big(*x), model(*x))
    assert sum(p.numel() for p in big.parameters()) > 2 * sum(p.numel() for p in gm.parameters())


@pytest.mark.parametrize("name", sorted(CNN_ZOO))
def test_grows_1_5x_or_refuses(name):
    entry, model, gm = _traced(name)
    x = _fresh(entry)
    if entry.at_1_5x != "exact":
        error, text = _expected_error(entry)
        with pytest.raises(error, match=text) as info:
            lemon_fx.grow(gm, Plan(width=1.5))
        assert "whole multiple" in str(info.value)
        big = lemon_fx.grow(gm, _partial_plan(gm, entry))
    else:
        big = lemon_fx.grow(gm, Plan(width=1.5, seed=2))
    _assert_same(big(*x), model(*x))


@pytest.mark.parametrize("name", sorted(CNN_ZOO))
def test_bigger_config_loads_grown_state_dict(name):
    """Grown names and shapes are those of the family's 2x config (torchvision-style)."""
    entry, _, gm = _traced(name)
    big = lemon_fx.grow(gm, Plan(width=2.0, seed=1))
    target = entry.build_2x().double()
    target.load_state_dict(big.state_dict(), strict=True)
    x = _fresh(entry)
    _assert_same(target.eval()(*x), big(*x))


def _train_forward(module: torch.nn.Module, x) -> torch.Tensor:
    module = module.train()
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.eval()  # dropout masks are random; this test is about batch statistics
    return module(*x)


BATCHNORM_NETS = sorted(n for n, e in CNN_ZOO.items() if e.has_batchnorm)


@pytest.mark.parametrize("width", [2.0, 1.5])
@pytest.mark.parametrize("name", BATCHNORM_NETS)
def test_batchnorm_train_mode(name, width):
    """One forward in train mode: batch statistics of copied channels are copies, so the
    outputs agree, and the updated running stats are the grown updated source's."""
    entry, _, gm = _traced(name)
    plan = Plan(width=width, seed=5)
    big = lemon_fx.grow(gm, plan)
    small, wide = copy.deepcopy(gm), copy.deepcopy(big)
    x = _fresh(entry, seed=2, batch=4)
    _assert_same(_train_forward(wide, x), _train_forward(small, x))
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in small.modules()):
        assert all(int(v) == 1 for k, v in wide.named_buffers()
                   if k.endswith("num_batches_tracked"))  # the stats were updated
    regrown = lemon_fx.grow(small.eval(), plan)
    stats = dict(regrown.named_buffers())  # running mean/var, num_batches_tracked
    assert stats
    state = dict(wide.named_buffers())
    for key, value in stats.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-12, msg=key)
    y = _fresh(entry, seed=3)
    _assert_same(wide.eval()(*y), small(*y))


def test_running_stats_copied_by_the_channel_index_map():
    entry, _, gm = _traced("resnet_basic")
    big = lemon_fx.grow(gm, Plan(width=1.5, seed=0))
    src, dst = gm.bn1, big.get_submodule("bn1")
    assert dst.num_features == 12 and dst.running_mean.shape == (12,)
    index = torch.arange(12) % 8  # LEMON's circular map: new channels after the originals
    for attr in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(dst, attr).detach(), getattr(src, attr).detach()[index])
    assert torch.equal(dst.num_batches_tracked, src.num_batches_tracked)


def _grouped(gm) -> dict[str, tuple[str, int, int]]:
    """name -> (kind, groups, channels per group) of grouped convs and GroupNorms."""
    out = {}
    for name, m in gm.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            out[name] = ("conv", m.groups, m.out_channels // m.groups)
            assert m.weight.shape[1] == m.in_channels // m.groups
        elif isinstance(m, nn.GroupNorm):
            out[name] = ("gn", m.num_groups, m.num_channels // m.num_groups)
            assert m.weight.shape == (m.num_channels,)
    return out


@pytest.mark.parametrize("name", ["resnext", "mobilenet", "inception", "groupnorm_cnn",
                                  "convnext"])
def test_grouped_layers_grow_by_whole_groups(name):
    entry, model, gm = _traced(name)
    before = _grouped(gm)
    assert before
    for width in (2.0, 1.5):
        try:
            big = lemon_fx.grow(gm, Plan(width=width, seed=1))
        except lemon_fx.NotLosslessError:
            assert entry.at_1_5x != "exact"
            continue
        after = _grouped(big)
        for key, (kind, groups, per_group) in before.items():
            new_kind, new_groups, new_per_group = after[key]
            assert (new_kind, new_per_group) == (kind, per_group), key
            assert new_groups == round(groups * width), key


def test_depthwise_groups_follow_channels():
    _, _, gm = _traced("mobilenet")
    big = lemon_fx.grow(gm, Plan(width=1.5, seed=1))
    dw = big.get_submodule("features.2.block.1.0")
    assert dw.groups == dw.in_channels == dw.out_channels == 24
    # depthwise filters are copied whole: no fan-in split inside a group
    src = gm.get_submodule("features.2.block.1.0").weight
    assert torch.equal(dw.weight.detach(), src.detach()[torch.arange(24) % 16])


def test_group_counts_in_groups():
    """A grouped width is reported and planned in groups, like attention heads."""
    _, _, gm = _traced("resnext")
    groups = {g.name: g for g in lemon_fx.inspect(gm).groups}
    assert groups["layer1.0.channels"].size == 2
    assert groups["layer1.0.channels"].role == "channels"
    big = lemon_fx.grow(gm, Plan(width={"layer1.0.channels": 3}))
    conv = big.get_submodule("layer1.0.conv2")
    assert (conv.groups, conv.in_channels, conv.out_channels) == (3, 12, 12)


def test_flatten_into_linear_splits_per_channel_block():
    """``x.flatten(1)`` of ``[B, C, 4, 4]``: fc1's columns are ``[C, 4, 4]``; a copied
    channel's 16 columns are split between the copies, spatial positions stay apart."""
    entry, model, gm = _traced("flatten_linear")
    big = lemon_fx.grow(gm, Plan(width=1.5, seed=3, method="net2net"))
    w = gm.fc1.weight.detach().view(-1, 16, 16)  # [out, C, H*W]
    w_big = big.get_submodule("fc1").weight.detach()
    assert w_big.shape == (48, 24 * 16)
    cols = w_big[:32].view(32, 24, 16)  # rows of the source units
    copies = torch.tensor([2] * 8 + [1] * 8, dtype=w.dtype)
    expected = embed(w / copies[None, :, None], 1, LeafGrowth(16, 24, "circ"))
    torch.testing.assert_close(cols, expected, rtol=0, atol=1e-12)


def test_conv_spatial_axes_never_grow():
    _, _, gm = _traced("flatten_linear")
    report = lemon_fx.inspect(gm)
    assert sorted(g.size for g in report.groups) == [8, 16, 32]  # no 4x4 spatial group


@pytest.mark.parametrize("name", ONNX_CHECKED)
def test_onnxruntime(name, tmp_path):
    entry, model, gm = _traced(name)
    width = 1.5 if entry.at_1_5x == "exact" else 2.0
    big = lemon_fx.grow(gm, Plan(width=width, seed=1))
    x = _fresh(entry)
    report = lemon_fx.verify(gm, big, x, onnx=str(tmp_path / "m.onnx"))
    assert report.ok and report.onnx_outputs


def test_subclassed_layernorm_with_its_own_forward_is_not_taken_for_layernorm():
    """Documents torchvision's ``LayerNorm2d(nn.LayerNorm)``: a subclass that permutes in
    its own forward. It must not be grown as a LayerNorm over the last axis."""

    class LayerNorm2d(nn.LayerNorm):
        def forward(self, x):
            x = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape,
                                               self.weight, self.bias, self.eps)
            return x.permute(0, 3, 1, 2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.norm = LayerNorm2d(8)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.norm(self.conv(x)).mean((2, 3)))

    model = Net().double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    gm = lemon_fx.trace(model, (x,))
    assert not any(n.op == "call_module" and n.target == "norm" for n in gm.graph.nodes)
    big = lemon_fx.grow(gm, Plan(width=2.0))  # traced through: a LayerNorm over channels
    _assert_same(big(x), model(x))


class StdConv2d(nn.Conv2d):
    """timm's weight-standardized convolution (BiT, ResNetV2): a subclass of nn.Conv2d
    whose forward normalizes each filter over its fan-in, so splitting the fan-in would
    change the filter: the Conv2d rule must not speak for it."""

    def forward(self, x):
        w = torch.nn.functional.batch_norm(self.weight.reshape(1, self.out_channels, -1), None,
                                           None, training=True, momentum=0.0, eps=1e-6)
        return torch.nn.functional.conv2d(x, w.reshape_as(self.weight), self.bias, self.stride,
                                          self.padding, self.dilation, self.groups)


class ScaledBatchNorm(nn.BatchNorm2d):
    def forward(self, x):
        return 2.0 * super().forward(x).flip(1)


@pytest.mark.parametrize("layer", [StdConv2d(8, 8, 3, padding=1), ScaledBatchNorm(8)],
                         ids=["StdConv2d", "BatchNorm2d subclass"])
def test_subclass_with_its_own_forward_is_traced_through_not_taken_for_its_base(layer):
    model = nn.Sequential(OrderedDict([("stem", nn.Conv2d(3, 8, 3, padding=1)),
                                       ("act", nn.ReLU()), ("layer", layer),
                                       ("pool", nn.AdaptiveAvgPool2d(1)),
                                       ("flat", nn.Flatten()), ("fc", nn.Linear(8, 3))]))
    model = model.double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    gm = lemon_fx.trace(model, (x,))
    assert not any(n.op == "call_module" and n.target == "layer" for n in gm.graph.nodes)
    try:
        big = lemon_fx.grow(gm, Plan(width=2.0))
    except lemon_fx.LemonError as err:
        # StdConv2d: a weight computed at run time; the BatchNorm subclass flips channels
        assert "computed at run time" in str(err) or "no rule for this op" in str(err)
        return
    _assert_same(big(x), model(x))


class _ConcatIntoGroupedConv(nn.Module):
    """Two branches of unequal widths (8 and 4) concatenated into a grouped conv whose
    groups (3 channels) straddle them, then a growable Linear head. With ``equal`` both
    branches have 8 channels: the concatenation is [2, 8], and the conv's 4 groups are 2
    per branch."""

    def __init__(self, head: bool, equal: bool = False):
        super().__init__()
        other = 8 if equal else 4
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, other, 3, padding=1)
        self.g = nn.Conv2d(8 + other, 8 + other, 3, padding=1, groups=4)
        self.head = nn.Sequential(nn.Linear(8 + other, 24), nn.GELU(), nn.Linear(24, 5)) \
            if head else None

    def forward(self, x):
        y = self.g(torch.cat([self.a(x), self.b(x)], dim=1))
        return y if self.head is None else self.head(y.mean(dim=(2, 3)))


def test_a_grouped_conv_on_a_concatenation_reports_the_widths_it_keeps():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    gm = lemon_fx.trace(_ConcatIntoGroupedConv(head=False).double().eval(), (x,))
    report = lemon_fx.inspect(gm)
    assert report.groups == [] and len(report.held) == 1
    assert {"a.weight[0]", "b.weight[0]", "g.weight[0]"} <= set(report.held[0].members)
    assert "kept at their size" in str(report) and "'g'" in str(report)
    assert report.to_dict()["held"][0]["op"] == "nn.Conv2d"
    # 2x asked, nothing can grow: an error naming the conv, not the same model back
    with pytest.raises(lemon_fx.PlanError) as info:
        lemon_fx.grow(gm, Plan(width=2.0))
    problem = info.value.problems[0]
    assert problem.node == "g" and problem.op == "nn.Conv2d"
    assert "nothing can grow" in problem.reason and problem.fix


def test_a_model_growing_around_kept_widths_says_which_it_kept():
    torch.manual_seed(0)
    model = _ConcatIntoGroupedConv(head=True).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    gm = lemon_fx.trace(model, (x,))
    big = lemon_fx.grow(gm, Plan(width=2.0))
    assert big.get_submodule("head.0").out_features == 48  # the hidden layer grew
    assert big.get_submodule("g").weight.shape == model.g.weight.shape
    notes = lemon_fx.growth_report(big).notes
    assert any("kept at their size" in n and "g.weight[0]" in n for n in notes)
    fresh = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator()
                        .manual_seed(1))
    torch.testing.assert_close(big(fresh), model(fresh), rtol=0, atol=1e-10)


def test_a_grouped_conv_on_a_concatenation_of_equal_parts_grows(unguarded):
    # cat([a, b]) of two 8-channel branches is [2, 8]; the conv's 4 groups are 2 per branch,
    # so both branches grow alike and the conv grows by whole groups in each
    torch.manual_seed(0)
    model = _ConcatIntoGroupedConv(head=True, equal=True).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    gm = lemon_fx.trace(model, (torch.randn(2, 3, 8, 8, dtype=torch.float64),))
    for width, channels in ((2.0, 32), (1.5, 24)):
        big = lemon_fx.grow(gm, Plan(width=width))
        assert big.get_submodule("g").weight.shape[0] == channels
        fresh = torch.randn(3, 3, 8, 8, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(big(fresh), model(fresh), rtol=0, atol=1e-10)

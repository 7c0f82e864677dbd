"""Branch ends that are identities or scales in eval mode, on the real classes: stochastic
depth (timm's DropPath, torchvision's StochasticDepth) and a layer scale read through a view
(ConvNeXt's ``x * gamma.reshape(1, -1, 1, 1)``). Grown in float64, weights and statistics
perturbed off their init, checked on fresh inputs with the guard switched off, so a wrong
rule fails here rather than in grow's last check."""

from __future__ import annotations

import pytest
import torch
from real_zoo import trained

import lemon_fx
from lemon_fx import Plan


def _trained(model):
    return trained(model, dtype=torch.float64, scale=0.05)


def _exact(model, plan, size):
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    gm = lemon_fx.trace(model, (x,))
    big = lemon_fx.grow(gm, plan)
    fresh = torch.randn(3, 3, size, size, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(big(fresh), model(fresh), rtol=1e-10, atol=1e-10)
    return big


PLANS = {"width": Plan(width=2.0), "depth": Plan(depth=2.0),
         "width+depth": Plan(width=2.0, depth=2.0)}


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_timm_drop_path_and_layer_scale(plan, unguarded):
    timm = pytest.importorskip("timm")
    vit = _trained(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16,
                                     patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                     num_classes=5, drop_path_rate=0.2, init_values=0.1))
    assert any(type(m).__name__ == "DropPath" for m in vit.modules())
    big = _exact(vit, PLANS[plan], 16)
    if "depth" in plan:
        assert sum(1 for n, _ in big.named_modules() if n.count(".") == 1
                   and n.startswith("blocks.")) == 4


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_timm_convnext_depth_grows_the_blocks_inside_its_stages(plan, unguarded):
    timm = pytest.importorskip("timm")
    convnext = _trained(timm.create_model("convnext_atto", pretrained=False, num_classes=5,
                                          drop_path_rate=0.1))
    big = _exact(convnext, PLANS[plan], 32)
    if "depth" in plan:
        stages = [len(list(big.get_submodule(f"stages.{i}.blocks").children()))
                  for i in range(4)]
        assert stages == [4, 4, 12, 4]


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_torchvision_stochastic_depth(plan, unguarded):
    pytest.importorskip("torchvision")
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    model = _trained(ConvNeXt([CNBlockConfig(8, 16, 2), CNBlockConfig(16, None, 2)],
                              stochastic_depth_prob=0.2, num_classes=5))
    assert any(type(m).__name__ == "StochasticDepth" for m in model.modules())
    _exact(model, PLANS[plan], 16)

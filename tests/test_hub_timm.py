"""grow_pretrained for timm: a real timm model -> a folder that
timm.create_model("local-dir:...", pretrained=True) rebuilds -> the source's function on fresh
inputs. Small configs, random weights perturbed off their init, nothing downloaded."""

from __future__ import annotations

import json

import pytest
import torch
from real_zoo import trained

import lemon_fx
from lemon_fx import Plan, PlanError, UnsupportedOpError

timm = pytest.importorskip("timm")

IMAGE = 32


def _trained(model):
    return trained(model, dtype=torch.float32, scale=0.02)


def _vit(name="vit_tiny_patch16_224"):
    return _trained(timm.create_model(name, pretrained=False, img_size=IMAGE, patch_size=8,
                                      embed_dim=64, depth=2, num_heads=2, num_classes=10))


def _resnet():
    return _trained(timm.create_model("resnet18", pretrained=False, num_classes=10))


def _convnext():
    return _trained(timm.create_model("convnext_atto", pretrained=False, num_classes=10))


def _reloaded_matches(source, out, size=IMAGE):
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), source(x), rtol=1e-4, atol=1e-5)
    return reloaded


CASES = {
    # name: (build, plan, the model_args it rewrites, input size)
    "vit-width": (_vit, Plan(width=2.0), {"embed_dim": [64, 128], "num_heads": [2, 4]}, IMAGE),
    "vit-width-depth": (_vit, Plan(width=2.0, depth=2.0),
                        {"embed_dim": [64, 128], "num_heads": [2, 4], "depth": [2, 4]}, IMAGE),
    "deit-depth": (lambda: _vit("deit_tiny_patch16_224"), Plan(depth=2.0), {"depth": [2, 4]},
                   IMAGE),
    "resnet-depth": (_resnet, Plan(depth=2.0), {"layers": [[2, 2, 2, 2], [4, 4, 4, 4]]}, 64),
    "convnext-width": (_convnext, Plan(width=2.0),
                       {"dims": [[40, 80, 160, 320], [80, 160, 320, 640]]}, 64),
    "convnext-depth": (_convnext, Plan(depth=2.0), {"depths": [[2, 2, 6, 2], [4, 4, 12, 4]]},
                       64),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_grown_timm_folder_rebuilds_with_local_dir_and_computes_the_same(tmp_path, case):
    build, plan, rewritten, size = CASES[case]
    source = build()
    out = tmp_path / "big"
    inputs = (torch.randn(1, 3, size, size),)
    growth = lemon_fx.grow_pretrained(source, plan, out, example_inputs=inputs)
    assert {k: [a, b] for k, (a, b) in growth.config.items()} == rewritten
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == source.pretrained_cfg["architecture"]
    for key, (_, grown) in rewritten.items():
        assert config["model_args"][key] == grown
    assert config["pretrained_cfg"]["num_classes"] == 1000 or "num_classes" in config
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json",
                                                   "model.safetensors"]
    reloaded = _reloaded_matches(source, out, size)
    grown_params = sum(p.numel() for p in reloaded.parameters())
    assert grown_params > 1.5 * sum(p.numel() for p in source.parameters())
    assert growth.loader == "timm.create_model" and growth.max_abs_error < 1e-4


def test_a_width_timm_cannot_write_is_refused_before_anything_is_written(tmp_path):
    # timm's ResNet builds its stem with 64 channels whatever its arguments say
    out = tmp_path / "big"
    with pytest.raises(PlanError, match="cannot be written as resnet18's model_args") as err:
        lemon_fx.grow_pretrained(_resnet(), Plan(width=2.0), out,
                                 example_inputs=(torch.randn(1, 3, 64, 64),))
    assert "pass model_args" in str(err.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_depth_the_analysis_refuses_writes_nothing(tmp_path):
    # resnet10t has one block per stage, and each of the later ones downsamples
    out = tmp_path / "big"
    model = _trained(timm.create_model("resnet10t", pretrained=False, num_classes=10))
    with pytest.raises(UnsupportedOpError, match="no block can be copied as an identity"):
        lemon_fx.grow_pretrained(model, Plan(depth={"layer2": 2}), out,
                                 example_inputs=(torch.randn(1, 3, 64, 64),))
    assert list(tmp_path.iterdir()) == []


def test_a_bare_depth_grows_the_stages_that_can_and_writes_their_depths(tmp_path):
    # only layer1's block keeps the stream's shape: layers (1, 1, 1, 1) -> (2, 1, 1, 1)
    out = tmp_path / "big"
    model = _trained(timm.create_model("resnet10t", pretrained=False, num_classes=10))
    with pytest.warns(UserWarning, match="'layer2', 'layer3', 'layer4' keep their depth"):
        lemon_fx.grow_pretrained(model, Plan(depth=2.0), out,
                                 example_inputs=(torch.randn(1, 3, 64, 64),))
    config = json.loads((out / "config.json").read_text())
    assert list(config["model_args"]["layers"]) == [2, 1, 1, 1]
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=1e-4)


def test_a_grown_timm_folder_grows_again_from_the_folder(tmp_path):
    source = _vit()
    lemon_fx.grow_pretrained(source, Plan(depth=2.0), tmp_path / "a")
    lemon_fx.grow_pretrained(tmp_path / "a", Plan(width=2.0), tmp_path / "b")
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["model_args"]["depth"] == 4 and config["model_args"]["embed_dim"] == 128
    _reloaded_matches(source, tmp_path / "b")


def test_the_command_line_grows_a_timm_architecture(tmp_path):
    from lemon_fx.cli.main import main

    plan = tmp_path / "plan.yaml"
    plan.write_text("depth:\n  layer1: 2\n")  # resnet10t's later stages start downsampling
    out = tmp_path / "big"
    assert main(["grow", "timm:resnet10t", "--plan", str(plan), "--input", "1x3x64x64",
                 "--out", str(out), "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "resnet10t"
    assert config["model_args"]["layers"] == [2, 1, 1, 1]
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert sum(p.numel() for p in reloaded.parameters()) > sum(
        p.numel() for p in timm.create_model("resnet10t").parameters())

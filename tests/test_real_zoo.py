"""The zoo on the real classes: every family of ``real_zoo`` under four plans, with the
outcome written here (lossless, or the named refusal), so coverage cannot regress silently.

Lossless means: the grown model equals the source on fresh inputs in float64 (1e-10 of the
output's scale; 1e-5 for a model that computes its norms in float32, as Hugging Face's
RMSNorm does), every parameter off its init and BatchNorm statistics real. A refusal must
be the typed error named here, with the cause in its first problem."""

from __future__ import annotations

import pytest
import torch
from real_zoo import FAMILIES, trained

import lemon_fx
from lemon_fx import NotLosslessError, Plan, PlanError, UnsupportedOpError
from lemon_fx.tracing.graph_facts import computed_dtypes

PLANS = {"width2": Plan(width=2.0), "width1.5": Plan(width=1.5), "depth2": Plan(depth=2.0),
         "width2+depth2": Plan(width=2.0, depth=2.0)}
OK = "lossless"
NO_STACK = (PlanError, "the model has no block stack")
AVG_AGAINST_SCALE = (NotLosslessError, "LayerNorm needs its input in the avg form")
ZERO_NORM = (NotLosslessError, "a norm's output is in the zero form")
POST_LN = (NotLosslessError, "is Post-LN")

# family: outcome under width2, width1.5, depth2, width2+depth2
EXPECTED = {
    "timm.vit": (OK, OK, OK, OK),
    "timm.deit": (OK, OK, OK, OK),
    "timm.vit_layerscale": (OK, OK, OK, OK),
    "timm.beit": (OK, OK, OK, OK),
    "timm.convnext": (OK, ZERO_NORM, OK, OK),
    "timm.resnet": (OK, OK, OK, OK),
    "timm.resnet10t": (OK, OK, OK, OK),
    "timm.mobilenetv3": (OK, OK, OK, OK),
    "timm.efficientnet": (OK, OK, OK, OK),
    "timm.regnet": (OK, OK, OK, OK),
    "timm.seresnext": (OK, OK, OK, OK),
    "timm.poolformer": (OK, (NotLosslessError, "GroupNorm with one group"), OK, OK),
    "timm.dla": (OK, OK, OK, OK),
    "timm.swin": (OK, ZERO_NORM, OK, OK),
    "timm.swinv2": (OK, ZERO_NORM, OK, OK),
    "timm.mixer": (OK, AVG_AGAINST_SCALE, OK, OK),
    "torchvision.resnet": (OK, OK, OK, OK),
    "torchvision.mobilenet_v2": (OK, OK, OK, OK),
    "torchvision.convnext": (OK, ZERO_NORM, OK, OK),
    "torchvision.vit": (OK, OK, OK, OK),
    "torchvision.regnet": (OK, OK, OK, OK),
    "torchvision.squeezenet": (OK, OK, NO_STACK, NO_STACK),
    "torchvision.shufflenet": (OK, OK, (UnsupportedOpError, "'cat_1' on the path"),
                               (UnsupportedOpError, "'cat_1' on the path")),
    "transformers.llama": (OK, OK, OK, OK),
    "transformers.qwen2": (OK, OK, OK, OK),
    "transformers.mistral": (OK, OK, OK, OK),
    "transformers.gemma": (OK, OK, OK, OK),
    "transformers.gemma2": (OK, OK, OK, OK),
    "transformers.gpt2": (OK, OK, OK, OK),
    "transformers.gpt_neo": (OK, OK, OK, OK),
    "transformers.opt": (OK, OK, OK, OK),
    "transformers.phi": (OK, OK, OK, OK),
    "transformers.stablelm": (OK, OK, OK, OK),
    "transformers.gptj": (OK, OK, OK, OK),
    "transformers.bloom": (OK, ZERO_NORM, OK, OK),
    "transformers.mixtral": (OK, OK, OK, OK),
    "transformers.qwen2_moe": (OK, OK, OK, OK),
    "transformers.albert": (OK, ZERO_NORM, POST_LN, POST_LN),
    "transformers.bert": (OK, ZERO_NORM, POST_LN, POST_LN),
    "transformers.vit": (OK, OK, OK, OK),
}
# lossless, but the class cannot be built at the grown sizes from its config or arguments
# (grow_pretrained refuses these before writing anything): at 1.5x the norms' eps must be
# scaled and timm's arguments (and OPT's config) hold no eps; timm's ResNet keeps a
# 64-channel stem; MobileNetV3's, EfficientNet's and RegNet's widths and depths come from
# multipliers and tables, not from sizes (a stage of one block that cannot be copied keeps
# it, where depth_multiplier=2 would double it); the Mixer is built from its class
NO_GROWN_CONFIG = {
    ("timm.vit", "width1.5"), ("timm.deit", "width1.5"), ("transformers.opt", "width1.5"),
    ("timm.vit_layerscale", "width1.5"), ("timm.beit", "width1.5"),
    ("timm.resnet", "width2"), ("timm.resnet", "width1.5"), ("timm.resnet", "width2+depth2"),
    ("timm.mobilenetv3", "width2"), ("timm.mobilenetv3", "width1.5"),
    ("timm.efficientnet", "width2"), ("timm.efficientnet", "width1.5"),
    ("timm.regnet", "width2"), ("timm.regnet", "width1.5"),
    ("timm.mobilenetv3", "depth2"), ("timm.mobilenetv3", "width2+depth2"),
    ("timm.efficientnet", "depth2"), ("timm.efficientnet", "width2+depth2"),
    ("timm.regnet", "depth2"), ("timm.regnet", "width2+depth2"),
    # DLA's trees and PoolFormer's MetaFormer stages take no depths or widths as
    # arguments timm's writer can set; SE-ResNeXt keeps 32 groups where growth doubles
    # them; Swin V2's position-bias MLP is 512 wide in the class whatever the arguments;
    # Gemma scales its embeddings by sqrt(hidden_size), which a grown config changes
    ("timm.dla", "depth2"), ("timm.dla", "width2+depth2"),
    ("timm.poolformer", "width2"), ("timm.poolformer", "depth2"),
    ("timm.poolformer", "width2+depth2"),
    ("timm.seresnext", "width2"), ("timm.seresnext", "width1.5"),
    ("timm.seresnext", "width2+depth2"),
    ("timm.swinv2", "width2"), ("timm.swinv2", "width2+depth2"),
    ("transformers.gemma", "width2"), ("transformers.gemma", "width1.5"),
    ("transformers.gemma", "width2+depth2"), ("transformers.gemma2", "width2"),
    ("transformers.gemma2", "width1.5"), ("transformers.gemma2", "width2+depth2"),
    # Bloom's alibi slopes count its heads, so its heads keep their number while the
    # stream and the FFN grow: BloomConfig derives the head size from hidden_size and has
    # no FFN field
    ("transformers.bloom", "width2"), ("transformers.bloom", "width2+depth2"),
    ("timm.mixer", "width2"), ("timm.mixer", "depth2"), ("timm.mixer", "width2+depth2"),
}
LIBRARY_MODULE = {"timm": "timm", "torchvision": "torchvision", "transformers": "transformers"}


def test_every_family_has_its_outcomes_written():
    assert set(EXPECTED) == set(FAMILIES)


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    return output[0]


@pytest.mark.parametrize("plan", sorted(PLANS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_real_zoo(family, plan):
    spec = FAMILIES[family]
    pytest.importorskip(LIBRARY_MODULE[spec.library])
    expected = EXPECTED[family][list(PLANS).index(plan)]
    torch.manual_seed(0)
    model = trained(spec.build())
    args = spec.inputs(torch.Generator().manual_seed(0))
    gm = lemon_fx.trace(model, args, spec.kwargs(args) if spec.kwargs else None)
    if expected != OK:
        error, cause = expected
        with pytest.raises(error) as raised:
            lemon_fx.grow(gm, PLANS[plan])
        assert cause in raised.value.problems[0].reason
        return
    big = lemon_fx.grow(gm, PLANS[plan])
    fresh = spec.inputs(torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = _first_tensor(model(*fresh, **(spec.kwargs(fresh) if spec.kwargs else {})))
        got = _first_tensor(big(*fresh))
    tolerance = 1e-5 if torch.float32 in computed_dtypes(gm) else 1e-10
    torch.testing.assert_close(got, want, rtol=0,
                               atol=tolerance * (1 + want.abs().max().item()))
    assert sum(p.numel() for p in big.parameters()) > sum(p.numel() for p in model.parameters())
    target = _class_at_grown_config(spec.library, model, gm, PLANS[plan])
    assert (target is None) == (spec.library == "torchvision"
                                or (family, plan) in NO_GROWN_CONFIG)
    if target is not None:  # the state_dict loads strictly into the real class, same function
        target.load_state_dict(big.state_dict(), strict=True)
        with torch.no_grad():
            again = _first_tensor(target(*fresh, **(spec.kwargs(fresh) if spec.kwargs else {})))
        torch.testing.assert_close(again, want, rtol=0,
                                   atol=tolerance * (1 + want.abs().max().item()))


def _class_at_grown_config(library, model, gm, plan):
    """The model's own class built at the grown sizes, from the config (transformers) or the
    model arguments (timm) that grow_pretrained writes; None for torchvision, which has no
    config to rewrite."""
    from lemon_fx.api import plan_in_detail

    planned = plan_in_detail(gm, plan)
    if library == "transformers":
        from lemon_fx.hub.hugging_face import _grown_config

        try:
            config, _ = _grown_config(model.config, planned)
        except PlanError:
            return None  # a plan the config cannot express (no eps field at 1.5x)
        # a run-time choice, not saved in config.json: the source's experts' spelling
        config._experts_implementation = getattr(model.config, "_experts_implementation", None)
        return type(model)(config).double().eval()
    if library == "timm":
        import timm

        from lemon_fx.hub.timm_folder import _given_args, _grown_args

        architecture = getattr(model, "pretrained_cfg", {}).get("architecture")
        if architecture is None:  # a class built directly, not by create_model
            return None
        try:
            args, _ = _grown_args(architecture, model, planned, _given_args(model))
        except PlanError:
            return None  # sizes timm's arguments cannot say (a 64-channel ResNet stem)
        return timm.create_model(architecture, pretrained=False, **args).double().eval()
    return None

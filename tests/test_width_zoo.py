"""Every zoo architecture grown in width: lossless on fresh inputs, or refused as LEMON says.

Fresh inputs come from a different generator than the tracing inputs. Post-LN streams and
streams that pass a nonlinearity (MLP-Mixer's token mixing reads the channels as a batch
axis) have no exact answer at non-multiple residual widths: they must raise
``NotLosslessError``, and they still grow exactly when only their other groups take the
non-multiple width.
"""

from __future__ import annotations

import pytest
import torch
from zoo import ZOO
from zoo_checks import WHOLE_MULTIPLE_STREAM, assert_lossless, traced

import lemon_fx
from lemon_fx import NotLosslessError, Plan

ONNX_CHECKED = {"gpt", "manual_attention", "vit", "mha", "post_ln_encoder", "fused_qkv_reshape",
                "swiglu", "swiglu_gqa", "layer_scale_vit", "split_flatten"}


def _non_multiple_plan(name: str, residual: object) -> Plan:
    return Plan(width={"@residual": residual, "@ffn": 1.5, "@heads": 1.5, "@kv_heads": 1.5,
                       "@hidden": 1.5, "@channels": 1.5}, seed=3)


def _grown_sizes(gm, big) -> dict[str, tuple[int, int]]:
    """Before/after sizes of every group but head_dim (which a bare width keeps)."""
    after = {g.name: g.size for g in lemon_fx.inspect(big).groups}
    return {g.name: (g.size, after.get(g.name)) for g in lemon_fx.inspect(gm).groups
            if g.role != "head_dim"}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_grows_2x_losslessly(name):
    entry, model, gm = traced(name)
    big = lemon_fx.grow(gm, Plan(width=2.0, seed=1))
    sizes = _grown_sizes(gm, big)
    assert sizes and all(after == 2 * before for before, after in sizes.values()), sizes
    assert_lossless(model, big, entry)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_grows_1_5x_or_refuses(name):
    entry, model, gm = traced(name)
    if name in WHOLE_MULTIPLE_STREAM:
        with pytest.raises(NotLosslessError, match="whole multiple"):
            lemon_fx.grow(gm, Plan(width=1.5))
        big = lemon_fx.grow(gm, _non_multiple_plan(name, residual=2.0))
    else:
        big = lemon_fx.grow(gm, Plan(width=1.5, seed=2))
    assert_lossless(model, big, entry)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_grows_to_absolute_non_multiple_sizes(name):
    """32 -> 40 on the residual stream (the ``64 -> 80`` kind of target)."""
    entry, model, gm = traced(name)
    residual = 64 if name in WHOLE_MULTIPLE_STREAM else 40
    plan = Plan(width={"@residual": residual, "@ffn": 1.25, "@heads": 5, "@hidden": 1.25,
                       "@channels": 40, "@kv_heads": 3}, seed=5)
    big = lemon_fx.grow(gm, plan)
    residual_groups = [g for g in lemon_fx.inspect(big).groups if g.role == "residual"]
    assert all(g.size == residual for g in residual_groups)
    assert_lossless(model, big, entry)


@pytest.mark.parametrize("name", sorted(ONNX_CHECKED))
def test_grown_model_matches_the_source_in_onnxruntime(name, tmp_path):
    entry, model, gm = traced(name)
    plan = _non_multiple_plan(name, 2.0) if name in WHOLE_MULTIPLE_STREAM else Plan(width=1.5)
    big = lemon_fx.grow(gm, plan)
    fresh = entry.example_inputs(torch.Generator().manual_seed(4))
    report = lemon_fx.verify(gm, big, fresh, onnx=str(tmp_path / "big.onnx"), rtol=1e-10,
                             atol=1e-10)
    assert report.ok
    assert report.onnx_outputs and all(o.passed for o in report.onnx_outputs)
    assert report.onnx_max_rel_error <= 1e-5


def test_the_source_graph_module_is_never_modified():
    entry, model, gm = traced("gpt")
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    code = gm.code
    lemon_fx.grow(gm, Plan(width=1.5))
    assert gm.code == code
    assert all(torch.equal(v, state[k]) for k, v in gm.state_dict().items())

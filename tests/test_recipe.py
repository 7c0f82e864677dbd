"""``plan_growth`` and ``GrowthRecipe``: the same bytes as ``grow``, in memory or streamed,
from a model with weights or from one on the meta device."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from zoo import ZOO
from zoo_checks import assert_lossless

import lemon_fx
from lemon_fx import GrowthRecipe, Plan, PlanError

CASES = [
    ("gpt", Plan(width=2.0, depth=2.0, seed=3)),         # tied head, cancelling blocks
    ("swiglu_gqa", Plan(width=1.5, seed=1)),              # non-multiple: avg/zero forms
    ("vit", Plan(width=2.0, depth={"blocks": 3}, placement="stack", seed=0)),
    ("post_ln_encoder", Plan(width=2.0, depth=2.0, seed=2, allow_inexact=True)),  # norms move
    ("residual_mlp", Plan(width=1.5, depth=2.0, method="net2net")),
]


def _trained_looking(name: str, dtype: torch.dtype = torch.float64):
    entry = ZOO[name]
    torch.manual_seed(0)
    model = entry.build().to(dtype).eval()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    inputs = tuple(x.to(dtype) if x.is_floating_point() else x
                   for x in entry.example_inputs(torch.Generator().manual_seed(0)))
    return entry, model, lemon_fx.trace(model, inputs)


def _assert_same_bytes(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("name,plan", CASES, ids=[c[0] for c in CASES])
def test_apply_gives_grow_bit_for_bit(name: str, plan: Plan) -> None:
    entry, model, gm = _trained_looking(name, torch.float32)
    big = lemon_fx.grow(gm, plan)
    recipe = lemon_fx.plan_growth(gm, plan)
    _assert_same_bytes(recipe.apply(gm.state_dict()), big.state_dict())
    assert recipe.shapes == {k: (tuple(v.shape), v.dtype) for k, v in big.state_dict().items()}


@pytest.mark.parametrize("name,plan", CASES, ids=[c[0] for c in CASES])
def test_a_saved_recipe_gives_the_same_bytes(tmp_path, name: str, plan: Plan) -> None:
    _, _, gm = _trained_looking(name)
    recipe = lemon_fx.plan_growth(gm, plan)
    again = GrowthRecipe.load(recipe.save(tmp_path / "recipe.json"))
    assert again == recipe
    json.loads((tmp_path / "recipe.json").read_text())  # plain JSON
    _assert_same_bytes(again.apply(gm.state_dict()), recipe.apply(gm.state_dict()))


def test_the_grown_state_dict_keeps_tied_weights_tied() -> None:
    entry, model, _ = _trained_looking("gpt")
    model.lm_head.weight = model.tok_emb.weight  # an LM head tied to the embedding
    gm = lemon_fx.trace(model, entry.example_inputs(torch.Generator().manual_seed(0)))
    recipe = lemon_fx.plan_growth(gm, Plan(width=2.0))
    assert recipe.aliases, "the GPT's head is tied to its embedding"
    grown = recipe.apply(gm.state_dict())
    for alias, name in recipe.aliases.items():
        assert grown[alias] is grown[name]
    big = lemon_fx.grow(gm, Plan(width=2.0))
    named = dict(big.named_parameters(remove_duplicate=False))
    for alias, name in recipe.aliases.items():
        assert named[alias] is named[name]


def test_apply_does_not_share_or_change_the_source_tensors() -> None:
    _, _, gm = _trained_looking("residual_mlp")
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    grown = lemon_fx.plan_growth(gm, Plan(depth=2.0)).apply(gm.state_dict())
    sources = {v.data_ptr() for v in gm.state_dict().values()}
    assert not any(v.data_ptr() in sources for v in grown.values())
    _assert_same_bytes(gm.state_dict(), before)


def _shard(state: dict, folder: Path, parts: int) -> None:
    """Write ``state`` as ``parts`` shards with the index transformers writes."""
    folder.mkdir()
    names = list(state)
    weight_map = {}
    for i in range(parts):
        chunk = names[i::parts]
        file = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        save_file({n: state[n].contiguous() for n in chunk}, folder / file)
        weight_map.update({n: file for n in chunk})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}))


def _untied(state: dict) -> dict:
    # safetensors stores no shared tensors: a tied checkpoint is saved with copies
    return {k: v.clone() for k, v in state.items()}


@pytest.mark.parametrize("max_shard_size", ["5GB", 20_000])
def test_streamed_growth_gives_the_same_bytes(tmp_path, max_shard_size) -> None:
    _, _, gm = _trained_looking("gpt", torch.float32)
    recipe = lemon_fx.plan_growth(gm, Plan(width=2.0, depth=2.0, seed=4))
    source = _untied(gm.state_dict())
    _shard(source, tmp_path / "small", parts=3)
    out = recipe.apply_safetensors(tmp_path / "small", tmp_path / "big", max_shard_size,
                                   progress=False)
    streamed = {}
    for file in sorted(out.glob("*.safetensors")):
        streamed.update(load_file(file))
    want = recipe.apply(gm.state_dict())
    assert set(streamed) == set(want)
    for name, tensor in want.items():
        assert torch.equal(streamed[name], tensor), name
    index = out / "model.safetensors.index.json"
    assert index.exists() == (max_shard_size == 20_000)


def test_streamed_growth_loads_into_the_target_class_and_is_lossless(tmp_path) -> None:
    entry, model, gm = _trained_looking("gpt")
    save_file(_untied(gm.state_dict()), tmp_path / "small.safetensors")
    recipe = lemon_fx.plan_growth(gm, Plan(width=2.0, depth=2.0))
    out = recipe.apply_safetensors(tmp_path / "small.safetensors", tmp_path / "big",
                                   progress=False)
    bigger = entry.build(dim=64, num_heads=8, depth=4).double().eval()
    bigger.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    assert_lossless(model, bigger, entry)


def test_a_model_on_the_meta_device_is_planned_without_weights() -> None:
    entry = ZOO["vit"]
    with torch.device("meta"):
        weightless = entry.build()
    inputs = entry.example_inputs(torch.Generator().manual_seed(0))
    gm = lemon_fx.trace(weightless, inputs)
    assert all(t.is_meta for t in gm.state_dict().values())
    report = lemon_fx.inspect(gm)
    assert report.stacks and report.groups
    plan = Plan(width=2.0, depth=2.0, seed=6)
    recipe = lemon_fx.plan_growth(gm, plan)
    # the same recipe as planned from the real model, applied to real weights
    _, real, real_gm = _trained_looking("vit", torch.float32)
    assert recipe == lemon_fx.plan_growth(real_gm, plan)
    _assert_same_bytes(recipe.apply(real_gm.state_dict()),
                       lemon_fx.grow(real_gm, plan).state_dict())
    with pytest.raises(PlanError, match="meta device"):
        lemon_fx.grow(gm, plan)


_HASH_SCRIPT = textwrap.dedent("""
    import hashlib, sys, torch
    sys.path.insert(0, {tests!r})
    import lemon_fx
    from test_recipe import _trained_looking
    _, _, gm = _trained_looking("swiglu_gqa", torch.float32)
    grown = lemon_fx.plan_growth(gm, lemon_fx.Plan(width=1.5, depth=2.0, seed=9)).apply(
        gm.state_dict())
    h = hashlib.sha256()
    for name, t in grown.items():
        h.update(name.encode()); h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    print(h.hexdigest())
""")


def test_the_same_seed_gives_the_same_bytes_in_another_process() -> None:
    tests = str(Path(__file__).parent)
    runs = {subprocess.run([sys.executable, "-c", _HASH_SCRIPT.format(tests=tests)],
                           capture_output=True, text=True, check=True).stdout.strip()
            for _ in range(2)}
    _, _, gm = _trained_looking("swiglu_gqa", torch.float32)
    grown = lemon_fx.plan_growth(gm, Plan(width=1.5, depth=2.0, seed=9)).apply(gm.state_dict())
    digest = hashlib.sha256()
    for name, t in grown.items():
        digest.update(name.encode())
        digest.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    assert runs == {digest.hexdigest()}


def test_tensors_can_be_made_in_any_order() -> None:
    _, _, gm = _trained_looking("swiglu_gqa")
    recipe = lemon_fx.plan_growth(gm, Plan(width=1.5, depth=2.0, seed=2))
    state = gm.state_dict()
    forward = recipe.apply(state)
    for name in reversed(list(recipe.tensors)):
        made = recipe.make(name, state[recipe.tensors[name].source])
        assert torch.equal(made, forward[name]), name


def test_a_hugging_face_model_built_on_the_meta_device_is_planned() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32)
    plan = Plan(width=2.0, depth={"model.layers": 4}, seed=1)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.device("meta"):
        weightless = transformers.LlamaForCausalLM(config)
    recipe = lemon_fx.plan_growth(lemon_fx.trace(weightless, (ids,)), plan)
    torch.manual_seed(0)
    real = lemon_fx.trace(transformers.LlamaForCausalLM(config), (ids,))
    assert recipe == lemon_fx.plan_growth(real, plan)
    _assert_same_bytes(recipe.apply(real.state_dict()), lemon_fx.grow(real, plan).state_dict())

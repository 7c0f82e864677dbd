"""The recipe's plain-data parts: layouts and steps as JSON, safetensors in and out."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lemon_fx.axes.expansion import LeafGrowth
from lemon_fx.recipe.recipe import GrowthRecipe, Step, TensorRecipe, layout_from_json
from lemon_fx.recipe.safetensors_io import (
    INDEX_NAME,
    SourceCheckpoint,
    parse_size,
    write_sharded,
)


def test_layouts_and_steps_survive_json() -> None:
    layout = ("prod", [LeafGrowth(3, 3), ("sum", [LeafGrowth(4, 6, "avg"),
                                                  LeafGrowth(2, 5, "zero")])])
    steps = (Step("embed", axis=0, layout=layout), Step("split", axis=1, layout=layout,
                                                         stream="w", fan_in=7),
             Step("transform", name="norm.gamma", layouts=(layout,)), Step("fill", value=1.0),
             Step("transform", name="layer_scale.rows", layouts=(layout,), reads=("g",)))
    recipe = GrowthRecipe({"w": TensorRecipe("v", (33, 33), torch.bfloat16, steps)},
                          aliases={"u": "w"}, seed=5, noise_scale=0.5)
    again = GrowthRecipe.from_json(json.loads(json.dumps(recipe.to_json())))
    assert again == recipe
    assert again.shapes == {"w": ((33, 33), torch.bfloat16), "u": ((33, 33), torch.bfloat16)}
    assert again.source_names() == {"v", "g"}  # a transform's reads are read too


def test_a_version_1_recipe_still_reads() -> None:
    """Version 2 added ``reads``; a saved version-1 recipe (no step reads) loads as it was."""
    data = GrowthRecipe({"w": TensorRecipe("w", (4,), torch.float32,
                                           (Step("fill", value=0.0),))}).to_json()
    data["version"] = 1
    assert GrowthRecipe.from_json(data).tensors["w"].steps == (Step("fill", value=0.0),)


def test_a_recipe_refuses_what_it_cannot_read() -> None:
    with pytest.raises(ValueError, match="unknown form"):
        layout_from_json([2, 4, "tiled"])
    with pytest.raises(ValueError, match="not a lemon_fx recipe"):
        GrowthRecipe.from_json({"format": "something else"})


@pytest.mark.parametrize("size", ["5GB", "500MB", "2GiB", 1234, "10 kB"])
def test_sizes_read_as_transformers_reads_them(size) -> None:
    expected = {"5GB": 5 * 10**9, "500MB": 5 * 10**8, "2GiB": 2 * 2**30, 1234: 1234,
                "10 kB": 10**4}[size]
    assert parse_size(size) == expected


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(5, 3, generator=g), "b": torch.randn(40, generator=g).bfloat16(),
            "c": torch.arange(7), "d": torch.randn(2, 2, 2, generator=g).double()}


@pytest.mark.parametrize("max_size", [10**9, 100])
def test_written_shards_load_with_safetensors_itself(tmp_path, max_size) -> None:
    tensors = _tensors()
    shapes = {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}
    shapes["e"] = shapes["a"]  # an alias of a, written as its own copy
    write_sharded(iter(tensors.items()), shapes, {"e": "a"}, tmp_path, max_size,
                  progress=False)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    loaded = {}
    for name in files:
        loaded.update(load_file(tmp_path / name))
    assert set(loaded) == {"a", "b", "c", "d", "e"}
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t) and loaded[name].dtype == t.dtype
    assert torch.equal(loaded["e"], tensors["a"])
    if max_size == 100:
        assert len(files) > 1
        index = json.loads((tmp_path / INDEX_NAME).read_text())
        assert set(index["weight_map"]) == set(loaded)
        # and the folder reads back as a source checkpoint
        source = SourceCheckpoint(tmp_path)
        assert torch.equal(source.tensor("d"), tensors["d"])
    else:
        assert files == ["model.safetensors"]


def test_a_single_file_reads_as_a_source_checkpoint(tmp_path) -> None:
    tensors = _tensors()
    save_file(tensors, tmp_path / "x.safetensors")
    source = SourceCheckpoint(tmp_path / "x.safetensors")
    assert sorted(source.keys()) == sorted(tensors)
    assert torch.equal(source.tensor("b"), tensors["b"])
    with pytest.raises(FileNotFoundError):
        SourceCheckpoint(tmp_path / "missing")


class _ScaledBlock(torch.nn.Module):
    """A Pre-LN block with a layer scale: at 1.5x its recipe folds gamma into ``fc``'s
    extra rows, a step that reads gamma's source tensor."""

    def __init__(self):
        super().__init__()
        self.inp, self.ln0, self.fc = (torch.nn.Linear(4, 8), torch.nn.LayerNorm(8),
                                       torch.nn.Linear(8, 8))
        self.gamma = torch.nn.Parameter(torch.rand(8) + 0.5)
        self.ln, self.out = torch.nn.LayerNorm(8), torch.nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.ln(h + self.fc(self.ln0(h)) * self.gamma))


def test_a_step_that_reads_another_tensor_streams_like_apply(tmp_path) -> None:
    import lemon_fx

    torch.manual_seed(0)
    model = _ScaledBlock().double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    gm = lemon_fx.trace(model, (torch.randn(2, 5, 4, dtype=torch.float64),))
    recipe = lemon_fx.plan_growth(gm, lemon_fx.Plan(width=1.5))
    reads = [s for r in recipe.tensors.values() for s in r.steps if s.reads]
    assert reads and {n for s in reads for n in s.reads} == {"gamma"}
    save_file(gm.state_dict(), tmp_path / "model.safetensors")
    recipe.apply_safetensors(tmp_path / "model.safetensors", tmp_path / "out")
    streamed = load_file(tmp_path / "out" / "model.safetensors")
    in_memory = recipe.apply(gm.state_dict())
    assert streamed.keys() == in_memory.keys()
    for name, tensor in in_memory.items():
        assert torch.equal(streamed[name], tensor), name
    big = lemon_fx.grow(gm, lemon_fx.Plan(width=1.5))
    fresh = torch.randn(3, 7, 4, dtype=torch.float64)
    torch.testing.assert_close(big(fresh), model(fresh), rtol=0, atol=1e-10)

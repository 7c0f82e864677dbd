"""The command line, run as a user would: a model file in a temporary folder, subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import onnxruntime
import pytest
import torch
from safetensors.torch import load_file

MODEL_FILE = textwrap.dedent('''
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, dim=16, depth=2):
            super().__init__()
            self.inp = nn.Linear(8, dim)
            self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
            self.out = nn.Linear(dim, 3)

        def forward(self, x):
            h = self.inp(x)
            for block in self.blocks:
                h = block(h)
            return self.out(h)

    class Block(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.ln = nn.LayerNorm(dim)
            self.fc1 = nn.Linear(dim, 2 * dim)
            self.fc2 = nn.Linear(2 * dim, dim)

        def forward(self, x):
            return x + self.fc2(torch.relu(self.fc1(self.ln(x))))

    def build():
        torch.manual_seed(0)
        return Net()

    def bigger():
        return Net(dim=32, depth=4)
''')


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lemon_fx.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "models.py").write_text(MODEL_FILE)
    (tmp_path / "plan.yaml").write_text("width: 2.0\ndepth: {blocks: 4}\nseed: 3\n")
    return tmp_path


def test_grow_writes_a_checked_model_that_loads_into_the_bigger_class(workdir):
    done = run("grow", "models.py:build", "--plan", "plan.yaml", "--input", "4x8",
               "--out", "grown", "--onnx", cwd=workdir)
    assert done.returncode == 0, done.stderr
    out = workdir / "grown"
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.safetensors",
                                                    "report.json", "report.md"]
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["ok"]
    assert [b["source"] for b in report["new_blocks"]] == ["blocks.0", "blocks.1"]
    assert report["plan"]["width"] == 2.0
    sys.path.insert(0, str(workdir))
    try:
        import models
    finally:
        sys.path.pop(0)
    source, target = models.build().double(), models.bigger().double()
    target.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    x = torch.randn(4, 8, dtype=torch.float64)  # the ONNX file has the example's batch size
    # the saved weights are float32: the float64 model built from them is float32-accurate
    torch.testing.assert_close(target(x), source(x), rtol=1e-5, atol=1e-5)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    got = session.run(None, {name: x.float().numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got).double(), source(x), rtol=1e-4, atol=1e-5)


def test_inspect_prints_groups_and_stacks_and_json(workdir):
    done = run("inspect", "models.py:build", "--input", "4x8", cwd=workdir)
    assert done.returncode == 0, done.stderr
    assert "residual" in done.stdout and "blocks: 2 x pre_ln" in done.stdout
    done = run("inspect", "models.py:build", "--input", "4x8", "--json", cwd=workdir)
    data = json.loads(done.stdout)
    assert data["stacks"] == [{"name": "blocks", "count": 2, "kind": "pre_ln"}]


def test_verify_and_export(workdir):
    done = run("verify", "models.py:build", "--plan", "plan.yaml", "--input", "4x8", "--json",
               cwd=workdir)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ok"]
    done = run("export", "models.py:build", "--input", "4x8", "--out", "m.onnx", cwd=workdir)
    assert done.returncode == 0, done.stderr
    assert (workdir / "m.onnx").stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (["grow", "models.py:nope", "--plan", "plan.yaml", "--input", "4x8", "--out", "g"],
     "has no callable 'nope'"),
    (["grow", "models.py:build", "--plan", "plan.yaml", "--input", "4x8:int64", "--out", "g"],
     "needs HIGH"),
    (["grow", "models.py:build", "--plan", "missing.yaml", "--input", "4x8", "--out", "g"],
     "missing.yaml"),
    (["grow", "models.py:build", "--plan", "bad.yaml", "--input", "4x8", "--out", "g"],
     "bad.yaml:"),
    (["grow", "models.py:build", "--plan", "shrink.yaml", "--input", "4x8", "--out", "g"],
     "would shrink"),
    (["grow", "models.py:build", "--plan", "plan.yaml", "--input", "4x9", "--out", "g"],
     "failed on the example inputs"),
    (["grow", "models.py:build", "--plan", "plan.yaml", "--input", "4x8", "--out", "g",
      "--dynamic-batch"], "--dynamic-batch without --onnx"),
    # these ended in a traceback (rc 1) before
    (["grow", "models.py:build", "--plan", "plan.yaml", "--input", "2x-5x8", "--out", "g"],
     "has a negative size"),
    (["grow", "models.py:build", "--plan", "plan.yaml", "--input", "4x8:int64:0", "--out", "g"],
     "leaves no integer to draw"),
    (["grow", "models.py:broken", "--plan", "plan.yaml", "--input", "4x8", "--out", "g"],
     "raised ValueError: no such config"),
    (["grow", "syntax.py:build", "--plan", "plan.yaml", "--input", "4x8", "--out", "g"],
     "syntax.py failed to load: SyntaxError"),
    (["grow", "models.py:build", "--checkpoint", "bad.pt", "--plan", "plan.yaml", "--input",
      "4x8", "--out", "g"], "cannot read checkpoint bad.pt"),
    (["grow", "models.py:build", "--checkpoint", "bad.safetensors", "--plan", "plan.yaml",
      "--input", "4x8", "--out", "g"], "cannot read checkpoint bad.safetensors"),
    (["grow", "models.py:build", "--plan", "plan.yaml", "--input", "4x8", "--out", "afile/g"],
     "give --out a path that can be written"),
])
def test_user_mistakes_give_one_line_and_no_output(workdir, args, message):
    (workdir / "bad.yaml").write_text("width: 2.0\nseed: [1,\n")
    (workdir / "shrink.yaml").write_text("width: {'@ffn': 4}\n")
    (workdir / "syntax.py").write_text("def build(:\n")
    (workdir / "bad.pt").write_text("not a checkpoint")
    (workdir / "bad.safetensors").write_text("not a checkpoint either")
    (workdir / "afile").write_text("a file where a folder should be")
    with (workdir / "models.py").open("a") as models:
        models.write("\ndef broken():\n    raise ValueError('no such config')\n")
    done = run(*args, cwd=workdir)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]  # earlier lines are progress
    assert last.startswith("lemon-fx: error: ") and message in last
    assert "fix: " in last and "Traceback" not in done.stderr
    assert len([line for line in done.stderr.splitlines() if line.startswith("lemon-fx: e")]) == 1
    assert not (workdir / "g").exists()


def test_debug_shows_the_traceback(workdir):
    done = run("grow", "models.py:nope", "--plan", "plan.yaml", "--input", "4x8", "--out", "g",
               "--debug", cwd=workdir)
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_every_verb_has_help_with_examples(workdir):
    for verb in ("inspect", "grow", "verify", "export", "demo"):
        done = run(verb, "--help", cwd=workdir)
        assert done.returncode == 0 and "examples:" in done.stdout, verb


def test_dtype_sets_the_saved_weights_dtype(workdir):
    done = run("grow", "models.py:build", "--plan", "plan.yaml", "--input", "4x8", "--out",
               "bf16", "--dtype", "bfloat16", "--quiet", cwd=workdir)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""
    state = load_file(str(workdir / "bf16" / "model.safetensors"))
    assert {t.dtype for t in state.values()} == {torch.bfloat16}


def test_dynamic_batch_files_from_export_and_grow(workdir):
    done = run("export", "models.py:build", "--plan", "plan.yaml", "--input", "4x8",
               "--out", "any.onnx", "--dynamic-batch", "--quiet", cwd=workdir)
    assert done.returncode == 0, done.stderr
    done = run("grow", "models.py:build", "--plan", "plan.yaml", "--input", "4x8",
               "--out", "grown", "--onnx", "--dynamic-batch", cwd=workdir)
    assert done.returncode == 0, done.stderr
    assert json.loads((workdir / "grown" / "report.json").read_text())[
        "verification"]["onnx_dynamic_batch"] is True
    assert "takes any batch size" in (workdir / "grown" / "report.md").read_text()
    sys.path.insert(0, str(workdir))
    try:
        import models
    finally:
        sys.path.pop(0)
    source = models.build().eval()
    for file in (workdir / "any.onnx", workdir / "grown" / "model.onnx"):
        session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        for batch in (1, 9):
            x = torch.randn(batch, 8)
            got = session.run(None, {name: x.numpy()})[0]
            with torch.no_grad():
                want = source(x)
            torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-5)


def test_grow_stream_grows_a_sharded_checkpoint_without_loading_it(workdir):
    sys.path.insert(0, str(workdir))
    try:
        import models
    finally:
        sys.path.pop(0)
    source = models.build()
    with torch.no_grad():  # trained-looking: no gamma 1 / beta 0 to hide a misplacement
        for p in source.parameters():
            p.add_(0.3 * torch.randn_like(p))
    from safetensors.torch import save_file

    from lemon_fx.recipe.safetensors_io import INDEX_NAME
    shards = workdir / "small"
    shards.mkdir()
    names = list(source.state_dict())
    weight_map = {}
    for i, chunk in enumerate((names[0::2], names[1::2])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: source.state_dict()[n] for n in chunk}, shards / file)
        weight_map.update(dict.fromkeys(chunk, file))
    (shards / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    done = run("grow", "models.py:build", "--plan", "plan.yaml", "--input", "4x8",
               "--checkpoint", "small", "--stream", "--out", "big", "--recipe", "recipe.json",
               "--max-shard-size", "4000", cwd=workdir)
    assert done.returncode == 0, done.stderr
    out = workdir / "big"
    state = {}
    for file in out.glob("*.safetensors"):
        state.update(load_file(str(file)))
    assert (out / INDEX_NAME).exists() and len(list(out.glob("*.safetensors"))) > 1
    target = models.bigger().double()
    target.load_state_dict(state, strict=True)
    x = torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(target(x), source.double()(x), rtol=1e-5, atol=1e-5)
    # the same bytes as growing in memory from the same checkpoint, and the recipe says so
    import lemon_fx

    recipe = lemon_fx.GrowthRecipe.load(workdir / "recipe.json")
    in_memory = run("grow", "models.py:build", "--plan", "plan.yaml", "--input", "4x8",
                    "--checkpoint", "small", "--out", "big_in_memory", cwd=workdir)
    assert in_memory.returncode == 0, in_memory.stderr
    loaded = load_file(str(workdir / "big_in_memory" / "model.safetensors"))
    assert set(loaded) == set(state) == set(recipe.shapes)
    for name, tensor in loaded.items():
        assert torch.equal(tensor, state[name]), name


def test_stream_needs_a_checkpoint(workdir):
    done = run("grow", "models.py:build", "--plan", "plan.yaml", "--input", "4x8", "--stream",
               "--out", "big", cwd=workdir)
    assert done.returncode == 2 and "--stream" in done.stderr and "fix" in done.stderr


def test_a_hugging_face_folder_is_inspected_and_grown_from_the_shell(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=32)).eval()
    model.save_pretrained(tmp_path / "small")
    (tmp_path / "plan.yaml").write_text("width: 2.0\ndepth: 2.0\n")
    done = run("inspect", "small", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "kv_heads" in done.stdout and "model.layers: 2" in done.stdout
    done = run("grow", "small", "--plan", "plan.yaml", "--out", "big", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    grown = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "big").eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(grown(ids).logits, model(ids).logits, rtol=1e-4,
                                   atol=1e-5)


def test_a_factory_without_input_is_one_line_with_the_fix(workdir):
    done = run("inspect", "models.py:build", cwd=workdir)
    assert done.returncode == 2 and "--input" in done.stderr and "fix" in done.stderr

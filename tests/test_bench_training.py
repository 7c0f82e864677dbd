"""tools/bench_training.py --quick: both tasks run end to end, every run is reported, the
grown models start exactly at the trained source's validation loss, and the plots exist."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).parent.parent / "tools" / "bench_training.py"
RUNS = {"scratch", "lemon", "lemon_full_schedule", "net2net", "random_new"}


def _load():
    spec = importlib.util.spec_from_file_location("bench_training_under_test", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load()


@pytest.fixture(scope="module")
def results(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert bench.main(["--quick", "--task", "all", "--out", str(out), "--threads", "1"]) == 0
    return {task: json.loads((out / name).read_text())
            for task, name in (("lm", "bench_training.json"),
                               ("mlm", "bench_training_mlm.json"))}, out


@pytest.mark.parametrize("task", ["lm", "mlm"])
def test_every_run_is_reported(results, task):
    data, _ = results
    report = data[task]
    assert report["task"] == task
    assert set(report["runs"]) == RUNS
    assert report["runs"]["scratch"]["steps_to_reach_scratch_loss"] == report["config"]["steps"]
    assert report["scratch_final_loss"] == report["runs"]["scratch"]["final_val_loss"]
    assert report["command"].startswith("python tools/bench_training.py")
    for name, run in report["runs"].items():
        curve = run["curve"]
        assert curve[0]["step"] == 0 and curve[0]["flops"] == 0
        assert all(a["step"] < b["step"] and a["flops"] < b["flops"]
                   for a, b in zip(curve, curve[1:])), name
        steps = run["steps_to_reach_scratch_loss"]
        if steps is not None and name != "scratch":
            assert run["saving"] == pytest.approx(1 - steps / report["config"]["steps"])
            assert run["saving_with_source"] < run["saving"]
    for method in ("lemon", "net2net", "random_new"):
        assert set(report["fraction_sweep"][method]) == {
            str(f) for f in report["config"]["fractions"]}


@pytest.mark.parametrize("task", ["lm", "mlm"])
def test_grown_models_start_at_the_trained_source_loss(results, task):
    report = results[0][task]
    for name in ("lemon", "lemon_full_schedule", "net2net"):
        start = report["runs"][name]["curve"][0]["val_loss"]
        assert start == pytest.approx(report["source_final_loss"], abs=1e-4), name
    # random new weights: the function is not preserved
    assert report["runs"]["random_new"]["curve"][0]["val_loss"] > \
        report["source_final_loss"] + 0.05


def test_plots_are_written(results):
    _, out = results
    for name in ("bench_training.png", "bench_training_mlm.png"):
        assert (out / name).stat().st_size > 10_000


def test_corpus_is_fixed_and_split(bench):
    train, val = bench.corpus()
    assert bench.MODULES == sorted(bench.MODULES)
    assert abs(len(val) / (len(train) + len(val)) - 0.1) < 1e-3
    assert int(train.max()) < 256 and int(val.max()) < 256
    again_train, again_val = bench.corpus()
    assert train.equal(again_train) and val.equal(again_val)


def test_mlm_masks_fifteen_percent_and_scores_only_masked_bytes(bench):
    import torch

    cfg = bench.Config(task="mlm", context=64)
    train, _ = bench.corpus()
    x, y = bench.make_batch(train, cfg, 64, torch.Generator().manual_seed(0))
    masked = x == bench.MASK
    assert masked.equal(y != -100)
    assert 0.12 < masked.float().mean().item() < 0.18
    assert (x[~masked] < 256).all()


def test_random_new_keeps_source_entries_and_redraws_the_rest(bench):
    import torch

    cfg = bench.Config(context=16, source_dim=16)
    small = bench.build(cfg, 16, 2, seed=0)
    fresh = bench.build(cfg, 32, 4, seed=1)
    init = {k: v.clone() for k, v in fresh.state_dict().items()}
    mixed = bench.random_new_weights(small, fresh, [0, 0, 1, 1]).state_dict()
    src = small.state_dict()
    assert mixed["blocks.2.fc.weight"][:64, :16].equal(src["blocks.1.fc.weight"])
    assert mixed["blocks.2.fc.weight"][64:].equal(init["blocks.2.fc.weight"][64:])
    assert mixed["blocks.1.fc.weight"].equal(init["blocks.1.fc.weight"])  # a new block
    qkv = mixed["blocks.0.attn.qkv.weight"]
    for chunk in range(3):  # q, k, v: the originals first in each chunk of 32 rows
        assert qkv[32 * chunk: 32 * chunk + 16, :16].equal(
            src["blocks.0.attn.qkv.weight"][16 * chunk: 16 * chunk + 16])
    assert mixed["head.weight"][:, :16].equal(src["head.weight"])
    assert mixed["head.weight"][:, 16:].equal(init["head.weight"][:, 16:])
    torch.testing.assert_close(mixed["wpe"][..., :16], src["wpe"])


def test_a_knob_sweep_reuses_the_scratch_runs_of_the_same_config(bench, results, tmp_path):
    data, out = results
    assert bench.main(["--quick", "--task", "lm", "--out", str(tmp_path), "--threads", "1",
                       "--reuse-scratch", str(out / "bench_training.json"),
                       "--methods", "lemon", "--noise-scale", "0.5"]) == 0
    again = json.loads((tmp_path / "bench_training.json").read_text())
    assert set(again["runs"]) == {"scratch", "lemon"}
    assert again["runs"]["scratch"]["curve"] == data["lm"]["runs"]["scratch"]["curve"]
    assert again["config"]["noise_scale"] == 0.5
    assert again["lemon_beats_every_baseline"] is None  # the baselines were not run
    # another N: the old scratch runs do not apply
    with pytest.raises(SystemExit, match="steps"):
        bench.main(["--quick", "--task", "lm", "--out", str(tmp_path), "--steps", "100",
                    "--reuse-scratch", str(out / "bench_training.json")])


@pytest.mark.parametrize("name", ["bench_training.json", "bench_training_mlm.json"])
def test_readme_figures_are_the_committed_measurements(name):
    """Every saving and loss in README's tables comes from the JSON in docs/bench/."""
    root = Path(__file__).parent.parent
    report = json.loads((root / "docs" / "bench" / name).read_text())
    readme = (root / "README.md").read_text()
    assert f"`L*` = {report['scratch_final_loss']:.4f}" in readme
    for run in report["runs"].values():
        steps = run["steps_to_reach_scratch_loss"]
        reached = "not reached" if steps is None else str(steps)
        saving = "-" if run["saving"] is None else f"{100 * run['saving']:.1f}%"
        if run["saving"] == 0:
            saving = "0%"
        row = f"| {run['decay_steps']} | {reached} | "
        assert row in readme, row
        assert saving in readme and f"{run['final_val_loss']:.4f} |" in readme
    assert (root / "docs" / "bench" / name.replace(".json", ".png")).stat().st_size > 10_000

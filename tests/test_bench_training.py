"""tools/bench_training.py --quick: both tasks (annealed) and the mid-training scenario (LM)
run end to end with every method, every run is reported with the saving formulas, the
lossless growths start exactly at the trained source's validation loss, the methods are
ranked, and the plots exist."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).parent.parent / "tools" / "bench_training.py"
RUNS = {"scratch", "lemon", "lemon_full_schedule", "net2net", "random_new", "llama_pro",
        "lemon_state", "lemon_asym"}
LOSSLESS = ("lemon", "lemon_full_schedule", "net2net", "llama_pro", "lemon_state",
            "lemon_asym")
CASES = [("lm", "annealed"), ("mlm", "annealed"), ("lm", "mid")]


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
    assert bench.main(["--quick", "--task", "lm", "--scenario", "mid", "--out", str(out),
                       "--threads", "1"]) == 0
    return {case: json.loads((out / name).read_text())
            for case, name in ((CASES[0], "bench_training.json"),
                               (CASES[1], "bench_training_mlm.json"),
                               (CASES[2], "bench_training_mid.json"))}, out


@pytest.mark.parametrize("case", CASES)
def test_every_run_is_reported(results, case):
    data, _ = results
    report = data[case]
    cfg = report["config"]
    assert (report["task"], report["scenario"], cfg["scenario"]) == (*case, case[1])
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
            assert run["saving"] == pytest.approx(1 - steps / cfg["steps"])
            paid = 6 * report["parameters"]["target"] * cfg["batch"] * cfg["context"] * steps
            assert run["saving_with_source"] == pytest.approx(
                1 - (paid + report["source_flops"]) / report["scratch_flops"])
            assert run["saving_with_source"] < run["saving"]
    for method in ("lemon", "net2net", "random_new", "llama_pro", "lemon_state",
                   "lemon_asym"):
        assert set(report["fraction_sweep"][method]) == {str(f) for f in cfg["fractions"]}
    # the source's cost: its own steps (mid: the growth step G) of the small model
    source_steps = cfg["growth_step"] if case[1] == "mid" else cfg["source_steps"]
    assert report["source_train_steps"] == source_steps
    assert report["source_curve"][-1]["step"] == source_steps
    assert report["source_flops"] == pytest.approx(
        6 * report["parameters"]["source"] * cfg["batch"] * cfg["context"] * source_steps)


@pytest.mark.parametrize("case", CASES)
def test_grown_models_start_at_the_trained_source_loss(results, case):
    report = results[0][case]
    for name in LOSSLESS:
        start = report["runs"][name]["curve"][0]["val_loss"]
        assert start == pytest.approx(report["source_final_loss"], abs=1e-4), name
    # random new weights: the function is not preserved
    assert report["runs"]["random_new"]["curve"][0]["val_loss"] > \
        report["source_final_loss"] + 0.05


@pytest.mark.parametrize("case", CASES)
def test_methods_are_ranked_against_every_baseline(results, case):
    report = results[0][case]
    runs = report["runs"]

    def steps(name):
        reached = runs[name]["steps_to_reach_scratch_loss"]
        return float("inf") if reached is None else reached
    ranking = report["ranking"]
    assert sorted(ranking) == sorted(RUNS - {"scratch"})
    keys = [(steps(n), runs[n]["final_val_loss"]) for n in ranking]
    assert keys == sorted(keys)
    best = report["best_new_recipe"]
    assert best in ("lemon_state", "lemon_asym")
    assert ranking.index(best) < ranking.index(({"lemon_state", "lemon_asym"} - {best}).pop())
    assert report["best_new_recipe_beats_every_baseline"] == all(
        steps(best) < steps(b) for b in ("lemon", "net2net", "random_new", "llama_pro"))


def test_the_scenarios_rates(results):
    """annealed: the source ends at rate 0, lemon_state starts at the grown peak; mid: the
    source stops at its constant rate, which lemon_state and lemon_asym's inherited
    capacity continue; the scratch runs differ (cosine against WSD)."""
    data, _ = results
    annealed, mid = data[CASES[0]], data[CASES[2]]
    assert annealed["source_last_lr"] == 0.0
    assert annealed["rates"]["lemon_state"] == annealed["grown_peak_lr"]
    assert annealed["rates"]["lemon_asym_inherited"] == pytest.approx(0.5 * annealed["peak_lr"])
    assert mid["source_last_lr"] == pytest.approx(mid["config"]["source_peak"])
    assert mid["rates"]["lemon_state"] == mid["rates"]["lemon_asym_inherited"] == \
        mid["source_last_lr"]
    assert mid["rates"]["lemon_asym_new"] == mid["peak_lr"] * mid["config"]["new_peak_scale"]
    assert mid["runs"]["scratch"]["curve"] != annealed["runs"]["scratch"]["curve"]


def test_wsd_schedule_is_stable_then_one_cooldown(bench):
    from dataclasses import replace

    cfg = replace(bench.Config(), scenario="mid")
    factor = bench.schedule_factor(cfg, 100, warmup=10)
    rates = [factor(t) for t in range(100)]
    assert rates[9] == rates[50] == rates[80] == 1.0 and rates[0] < rates[9]
    assert all(a > b for a, b in zip(rates[80:], rates[81:])) and rates[99] < 0.3
    stable = bench.schedule_factor(cfg, 100, warmup=10, stable=True)
    assert stable(99) == stable(10_000) == 1.0
    annealed = bench.schedule_factor(bench.Config(), 100, warmup=10)
    assert annealed(50) < 1.0 and annealed(100) == 0.0


@pytest.mark.parametrize("case", CASES)
def test_markdown_prints_every_run_of_a_report(bench, results, case, capsys):
    """``--markdown`` prints README's table from a report: one row per run, scratch first,
    then the ranking, each with the report's own figures."""
    data, out = results
    name = {CASES[0]: "bench_training.json", CASES[1]: "bench_training_mlm.json",
            CASES[2]: "bench_training_mid.json"}[case]
    assert bench.main(["--markdown", str(out / name)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    report = data[case]
    assert f"`L*` = {report['scratch_final_loss']:.4f}" in rows[0]
    assert len(rows) == 1 + len(RUNS)
    assert rows[1].startswith("| scratch (peak ")
    for row, run in zip(rows[2:], report["ranking"]):
        figures = report["runs"][run]
        assert row.startswith(f"| {bench.ROW_NAMES[run]} | {figures['decay_steps']} | ")
        assert row.endswith(f" | {figures['final_val_loss']:.4f} |")


def test_shapes_and_device_are_flags_and_the_report_names_the_device(bench, tmp_path):
    """The paper's shapes on a GPU are one command (``--source-dim 384 --source-depth 6
    --heads 6 --device cuda``); here a smaller source than --quick's, on the CPU."""
    assert bench.main(["--quick", "--task", "lm", "--methods", "lemon", "--threads", "1",
                       "--source-dim", "16", "--source-depth", "1", "--heads", "2",
                       "--device", "cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_training.json").read_text())
    cfg = bench.replace(bench.QUICK, source_dim=16, source_depth=1, heads=2)
    assert report["parameters"] == {
        "source": bench.count_parameters(bench.build(cfg, 16, 1, 0)),
        "target": bench.count_parameters(bench.build(cfg, 32, 2, 0))}
    assert report["device"] == "cpu" and report["config"]["device"] == "cpu"
    # a scratch sweep from another device is not reused
    with pytest.raises(SystemExit, match="device"):
        bench.reusable_scratch(tmp_path / "bench_training.json", bench.replace(cfg,
                               device="cuda"))


def test_plots_are_written(results):
    _, out = results
    for name in ("bench_training.png", "bench_training_mlm.png", "bench_training_mid.png"):
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
    assert again["runs"]["scratch"]["curve"] == data[CASES[0]]["runs"]["scratch"]["curve"]
    assert again["config"]["noise_scale"] == 0.5
    assert again["lemon_beats_every_baseline"] is None  # the baselines were not run
    assert again["best_new_recipe"] is None and again["ranking"] == ["lemon"]
    assert again["best_new_recipe_beats_every_baseline"] is None
    # another N: the old scratch runs do not apply
    with pytest.raises(SystemExit, match="steps"):
        bench.main(["--quick", "--task", "lm", "--out", str(tmp_path), "--steps", "100",
                    "--reuse-scratch", str(out / "bench_training.json")])
    # a mid report's scratch runs are WSD's: not an annealed run's, and the other way round
    with pytest.raises(SystemExit, match="scenario"):
        bench.main(["--quick", "--task", "lm", "--out", str(tmp_path), "--scenario", "mid",
                    "--reuse-scratch", str(out / "bench_training.json")])


def test_the_committed_report_still_gives_its_scratch_runs(bench):
    """docs/bench/bench_training.json is the annealed scenario's scratch sweep at the
    default config, and only that."""
    from dataclasses import replace

    path = Path(__file__).parent.parent / "docs" / "bench" / "bench_training.json"
    report = bench.reusable_scratch(path, bench.Config())
    assert set(report["scratch_sweep_curves"]) == {"0.001", "0.002", "0.004"}
    with pytest.raises(SystemExit, match="scenario"):
        bench.reusable_scratch(path, replace(bench.Config(), scenario="mid"))


@pytest.mark.parametrize("name", ["bench_training.json", "bench_training_mid.json",
                                  "bench_training_mlm.json"])
def test_readme_figures_are_the_committed_measurements(bench, name):
    """README's table of each committed report is the one ``--markdown`` prints from its
    JSON in docs/bench/, row for row."""
    root = Path(__file__).parent.parent
    report = json.loads((root / "docs" / "bench" / name).read_text())
    readme = (root / "README.md").read_text()
    assert bench.markdown_table(report).strip() in readme
    assert (root / "docs" / "bench" / name.replace(".json", ".png")).stat().st_size > 10_000

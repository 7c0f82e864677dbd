"""The training benchmark's --quick smoke run: every run present, growth lossless at step 0."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).parent.parent / "tools" / "bench_training.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("bench_training", TOOL)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_training"] = bench
    spec.loader.exec_module(bench)
    out = tmp_path_factory.mktemp("bench")
    assert bench.main(["--quick", "--out", str(out), "--threads", "1"]) == 0
    return json.loads((out / "bench_training.json").read_text()), out


def test_every_run_is_reported(report):
    data, out = report
    assert set(data["runs"]) == {"scratch", "lemon", "lemon_full_schedule", "net2net",
                                 "random_new"}
    assert data["runs"]["scratch"]["steps_to_reach_scratch_loss"] == data["config"]["steps"]
    assert (out / "bench_training.png").stat().st_size > 0


def test_grown_models_start_at_the_trained_source_loss(report):
    data, _ = report
    for name in ("lemon", "lemon_full_schedule", "net2net"):
        start = data["runs"][name]["curve"][0]["val_loss"]
        assert start == pytest.approx(data["source_final_loss"], abs=1e-4), name
    assert data["runs"]["random_new"]["curve"][0]["val_loss"] > data["source_final_loss"] + 0.1

"""The training loop (lemon_fx/training.py) and its command line (tools/train.py).

Single process: the loss goes down, logs and a safetensors checkpoint are written, and a run
interrupted mid-way and resumed ends bit-identical to an uninterrupted one. Data parallel:
``python -m torch.distributed.run`` starts 2 CPU processes (gloo, 127.0.0.1, a free port)
running this file as a script; both ranks must end with identical weights, and the losses
and weights must match one process trained on the same global batches (float64, no dropout,
so only the order of floating-point additions differs).

Run as a script (``torchrun ... tests/test_training.py OUT_DIR``) this file is the DDP
worker: it trains and saves its rank's weights and losses to ``OUT_DIR/rank{RANK}.pt``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lemon_fx.training.loop import TrainConfig, build_optimizer, latest_checkpoint, shard, train
from lemon_fx.training.schedule import lemon_lr_factor

ROOT = Path(__file__).resolve().parent.parent
STEPS = 8
GLOBAL_BATCH = 8


def _model(dropout: float = 0.0) -> nn.Module:
    """A float64 MLP with matrices, biases and a LayerNorm (decayed and undecayed groups)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Dropout(dropout),
                         nn.Linear(16, 3)).double()


def _batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed sequence of global batches: a function of the step alone."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=torch.float64)
    return x, torch.cat([x[:, :2].sin(), x[:, 2:3] * x[:, 3:4]], dim=1)


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


def _eval(model: nn.Module) -> float:
    x, y = _batches(10_000)
    with torch.no_grad():
        return float(_loss(model(x), y))


def _config(**kw) -> TrainConfig:
    kw = {"peak_lr": 1e-2, "total_steps": STEPS, "warmup_steps": 2, "floor": 0.1,
          "weight_decay": 0.1, "device": "cpu", "progress": False, **kw}
    return TrainConfig(**kw)


# -- single process ------------------------------------------------------------------------

def test_single_process_learns_and_writes_logs_and_a_checkpoint(tmp_path):
    model = _model()
    before = _eval(model)
    result = train(model, _batches, _loss,
                   _config(total_steps=30, eval_every=10, checkpoint_every=15,
                           out_dir=tmp_path), eval_fn=_eval)
    assert result.start_step == 0 and result.end_step == 30 and len(result.losses) == 30
    assert sum(result.losses[-5:]) < 0.75 * sum(result.losses[:5])  # noisy batches of 8
    assert [s for s, _ in result.evals] == [10, 20, 30]
    evals = [before] + [e for _, e in result.evals]  # one fixed batch: a steady decrease
    assert all(a > b for a, b in zip(evals, evals[1:])) and evals[-1] < 0.5 * before

    lines = (tmp_path / "log.csv").read_text().splitlines()
    assert lines[0] == "step,lr,train_loss,eval_loss,grad_norm,tokens_per_s,elapsed_s"
    assert len(lines) == 31
    log = json.loads((tmp_path / "log.json").read_text())
    assert log["config"]["total_steps"] == 30 and len(log["steps"]) == 30
    rows = log["steps"]
    assert [r["step"] for r in rows] == list(range(1, 31))
    torch.testing.assert_close([r["train_loss"] for r in rows], result.losses,
                               rtol=0, atol=0)
    # the lr logged for step k is the rate that step used
    torch.testing.assert_close([r["lr"] for r in rows],
                               [1e-2 * lemon_lr_factor(i, 2, 30, 0.1) for i in range(30)],
                               rtol=1e-12, atol=0)
    assert [r["eval_loss"] is not None for r in rows] == [(i + 1) % 10 == 0 for i in range(30)]
    assert all(r["tokens_per_s"] > 0 for r in rows)

    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-30"
    assert (tmp_path / "checkpoint-15" / "trainer_state.json").is_file()
    saved = load_file(str(tmp_path / "checkpoint-30" / "model.safetensors"))
    fresh = _model()
    fresh.load_state_dict(saved)
    for a, b in zip(fresh.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    state = json.loads((tmp_path / "checkpoint-30" / "trainer_state.json").read_text())
    assert state["step"] == 30


def test_weight_decay_only_on_matrices():
    model = _model()
    groups = build_optimizer(model, _config()).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() >= 2), name


class _Crash(Exception):
    pass


class _Iterable:
    """An iterable of the same global batches that can crash part-way."""

    def __init__(self, crash_at: int | None = None):
        self.crash_at = crash_at

    def __iter__(self):
        for step in range(STEPS):
            if step == self.crash_at:
                raise _Crash
            yield _batches(step)


@pytest.mark.parametrize("source", ["callable", "iterable"])
def test_resume_after_a_crash_repeats_the_uninterrupted_run_exactly(tmp_path, source):
    """Dropout on, to check that resuming needs no saved RNG state (each step is seeded
    from its number); a crash after the step-3 checkpoint, with step 4 already logged."""
    def data(crash_at=None):
        if source == "iterable":
            return _Iterable(crash_at)

        def get(step):
            if step == crash_at:
                raise _Crash
            return _batches(step)
        return get

    full = _model(dropout=0.2)
    full_result = train(full, data(), _loss, _config(out_dir=tmp_path / "full"))

    run = tmp_path / "run"
    with pytest.raises(_Crash):
        train(_model(dropout=0.2), data(crash_at=4), _loss,
              _config(out_dir=run, checkpoint_every=3))
    assert latest_checkpoint(run) == run / "checkpoint-3"
    assert len((run / "log.csv").read_text().splitlines()) == 1 + 4  # steps 1-4 logged

    resumed = _model(dropout=0.2)  # fresh weights: the checkpoint must replace them
    result = train(resumed, data(), _loss, _config(out_dir=run, checkpoint_every=3))
    assert result.start_step == 3 and result.end_step == STEPS
    assert result.losses == full_result.losses[3:]
    for a, b in zip(resumed.state_dict().values(), full.state_dict().values()):
        assert torch.equal(a, b)
    steps = json.loads((run / "log.json").read_text())["steps"]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))  # step 4 not twice
    assert [r["train_loss"] for r in steps] == full_result.losses

    again = train(resumed, data(), _loss, _config(out_dir=run))
    assert again.start_step == STEPS and again.losses == []


def test_resume_false_starts_over(tmp_path):
    train(_model(), _batches, _loss, _config(out_dir=tmp_path))
    result = train(_model(), _batches, _loss, _config(out_dir=tmp_path), resume=False)
    assert result.start_step == 0 and len(result.losses) == STEPS
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 1 + STEPS


def test_running_out_of_data_stops_and_checkpoints(tmp_path):
    result = train(_model(), [_batches(i) for i in range(5)], _loss, _config(out_dir=tmp_path))
    assert result.end_step == 5 and len(result.losses) == 5
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-5"


def test_a_non_finite_loss_stops_before_the_update(tmp_path):
    model = _model()
    weights = [p.detach().clone() for p in model.parameters()]
    nan_loss = lambda out, target: _loss(out, target) * float("nan")  # noqa: E731
    with pytest.raises(FloatingPointError, match="step 1"):
        train(model, _batches, nan_loss, _config())
    for a, b in zip(model.parameters(), weights):
        assert torch.equal(a.detach(), b)


def test_shard_splits_the_global_batch_evenly_or_refuses():
    x = torch.arange(12).reshape(6, 2)
    parts = [shard((x, {"y": x[:, 0]}), rank, 3) for rank in range(3)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert torch.equal(parts[1][1]["y"], x[2:4, 0])
    with pytest.raises(ValueError, match="multiple of 4"):
        shard(x, 0, 4)


def test_invalid_configs_are_refused():
    for bad in [dict(peak_lr=0.0), dict(total_steps=0), dict(warmup_steps=STEPS + 1),
                dict(floor=2.0), dict(grad_clip=0.0), dict(eval_every=-1)]:
        with pytest.raises(ValueError):
            _config(**bad)


# -- data parallel ---------------------------------------------------------------------------

DDP_CLIP = 0.05  # small enough that clipping acts on most steps: it must agree across ranks


def _ddp_config(out_dir=None) -> TrainConfig:
    return _config(grad_clip=DDP_CLIP, out_dir=out_dir, checkpoint_every=4)


def _ddp_worker(out: Path) -> None:
    """One torchrun rank: train on the shared global batches, save weights and losses."""
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    model = _model()
    seen: list[torch.Tensor] = []  # the targets this rank trained on, step by step

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        seen.append(target.clone())
        return _loss(out, target)

    result = train(model, _batches, loss, _ddp_config(out / "run"), eval_fn=_eval)
    assert not torch.distributed.is_initialized()  # train() destroyed the group it made
    torch.save({"state": model.state_dict(), "losses": result.losses, "evals": result.evals,
                "seen": seen}, out / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
               *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_two_cpu_processes_match_one_process_on_the_global_batch(tmp_path):
    _torchrun(str(Path(__file__).resolve()), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    # both ranks hold exactly the same weights and report the same global-batch losses
    for (name, a), b in zip(ranks[0]["state"].items(), ranks[1]["state"].values()):
        assert torch.equal(a, b), name
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert len(ranks[0]["losses"]) == STEPS
    # each rank trained on its own half of every global batch, not on all of it
    for step in range(STEPS):
        halves = [ranks[r]["seen"][step] for r in range(2)]
        assert halves[0].shape[0] == GLOBAL_BATCH // 2
        assert torch.equal(torch.cat(halves), _batches(step)[1])

    single = _model()
    result = train(single, _batches, _loss, _ddp_config(tmp_path / "single"), eval_fn=_eval)
    # float64; the two runs differ only in how the batch mean is summed (two half-batch
    # means averaged by all-reduce vs one mean): measured differences are ~2e-16 in the
    # losses and ~6e-17 in the weights, and 1e-12 leaves room for Adam to amplify them
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(result.losses),
                               rtol=0, atol=1e-12)
    for (name, a), b in zip(ranks[0]["state"].items(), single.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)
    torch.testing.assert_close(torch.tensor([e for _, e in ranks[0]["evals"]]),
                               torch.tensor([e for _, e in result.evals]), rtol=0, atol=1e-12)

    # clipping was active, and only rank 0 wrote logs and checkpoints
    steps = json.loads((tmp_path / "run" / "log.json").read_text())["steps"]
    assert sum(r["grad_norm"] > DDP_CLIP for r in steps) >= STEPS // 2
    assert latest_checkpoint(tmp_path / "run") == tmp_path / "run" / "checkpoint-8"
    saved = load_file(str(tmp_path / "run" / "checkpoint-8" / "model.safetensors"))
    for name, a in ranks[0]["state"].items():
        assert torch.equal(saved[name], a), name


def test_the_demo_trains_under_torchrun_and_resumes(tmp_path):
    out = tmp_path / "demo"
    args = [str(ROOT / "tools" / "train.py"), "--demo", "--batch", "4", "--context", "16",
            "--eval-every", "2", "--eval-batches", "1", "--checkpoint-every", "2",
            "--out", str(out)]
    first = _torchrun(*args, "--steps", "2")
    assert "steps 0->2" in first.stdout
    assert latest_checkpoint(out) == out / "checkpoint-2"
    assert len((out / "log.csv").read_text().splitlines()) == 1 + 2
    assert json.loads((out / "log.json").read_text())["steps"][-1]["eval_loss"] is not None
    second = _torchrun(*args, "--steps", "3")  # every rank loads rank 0's choice of checkpoint
    assert "steps 2->3" in second.stdout
    assert [r["step"] for r in json.loads((out / "log.json").read_text())["steps"]] == [1, 2, 3]


if __name__ == "__main__":
    _ddp_worker(Path(sys.argv[1]))

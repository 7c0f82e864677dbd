"""The training loop: loss goes down, logs and checkpoints, resume, and data parallel.

The DDP test starts 2 CPU processes (gloo) on 127.0.0.1 and checks that both ranks hold
identical weights and that losses and weights match one process on the same global batches.
"""

from __future__ import annotations

import os
import shutil
import socket

import torch
import torch.multiprocessing as mp
from torch import nn

from lemon_fx.training import TrainConfig, train

STEPS = 6


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def _batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64)
    return x, x[:, :3].sin()


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


def _config(**kw) -> TrainConfig:
    return TrainConfig(peak_lr=1e-2, total_steps=STEPS, warmup_steps=2, device="cpu", **kw)


def test_single_process_learns_and_writes_logs_and_checkpoints(tmp_path):
    model = _model()
    result = train(model, _batches, _loss, _config(out_dir=str(tmp_path), checkpoint_every=3,
                                                    eval_every=2),
                   eval_fn=lambda m: float(_loss(m(_batches(0)[0]), _batches(0)[1]).detach()))
    assert result.losses[-1] < result.losses[0]
    assert [s for s, _ in result.evals] == [2, 4, 6]
    assert (tmp_path / "log.csv").read_text().count("\n") == STEPS + 1
    assert (tmp_path / "checkpoint-6" / "model.safetensors").exists()


def test_resume_continues_exactly(tmp_path):
    full = _model()
    train(full, _batches, _loss, _config())
    interrupted = _model()
    train(interrupted, _batches, _loss, _config(out_dir=str(tmp_path), checkpoint_every=3))
    shutil.rmtree(tmp_path / "checkpoint-6")  # as if it stopped after step 3
    resumed = _model()
    result = train(resumed, _batches, _loss, _config(out_dir=str(tmp_path)))
    assert result.start_step == 3
    for a, b in zip(resumed.state_dict().values(), full.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model = _model()
    result = train(model, _batches, _loss, _config())
    torch.save({"state": model.state_dict(), "losses": result.losses}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_match_one_process_on_the_global_batch(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for a, b in zip(ranks[0]["state"].values(), ranks[1]["state"].values()):
        assert torch.equal(a, b)
    single = _model()
    result = train(single, _batches, _loss, _config())
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(result.losses),
                               rtol=0, atol=1e-12)
    for a, b in zip(ranks[0]["state"].values(), single.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)

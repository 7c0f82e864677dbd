"""Training a grown model (or any model) with LEMON's schedule, on one process or many.

``train(model, batches, loss_fn, config)`` runs AdamW (weight decay on matrices only),
gradient clipping and :class:`lemon_fx.LemonSchedule`, evaluates every ``eval_every``
steps, writes safetensors checkpoints and CSV/JSON logs, and resumes from the latest
checkpoint in ``out_dir``. It uses CUDA when present.

Data parallel: under ``torchrun`` (``WORLD_SIZE > 1``) the process group is initialised
from torchrun's environment (gloo on CPU, nccl on CUDA) and the model wrapped in
``DistributedDataParallel``. ``batches(step)`` returns the same *global* batch on every
rank and each rank trains on its own contiguous slice of it: DDP averages the gradients,
so with equal slices the update is the single-process update on the global batch. Only
rank 0 writes logs and checkpoints.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from lemon_fx.schedule import LemonSchedule

__all__ = ["TrainConfig", "TrainResult", "train"]


@dataclass
class TrainConfig:
    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    floor: float = 0.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    eval_every: int = 0
    checkpoint_every: int = 0
    out_dir: str | None = None
    seed: int = 0
    device: str = "auto"
    progress: bool = False


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # mean loss over the global batch
    evals: list[tuple[int, float]] = field(default_factory=list)
    start_step: int = 0


def _world() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank, world


def _device(config: TrainConfig) -> torch.device:
    if config.device != "auto":
        return torch.device(config.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    matrices = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    others = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": matrices, "weight_decay": config.weight_decay},
                              {"params": others, "weight_decay": 0.0}],
                             lr=config.peak_lr, betas=config.betas)


def _latest_checkpoint(out: Path) -> Path | None:
    found = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def _save_checkpoint(out: Path, step: int, model: nn.Module, optimizer, schedule) -> None:
    from safetensors.torch import save_file

    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"step": str(step)})
    # optimizer moments are nested dicts of tensors and ints, which safetensors cannot hold
    torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "step": step}, folder / "training_state.pt")


def _load_checkpoint(folder: Path, model: nn.Module, optimizer, schedule) -> int:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    state = torch.load(folder / "training_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    return int(state["step"])


def train(model: nn.Module, batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
          loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], config: TrainConfig,
          *, eval_fn: Callable[[nn.Module], float] | None = None,
          resume: bool = True) -> TrainResult:
    """Train ``model`` in place for ``config.total_steps`` steps (see the module docstring)."""
    rank, world = _world()
    device = _device(config)
    torch.manual_seed(config.seed)
    model.to(device).train()
    optimizer = _optimizer(model, config)
    schedule = LemonSchedule(optimizer, config.warmup_steps, config.total_steps, config.floor)
    out = Path(config.out_dir) if config.out_dir else None
    result = TrainResult()
    if out is not None and resume and (latest := _latest_checkpoint(out)) is not None:
        result.start_step = _load_checkpoint(latest, model, optimizer, schedule)
    trained = model
    if world > 1:
        trained = nn.parallel.DistributedDataParallel(model, device_ids=None if
                                                      device.type == "cpu" else [device])
    log_rows: list[dict] = []
    started = time.perf_counter()
    for step in range(result.start_step, config.total_steps):
        inputs, targets = batches(step)
        inputs = inputs.chunk(world)[rank].to(device)
        targets = targets.chunk(world)[rank].to(device)
        loss = loss_fn(trained(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        schedule.step()
        global_loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(global_loss)
            global_loss /= world
        result.losses.append(float(global_loss))
        row = {"step": step + 1, "lr": optimizer.param_groups[0]["lr"],
               "train_loss": float(global_loss), "eval_loss": "",
               "tokens_per_s": inputs.numel() * world * (step + 1 - result.start_step)
               / max(time.perf_counter() - started, 1e-9)}
        if eval_fn is not None and config.eval_every and (step + 1) % config.eval_every == 0:
            row["eval_loss"] = eval_fn(model)
            result.evals.append((step + 1, row["eval_loss"]))
        log_rows.append(row)
        if rank == 0 and config.progress:
            print(f"\rstep {step + 1}/{config.total_steps} loss {row['train_loss']:.4f}",
                  end="", file=sys.stderr, flush=True)
        if out is not None and rank == 0 and config.checkpoint_every and \
                (step + 1) % config.checkpoint_every == 0:
            _save_checkpoint(out, step + 1, model, optimizer, schedule)
    if rank == 0 and config.progress:
        print(file=sys.stderr)
    if out is not None and rank == 0:
        _write_logs(out, log_rows, config)
    return result


def _write_logs(out: Path, rows: list[dict], config: TrainConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fields = ["step", "lr", "train_loss", "eval_loss", "tokens_per_s"]
    csv_path = out / "log.csv"
    new = not csv_path.exists()
    with csv_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    json_path = out / "log.json"
    history = json.loads(json_path.read_text())["steps"] if json_path.exists() else []
    json_path.write_text(json.dumps({"config": asdict(config), "steps": history + rows},
                                    indent=1) + "\n")

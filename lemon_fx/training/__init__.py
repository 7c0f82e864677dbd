"""A leaf: training after growth. ``schedule`` (LEMON's learning-rate schedule) and
``loop`` (the training loop, checkpoints, DDP)."""

from lemon_fx.training.loop import (
    TrainConfig,
    TrainResult,
    build_optimizer,
    latest_checkpoint,
    shard,
    train,
)
from lemon_fx.training.schedule import LemonSchedule, lemon_lr_factor

__all__ = ["LemonSchedule", "TrainConfig", "TrainResult", "build_optimizer",
           "latest_checkpoint", "lemon_lr_factor", "shard", "train"]

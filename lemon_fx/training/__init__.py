"""A leaf: training after growth. ``schedule`` (LEMON's compressed cosine, warmup-stable-
decay, a source's schedule continued), ``loop`` (the training loop, checkpoints, DDP and
FSDP2), ``provenance`` (which source entry each grown entry continues),
``optimizer_state`` (AdamW's state carried through a growth) and ``param_groups`` (rates
that tell inherited capacity from new, and LLaMA-Pro's train-only-new mode)."""

from lemon_fx.training.loop import (
    TrainConfig,
    TrainResult,
    build_optimizer,
    build_schedule,
    fsdp_blocks,
    latest_checkpoint,
    shard,
    train,
)
from lemon_fx.training.optimizer_state import GrowthAwareAdamW, grow_optimizer_state
from lemon_fx.training.param_groups import (
    GrowthParamGroups,
    NewCapacityOnly,
    growth_param_groups,
    train_only_new,
)
from lemon_fx.training.schedule import LemonSchedule, WSDSchedule, lemon_lr_factor, wsd_lr_factor

__all__ = ["GrowthAwareAdamW", "GrowthParamGroups", "LemonSchedule", "NewCapacityOnly",
           "TrainConfig", "TrainResult", "WSDSchedule", "build_optimizer", "build_schedule",
           "fsdp_blocks", "grow_optimizer_state", "growth_param_groups", "latest_checkpoint",
           "lemon_lr_factor", "shard", "train", "train_only_new", "wsd_lr_factor"]

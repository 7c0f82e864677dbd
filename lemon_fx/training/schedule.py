"""LEMON's learning-rate schedule for training a grown model.

LEMON (Wang et al. 2024, "Training after growth") trains the grown model with a fresh
optimizer, the warmup repeated, the **same peak learning rate** as training the large model
from scratch, and the whole cosine decay **compressed** into the shorter budget: where
from scratch decays over ``T`` steps, the grown model decays over ``T_grown < T`` (ViT:
130 of 300 epochs). The peak stays high because the grown model must still move away from
the small model's solution (its new weights start at init scale); the decay is fast
because it starts from a good function and needs fewer steps to settle.

Usage::

    optimizer = torch.optim.AdamW(big.parameters(), lr=peak_lr)
    scheduler = lemon_fx.LemonSchedule(optimizer, warmup_steps=100, total_steps=2_000)
    for step in range(2_000):
        ...; optimizer.step(); scheduler.step()

With ``total_steps`` equal to the from-scratch budget it is the usual warmup + cosine
schedule, which is also what the from-scratch baseline uses.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["LemonSchedule", "lemon_lr_factor"]


def lemon_lr_factor(step: int, warmup_steps: int, total_steps: int, floor: float = 0.0) -> float:
    """The multiplier of the peak rate at ``step``: linear warmup, then cosine to ``floor``.

    ``floor`` is a fraction of the peak (0.1: never below 10% of it). Past ``total_steps``
    the factor stays at ``floor``.
    """
    if step >= total_steps:  # also when warmup fills the budget: no step left to decay
        return floor
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LemonSchedule(LambdaLR):
    """``LambdaLR`` with :func:`lemon_lr_factor`: the optimizer's ``lr`` is the peak rate.

    ``warmup_steps``: steps of linear warmup; ``total_steps``: the whole schedule, warmup
    included (for a grown model shorter than from scratch: the compressed decay);
    ``floor``: the final rate as a fraction of the peak (kept past ``total_steps``). Both
    step counts are ints with ``0 <= warmup_steps <= total_steps`` and ``total_steps >
    0``, and ``0 <= floor <= 1``; anything else raises ``ValueError``. The three are kept
    as attributes of the same names. Call ``step()`` once per optimizer step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                 floor: float = 0.0, last_epoch: int = -1):
        for name, value in (("warmup_steps", warmup_steps), ("total_steps", total_steps)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} counts optimizer steps: an int, got {value!r}")
        if total_steps <= 0 or warmup_steps < 0 or warmup_steps > total_steps:
            raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps "
                             f"({total_steps}) and total_steps > 0")
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"floor is a fraction of the peak rate, got {floor}")
        self.warmup_steps, self.total_steps, self.floor = warmup_steps, total_steps, floor
        super().__init__(optimizer, lambda step: lemon_lr_factor(step, warmup_steps,
                                                                 total_steps, floor),
                         last_epoch=last_epoch)

"""Learning-rate schedules for training a grown model: LEMON's compressed cosine, and
warmup-stable-decay with a ``(1 - sqrt)`` cooldown for growing a source mid-run.

**LEMON's compressed cosine.** LEMON (Wang et al. 2024, "Training after growth") trains
the grown model with a fresh optimizer, the warmup repeated, the **same peak learning
rate** as training the large model from scratch, and the whole cosine decay **compressed**
into the shorter budget: where from scratch decays over ``T`` steps, the grown model decays
over ``T_grown < T`` (ViT: 130 of 300 epochs). The peak stays high because the grown model
must still move away from the small model's solution (its new weights start at init
scale); the decay is fast because it starts from a good function and needs fewer steps to
settle. With ``total_steps`` equal to the from-scratch budget it is the usual warmup +
cosine schedule, which is also what the from-scratch baseline uses.

**Warmup-stable-decay (WSD).** Linear warmup, then the peak held constant, then one
cooldown over the last ``cooldown_steps`` steps, shaped ``1 - sqrt(progress)`` (Hägele et
al. 2024, "Scaling laws and compute-optimal training beyond fixed training durations":
constant + cooldown matches or beats cosine, and ``1 - sqrt`` beats a linear cooldown).
It suits growth because the stable phase has nothing to undo: a source trained at a
constant rate ``r`` and grown at step ``G`` is un-annealed, and the grown model can carry on
at ``r`` without a re-warm (``TRAINING.md`` §5, items 1 and 3), ending with the one
cooldown. A cooldown can also be branched off any step of a stable run, so one WSD run
gives the loss at every budget.

**Continuing a schedule at the growth point.** Two knobs, on both schedules:

- ``start_step``: enter the schedule at that step, as if that many steps of it had already
  been taken (LEMON's ``--offset-steps`` / "ghost epochs"). With the source's own schedule
  and ``start_step=G`` the grown run's rates are the rates the source would have used from
  step ``G`` on.
- ``start_factor``: the rate just before the run's first step, as a fraction of its peak;
  the warmup ramps from there instead of from 0. To ramp from the source's rate ``r`` to a
  different peak ``p``, use ``start_factor = r / p``: the rates are then ``r`` (the source's
  last step), ``r + (p - r) / W``, ..., ``p`` after ``W`` warmup steps, a straight line
  across the growth point. It is the same convention as the ordinary warmup (``(step + 1) /
  W``, the rate "before" step 0 being 0), which is why no step is spent at rate 0 there.
  Without a ramp (``warmup_steps=0``, or ``p == r``) the grown run's first rate is the
  source's last rate exactly.

Usage::

    optimizer = torch.optim.AdamW(big.parameters(), lr=peak_lr)
    scheduler = lemon_fx.LemonSchedule(optimizer, warmup_steps=100, total_steps=2_000)
    # or: the grown model continues the source's constant rate, then one cooldown
    scheduler = WSDSchedule(optimizer, warmup_steps=0, total_steps=2_000, cooldown_steps=400)
    for step in range(2_000):
        ...; optimizer.step(); scheduler.step()

The factor functions also work per parameter group, through ``LambdaLR`` with one
function per group, so inherited and new capacity can follow different schedules (SPARKLING:
inherited weights keep the running rate, new ones are re-warmed over 250 steps to 1.3x)::

    optimizer = torch.optim.AdamW([{"params": inherited, "lr": r},
                                   {"params": new, "lr": 1.3 * r}])
    keep = functools.partial(wsd_lr_factor, warmup_steps=0, total_steps=T, cooldown_steps=C)
    rewarm = functools.partial(wsd_lr_factor, warmup_steps=250, total_steps=T,
                               cooldown_steps=C)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [keep, rewarm])
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["LemonSchedule", "WSDSchedule", "lemon_lr_factor", "wsd_lr_factor"]


def _warmup(step: int, warmup_steps: int, start_factor: float) -> float:
    """Linear from ``start_factor`` (the rate "before" step 0) to 1 at ``warmup_steps - 1``."""
    return start_factor + (1.0 - start_factor) * (step + 1) / warmup_steps


def lemon_lr_factor(step: int, warmup_steps: int, total_steps: int, floor: float = 0.0,
                    start_factor: float = 0.0) -> float:
    """The multiplier of the peak rate at ``step``: linear warmup, then cosine to ``floor``.

    ``floor`` is a fraction of the peak (0.1: never below 10% of it). Past ``total_steps``
    the factor stays at ``floor``. The warmup ramps from ``start_factor`` (default 0; see
    the module docstring) to 1.
    """
    if step >= total_steps:  # also when warmup fills the budget: no step left to decay
        return floor
    if warmup_steps > 0 and step < warmup_steps:
        return _warmup(step, warmup_steps, start_factor)
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def wsd_lr_factor(step: int, warmup_steps: int, total_steps: int, cooldown_steps: int,
                  floor: float = 0.0, start_factor: float = 0.0) -> float:
    """The multiplier of the peak rate at ``step``: warmup, stable at 1, ``(1 - sqrt)``
    cooldown to ``floor``.

    Steps ``[0, warmup_steps)`` ramp linearly from ``start_factor`` to 1; the factor is then
    1 until the cooldown starts at ``D = total_steps - cooldown_steps``; at step ``D + k``
    (``0 <= k < cooldown_steps``) it is ``floor + (1 - floor) * (1 - sqrt(k /
    cooldown_steps))``, so the cooldown's first step is still at the peak and the rate
    reaches ``floor`` at ``total_steps``, where it stays. ``cooldown_steps=0`` means no
    cooldown: the factor stays 1 after the warmup, also past ``total_steps`` (the stable
    phase of a source that will be grown, or a run whose cooldown is branched off later).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return _warmup(step, warmup_steps, start_factor)
    if cooldown_steps == 0:
        return 1.0
    if step >= total_steps:
        return floor
    into = step - (total_steps - cooldown_steps)
    if into < 0:
        return 1.0
    return floor + (1.0 - floor) * (1.0 - math.sqrt(into / cooldown_steps))


def _check_schedule(warmup_steps: int, total_steps: int, floor: float, *,
                    cooldown_steps: int = 0, start_factor: float = 0.0,
                    start_step: int = 0) -> None:
    """ValueError unless the arguments describe a schedule: the checks of both classes and
    of ``TrainConfig`` (``total_steps`` here is the whole schedule's length)."""
    for name, value in (("warmup_steps", warmup_steps), ("total_steps", total_steps),
                        ("cooldown_steps", cooldown_steps), ("start_step", start_step)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} counts optimizer steps: an int, got {value!r}")
    if total_steps <= 0 or warmup_steps < 0 or warmup_steps > total_steps:
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps "
                         f"({total_steps}) and total_steps > 0")
    if cooldown_steps < 0 or warmup_steps + cooldown_steps > total_steps:
        raise ValueError(f"need cooldown_steps ({cooldown_steps}) >= 0 and warmup_steps "
                         f"({warmup_steps}) + cooldown_steps <= total_steps ({total_steps}): "
                         "the cooldown cannot start before the warmup ends")
    if not 0 <= start_step < total_steps:
        raise ValueError(f"need 0 <= start_step ({start_step}) < total_steps ({total_steps}):"
                         " a schedule entered at its end would be only its floor")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor is a fraction of the peak rate, got {floor}")
    if not (math.isfinite(start_factor) and start_factor >= 0.0):
        raise ValueError(f"start_factor is a rate over the peak rate, finite and >= 0, "
                         f"got {start_factor}")


class LemonSchedule(LambdaLR):
    """``LambdaLR`` with :func:`lemon_lr_factor`: the optimizer's ``lr`` is the peak rate.

    ``warmup_steps``: steps of linear warmup; ``total_steps``: the whole schedule, warmup
    included (for a grown model shorter than from scratch: the compressed decay);
    ``floor``: the final rate as a fraction of the peak (kept past ``total_steps``). Both
    step counts are ints with ``0 <= warmup_steps <= total_steps`` and ``total_steps >
    0``, and ``0 <= floor <= 1``; anything else raises ``ValueError``. ``start_step``
    (``0 <= start_step < total_steps``) enters the schedule part-way, as if that many steps
    were done (LEMON's ghost epochs: a lower peak); ``start_factor`` (``>= 0``) is where
    the warmup ramps from (module docstring). All are kept as attributes of the same
    names. Call ``step()`` once per optimizer step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                 floor: float = 0.0, last_epoch: int = -1, *, start_factor: float = 0.0,
                 start_step: int = 0):
        _check_schedule(warmup_steps, total_steps, floor, start_factor=start_factor,
                        start_step=start_step)
        self.warmup_steps, self.total_steps, self.floor = warmup_steps, total_steps, floor
        self.start_factor, self.start_step = start_factor, start_step
        super().__init__(optimizer, lambda step: lemon_lr_factor(
            start_step + step, warmup_steps, total_steps, floor, start_factor),
            last_epoch=last_epoch)


class WSDSchedule(LambdaLR):
    """``LambdaLR`` with :func:`wsd_lr_factor`: the optimizer's ``lr`` is the peak rate.

    ``warmup_steps`` of linear warmup, the peak until the last ``cooldown_steps`` steps of
    ``total_steps`` (the whole schedule), a ``(1 - sqrt)`` cooldown to ``floor`` (a
    fraction of the peak, kept past ``total_steps``); ``cooldown_steps=0``: no cooldown.
    Needs ints with ``total_steps > 0``, ``warmup_steps, cooldown_steps >= 0`` and
    ``warmup_steps + cooldown_steps <= total_steps`` (a cooldown overlapping the warmup is
    not a WSD schedule), and ``0 <= floor <= 1``; ``start_step`` and ``start_factor`` as
    for :class:`LemonSchedule`. Anything else raises ``ValueError``. All are kept as
    attributes of the same names. Call ``step()`` once per optimizer step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                 cooldown_steps: int, floor: float = 0.0, last_epoch: int = -1, *,
                 start_factor: float = 0.0, start_step: int = 0):
        _check_schedule(warmup_steps, total_steps, floor, cooldown_steps=cooldown_steps,
                        start_factor=start_factor, start_step=start_step)
        self.warmup_steps, self.total_steps, self.floor = warmup_steps, total_steps, floor
        self.cooldown_steps = cooldown_steps
        self.start_factor, self.start_step = start_factor, start_step
        super().__init__(optimizer, lambda step: wsd_lr_factor(
            start_step + step, warmup_steps, total_steps, cooldown_steps, floor,
            start_factor), last_epoch=last_epoch)

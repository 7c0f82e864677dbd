"""LEMON's schedule (lemon_fx/schedule.py): warmup to the same peak, cosine compressed into
the grown model's shorter budget, then constant at the floor."""

from __future__ import annotations

import math

import pytest
import torch

from lemon_fx.training.schedule import LemonSchedule, lemon_lr_factor

PEAK = 3e-3


def _rates(total: int, warmup: int, floor: float = 0.0, steps: int | None = None) -> list:
    """The optimizer's lr at each step, as a training loop would see it."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    schedule = LemonSchedule(optimizer, warmup_steps=warmup, total_steps=total, floor=floor)
    rates = []
    for _ in range(steps if steps is not None else total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return rates


def test_warmup_is_linear_up_to_the_peak():
    rates = _rates(total=100, warmup=10)
    expected = [PEAK * (i + 1) / 10 for i in range(10)]
    torch.testing.assert_close(rates[:10], expected, rtol=1e-12, atol=0)
    assert max(rates) == pytest.approx(PEAK, rel=1e-12)
    assert rates[9] == pytest.approx(PEAK, rel=1e-12)  # the peak is reached, not approached


def test_without_warmup_it_starts_at_the_peak():
    assert _rates(total=10, warmup=0)[0] == pytest.approx(PEAK, rel=1e-12)


def test_cosine_decays_monotonically_to_the_floor_at_total_steps():
    rates = _rates(total=100, warmup=10, floor=0.1, steps=101)
    middle = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))  # half way through the decay
    assert rates[55] == pytest.approx(PEAK * middle, rel=1e-12)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))
    assert rates[99] > PEAK * 0.1
    assert rates[100] == pytest.approx(PEAK * 0.1, rel=1e-12)


def test_the_rate_stays_at_the_floor_after_total_steps():
    rates = _rates(total=50, warmup=5, floor=0.2, steps=200)
    torch.testing.assert_close(rates[50:], [PEAK * 0.2] * 150, rtol=1e-12, atol=0)
    assert lemon_lr_factor(10**6, 5, 50, floor=0.2) == pytest.approx(0.2, rel=1e-12)


def test_the_compressed_schedule_has_the_same_peak_and_reaches_the_floor_sooner():
    """LEMON's point: the grown model keeps the from-scratch peak, but decays over 130 of
    300 steps, so it is at the floor by step 130 while from scratch is still high."""
    scratch = _rates(total=300, warmup=20, floor=0.05, steps=300)
    grown = _rates(total=130, warmup=20, floor=0.05, steps=300)
    assert max(grown) == pytest.approx(max(scratch), rel=1e-12)
    assert grown[:20] == scratch[:20]  # the same warmup
    assert grown[130] == pytest.approx(PEAK * 0.05, rel=1e-12)
    assert scratch[130] > 10 * grown[130]
    assert all(g <= s + 1e-18 for g, s in zip(grown, scratch))
    at_floor = [i for i, r in enumerate(grown) if i >= 20 and r <= PEAK * 0.05 * (1 + 1e-12)]
    assert at_floor == list(range(130, 300))
    assert min(scratch[20:]) > PEAK * 0.05  # from scratch gets there only at step 300


def test_the_scheduler_follows_the_factor_function():
    rates = _rates(total=40, warmup=7, floor=0.3, steps=45)
    expected = [PEAK * lemon_lr_factor(i, 7, 40, 0.3) for i in range(45)]
    torch.testing.assert_close(rates, expected, rtol=1e-12, atol=0)


def test_the_schedule_round_trips_through_its_state_dict():
    """What resuming a run relies on: a fresh schedule loaded mid-run continues the same."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    schedule = LemonSchedule(optimizer, warmup_steps=3, total_steps=20, floor=0.1)
    for _ in range(8):
        optimizer.step()
        schedule.step()
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    restored = LemonSchedule(other, warmup_steps=3, total_steps=20, floor=0.1)
    other.load_state_dict(optimizer.state_dict())
    restored.load_state_dict(schedule.state_dict())
    for _ in range(5):
        optimizer.step(), schedule.step(), other.step(), restored.step()
        assert other.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("kwargs", [dict(warmup_steps=5, total_steps=0),
                                    dict(warmup_steps=0, total_steps=-3),
                                    dict(warmup_steps=11, total_steps=10),
                                    dict(warmup_steps=-1, total_steps=10),
                                    dict(warmup_steps=1, total_steps=10, floor=1.5),
                                    dict(warmup_steps=1, total_steps=10, floor=-0.1),
                                    dict(warmup_steps=2.5, total_steps=5),
                                    dict(warmup_steps=0, total_steps=float("nan")),
                                    dict(warmup_steps=True, total_steps=5)])
def test_invalid_arguments_are_refused(kwargs):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="warmup_steps|total_steps|floor"):
        LemonSchedule(optimizer, **kwargs)


def test_a_warmup_that_fills_the_budget_ends_at_the_floor():
    """warmup == total left the rate at the peak on step ``total`` (1.0, then 0.0)."""
    factors = [lemon_lr_factor(step, 4, 4, floor=0.1) for step in range(6)]
    assert factors == [0.25, 0.5, 0.75, 1.0, 0.1, 0.1]

"""LEMON's schedule: warmup to the same peak, cosine compressed into the grown budget."""

import math

import pytest
import torch

import lemon_fx
from lemon_fx import LemonSchedule, lemon_lr_factor


def _rates(total: int, warmup: int, floor: float = 0.0, steps: int | None = None) -> list:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
    schedule = LemonSchedule(optimizer, warmup_steps=warmup, total_steps=total, floor=floor)
    rates = []
    for _ in range(steps or total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return rates


def test_warmup_is_linear_to_the_peak():
    rates = _rates(total=100, warmup=10)
    assert rates[:10] == pytest.approx([3e-3 * (i + 1) / 10 for i in range(10)], rel=1e-12)
    assert max(rates) == pytest.approx(3e-3, rel=1e-12)


def test_cosine_reaches_the_floor_at_total_steps_and_stays():
    rates = _rates(total=100, warmup=10, floor=0.1, steps=130)
    assert rates[55] == pytest.approx(3e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))),
                                      rel=1e-12)
    assert rates[100:] == pytest.approx([3e-4] * 30, rel=1e-12)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))


def test_the_compressed_schedule_has_the_same_peak_and_decays_sooner():
    scratch, grown = _rates(total=300, warmup=20), _rates(total=130, warmup=20)
    assert max(grown) == max(scratch)
    assert grown[129] < scratch[129] / 10


def test_the_factor_function_matches_the_scheduler():
    assert lemon_lr_factor(0, 0, 10) == 1.0
    assert lemon_lr_factor(10, 0, 10, floor=0.2) == pytest.approx(0.2)
    assert lemon_fx.lemon_lr_factor is lemon_lr_factor


@pytest.mark.parametrize("kwargs", [dict(warmup_steps=5, total_steps=0),
                                    dict(warmup_steps=11, total_steps=10),
                                    dict(warmup_steps=-1, total_steps=10),
                                    dict(warmup_steps=1, total_steps=10, floor=1.5)])
def test_invalid_arguments_are_refused(kwargs):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError):
        LemonSchedule(optimizer, **kwargs)

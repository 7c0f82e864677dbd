"""The schedules (lemon_fx/training/schedule.py). LEMON's: warmup to the same peak, cosine
compressed into the grown model's shorter budget, then constant at the floor. WSD: warmup,
constant, a (1 - sqrt) cooldown. Continuing a source's schedule at the growth point
(start_step, start_factor), per parameter group, and as TrainConfig chooses it."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from lemon_fx.training.loop import TrainConfig, build_schedule, train
from lemon_fx.training.schedule import (
    LemonSchedule,
    WSDSchedule,
    lemon_lr_factor,
    wsd_lr_factor,
)

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


# -- warmup-stable-decay ---------------------------------------------------------------------

def _run(schedule_type, *args, lr: float = PEAK, steps: int, **kwargs) -> list:
    """The lr at each of ``steps`` steps of ``schedule_type(optimizer, *args, **kwargs)``."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    schedule = schedule_type(optimizer, *args, **kwargs)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return rates


def test_wsd_warms_up_holds_the_peak_then_cools_down_as_one_minus_sqrt():
    """Warmup 10, total 100, cooldown 40 (from step 60), floor 0.1."""
    f = functools.partial(wsd_lr_factor, warmup_steps=10, total_steps=100, cooldown_steps=40,
                          floor=0.1)
    assert [f(k) for k in range(10)] == pytest.approx([(k + 1) / 10 for k in range(10)],
                                                      rel=1e-12)
    assert all(f(k) == 1.0 for k in range(9, 61))  # peak from the warmup's last step on,
    # and the cooldown's first step (60) is still at the peak
    assert f(70) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(10 / 40)), rel=1e-12)  # 0.55
    assert f(70) == pytest.approx(0.55, rel=1e-12)
    assert f(99) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(39 / 40)), rel=1e-12)
    assert f(99) > 0.1 and f(100) == 0.1 and f(10**6) == 0.1
    cooldown = [f(k) for k in range(60, 101)]
    assert all(a > b for a, b in zip(cooldown, cooldown[1:]))
    # the (1 - sqrt) shape: it drops fastest at the start of the cooldown, unlike a line
    assert cooldown[0] - cooldown[1] > 10 * (cooldown[-2] - cooldown[-1])
    assert f(80) < 0.1 + 0.9 * 0.5  # below the linear cooldown's value at the middle


def test_the_wsd_scheduler_follows_the_factor_function():
    rates = _run(WSDSchedule, 5, 40, 12, 0.2, steps=45)
    assert rates == pytest.approx([PEAK * wsd_lr_factor(k, 5, 40, 12, 0.2) for k in range(45)],
                                  rel=1e-12)
    assert rates[4] == pytest.approx(PEAK, rel=1e-12) and rates[40:] == [PEAK * 0.2] * 5


def test_without_a_cooldown_wsd_stays_at_the_peak():
    """The stable phase of a source that will be grown: no decay, also past the end."""
    assert _run(WSDSchedule, 0, 20, 0, 0.1, steps=30) == [PEAK] * 30
    assert [wsd_lr_factor(k, 3, 5, 0) for k in range(7)] == pytest.approx(
        [1 / 3, 2 / 3, 1, 1, 1, 1, 1], rel=1e-12)


def test_a_cooldown_filling_the_schedule_starts_at_the_peak():
    assert wsd_lr_factor(0, 0, 4, 4) == 1.0
    assert [wsd_lr_factor(k, 0, 4, 4) for k in range(1, 5)] == pytest.approx(
        [1 - math.sqrt(0.25), 1 - math.sqrt(0.5), 1 - math.sqrt(0.75), 0.0], rel=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(warmup_steps=0, total_steps=10, cooldown_steps=-1), "cooldown_steps"),
    (dict(warmup_steps=4, total_steps=10, cooldown_steps=7), "cannot start before the warmup"),
    (dict(warmup_steps=11, total_steps=10, cooldown_steps=0), "warmup_steps"),
    (dict(warmup_steps=0, total_steps=0, cooldown_steps=0), "total_steps > 0"),
    (dict(warmup_steps=0, total_steps=10, cooldown_steps=2.0), "an int"),
    (dict(warmup_steps=0, total_steps=10, cooldown_steps=True), "an int"),
    (dict(warmup_steps=0, total_steps=10, cooldown_steps=2, floor=1.5), "floor"),
    (dict(warmup_steps=2, total_steps=10, cooldown_steps=2, start_factor=-0.5),
     "start_factor"),
    (dict(warmup_steps=2, total_steps=10, cooldown_steps=2, start_factor=float("nan")),
     "start_factor"),
    (dict(warmup_steps=2, total_steps=10, cooldown_steps=2, start_step=10), "start_step"),
    (dict(warmup_steps=2, total_steps=10, cooldown_steps=2, start_step=-1), "start_step"),
])
def test_invalid_wsd_arguments_are_refused(kwargs, match):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=match):
        WSDSchedule(optimizer, **kwargs)


def test_lemon_schedule_refuses_a_start_step_past_its_end():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="start_step"):
        LemonSchedule(optimizer, 2, 10, start_step=10)


# -- continuing a source's schedule at the growth point ---------------------------------------

SOURCE = dict(warmup_steps=10, total_steps=1000, cooldown_steps=200)  # grown at step 300
GROWTH = 300


def test_a_grown_run_continues_at_the_rate_of_the_source_stable_phase():
    """The source trained 300 steps of a WSD schedule at rate r (stable phase); the grown
    run is a fresh WSD schedule with no warmup at peak r: its first rate is the source's
    last, and it ends with one cooldown."""
    r = 2e-3
    source = _run(WSDSchedule, lr=r, steps=GROWTH, **SOURCE)
    grown = _run(WSDSchedule, 0, 500, 100, 0.0, lr=r, steps=500)
    assert grown[0] == source[-1] == r
    assert grown[:401] == [r] * 401 and grown[401] < r
    assert grown[-1] == pytest.approx(r * (1 - math.sqrt(99 / 100)), rel=1e-12)


def test_a_ramp_from_the_source_rate_to_a_new_peak_is_a_straight_line_across_growth():
    """Ramp from r to p = 2.5 r over 50 steps (start_factor = r / p): the source's last rate,
    then 50 equal increments, the last one landing on p; then p until the cooldown."""
    r, p = 2e-3, 5e-3
    source = _run(WSDSchedule, lr=r, steps=GROWTH, **SOURCE)
    grown = _run(WSDSchedule, 50, 500, 100, lr=p, start_factor=r / p, steps=500)
    line = [source[-1]] + grown[:50]
    increments = [b - a for a, b in zip(line, line[1:])]
    assert increments == pytest.approx([(p - r) / 50] * 50, rel=1e-9)
    assert grown[49] == pytest.approx(p, rel=1e-12) and grown[50:401] == [p] * 351
    # ramping down to a lower peak is the same line, falling
    lower = _run(WSDSchedule, 4, 20, 0, lr=r / 2, start_factor=2.0, steps=5)
    assert lower == pytest.approx([r * (1 - 0.5 * k / 4) for k in range(1, 5)] + [r / 2],
                                  rel=1e-12)


@pytest.mark.parametrize("schedule_type, args", [(WSDSchedule, (10, 1000, 200, 0.1)),
                                                 (LemonSchedule, (10, 1000, 0.1))])
def test_start_step_enters_a_schedule_where_the_source_left_it(schedule_type, args):
    """The grown run continues the source's own schedule from the growth step: its rates are
    the uninterrupted schedule's (for the cosine: LEMON's ghost epochs, a lower peak)."""
    whole = _run(schedule_type, *args, steps=1000)
    continued = _run(schedule_type, *args, start_step=GROWTH, steps=1000 - GROWTH)
    assert continued == whole[GROWTH:]
    if schedule_type is LemonSchedule:  # entered part-way down the cosine
        assert continued[0] < PEAK and continued[0] < whole[GROWTH - 1]
    # entering inside the warmup finishes the same warmup
    assert _run(schedule_type, *args, start_step=4, steps=10) == whole[4:14]


def test_inherited_and_new_capacity_follow_their_own_schedules_per_group():
    """SPARKLING-style: inherited weights keep the running rate r, new ones are re-warmed
    over 250 steps to 1.3 r; both cool down together at the end."""
    r, total, cooldown = 1e-3, 1000, 200
    inherited = torch.nn.Parameter(torch.zeros(2))
    new = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [inherited], "lr": r},
                                   {"params": [new], "lr": 1.3 * r}])
    keep = functools.partial(wsd_lr_factor, warmup_steps=0, total_steps=total,
                             cooldown_steps=cooldown)
    rewarm = functools.partial(wsd_lr_factor, warmup_steps=250, total_steps=total,
                               cooldown_steps=cooldown)
    schedule = LambdaLR(optimizer, [keep, rewarm])
    rates, saved = [], None
    for step in range(total):
        if step == 500:  # a checkpoint, which stores the schedule as JSON
            saved = optimizer.state_dict(), json.loads(json.dumps(schedule.state_dict()))
        rates.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        schedule.step()
    old, fresh = zip(*rates)
    assert old[:801] == (r,) * 801
    assert fresh[:250] == pytest.approx([1.3 * r * (k + 1) / 250 for k in range(250)],
                                        rel=1e-12)
    assert fresh[249:801] == pytest.approx([1.3 * r] * 552, rel=1e-12)
    expected = [1 - math.sqrt(k / cooldown) for k in range(cooldown)]
    assert old[800:] == pytest.approx([r * e for e in expected], rel=1e-12)
    assert fresh[800:] == pytest.approx([1.3 * r * e for e in expected], rel=1e-12)

    # resumed from the step-500 checkpoint in the loop's order (schedule built, then both
    # states loaded), the per-group rates carry on exactly
    other = torch.optim.AdamW([{"params": [inherited], "lr": r},
                               {"params": [new], "lr": 1.3 * r}])
    restored = LambdaLR(other, [keep, rewarm])
    other.load_state_dict(saved[0])
    restored.load_state_dict(saved[1])
    for step in range(500, total):
        assert [g["lr"] for g in other.param_groups] == list(rates[step]), step
        other.step()
        restored.step()


# -- TrainConfig chooses the schedule ---------------------------------------------------------

def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)


def _config(**kw) -> TrainConfig:
    return TrainConfig(**{"peak_lr": PEAK, "total_steps": 40, "device": "cpu",
                          "progress": False, **kw})


def test_the_default_config_keeps_lemons_cosine():
    config = _config(warmup_steps=5, floor=0.1)
    assert (config.schedule, config.cooldown_steps, config.start_step, config.start_lr,
            config.parallel) == ("cosine", 0, 0, None, "ddp")
    schedule = build_schedule(_optimizer(), config)
    assert type(schedule) is LemonSchedule
    assert (schedule.warmup_steps, schedule.total_steps, schedule.floor,
            schedule.start_factor, schedule.start_step) == (5, 40, 0.1, 0.0, 0)


def test_the_config_builds_the_wsd_continuation_it_describes():
    """start_step 300 of a schedule warmed up over 320 steps from start_lr: the schedule is
    340 long, its cooldown the last 30 steps, its warmup ramping from start_lr / peak_lr."""
    config = _config(schedule="wsd", warmup_steps=320, cooldown_steps=20, floor=0.05,
                     start_step=300, start_lr=PEAK / 4)
    schedule = build_schedule(_optimizer(), config)
    assert type(schedule) is WSDSchedule
    assert (schedule.warmup_steps, schedule.total_steps, schedule.cooldown_steps,
            schedule.floor, schedule.start_factor, schedule.start_step) == (
        320, 340, 20, 0.05, 0.25, 300)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                               torch.nn.Linear(4, 1)).double()


def _batches(step: int):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    return x, x.sum(dim=1, keepdim=True)


def _mse(out, target):
    return ((out - target) ** 2).mean()


def test_train_logs_the_wsd_rates_and_resumes_them(tmp_path):
    """A grown run ramping from the source's rate to its peak over 4 steps, then a cooldown
    over the last 5 of 12 steps; interrupted after 6 steps (the data ran out) and resumed,
    its logged rates are the schedule's, step for step."""
    config = _config(total_steps=12, schedule="wsd", warmup_steps=4, cooldown_steps=5,
                     floor=0.1, start_lr=PEAK / 2, out_dir=tmp_path, grad_clip=None)
    expected = [PEAK * wsd_lr_factor(k, 4, 12, 5, 0.1, start_factor=0.5) for k in range(12)]
    assert expected[:4] == pytest.approx([PEAK * (0.5 + 0.5 * (k + 1) / 4) for k in range(4)],
                                         rel=1e-12)
    train(_model(), [_batches(k) for k in range(6)], _mse, config)
    result = train(_model(), _batches, _mse, config)
    assert result.start_step == 6 and result.end_step == 12
    steps = json.loads((tmp_path / "log.json").read_text())["steps"]
    assert [r["lr"] for r in steps] == pytest.approx(expected, rel=1e-12)
    assert json.loads((tmp_path / "log.json").read_text())["config"]["schedule"] == "wsd"


def test_a_cooldown_branched_off_a_stable_run_follows_the_new_schedule(tmp_path):
    """6 steps of a stable phase (no cooldown), then resumed as a 10-step run whose last 4
    steps are the cooldown: the resumed steps run at the new schedule's rates, not at the
    rate the old schedule left in the checkpoint's optimizer."""
    stable = _config(total_steps=6, schedule="wsd", warmup_steps=2, out_dir=tmp_path)
    train(_model(), _batches, _mse, stable)
    branched = _config(total_steps=10, schedule="wsd", warmup_steps=2, cooldown_steps=4,
                       floor=0.1, out_dir=tmp_path)
    result = train(_model(), _batches, _mse, branched)
    assert result.start_step == 6
    rates = [r["lr"] for r in json.loads((tmp_path / "log.json").read_text())["steps"]]
    expected = [PEAK * wsd_lr_factor(k, 2, 10, 4, 0.1) for k in range(10)]
    assert rates == pytest.approx(expected, rel=1e-12)
    assert rates[6] == PEAK and rates[7] < PEAK  # the cooldown's first step, then down

    # a lower peak for the rest of a run is honoured too (the checkpoint held the old one)
    lower = _config(total_steps=12, schedule="wsd", warmup_steps=2, cooldown_steps=4,
                    floor=0.1, out_dir=tmp_path, peak_lr=PEAK / 2)
    train(_model(), _batches, _mse, lower)
    rates = [r["lr"] for r in json.loads((tmp_path / "log.json").read_text())["steps"]]
    assert rates[10:] == pytest.approx(
        [PEAK / 2 * wsd_lr_factor(k, 2, 12, 4, 0.1) for k in (10, 11)], rel=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(schedule="linear"), "schedule is 'cosine' or 'wsd'"),
    (dict(cooldown_steps=5), "cooldown of schedule='wsd'"),
    (dict(schedule="wsd", warmup_steps=10, cooldown_steps=31), "cannot start before"),
    (dict(schedule="wsd", cooldown_steps=-1), "cooldown_steps"),
    (dict(start_step=-1), "start_step"),
    (dict(start_step=1.5), "start_step counts optimizer steps"),
    (dict(total_steps=8.0), "total_steps counts optimizer steps"),
    (dict(warmup_steps=5, start_lr=0.0), "start_lr"),
    (dict(warmup_steps=5, start_lr=float("inf")), "start_lr"),
    (dict(start_lr=PEAK / 2), "no warmup is ahead"),
    (dict(warmup_steps=5, start_step=5, start_lr=PEAK / 2), "no warmup is ahead"),
    (dict(warmup_steps=41), "warmup_steps"),
])
def test_invalid_schedule_configs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _config(**kwargs)


def test_a_warmup_longer_than_the_run_is_fine_when_the_run_enters_it_part_way():
    config = _config(warmup_steps=50, start_step=20)  # the schedule is 60 steps long
    assert build_schedule(_optimizer(), config).total_steps == 60

"""Sanity checks on the test zoo itself: every model runs, traces, and draws fresh inputs.

These tests say nothing about lemon_fx; they make sure that a failure elsewhere on a zoo model
is the library's, not the zoo's.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx
from zoo import ZOO, ZooEntry


def _build(entry: ZooEntry) -> torch.nn.Module:
    torch.manual_seed(0)
    return entry.build().double().eval()


def _inputs(entry: ZooEntry, seed: int) -> tuple:
    return entry.example_inputs(torch.Generator().manual_seed(seed))


def test_zoo_has_the_expected_families() -> None:
    assert len(ZOO) >= 13
    assert sum(entry.post_ln for entry in ZOO.values()) >= 1
    for name, entry in ZOO.items():
        assert entry.name == name


@pytest.mark.parametrize("name", sorted(ZOO))
def test_runs_in_float64_and_traces(name: str) -> None:
    entry = ZOO[name]
    model = _build(entry)
    inputs = _inputs(entry, seed=0)
    for x in inputs:
        assert x.dtype in (torch.float64, torch.int64), x.dtype

    with torch.no_grad():
        out = model(*inputs)
        assert out.dtype == torch.float64
        assert torch.isfinite(out).all()

        traced = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(traced(*inputs), out, rtol=0, atol=1e-12)
        # Inputs not used for tracing: the graph has no baked-in sizes or values.
        other = _inputs(entry, seed=1)
        torch.testing.assert_close(traced(*other), model(*other), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_construction_is_deterministic(name: str) -> None:
    entry = ZOO[name]
    a, b = _build(entry).state_dict(), _build(entry).state_dict()
    assert list(a) == list(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_generators_give_different_inputs(name: str) -> None:
    entry = ZOO[name]
    first, again, second = _inputs(entry, 0), _inputs(entry, 0), _inputs(entry, 1)
    assert len(first) == len(second)
    for x, y in zip(first, again):
        assert torch.equal(x, y)
    assert any(not torch.equal(x, y) for x, y in zip(first, second))
    for x, y in zip(first, second):
        assert x.shape == y.shape and x.dtype == y.dtype


@pytest.mark.parametrize("name", sorted(ZOO))
def test_builds_a_bigger_instance(name: str) -> None:
    entry = ZOO[name]
    torch.manual_seed(0)
    big = entry.build(dim=64, depth=3).double().eval()
    with torch.no_grad():
        out = big(*_inputs(entry, seed=0))
    assert torch.isfinite(out).all()
    small = _build(entry)
    assert sum(p.numel() for p in big.parameters()) > sum(p.numel() for p in small.parameters())

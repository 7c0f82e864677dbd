"""``lemon_fx.grow``: compose analysis, plan resolution and the rewrite passes.

This is the one place in ``lemon_fx`` that imports ``passes``: the pipeline is
trace -> analysis -> resolution -> passes (widen, deepen, cleanup) -> the caller verifies.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from lemon_fx.analysis import WidthAnalysis
from lemon_fx.depth_plan import StackGrowth, resolve_depth
from lemon_fx.errors import PlanError, Problem, TraceError
from lemon_fx.example_check import check_on_example
from lemon_fx.graph_facts import tensor_shape
from lemon_fx.groups import held_note, returned_width_notes
from lemon_fx.plan import Plan
from lemon_fx.report import analyze
from lemon_fx.resolution import Resolution, resolve_width
from lemon_fx.stacks import find_stacks
from lemon_fx.tracing import EXAMPLE_INPUTS_KEY, record_facts

__all__ = ["GrowthReport", "grow", "growth_report"]

REPORT_KEY = "lemon_fx.report"


@dataclass
class GrowthReport:
    """What ``grow`` did: the plan, each new block's source, notes, measured error."""

    plan: Plan
    new_blocks: list[Any] = field(default_factory=list)  # passes.deepen.NewBlock
    notes: list[str] = field(default_factory=list)
    # max |grown - source| on the example inputs in float64, measured when the growth is
    # exact only up to eps (Post-LN depth with allow_inexact=True)
    measured_error: float | None = None

    def __str__(self) -> str:
        lines = [f"plan: {self.plan.to_dict()}"]
        for b in self.new_blocks:
            lines.append(f"new block {b.name} <- copy of {b.source_name} (cancelling "
                         "branches)")
        lines += [f"note: {n}" for n in self.notes]
        if self.measured_error is not None:
            lines.append(f"measured error on the example inputs (float64): "
                         f"{self.measured_error:.3g}")
        return "\n".join(lines)


def growth_report(grown: torch.fx.GraphModule) -> GrowthReport:
    """The ``GrowthReport`` of a module returned by ``grow``."""
    return grown.meta[REPORT_KEY]


def _as_plan(plan: Plan | Mapping[str, Any] | float | int) -> Plan:
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, Mapping):
        return Plan.from_dict(plan)
    if isinstance(plan, (int, float)) and not isinstance(plan, bool):
        return Plan(width=plan)
    raise PlanError("grow needs a lemon_fx.Plan",
                    [Problem(reason=f"got {type(plan).__name__}",
                             fix="pass Plan(width=2.0) or a dict of Plan fields")])


def _with_facts(gm: torch.fx.GraphModule, example_inputs: Any) -> torch.fx.GraphModule:
    """``gm`` itself when it carries shapes, else a copy with shapes recorded."""
    has_facts = any(tensor_shape(n) is not None for n in gm.graph.nodes
                    if n.op == "placeholder")
    if has_facts and example_inputs is None:
        return gm
    if example_inputs is None:
        raise TraceError(
            "this GraphModule carries no shape metadata",
            [Problem(reason="it was not traced with lemon_fx.trace",
                     fix="pass example_inputs=(...) to grow, or trace with lemon_fx.trace")])
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    private = copy.deepcopy(gm)
    try:
        record_facts(private, tuple(example_inputs))
    except Exception as exc:
        raise TraceError(
            "the GraphModule failed on example_inputs",
            [Problem(reason=f"{type(exc).__name__}: {str(exc).splitlines()[0]}",
                     fix="pass the inputs forward() expects")]) from exc
    return private


def grow(
    gm: torch.fx.GraphModule,
    plan: Plan | Mapping[str, Any] | float | int,
    example_inputs: Any = None,
) -> torch.fx.GraphModule:
    """Return a NEW GraphModule computing ``gm``'s function at the plan's sizes.

    Every check (plan, unsupported ops, exactness) runs before anything is built; ``gm``
    is never modified, also when this raises.
    """
    from passes.cleanup import cleanup
    from passes.deepen import deepen
    from passes.widen import plan_edits, widen

    if not isinstance(gm, torch.fx.GraphModule):
        raise TraceError("grow needs a torch.fx.GraphModule",
                         [Problem(reason=f"got {type(gm).__name__}",
                                  fix="trace the model first: gm = lemon_fx.trace(model, "
                                  "example_inputs)")])
    plan = _as_plan(plan)
    source = _with_facts(gm, example_inputs)
    # every check first: width, then depth, then the rewrites' own refusals
    analysis = analyze(source)
    resolution = resolve_width(analysis, plan)
    growths = resolve_depth(find_stacks(source), plan)
    _check_size(analysis, resolution, growths)
    edits = plan_edits(resolution)
    # widen first, so that new blocks copy widened sources (the order that is lossless)
    private = copy.deepcopy(source)
    grown = widen(private, resolution, edits).graph_module
    _, new_blocks, notes = deepen(grown, growths, resolution)
    grown = cleanup(grown).graph_module
    report = GrowthReport(plan, new_blocks, list(notes))
    if plan.width is not None:
        report.notes += [held_note(h) for h in analysis.held]
        report.notes += returned_width_notes(analysis)
    inputs = source.meta.get(EXAMPLE_INPUTS_KEY)
    if inputs is not None:
        if notes and plan.allow_inexact:
            report.measured_error = _measured_error(source, grown, inputs)
        else:
            report.notes += check_on_example(source, grown, inputs)
        record_facts(grown, inputs)
    grown.meta[REPORT_KEY] = report
    grown.meta["lemon_fx.plan"] = plan
    return grown


# 10^12 parameters (4 TB in float32): a plan beyond it is a typo (width=1e6), and
# building it would end in an allocator error from deep inside the width pass.
MAX_PARAMETERS = 10**12


def _check_size(analysis: WidthAnalysis, resolution: Resolution,
                growths: list[StackGrowth]) -> None:
    """Refuse a plan whose grown model would have more than ``MAX_PARAMETERS``."""
    grown = {name: math.prod(resolution.grown(d) for d in dims)
             for name, dims in analysis.param_dims.items()}
    total = sum(grown.values())
    for growth in growths:
        in_stack = sum(n for name, n in grown.items()
                       if name.startswith(growth.stack.name + "."))
        total += in_stack // max(growth.stack.count, 1) * (len(growth.order)
                                                         - growth.stack.count)
    if total > MAX_PARAMETERS:
        raise PlanError("the plan does not fit this model", [Problem(
            reason=f"the grown model would have about {total:.3g} parameters",
            node="width" if analysis.param_dims else "depth",
            fix=f"check the plan's numbers: lemon_fx builds at most {MAX_PARAMETERS:.0e} "
            "parameters (an absolute size where a multiplier was meant?)")])


def _measured_error(source: torch.fx.GraphModule, grown: torch.fx.GraphModule,
                    inputs: tuple) -> float:
    cast = [x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
            for x in inputs]
    from lemon_fx.verification import flatten_outputs

    with torch.no_grad():
        want = flatten_outputs(copy.deepcopy(source).double().eval()(*cast))
        got = flatten_outputs(copy.deepcopy(grown).double().eval()(*cast))
    return max((float((g - w).abs().max()) for (_, g), (_, w) in zip(got, want)
                if isinstance(g, torch.Tensor)), default=0.0)

"""``lemon_fx.grow``: compose analysis, plan resolution and the rewrite passes.

This is the one place in ``lemon_fx`` that imports ``passes``: the pipeline is
trace -> analysis -> resolution -> passes (widen, cleanup) -> the caller verifies.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx

from lemon_fx.errors import PlanError, Problem, TraceError
from lemon_fx.graph_facts import tensor_shape
from lemon_fx.plan import Plan
from lemon_fx.report import analyze
from lemon_fx.resolution import resolve_width
from lemon_fx.tracing import EXAMPLE_INPUTS_KEY, record_facts

__all__ = ["grow"]


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
    from passes.widen import plan_edits, widen

    if not isinstance(gm, torch.fx.GraphModule):
        raise TraceError("grow needs a torch.fx.GraphModule",
                         [Problem(reason=f"got {type(gm).__name__}",
                                  fix="trace the model first: gm = lemon_fx.trace(model, "
                                  "example_inputs)")])
    plan = _as_plan(plan)
    if plan.depth is not None:
        raise PlanError("depth growth is not available yet",
                        [Problem(reason="this version of lemon_fx grows width only",
                                 node="depth", fix="leave depth=None")])
    source = _with_facts(gm, example_inputs)
    analysis = analyze(source)
    resolution = resolve_width(analysis, plan)
    edits = plan_edits(resolution)
    private = copy.deepcopy(source)
    result = widen(private, resolution, edits)
    result = cleanup(result.graph_module)
    grown = result.graph_module
    inputs = source.meta.get(EXAMPLE_INPUTS_KEY)
    if inputs is not None:
        record_facts(grown, inputs)
    grown.meta["lemon_fx.plan"] = plan
    return grown

"""The composition module: ``trace``, ``inspect``, ``grow`` and ``register``.

This is the one core module that imports ``passes``: it hands the default rule table
(``passes.rules``) to tracing (which modules stay whole), to the analyses and to depth,
so no floor below fetches it. The pipeline is trace -> analysis -> resolution -> passes
(widen, deepen, cleanup) -> the last guard (``verification.guard``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from lemon_fx.analysis.groups import held_note, returned_width_notes
from lemon_fx.analysis.report import InspectReport, analyze, inspect_graph
from lemon_fx.analysis.rule import Rule
from lemon_fx.analysis.stacks import find_stacks
from lemon_fx.analysis.width import WidthAnalysis
from lemon_fx.errors import PlanError, Problem, TraceError, first_line
from lemon_fx.plan import Plan
from lemon_fx.resolution.depth import StackGrowth, resolve_depth
from lemon_fx.resolution.width import Resolution, resolve_width
from lemon_fx.tracing.frontend import trace as trace_model
from lemon_fx.tracing.graph_facts import (
    example_inputs as example_inputs_of,
)
from lemon_fx.tracing.graph_facts import (
    growth_of,
    record_facts,
    set_growth,
    tensor_shape,
)
from lemon_fx.verification.compare import flatten_outputs
from lemon_fx.verification.guard import check_on_example
from passes.cleanup import cleanup
from passes.deepen import deepen
from passes.rules import default_registry
from passes.widen import plan_edits, widen

__all__ = ["GrowthReport", "grow", "growth_report", "inspect", "register", "trace"]


@dataclass
class GrowthReport:
    """What ``grow`` did: the plan, each new block's source, notes, measured error.

    ``growth_report(big)`` returns it for a module ``grow`` returned; ``str(report)`` is a
    readable summary. ``plan``: the ``Plan`` that was grown. ``new_blocks``: one
    ``passes.deepen.NewBlock`` per inserted block (its ``name`` and the ``source_name`` of
    the block it copies). ``notes``: what the user should know and no error covers
    (Post-LN new blocks exact only up to eps, widths kept at their size and why, outputs
    not checked on the example inputs). ``measured_error``: ``max |grown - source|`` in
    float64 on the example inputs, measured only when the growth is exact up to eps alone
    (Post-LN depth with ``Plan(allow_inexact=True)``); else None.
    """

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
    return growth_of(grown)


def trace(
    model: nn.Module,
    example_inputs: Any,
    example_kwargs: dict[str, Any] | None = None,
    *,
    leaf_modules: Iterable[type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
    frontend: str = "auto",
) -> torch.fx.GraphModule:
    """Trace ``model`` into a GraphModule with shape facts on every node.

    The model is deep-copied first, so tracing and the shape run never touch the user's
    module (a BatchNorm in train mode would otherwise update its running stats). Modules
    with a registered rule (built in or ``lemon_fx.register``-ed) stay single
    ``call_module`` nodes, as do ``leaf_modules``; ``concrete_args`` pins Python-level
    arguments, as in ``torch.fx.symbolic_trace``. ``frontend``: ``"fx"`` (symbolic_trace),
    ``"export"`` (torch.export, ATen ops) or ``"auto"`` (fx, and export when fx fails,
    e.g. for Hugging Face models). Raises ``TraceError`` naming the failing line.
    """
    return trace_model(model, example_inputs, example_kwargs, leaf_modules=leaf_modules,
                       concrete_args=concrete_args, frontend=frontend,
                       keep_whole=default_registry().has_module_rule)


def inspect(gm: torch.fx.GraphModule) -> InspectReport:
    """Analyze ``gm`` without changing it: width groups, roles, forms, block stacks and
    what blocks each group, as an ``InspectReport``."""
    return inspect_graph(gm, default_registry())


def register(*ops: Any, replace: bool = False) -> Callable[[type[Rule]], type[Rule]]:
    """Class decorator: register a ``Rule`` subclass for user modules or functions.

    >>> @lemon_fx.register(MyScale)
    ... class MyScaleRule(lemon_fx.Rule):
    ...     def analyze(self, node, ctx): ...

    ``ops`` are module classes, functions or ``Tensor`` method names. An op that already
    has a rule raises ValueError unless ``replace=True``. A module with a rule is kept
    whole by ``trace``, so register before tracing.
    """

    def decorate(cls: type[Rule]) -> type[Rule]:
        default_registry().add(cls(), ops, replace=replace)
        return cls

    return decorate


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
            [Problem(reason=first_line(exc),
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
    if not isinstance(gm, torch.fx.GraphModule):
        raise TraceError("grow needs a torch.fx.GraphModule",
                         [Problem(reason=f"got {type(gm).__name__}",
                                  fix="trace the model first: gm = lemon_fx.trace(model, "
                                  "example_inputs)")])
    plan = _as_plan(plan)
    source = _with_facts(gm, example_inputs)
    # every check first: width, then depth, then the rewrites' own refusals
    registry = default_registry()
    analysis = analyze(source, registry)
    resolution = resolve_width(analysis, plan)
    growths = resolve_depth(find_stacks(source, registry), plan)
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
    inputs = example_inputs_of(source)
    if inputs is not None:
        if notes and plan.allow_inexact:
            report.measured_error = _measured_error(source, grown, inputs)
        else:
            report.notes += check_on_example(source, grown, inputs)
        record_facts(grown, inputs)
    set_growth(grown, report, plan)
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
    with torch.no_grad():
        want = flatten_outputs(copy.deepcopy(source).double().eval()(*cast))
        got = flatten_outputs(copy.deepcopy(grown).double().eval()(*cast))
    return max((float((g - w).abs().max()) for (_, g), (_, w) in zip(got, want)
                if isinstance(g, torch.Tensor)), default=0.0)

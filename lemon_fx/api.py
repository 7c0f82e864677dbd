"""The composition module: ``trace``, ``inspect``, ``grow`` and ``register``.

This is the one core module that imports ``passes``: it hands the default rule table
(``passes.rules``) to tracing (which modules stay whole), to the analyses and to depth,
so no floor below fetches it. The pipeline is trace -> analysis -> resolution -> passes
(widen, deepen, cleanup) -> the last guard (``verification.guard``).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import warnings
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
from lemon_fx.recipe.recipe import GrowthRecipe, TensorRecipe
from lemon_fx.resolution.depth import StackGrowth, kept_depth_notes, resolve_depth
from lemon_fx.resolution.width import Resolution, grown_outputs, resolve_width
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
from passes.widen import plan_edits, tie_aliases, widen

__all__ = ["GrowthReport", "PlannedGrowth", "grow", "growth_report", "inspect", "plan_growth",
           "plan_in_detail", "register", "trace"]


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


@dataclass
class PlannedGrowth:
    """Everything ``grow`` decides before a single weight is made: the source graph (with
    facts), its width analysis and resolution (every group's grown size), each stack's
    growth (block orders), the grown structure (tensors on meta), the recipe, the new
    blocks and the report's notes. ``plan_in_detail`` returns it for tools that rewrite a
    model's configuration (``lemon_fx.hub``)."""

    source: torch.fx.GraphModule
    analysis: WidthAnalysis
    resolution: Resolution
    growths: list[StackGrowth]
    structure: torch.fx.GraphModule  # the grown graph and modules, tensors on meta
    recipe: GrowthRecipe
    new_blocks: list[Any]
    notes: list[str]  # depth's (Post-LN blocks exact up to eps)
    output_notes: list[str]  # each grown output (grow_outputs=True)
    # stacks a bare depth left at their depth (warned), blocks a grown stack kept
    depth_left_notes: list[str] = field(default_factory=list)
    depth_kept_notes: list[str] = field(default_factory=list)


def _weightless_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A deep copy of ``gm`` whose state_dict tensors are empty meta tensors: the grown
    model's structure is built on it without copying a weight (tied tensors stay tied;
    tensors outside the state_dict, such as non-persistent buffers, are copied)."""
    memo: dict[int, Any] = {}
    for tensor in gm.state_dict(keep_vars=True).values():
        if id(tensor) in memo:
            continue
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = (nn.Parameter(empty, requires_grad=tensor.requires_grad)
                            if isinstance(tensor, nn.Parameter) else empty)
    return copy.deepcopy(gm, memo)


def _identity_recipes(gm: torch.fx.GraphModule) -> dict[str, TensorRecipe]:
    return {name: TensorRecipe(name, tuple(t.shape), t.dtype)
            for name, t in gm.state_dict(keep_vars=True).items()}


def _final_recipe(structure: torch.fx.GraphModule, made_of: dict[str, TensorRecipe],
                  plan: Plan) -> GrowthRecipe:
    """The recipe in the grown state_dict's order; a name that shares its tensor with an
    earlier one (tied weights) is an alias of it."""
    tensors: dict[str, TensorRecipe] = {}
    aliases: dict[str, str] = {}
    first_of: dict[int, str] = {}
    for name, tensor in structure.state_dict(keep_vars=True).items():
        if id(tensor) in first_of:
            aliases[name] = first_of[id(tensor)]
            continue
        first_of[id(tensor)] = name
        tensors[name] = made_of[name]
    return GrowthRecipe(tensors, aliases, seed=plan.seed, noise_scale=plan.noise_scale)


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic garbage collector paused, as it was before afterwards.

    Planning copies a graph's thousands of nodes and their metadata; each copy can set
    off a full collection over every object the process holds (a model, its trace),
    measured at 0.2 s of a 2 s growth of GPT-2 small. Tensors are freed by their
    reference counts either way; the cycles planning leaves are collected afterwards."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def plan_in_detail(gm: torch.fx.GraphModule, plan: Plan | Mapping[str, Any] | float | int,
                   example_inputs: Any = None) -> PlannedGrowth:
    """``plan_growth`` with everything decided on the way (see ``PlannedGrowth``)."""
    with _collector_paused():
        return _plan_in_detail(gm, plan, example_inputs)


def _plan_in_detail(gm: torch.fx.GraphModule, plan: Plan | Mapping[str, Any] | float | int,
                    example_inputs: Any = None) -> PlannedGrowth:
    if not isinstance(gm, torch.fx.GraphModule):
        raise TraceError("grow needs a torch.fx.GraphModule",
                         [Problem(reason=f"got {type(gm).__name__}",
                                  fix="trace the model first: gm = lemon_fx.trace(model, "
                                  "example_inputs)")])
    plan = _as_plan(plan)
    source = _with_facts(gm, example_inputs)
    # every check first: width, then depth, then the rewrites' own refusals
    registry = default_registry()
    analysis = analyze(source, registry, fix_outputs=not plan.grow_outputs)
    resolution = resolve_width(analysis, plan)
    stacks = find_stacks(source, registry)
    growths = resolve_depth(stacks, plan)
    _check_size(analysis, resolution, growths)
    edits = plan_edits(resolution)
    # widen first, so that new blocks copy widened sources (the order that is lossless)
    structure = _weightless_copy(source)
    made_of = _identity_recipes(source)
    widened, width_made = widen(structure, resolution, edits)
    for alias, name in analysis.aliases.items():
        if name in width_made:
            made_of[alias] = width_made[name]
    made_of.update(width_made)
    _, new_blocks, notes = deepen(widened.graph_module, growths, resolution, made_of)
    structure = cleanup(widened.graph_module).graph_module
    recipe = _final_recipe(structure, made_of, plan)
    output_notes = [
        f"output '{name}' axis {axis} grows {size} -> {grown}: its first {size} entries are "
        "the source's output" for name, axis, size, grown in grown_outputs(resolution)]
    return PlannedGrowth(source, analysis, resolution, growths, structure, recipe, new_blocks,
                         list(notes), output_notes, *kept_depth_notes(stacks, growths, plan))


def warn_what_a_bare_plan_left(planned: PlannedGrowth, plan: Plan, stacklevel: int = 2
                               ) -> None:
    """Warn (``warnings.warn``) about what a bare number left at its size: it asked for
    every width group (``Plan(width=2.0)``) or every block stack (``Plan(depth=2.0)``), so
    a group kept at its size (the model returns it) or a stack kept at its depth (nothing
    in it can be copied) is news. A mapping named what grows: nothing to warn about."""
    notes = []
    if isinstance(plan.width, (int, float)):
        notes += returned_width_notes(planned.analysis)
    notes += planned.depth_left_notes
    for note in notes:
        warnings.warn(f"lemon_fx: {note}", stacklevel=stacklevel)


def plan_growth(gm: torch.fx.GraphModule, plan: Plan | Mapping[str, Any] | float | int,
                example_inputs: Any = None) -> GrowthRecipe:
    """What ``grow(gm, plan)`` makes of every tensor, as a ``GrowthRecipe``; reads no
    weight values (``gm`` may live on the meta device).

    ``recipe.apply(gm.state_dict())`` equals ``grow(gm, plan).state_dict()`` bit for bit;
    ``recipe.apply_safetensors(src, out_dir)`` grows a checkpoint on disk. Every check
    ``grow`` makes before building anything runs here too, with the same errors.
    """
    return plan_in_detail(gm, plan, example_inputs).recipe


def grow(
    gm: torch.fx.GraphModule,
    plan: Plan | Mapping[str, Any] | float | int,
    example_inputs: Any = None,
) -> torch.fx.GraphModule:
    """Return a NEW GraphModule computing ``gm``'s function at the plan's sizes.

    Every check (plan, unsupported ops, exactness) runs before anything is built; ``gm``
    is never modified, also when this raises. It is ``plan_growth`` (the graph edits and
    the recipe), the recipe applied to ``gm``'s state_dict, and the last guard.
    """
    with _collector_paused():
        return _grow(gm, plan, example_inputs)


def _grow(gm: torch.fx.GraphModule, plan: Plan | Mapping[str, Any] | float | int,
          example_inputs: Any) -> torch.fx.GraphModule:
    planned = plan_in_detail(gm, plan, example_inputs)
    source, grown, plan = planned.source, planned.structure, _as_plan(plan)
    if any(t.is_meta for t in source.state_dict().values()):
        raise PlanError("grow needs the source's weights", [Problem(
            reason="the traced model's tensors are on the meta device",
            fix="use lemon_fx.plan_growth(gm, plan) to plan without weights, then "
                "recipe.apply(state_dict) or recipe.apply_safetensors(checkpoint, out_dir)")])
    state = planned.recipe.apply(source.state_dict())
    grown.load_state_dict(state, strict=True, assign=True)
    tie_aliases(grown, planned.recipe.aliases)  # loading gave each name its own tensor
    report = GrowthReport(plan, planned.new_blocks, planned.notes + planned.output_notes)
    if plan.width is not None:
        report.notes += [held_note(h) for h in planned.analysis.held]
        report.notes += returned_width_notes(planned.analysis)
    report.notes += planned.depth_left_notes + planned.depth_kept_notes
    warn_what_a_bare_plan_left(planned, plan, stacklevel=4)
    inputs = example_inputs_of(source)
    if inputs is not None:
        if planned.notes and plan.allow_inexact:
            report.measured_error = _measured_error(source, grown, inputs)
            record_facts(grown, inputs)
        else:  # the guard's run of the grown model records its shapes too
            report.notes += check_on_example(source, grown, inputs,
                                             leading=plan.grow_outputs, record_grown=True)
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

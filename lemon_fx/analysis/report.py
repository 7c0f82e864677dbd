"""What ``lemon_fx.inspect`` shows: a dry run's width groups, block stacks and held widths.

``inspect_graph(gm, registry)`` is the analysis behind it; the api passes the registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx

from lemon_fx.analysis.groups import HeldWidth, WidthGroup, build_groups, held_note
from lemon_fx.analysis.registry import Registry
from lemon_fx.analysis.stacks import BlockStack, find_stacks
from lemon_fx.analysis.width import WidthAnalysis, analyze_width
from lemon_fx.axes.vocabulary import HEAD_DIM
from lemon_fx.errors import Problem, TraceError
from lemon_fx.tracing.graph_facts import tensor_shape

__all__ = ["InspectReport", "analyze", "inspect_graph"]


@dataclass
class InspectReport:
    """The result of ``lemon_fx.inspect``: what a plan can grow, before growing anything.

    ``groups``: the width groups (``WidthGroup``), each one size a plan may change;
    ``stacks``: the block stacks (``BlockStack``) a depth plan may lengthen;
    ``parameters``: the source's parameter count; ``held``: layer widths the analysis
    keeps at their size, with the op and the reason; ``analysis``: the full width
    analysis, for tools. ``str(report)`` is a table; ``to_dict()`` is plain JSON data;
    ``group(name)`` finds one group.
    """

    groups: list[WidthGroup]
    stacks: list[BlockStack]
    parameters: int
    analysis: WidthAnalysis | None = field(default=None, repr=False)
    # layer widths the analysis keeps at their size, with the op and the reason
    held: list[HeldWidth] = field(default_factory=list)

    def group(self, name: str) -> WidthGroup:
        """The group named ``name``; ``KeyError`` listing the names when there is none."""
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no group {name!r}; groups: {[g.name for g in self.groups]}")

    def __str__(self) -> str:
        rows = [("group", "role", "size", "form", "params", "growth")]
        for g in self.groups:
            growth = "blocked" if g.blocked_by else ("whole multiples" if
                                                     g.whole_multiples_only or g.form ==
                                                     "conflict" else "any")
            rows.append((g.name, g.role, str(g.size), g.form, str(len(g.members)), growth))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        out = [f"width groups ({len(self.groups)}), {self.parameters:,} parameters", *lines]
        for g in self.groups:
            if g.role == HEAD_DIM:
                continue  # LEMON keeps head_dim; the reason is always the attention scale
            for why in g.blocked_by[:3]:
                out.append(f"  {g.name} blocked by {why}")
        out += [f"  {held_note(h)}" for h in self.held]
        if self.stacks:
            out.append("")
            out.append("block stacks")
            for s in self.stacks:
                out.append(f"  {s.name}: {s.count} x {s.kind}")
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data: parameters, groups, stacks and held widths (no analysis)."""
        return {
            "parameters": self.parameters,
            "groups": [
                {"name": g.name, "size": g.size, "role": g.role, "form": g.form,
                 "members": list(g.members), "blocked_by": list(g.blocked_by)}
                for g in self.groups
            ],
            "stacks": [{"name": s.name, "count": s.count, "kind": s.kind} for s in self.stacks],
            "held": [{"members": list(h.members), "node": h.problem.node, "op": h.problem.op,
                      "reason": h.problem.reason, "fix": h.problem.fix} for h in self.held],
        }


def _require_facts(gm: torch.fx.GraphModule) -> None:
    if not any(tensor_shape(n) is not None for n in gm.graph.nodes if n.op == "placeholder"):
        raise TraceError(
            "this GraphModule carries no shape metadata",
            [Problem(reason="nodes have no tensor_meta (plain torch.fx.symbolic_trace)",
                     fix="trace with lemon_fx.trace(model, example_inputs), or pass "
                     "example_inputs to lemon_fx.grow")])


def analyze(gm: torch.fx.GraphModule, registry: Registry, *,
            fix_outputs: bool = True) -> WidthAnalysis:
    """The width analysis of ``gm`` with its groups built; TraceError without facts.
    ``fix_outputs=False`` lets widths reach the model's outputs (``grow_outputs``)."""
    _require_facts(gm)
    analysis = analyze_width(gm, registry, fix_outputs=fix_outputs)
    build_groups(analysis)
    return analysis


def inspect_graph(gm: torch.fx.GraphModule, registry: Registry) -> InspectReport:
    """Analyze ``gm`` without changing it: groups, roles, forms, stacks, blockers."""
    analysis = analyze(gm, registry)
    return InspectReport(
        groups=analysis.groups,
        stacks=find_stacks(gm, registry),
        parameters=sum(p.numel() for p in gm.parameters()),
        analysis=analysis,
        held=analysis.held,
    )

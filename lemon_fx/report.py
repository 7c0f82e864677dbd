"""``lemon_fx.inspect``: a dry run that shows the width groups and block stacks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx

from lemon_fx.analysis import WidthAnalysis, analyze_width
from lemon_fx.errors import Problem, TraceError
from lemon_fx.graph_facts import tensor_shape
from lemon_fx.groups import HeldWidth, WidthGroup, build_groups, held_note
from lemon_fx.stacks import BlockStack, find_stacks

__all__ = ["InspectReport", "inspect", "analyze"]


@dataclass
class InspectReport:
    groups: list[WidthGroup]
    stacks: list[BlockStack]
    parameters: int
    analysis: WidthAnalysis | None = field(default=None, repr=False)
    # layer widths the analysis keeps at their size, with the op and the reason
    held: list[HeldWidth] = field(default_factory=list)

    def group(self, name: str) -> WidthGroup:
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
            if g.role == "head_dim":
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


def analyze(gm: torch.fx.GraphModule) -> WidthAnalysis:
    _require_facts(gm)
    analysis = analyze_width(gm)
    build_groups(analysis)
    return analysis


def inspect(gm: torch.fx.GraphModule) -> InspectReport:
    """Analyze ``gm`` without changing it: groups, roles, forms, stacks, blockers."""
    analysis = analyze(gm)
    return InspectReport(
        groups=analysis.groups,
        stacks=find_stacks(gm),
        parameters=sum(p.numel() for p in gm.parameters()),
        analysis=analysis,
        held=analysis.held,
    )

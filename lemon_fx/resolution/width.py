"""Plan resolution: from a ``Plan`` and a ``WidthAnalysis`` to a target size per leaf.

Resolution is where every "no" is said, before anything is built: unknown selectors and
shrinking (``PlanError``), growth through ops without a rule (``UnsupportedOpError``), and
growth with no exact answer (``NotLosslessError``: conflicting LEMON forms at a
non-multiple width, a blocked axis, an unclaimed parameter). All problems of one kind are
raised together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lemon_fx.analysis.groups import WidthGroup
from lemon_fx.analysis.width import AxisUse, Slot, WidthAnalysis, matches
from lemon_fx.axes.expansion import AxisGrowth, LeafGrowth
from lemon_fx.axes.vocabulary import CIRC, FORMS, HEAD_DIM, ONLY_CIRC, ROLES, Form
from lemon_fx.errors import NotLosslessError, PlanError, Problem, UnsupportedOpError
from lemon_fx.plan import Plan

__all__ = ["Resolution", "resolve_width"]



@dataclass
class Resolution:
    """A plan resolved against a model: the target size of every leaf and the form of
    every value axis. ``resolve_width`` returns one only when every check has passed.

    ``analysis``: the ``WidthAnalysis`` it resolves; ``plan``: the ``Plan``;
    ``targets``: leaf root -> grown size (a leaf not listed keeps its size); ``forms``:
    the chosen form (``"circ"``, ``"avg"``, ``"zero"``) of each form class, by its root
    slot. The methods answer the rewrite and the passes: sizes (``target``, ``grown``,
    ``grows``, ``grown_shape``, ``is_dynamic``), forms (``form``) and layouts
    (``axis_growth``, ``slot_growth``, ``leaf_growth``).
    """

    analysis: WidthAnalysis
    plan: Plan
    targets: dict[int, int]
    forms: dict[Slot, str] = field(default_factory=dict)

    # -- sizes -------------------------------------------------------------------------
    def target(self, leaf: int) -> int:
        """The grown size of one leaf."""
        root = self.analysis.dims.find(leaf)
        return self.targets.get(root, self.analysis.dims.size(root))

    def grown(self, dim: int) -> int:
        """The grown size of any dim: its leaves' targets, multiplied or added up."""
        tree = self.analysis.dims.tree(dim)
        return self._grown_tree(tree)

    def _grown_tree(self, tree) -> int:
        if isinstance(tree, int):
            return self.target(tree)
        kind, children = tree
        sizes = [self._grown_tree(c) for c in children]
        return math.prod(sizes) if kind == "prod" else sum(sizes)

    def non_multiple(self, leaf: int) -> bool:
        """Whether ``leaf`` grows by a non-multiple (``r != 0``); an empty axis never does
        (Phi-3's ``q[..., rotary_dim:]`` with full rotary is one)."""
        size = self.analysis.dims.size(leaf)
        return size != 0 and self.target(leaf) % size != 0

    def grows(self, dim: int) -> bool:
        """Whether any leaf of ``dim`` changes size."""
        return any(self.target(leaf) != self.analysis.dims.size(leaf)
                   for leaf in self.analysis.dims.leaves(dim))

    def grown_shape(self, value) -> tuple[int, ...]:
        """The grown shape of a value (a node, or ``(node, i)``)."""
        return tuple(self.grown(d) for d in self.analysis.value_dims[value])

    # -- forms -------------------------------------------------------------------------
    def form(self, slot: Slot | None) -> str:
        """The chosen form of a value axis; ``None`` stands for a rule-internal axis
        (the heads inside ``nn.MultiheadAttention``), which is always circ."""
        if slot is None:
            return CIRC
        return self.forms.get(self.analysis.form_root(slot), CIRC)

    def is_dynamic(self, dim: int) -> bool:
        """Whether the axis' size follows a model input's size (batch, sequence)."""
        return any(self.analysis.dims.find(leaf) in self.analysis.input_leaves
                   for leaf in self.analysis.dims.leaves(dim))

    def axis_growth(self, dim: int, form: str) -> AxisGrowth:
        """The expansion layout of ``dim`` with every growing leaf in ``form``."""
        return self._layout(self.analysis.dims.tree(dim), form)

    def _layout(self, tree, form: str) -> AxisGrowth:
        if isinstance(tree, int):
            source = self.analysis.dims.size(tree)
            return LeafGrowth(source, self.target(tree), form)
        kind, children = tree
        return (kind, [self._layout(c, form) for c in children])

    def slot_growth(self, slot: Slot) -> AxisGrowth:
        """The layout of a value axis, every leaf in the axis' chosen form."""
        value, axis = slot
        return self.axis_growth(self.analysis.value_dims[value][axis], self.form(slot))

    def leaf_growth(self, dim: int, form: Form = CIRC) -> LeafGrowth:
        """The growth of a dim that must be a single leaf (norms' normalized axis)."""
        leaves = self.analysis.dims.leaves(dim)
        size = self.analysis.dims.size(dim)
        if len(leaves) != 1:
            return LeafGrowth(size, self.grown(dim), form)
        return LeafGrowth(size, self.target(leaves[0]), form)


def _selected(groups: list[WidthGroup], selector: str) -> list[WidthGroup]:
    if selector.startswith("@"):
        return [g for g in groups if g.role == selector[1:]]
    return [g for g in groups if matches(selector, g.name)]


def _target_for(group: WidthGroup, value: float | int) -> int:
    if isinstance(value, float):
        return int(round(group.size * value))
    return int(value)


def _fixed_examples(analysis: WidthAnalysis, count: int = 3) -> str:
    """A few reasons axes were fixed, those made by ops before the model's inputs/outputs:
    "every axis is an input or output" is rarely the whole story (``y @ y.T``, a Falcon
    ``weight.T`` without a rule)."""
    blocked = sorted({f"{b.problem.reason} (at '{b.problem.node}')"
                      for b in analysis.blockers})
    reasons = set(analysis.dims.fixed_leaves().values())
    by_ops = sorted(r for r in reasons if "of model input" not in r
                    and "of model output" not in r)
    ends = sorted(reasons - set(by_ops))
    return "; ".join((blocked + by_ops + ends)[:count]) or "an input or output axis"


def resolve_width(analysis: WidthAnalysis, plan: Plan) -> Resolution:
    groups = analysis.groups
    targets: dict[int, int] = {}
    problems: list[Problem] = []
    width = plan.width
    if width is None:
        pass
    elif isinstance(width, dict):
        names = ", ".join(g.name for g in groups) or "(none)"
        for selector, value in width.items():
            if selector.startswith("@") and selector[1:] not in ROLES:
                problems.append(Problem(
                    reason=f"unknown role selector {selector!r}", node=f"width[{selector!r}]",
                    fix=f"use one of {', '.join('@' + r for r in ROLES)} or a group name "
                    f"glob; the groups are: {names}"))
                continue
            chosen = _selected(groups, selector)
            if not chosen and not selector.startswith("@"):
                problems.append(Problem(
                    reason=f"selector {selector!r} matches no width group",
                    node=f"width[{selector!r}]",
                    fix=f"use a group name or glob; the groups are: {names}"))
            for g in chosen:
                targets[g.leaf] = _target_for(g, value)
        # a role selector may name a role this model lacks (one plan for many models),
        # but a plan whose every selector misses would hand back the same model
        if width and not problems and not targets:
            roles = ", ".join(sorted({"@" + g.role for g in groups})) or "(none)"
            problems.append(Problem(
                reason=f"the width plan grows nothing: {', '.join(map(repr, width))} match "
                "no width group of this model", node="width",
                fix=f"use a role this model has ({roles}) or a group name; the groups are: "
                f"{names}"))
    else:  # a bare number scales, int or float
        for g in groups:
            if g.role != HEAD_DIM:
                targets[g.leaf] = _target_for(g, float(width))
        if float(width) != 1.0 and not any(g.role != HEAD_DIM for g in groups):
            problems += [Problem(reason=f"nothing can grow: {h.problem.reason} "
                                 f"({', '.join(h.members)})", fix=h.problem.fix,
                                 node=h.problem.node, op=h.problem.op,
                                 source=h.problem.source) for h in analysis.held]
            if not problems:
                problems.append(Problem(
                    reason="this model has no growable width group: every axis is kept at "
                    f"its size, for example as {_fixed_examples(analysis)}", node="width",
                    fix="check lemon_fx.inspect(gm); grow depth only"))
    for g in groups:
        t = targets.get(g.leaf, g.size)
        if t < g.size:
            problems.append(Problem(
                reason=f"group {g.name!r} would shrink from {g.size} to {t}",
                node=g.name, fix="lemon_fx only grows: use a target >= the current size"))
    if problems:
        raise PlanError("the plan does not fit this model", problems)
    resolution = Resolution(analysis, plan, {k: v for k, v in targets.items()})
    _check_ties(resolution)
    # one error lists every problem: unsupported ops first decide the type
    unsupported, inexact = _check_blockers(resolution)
    conflicts, every_conflict = _solve_forms(resolution)
    rest = _check_claims(resolution) + _check_grown_outputs(resolution)
    details = unsupported + inexact + every_conflict + rest
    inexact += conflicts + rest
    if unsupported:
        raise UnsupportedOpError("growing this model needs ops lemon_fx has no rule for",
                                 unsupported + inexact, details)
    if inexact:
        raise NotLosslessError("this growth has no exact answer", inexact, details)
    return resolution


def _source_first(layout: AxisGrowth, grows) -> bool:
    """Whether the first ``S`` entries of an axis of this layout are the source's: a leaf
    (every form starts with a tile of ``x``), a product whose inner leaves keep their
    size, a concatenation in which only the last part grows."""
    if isinstance(layout, LeafGrowth):
        return True
    kind, children = layout
    if kind == "prod":
        return all(not grows(c) for c in children[1:]) and _source_first(children[0], grows)
    return all(not grows(c) for c in children[:-1]) and _source_first(children[-1], grows)


def grown_outputs(res: Resolution) -> list[tuple[str, int, int, int]]:
    """(output name, axis, source size, grown size) of every output axis that grows."""
    return [(name, axis, res.analysis.dims.size(d), res.grown(d))
            for name, axis, d in res.analysis.output_axes if res.grows(d)]


def _check_grown_outputs(res: Resolution) -> list[Problem]:
    def grows(layout: AxisGrowth) -> bool:
        if isinstance(layout, LeafGrowth):
            return not layout.identity
        return any(grows(c) for c in layout[1])

    problems = []
    for name, axis, d in res.analysis.output_axes:
        if res.grows(d) and not _source_first(res.axis_growth(d, CIRC), grows):
            problems.append(Problem(
                reason=f"axis {axis} of model output '{name}' would grow, but its first "
                f"{res.analysis.dims.size(d)} entries would not be the source's (an inner "
                "factor or an earlier part of a concatenation grows)", node=name,
                fix="keep that width fixed in the plan, or grow_outputs=False"))
    return problems


def _check_ties(res: Resolution) -> None:
    problems = []
    for dim, parts, problem in res.analysis.ties:
        want = math.prod(res.grown(p) for p in parts)
        if res.grown(dim) != want:
            problems.append(Problem(
                reason=f"{problem.reason}: width {res.grown(dim)} but the parts give {want}",
                fix=problem.fix, node=problem.node, op=problem.op, source=problem.source))
    if problems:
        raise PlanError("the plan breaks a size constraint of the model", problems)


def _check_blockers(res: Resolution) -> tuple[list[Problem], list[Problem]]:
    unsupported, inexact = [], []
    dims = res.analysis.dims
    seen = set()
    for b in res.analysis.blockers:
        growing = [leaf for leaf in dims.leaves(b.dim) if res.target(leaf) != dims.size(leaf)]
        if not growing:
            continue
        if b.whole_multiples_ok and not any(res.non_multiple(leaf) for leaf in growing):
            continue
        key = (b.problem.node, b.problem.reason)
        if key in seen:
            continue
        seen.add(key)
        (unsupported if b.kind == "unsupported" else inexact).append(b.problem)
    return unsupported, inexact


def _solve_forms(res: Resolution) -> tuple[list[Problem], list[Problem]]:
    """Pick each form class' form: circ, else avg, else zero, among what its ops allow.

    A class only needs a choice when one of its axes grows by a non-multiple (``r != 0``):
    for whole multiples all three forms are the same tiling. A class with no form left
    is one problem (its width group, each distinct need with how many nodes have it and
    the first one); the second list has one problem per node, for ``details``.
    """
    a = res.analysis
    conflicts: list[tuple[set[int], list[Problem]]] = []
    every: list[Problem] = []
    for root, members in a.form_classes_index().items():
        allowed, reasons = a.allowed_forms(root, lambda slot: any(
            res.non_multiple(leaf) for leaf in a.slot_leaves(slot)))
        growing = {leaf for slot in members for leaf in a.slot_leaves(slot)
                   if res.non_multiple(leaf)}
        composite = any(any(res.non_multiple(leaf) for leaf in a.slot_leaves(s))
                        and len(a.slot_leaves(s)) > 1 for s in members)
        if composite:
            allowed &= ONLY_CIRC
        chosen = next((f for f in FORMS if f in allowed), None)
        if chosen is None:
            if growing:
                reasons = list(dict.fromkeys(reasons))
                every += [Problem(reason=f"{p.reason}, and another op on this axis needs a "
                                  "different form: no exact answer at a non-multiple width",
                                  fix=p.fix, node=p.node, op=p.op, source=p.source)
                          for p in reasons]
                conflicts.append((growing, reasons))
            chosen = CIRC
        res.forms[root] = chosen
    # one problem per width group: its form classes (one per block, say) merged
    by_group: dict[str, tuple[set[int], list[Problem]]] = {}
    for growing, reasons in conflicts:
        key = _group_label(res, growing)
        leaves, found = by_group.setdefault(key, (set(), []))
        leaves |= growing
        found += [p for p in reasons if p not in found]
    condensed = [_form_conflict(label, reasons) for label, (_, reasons) in by_group.items()]
    return condensed, every


def _group_label(res: Resolution, growing: set[int]) -> str:
    """``residual (96 -> 144 entries)``: the first width group on these leaves."""
    groups = [g for g in res.analysis.groups if g.leaf in growing]
    if not groups:
        return "a width"
    g = groups[0]
    unit = "heads" if "heads" in g.role else "entries"
    return f"{g.name} ({g.size} -> {res.target(g.leaf)} {unit})"


def _form_conflict(label: str, reasons: list[Problem]) -> Problem:
    """``residual (96 -> 144 entries): LayerNorm needs ... (12 nodes, e.g. 'ln'); a
    depthwise conv ... (12 nodes, e.g. 'conv'): no exact answer at a non-multiple width``."""
    by_reason: dict[str, list[Problem]] = {}
    for p in reasons:
        by_reason.setdefault(p.reason, []).append(p)
    needs = "; ".join(
        f"{reason} ({len(ps)} node{'s' if len(ps) > 1 else ''}, e.g. '{ps[0].node}')"
        for reason, ps in by_reason.items())
    first = reasons[0]
    return Problem(reason=f"{label}: {needs}: no exact answer at a non-multiple width",
                   fix=first.fix, node=None, source=first.source)


def _check_claims(res: Resolution) -> list[Problem]:
    """Every growing parameter axis is claimed, and all claims on it agree."""
    a = res.analysis
    problems = []
    for name, dims in a.param_dims.items():
        growing = [i for i, d in enumerate(dims) if res.grows(d)]
        if not growing:
            continue
        claims = a.claims.get(name, [])
        if not claims:
            problems.append(Problem(
                reason=f"parameter {name!r} has a growing axis but no rule says how to grow it",
                node=name, fix="register a rule for the module that owns it"))
            continue
        first = claims[0]
        for axis in growing:
            uses = [c.axes[axis] if axis < len(c.axes) else None for c in claims]
            if any(u is None for u in uses):
                problems.append(Problem(
                    reason=f"axis {axis} of parameter {name!r} grows, but "
                    f"'{first.node.name}' cannot grow it", node=first.node.name,
                    fix="keep this width fixed"))
                continue
            kinds = {(u.kind, res.form(u.slot)) for u in uses if isinstance(u, AxisUse)}
            # a transform (a norm's eta, zero extras) changes the tensor only where the
            # axis grows by a non-multiple; there a plain expansion is something else
            whole = not any(res.non_multiple(leaf) for leaf in a.dims.leaves(dims[axis]))
            if not whole and len({not c.transforms for c in claims}) > 1:
                problems.append(Problem(
                    reason=f"parameter {name!r} is rescaled for its norm at this width "
                    f"(LEMON's eta) and also read as a value by "
                    f"{', '.join(sorted({c.node.name for c in claims if not c.transforms}))}",
                    node=", ".join(sorted({c.node.name for c in claims})),
                    fix="grow this width by a whole multiple (2x, 3x, ...), or read a copy "
                    "of the parameter that the norm does not own"))
                continue
            if whole:  # at whole multiples every form is the same tiling
                kinds = {(kind, None) for kind, _ in kinds}
            if len(kinds) > 1:
                readers = sorted({c.node.name for c in claims if c.node.op == "get_attr"})
                read = (f"; {', '.join(readers)} read{'s' if len(readers) == 1 else ''} it "
                        "as a value, which needs every axis expanded" if readers else "")
                needs = ", ".join(k if f is None else f"{k} in the {f} form"
                                  for k, f in sorted(kinds, key=str))
                problems.append(Problem(
                    reason=f"parameter {name!r} is shared by ops that need axis {axis} grown "
                    f"differently ({needs})" + read,
                    node=", ".join(sorted({c.node.name for c in claims})),
                    fix="untie the parameter (give each use its own), or keep this width "
                    "fixed"))
    return problems

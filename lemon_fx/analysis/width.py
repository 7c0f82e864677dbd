"""Width analysis: which axes of a traced model are coupled, and what each one needs.

``analyze_width(gm)`` walks the graph once. For every node it asks the node's rule (see
``lemon_fx.rule``) to state facts through a ``NodeAnalysis``; nothing is changed. The
result, a ``WidthAnalysis``, holds:

- a ``DimTable``: every axis of every value and parameter as a dim, coupled and factored;
- the *groups*: classes of growable leaves (not tied to a model input or output, and
  owning at least one parameter axis), each with a readable name and a role;
- the *form* needs of each value axis (LEMON's circ / avg / zero), solved per class of
  axes that must share a form, with the conflicts that make non-multiple widths impossible;
- parameter claims: for each parameter axis, whether it is expanded (fan-out: rows, bias)
  or split (fan-in: columns) when its dim grows;
- blocked growth: dims an op cannot grow (unknown op, softmax over the axis, ...), each
  with the node, the op, the reason and the fix, raised only if a plan grows that dim.
"""

from __future__ import annotations

import fnmatch
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from lemon_fx.analysis.registry import Registry
from lemon_fx.analysis.rule import Rule
from lemon_fx.axes.dims import DimTable, FactorMismatch
from lemon_fx.axes.vocabulary import (
    ANY_FORM,
    CHANNELS,
    FFN,
    HEAD_DIM,
    HEADS,
    HIDDEN,
    KV_HEADS,
    RESIDUAL,
)
from lemon_fx.errors import Problem
from lemon_fx.tracing.graph_facts import (
    op_name,
    plain_value,
    source_line,
    tensor_shape,
    tensor_shapes,
)

__all__ = [
    "AxisUse",
    "Blocker",
    "Claim",
    "ParamTransform",
    "NodeAnalysis",
    "Slot",
    "Value",
    "WidthAnalysis",
    "analyze_width",
]

# A value is a node's single tensor, or element i of a node that returns a tuple.
Value = torch.fx.Node | tuple[torch.fx.Node, int]
Slot = tuple[Value, int]

# the order groups are listed in
ROLE_ORDER = (HEADS, KV_HEADS, HEAD_DIM, CHANNELS, RESIDUAL, FFN, HIDDEN)


@dataclass(frozen=True)
class AxisUse:
    """How a parameter axis follows its dim: ``expand`` (fan-out) or ``split`` (fan-in).

    ``kind``: ``"expand"`` (rows, biases, tables: ``W' = E W`` along the axis) or
    ``"split"`` (columns read from a grown input: copies sum to the source column).
    ``slot`` is the value axis whose LEMON form the expansion must reproduce (for
    ``expand``) or invert (for ``split``); ``None`` for an axis inside the rule (the heads
    of ``nn.MultiheadAttention``), which is always circ.
    """

    kind: str
    slot: Slot | None


@dataclass(frozen=True)
class ParamTransform:
    """A rule's own growth of one parameter, where the generic expand/split is not it
    (a norm's gamma scaled by eta, its beta padded with zeros).

    ``name`` names a function in the recipe's transform table
    (``lemon_fx.recipe.transforms.register_transform``), ``fn(source, generic, layouts)``:
    ``source`` is the source tensor (float64), ``generic`` what the steps before made of
    it, and ``layouts`` the growth (``AxisGrowth``, every leaf in the circ form) of each
    dim in ``dims``, in that order. A transform sees exactly those growths: nothing of the
    graph, the plan or the rewrite, so a recipe (plain JSON) can name it and apply it to
    any tensor.

    ``slots``: for each dim, a value axis whose resolved form its layout takes (empty:
    every layout in the circ form); ``reads``: other parameters (qualified names) the
    function receives after ``layouts``, as their source tensors (a layer scale's gamma
    folded into the layer before it).
    """

    name: str
    dims: tuple[int, ...]
    slots: tuple[Any, ...] = ()
    reads: tuple[str, ...] = ()


@dataclass
class Claim:
    """One rule's statement of how a parameter is grown: per axis an ``AxisUse`` (expand
    as a producer, split as a consumer, None for an axis that keeps its size), and
    optionally a ``ParamTransform`` of its own.

    ``param``: the parameter's or buffer's qualified name (the first name of a tied
    tensor); ``axes``: one ``AxisUse`` or None per axis; ``node``: the node whose rule
    made the claim; ``transforms``: the rules' own steps after the generic ones (a
    norm's gamma scaled by eta, then a tied head's 1/k), in order;
    ``default``: True for the claim made for a free parameter nobody else claimed (a
    position table, a class token: every axis expanded); ``readers``: other nodes that
    read the parameter as part of the claimed pattern (the ``w * ...`` of a decomposed
    RMSNorm), so that their reads are not taken as separate value reads. All claims on
    one parameter must agree on every growing axis, or resolution refuses the growth.
    """

    param: str
    axes: tuple[AxisUse | None, ...]
    node: torch.fx.Node
    transforms: tuple[ParamTransform, ...] = ()
    # made for a free parameter nobody else claimed (a position table, a class token)
    default: bool = False
    # nodes other than ``node`` that read the parameter as part of the claimed pattern
    # (the ``w * ...`` of a decomposed RMSNorm claimed from its mean)
    readers: frozenset[torch.fx.Node] = frozenset()


@dataclass
class Blocker:
    """Growth of ``dim`` is impossible (``kind`` "unsupported") or inexact ("not_lossless").

    Made by ``NodeAnalysis.forbid_growth`` and raised only if a plan grows a leaf of
    ``dim``: ``"unsupported"`` as ``UnsupportedOpError``, ``"not_lossless"`` as
    ``NotLosslessError``, with ``problem`` (node, op, source line, reason, fix) as the
    entry. ``whole_multiples_ok``: growth by whole multiples (2x, 3x, ...) is exact and
    only a non-multiple width is refused.
    """

    dim: int
    problem: Problem
    kind: str
    whole_multiples_ok: bool = False


@dataclass
class FormNeed:
    """An op's requirement on a value axis: at a non-multiple width it must be in one of
    ``forms`` (``"circ"``, ``"avg"``, ``"zero"``); ``problem`` is the entry raised when
    the needs of one form class leave no form. Made by ``NodeAnalysis.require_form``."""

    forms: frozenset[str]
    problem: Problem
    # the need holds only when this very axis grows by a non-multiple (a row-wise map's
    # rows: a norm or a biased Linear over another axis), not whenever its class does
    own_axis_only: bool = False


@dataclass
class WidthAnalysis:
    """Everything ``analyze_width`` found out about a traced model; changes nothing.

    ``gm``: the analyzed GraphModule. ``dims``: the ``DimTable`` of every axis.
    ``value_dims``: per value (a node, or ``(node, i)`` for item ``i`` of a tuple
    result) the dim of each axis; ``param_dims``: the same per parameter or buffer
    (qualified name; a tied tensor under its first name). ``claims``: per parameter, the
    ``Claim`` of each rule that grows it. ``blockers``: growth that is refused if a plan
    asks for it (``Blocker``). ``hints``: per dim, what rules said about it (``norm``,
    ``heads``, ...: see ``axes.vocabulary``), which makes the groups' roles.
    ``form_parent``: a union-find over value axes (``Slot``) that must share one LEMON
    form; ``form_needs``: per axis, the forms its ops allow (``FormNeed``). ``ties``:
    ``(dim, parts, problem)`` size constraints, ``size(dim) == prod(size(parts))`` after
    growth (``nn.MultiheadAttention``'s ``embed_dim``). ``rules``: the rule that analyzed
    each node (a rule-less op gets one that forbids growth through it). ``groups`` and
    ``held``: the ``WidthGroup`` and ``HeldWidth`` lists, set by ``build_groups``.
    ``input_leaves``: the leaves of the model inputs' axes (sizes that follow an input:
    batch, sequence). ``aliases``: each further name of a tied tensor -> its first name.
    ``get_attr_nodes``: the nodes that read a parameter or buffer directly. ``mixed``:
    ``(dim, problem)`` for axes an op couples in a way the table cannot express, kept at
    their size.
    """

    gm: torch.fx.GraphModule
    dims: DimTable
    value_dims: dict[Any, list[int]]
    param_dims: dict[str, list[int]]
    claims: dict[str, list[Claim]]
    blockers: list[Blocker]
    hints: dict[int, set[str]]
    form_parent: dict[Slot, Slot]
    form_needs: dict[Slot, list[FormNeed]]
    ties: list[tuple[int, list[int], Problem]]
    rules: dict[torch.fx.Node, Rule]
    groups: list[Any] = field(default_factory=list)  # list[WidthGroup], set by build_groups
    held: list[Any] = field(default_factory=list)  # list[HeldWidth], set by build_groups
    input_leaves: set[int] = field(default_factory=set)
    # (output node name, axis, dim) of every tensor the model returns
    output_axes: list[tuple[str, int, int]] = field(default_factory=list)
    # a tensor registered under several names (tied weights) is analyzed once, under the
    # first name; the others map to it
    aliases: dict[str, str] = field(default_factory=dict)
    # (part, whole): ``part`` is picked from ``whole`` by position (``q[..., :rot]``);
    # what a part is for, a head's dims, says what the whole is for
    picked_parts: list[tuple[int, int]] = field(default_factory=list)
    get_attr_nodes: list[torch.fx.Node] = field(default_factory=list)
    # axes an op couples in a way the dims table cannot express (a grouped conv reading a
    # concatenation): they are kept at their size, and say so instead of growing silently
    mixed: list[tuple[int, Problem]] = field(default_factory=list)
    _form_index: dict | None = field(default=None, repr=False)

    def canonical(self, name: str) -> str:
        """The name a parameter is analyzed under (the first name of a tied tensor)."""
        return self.aliases.get(name, name)

    # -- slots and forms -------------------------------------------------------------
    def form_root(self, slot: Slot) -> Slot:
        """The representative of the class of value axes that share ``slot``'s form."""
        parent = self.form_parent
        root = slot
        while parent.get(root, root) != root:
            root = parent[root]
        return root

    def form_classes(self) -> dict[Slot, list[Slot]]:
        """Every form class: its root -> its member value axes (computed afresh)."""
        classes: dict[Slot, list[Slot]] = {}
        for slot in self.form_parent:
            classes.setdefault(self.form_root(slot), []).append(slot)
        return classes

    def allowed_forms(self, slot: Slot, grows: Callable[[Slot], bool] | None = None
                      ) -> tuple[frozenset[str], list[Problem]]:
        """The forms every op on ``slot``'s form class allows (an empty set: a conflict),
        and the problem of each need that restricted them. ``grows`` (a resolved plan's
        "does this axis grow by a non-multiple") drops the needs that hold only when their
        own axis grows; without it every need counts."""
        root = self.form_root(slot)
        allowed = ANY_FORM
        reasons: list[Problem] = []
        for member in self.form_classes_index().get(root, [root]):
            for need in self.form_needs.get(member, []):
                if need.own_axis_only and grows is not None and not grows(member):
                    continue
                allowed &= need.forms
                reasons.append(need.problem)
        return allowed, reasons

    def form_classes_index(self) -> dict[Slot, list[Slot]]:
        """The form classes, computed once the analysis is complete."""
        if self._form_index is None:
            self._form_index = self.form_classes()
        return self._form_index

    def slot_leaves(self, slot: Slot) -> list[int]:
        """The leaves (width groups' dims) of one value axis, outer first."""
        value, axis = slot
        return self.dims.leaves(self.value_dims[_key(value)][axis])

    def leaf_of(self, dim: int) -> list[int]:
        """The leaves of ``dim``, outer first (``dims.leaves``)."""
        return self.dims.leaves(dim)


def _key(value: Value) -> Any:
    return value


class NodeAnalysis:
    """What a rule may state about its node. Nothing here changes the graph.

    ``node`` is the node being analyzed, ``rule`` its rule, ``root`` the GraphModule,
    ``module`` the called submodule of a ``call_module`` node (else None). Axes are named
    by dims (ints of the analysis' ``DimTable``), value axes by slots ``(value, axis)``.
    Facts: ``unify``, ``factor``, ``concatenate``, ``tie``, ``fix``, ``hint``; forms:
    ``same_form``, ``require_form``, ``pass_through``, ``broadcast``; parameters:
    ``claim``; refusals: ``forbid_growth`` (raised only if a plan grows the dim).
    """

    def __init__(self, analysis: WidthAnalysis, node: torch.fx.Node, rule: Rule):
        self._a = analysis
        self.node = node
        self.rule = rule
        self.root = analysis.gm
        self.module = analysis.gm.get_submodule(node.target) if node.op == "call_module" else None

    # -- facts about values ------------------------------------------------------------
    def is_tensor(self, arg: Any) -> bool:
        """Whether ``arg`` is a node whose tensor the analysis has axes for."""
        return isinstance(arg, torch.fx.Node) and _key(arg) in self._a.value_dims

    def dims(self, value: Value) -> list[int]:
        """The dim of each axis of ``value`` (a node, or ``(node, i)``)."""
        return self._a.value_dims[_key(value)]

    def shape(self, value: Value) -> tuple[int, ...]:
        """The source sizes of ``value``'s axes."""
        return tuple(self._a.dims.size(d) for d in self.dims(value))

    def value(self, arg: Any) -> Any:
        """The plain (non-tensor) value of an argument when the example inputs ran."""
        return plain_value(arg)

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """The node's argument at position ``index``, else keyword ``name``, else ``default``."""
        if len(self.node.args) > index:
            return self.node.args[index]
        return self.node.kwargs.get(name, default)

    def outputs(self) -> list[Value]:
        """The node's tensor results: itself, or (node, i) for each tensor of a tuple."""
        if _key(self.node) in self._a.value_dims:
            return [self.node]
        return [k for k in self._a.value_dims if isinstance(k, tuple) and k[0] is self.node]

    def param(self, attr: str) -> str:
        """The qualified name of this call_module node's parameter or buffer ``attr``."""
        return f"{self.node.target}.{attr}" if self.node.target else attr

    def param_dims(self, qualname: str) -> list[int]:
        """The dim of each axis of a parameter or buffer, by qualified name."""
        return self._a.param_dims[self._a.canonical(qualname)]

    def canonical(self, qualname: str) -> str:
        """The name a parameter is analyzed and grown under (a tied tensor's first name)."""
        return self._a.canonical(qualname)

    def rule_of(self, node: torch.fx.Node) -> Rule | None:
        """The rule of another node already analyzed (nodes are analyzed in graph order)."""
        return self._a.rules.get(node)

    def claims_made_by(self, node: torch.fx.Node) -> list[Claim]:
        """The claims ``node``'s rule made, in order (a layer whose output this rule's
        node scales, so that the scale can be folded into the layer's rows)."""
        return [c for claims in self._a.claims.values() for c in claims if c.node is node]

    def claims_on(self, qualname: str) -> list[Claim]:
        """The claims made so far on a parameter, in order (the first one grows it)."""
        return list(self._a.claims.get(self._a.canonical(qualname), []))

    def same_dim(self, a: int, b: int) -> bool:
        """Whether ``a`` and ``b`` have been unified into one axis."""
        return self._a.dims.find(a) == self._a.dims.find(b)

    def has_param(self, qualname: str) -> bool:
        """Whether the model has a parameter or buffer of that name."""
        return self._a.canonical(qualname) in self._a.param_dims

    # -- coupling ----------------------------------------------------------------------
    def unify(self, a: int, b: int) -> None:
        """``a`` and ``b`` are one axis: equal sizes now and after growth. Axes whose
        layouts cannot be lined up are kept at their size instead (and reported)."""
        try:
            self._a.dims.unify(a, b)
        except FactorMismatch as exc:
            self._mismatch([a, b], str(exc))

    def factor(self, dim: int, parts: list[int]) -> None:
        """``dim`` is the product of ``parts``, outer first (a reshape ``C -> [H, Dh]``);
        on a mismatch the axes are kept at their size, as in ``unify``."""
        try:
            self._a.dims.factor_as(dim, parts)
        except FactorMismatch as exc:
            self._mismatch([dim, *parts], str(exc))

    def concatenate(self, dim: int, parts: list[int]) -> None:
        """``dim`` is ``parts`` laid end to end (``cat``, unequal ``split``); on a
        mismatch the axes are kept at their size, as in ``unify``."""
        try:
            self._a.dims.concatenate_as(dim, parts)
        except FactorMismatch as exc:
            self._mismatch([dim, *parts], str(exc))

    def _mismatch(self, dims: list[int], why: str) -> None:
        reason = f"{op_name(self.node, self.root)} at '{self.node.name}' mixes axes ({why})"
        problem = self.problem(
            f"couples axes whose layouts lemon_fx cannot line up ({why}), so they keep "
            "their size",
            "grow the rest with a width mapping that leaves these layers out, or register a "
            "rule that states the coupling")
        for d in dims:
            self.fix(d, reason)
            self._a.mixed.append((d, problem))

    def new_dim(self, size: int) -> int:
        """A fresh dim of ``size``, for an axis inside the op (heads, a repeat count)."""
        return self._a.dims.new(size)

    def fix(self, dim: int, reason: str) -> None:
        """The dim is tied to something outside the model's width and never grows."""
        self._a.dims.fix(dim, reason)

    def hint(self, dim: int, role: str) -> None:
        """Say what ``dim`` is for (a ``Hint``: ``norm``, ``heads``...); hints make roles."""
        for leaf in self._a.dims.leaves(dim):
            self._a.hints.setdefault(leaf, set()).add(role)
        # hints on not-yet-factored dims are re-read through leaves at the end
        self._a.hints.setdefault(self._a.dims.find(dim), set()).add(role)

    def picked_from(self, part: int, whole: int) -> None:
        """``part`` holds entries picked from ``whole`` by position (a slice with literal
        bounds): a whole whose parts go into a head's dims (partial rotary's
        ``q[..., :rot]``) is a ``head_dim`` too, which a bare width keeps."""
        self._a.picked_parts.append((part, whole))

    def tie(self, dim: int, parts: list[int], reason: str, fix: str) -> None:
        """After growth ``size(dim)`` must still equal the product of ``size(parts)``."""
        self._a.ties.append((dim, parts, self.problem(reason, fix)))

    # -- forms -------------------------------------------------------------------------
    def slot(self, value: Value, axis: int) -> Slot:
        """The value axis ``(value, axis)`` (negative axes allowed), registered for forms."""
        rank = len(self.dims(value))
        slot = (value, axis % rank)
        self._a.form_parent.setdefault(slot, slot)
        return slot

    def same_form(self, *slots: Slot) -> None:
        """The value axes share one LEMON form (their form classes are merged)."""
        a = self._a
        roots = [a.form_root(s) for s in slots]
        for r in roots[1:]:
            if r != roots[0]:
                a.form_parent[r] = roots[0]

    def require_form(self, slot: Slot, forms: set[str] | frozenset[str], reason: str,
                     own_axis_only: bool = False) -> None:
        """The axis must be in one of ``forms`` when its width grows by a non-multiple;
        ``own_axis_only``: only when this axis itself grows (a row-wise map's rows), not
        when another axis of its form class does."""
        self._a.form_needs.setdefault(slot, []).append(
            FormNeed(frozenset(forms), self.problem(reason, "grow this width by a whole "
                                                    "multiple (2x, 3x, ...)"), own_axis_only)
        )

    def pass_through(self, src: Value, dst: Value) -> None:
        """``dst`` has ``src``'s axes in the same order and the same form (elementwise)."""
        for axis, (a, b) in enumerate(zip(self.dims(src), self.dims(dst))):
            self.unify(a, b)
            self.same_form(self.slot(src, axis), self.slot(dst, axis))

    def broadcast(self, inputs: list[Any], output: Value) -> None:
        """Numpy broadcasting: trailing axes of equal size are one dim with one form."""
        out_dims = self.dims(output)
        for arg in inputs:
            if not self.is_tensor(arg):
                continue
            in_dims = self.dims(arg)
            offset = len(out_dims) - len(in_dims)
            for axis, d in enumerate(in_dims):
                o = out_dims[axis + offset] if axis + offset >= 0 else None
                if o is None:
                    continue
                if self._a.dims.size(d) == self._a.dims.size(o):
                    self.unify(d, o)
                    self.same_form(self.slot(arg, axis), self.slot(output, axis + offset))
                # a size-1 axis broadcast against a grown one reads the same entry for
                # every copy, which is exactly what every form needs

    # -- parameters --------------------------------------------------------------------
    def claim(
        self,
        qualname: str,
        axes: list[AxisUse | None],
        *,
        transform: ParamTransform | None = None,
        readers: frozenset[torch.fx.Node] = frozenset(),
    ) -> None:
        """State how a parameter grows: one ``AxisUse`` (or None) per axis, optionally
        the rule's own ``transform``; see ``Claim``."""
        qualname = self._a.canonical(qualname)
        transforms = (transform,) if transform is not None else ()
        self._a.claims.setdefault(qualname, []).append(
            Claim(qualname, tuple(axes), self.node, transforms, readers=readers)
        )

    # -- refusals ----------------------------------------------------------------------
    def problem(self, reason: str, fix: str) -> Problem:
        """A ``Problem`` at this node, with its op and source line."""
        return Problem(
            reason=reason,
            fix=fix,
            node=self.node.name,
            op=op_name(self.node, self.root),
            source=source_line(self.node),
        )

    def forbid_growth(
        self, dims: list[int] | int, reason: str, fix: str, *, kind: str = "unsupported",
        whole_multiples_ok: bool = False,
    ) -> None:
        """Growing any of ``dims`` would be wrong; raised only if a plan grows one."""
        for d in [dims] if isinstance(dims, int) else dims:
            self._a.blockers.append(
                Blocker(d, self.problem(reason, fix), kind, whole_multiples_ok)
            )


def _new_value_dims(table: DimTable, shape: tuple[int, ...]) -> list[int]:
    return [table.new(s) for s in shape]


def _tensor_args(node: torch.fx.Node, value_dims: dict) -> list[Value]:
    """The tensor values ``node`` reads: its tensor arguments, and the items of an argument
    that is a tuple of tensors (``torch.stack(h.chunk(2, -1)[::-1])``)."""
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n))
    values: list[Value] = []
    for n in found:
        if n in value_dims:
            values.append(n)
        else:
            values += [k for k in value_dims if isinstance(k, tuple) and k[0] is n]
    return values


def analyze_width(gm: torch.fx.GraphModule, registry: Registry, *,
                  fix_outputs: bool = True) -> WidthAnalysis:
    """State every coupling in ``gm``; groups, forms and blockers come out of it."""
    table = DimTable()
    analysis = WidthAnalysis(
        gm=gm, dims=table, value_dims={}, param_dims={}, claims={}, blockers=[], hints={},
        form_parent={}, form_needs={}, ties=[], rules={},
    )
    first_name: dict[int, str] = {}
    for name, tensor in list(gm.named_parameters(remove_duplicate=False)) + list(
            gm.named_buffers(remove_duplicate=False)):
        if id(tensor) in first_name:
            analysis.aliases[name] = first_name[id(tensor)]
            continue
        first_name[id(tensor)] = name
        analysis.param_dims[name] = _new_value_dims(table, tuple(tensor.shape))
    for node in gm.graph.nodes:
        shape = tensor_shape(node)
        if shape is not None and node.op != "output":
            analysis.value_dims[node] = _new_value_dims(table, shape)
            continue
        shapes = tensor_shapes(node)
        if shapes is not None and node.op != "output":
            for i, s in enumerate(shapes):
                if s is not None:
                    analysis.value_dims[(node, i)] = _new_value_dims(table, s)

    unknown = _UnknownOp()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            for value in _values_of(node, analysis):
                for axis, d in enumerate(analysis.value_dims[value]):
                    table.fix(d, f"axis {axis} of model input '{node.name}'")
        elif node.op == "output":
            _fix_outputs(node, analysis, fix_outputs)
        elif node.op == "get_attr":
            _analyze_get_attr(node, analysis)
        else:
            has_tensors = bool(_values_of(node, analysis)) or bool(
                _tensor_args(node, analysis.value_dims)
            )
            if not has_tensors:
                continue  # shape arithmetic on plain ints
            rule = registry.lookup(node, gm) or unknown
            analysis.rules[node] = rule
            rule.analyze(node, NodeAnalysis(analysis, node, rule))
    for rule in {id(r): r for r in analysis.rules.values()}.values():
        rule.finalize(analysis)
    _claim_value_reads(analysis)
    _claim_unclaimed_module_params(analysis)
    _forbid_sizes_used_as_numbers(analysis)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            for value in _values_of(node, analysis):
                for d in analysis.value_dims[value]:
                    analysis.input_leaves.update(table.find(x) for x in table.leaves(d))
    return analysis


def _values_of(node: torch.fx.Node, analysis: WidthAnalysis) -> list[Value]:
    if node in analysis.value_dims:
        return [node]
    return [k for k in analysis.value_dims if isinstance(k, tuple) and k[0] is node]


def _fix_outputs(node: torch.fx.Node, analysis: WidthAnalysis, fix: bool) -> None:
    """Record the model's output axes, and keep them at their size unless ``fix`` is
    False (``Plan(grow_outputs=True)``)."""
    def visit(arg: torch.fx.Node) -> torch.fx.Node:
        for value in _values_of(arg, analysis):
            for axis, d in enumerate(analysis.value_dims[value]):
                analysis.output_axes.append((arg.name, axis, d))
                if fix:
                    analysis.dims.fix(d, f"axis {axis} of model output '{arg.name}'")
        return arg

    torch.fx.node.map_arg(node.args, visit)


def _analyze_get_attr(node: torch.fx.Node, analysis: WidthAnalysis) -> None:
    """A parameter or buffer read directly: its value's axes are the tensor's axes."""
    name = analysis.canonical(node.target)
    if node not in analysis.value_dims or name not in analysis.param_dims:
        return
    ctx = NodeAnalysis(analysis, node, _UnknownOp())
    for a, b in zip(analysis.value_dims[node], analysis.param_dims[name]):
        ctx.unify(a, b)
    analysis.get_attr_nodes.append(node)


def _size_read(node: torch.fx.Node, analysis: WidthAnalysis) -> list[int] | None:
    """The dims whose sizes a shape query reads: ``x.shape``/``x.size()`` all of them,
    ``x.size(i)``/``aten.sym_size(x, i)`` one; None for any other node."""
    x = node.args[0] if node.args else None
    if not isinstance(x, torch.fx.Node) or x not in analysis.value_dims:
        return None
    dims = analysis.value_dims[x]
    if node.op == "call_function" and node.target is getattr:
        return list(dims) if node.args[1] == "shape" else None
    index = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if (node.op == "call_method" and node.target == "size") or \
            node.target is torch.ops.aten.sym_size.int:
        return list(dims) if index is None else [dims[index]]
    return None


def _forbid_sizes_used_as_numbers(analysis: WidthAnalysis) -> None:
    """A size read from an axis follows it when the axis grows: exact where it sizes a
    view/reshape/expand (their rules rewrite it to the grown size), wrong anywhere it is
    used as a number (``scores * q.size(-1) ** -0.5``, ``torch.arange(x.shape[-1])``, a
    returned size). Sizes are followed through int arithmetic and tuple indexing to
    their uses; growth of the axis is forbidden at each use of the other kind."""
    pending = [(node, dims, node) for node in analysis.gm.graph.nodes
               if (dims := _size_read(node, analysis))]
    seen: set[torch.fx.Node] = set()
    while pending:
        node, dims, query = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            rule = analysis.rules.get(user)
            if rule is not None and rule.rewrites_size_args(user) and user.args[0] is not node:
                continue
            if user.op in ("call_function", "call_method") and rule is None:
                picked = dims  # int arithmetic, tuple indexing: follow the number
                if user.target is operator.getitem and node is query and \
                        isinstance(user.args[1], (int, slice)) and len(dims) > 1:
                    index = user.args[1]
                    picked = [dims[index]] if isinstance(index, int) else dims[index]
                pending.append((user, picked, query))
                continue
            NodeAnalysis(analysis, user, rule or _UnknownOp()).forbid_growth(
                dims, f"the size of this axis, read by '{query.name}', is used as a number "
                "here, and it would change when the axis grows",
                "use a constant (a config value) instead of the tensor's size, or keep this "
                "width fixed", kind="not_lossless")


def _claim_value_reads(analysis: WidthAnalysis) -> None:
    """A parameter a layer claims, also read as a value (``W.t()``, ``w.mean()``,
    ``y * ln.weight``), must be grown the way that value is read: every axis expanded in
    its value's form. Said as one more claim, so that ``_check_claims`` refuses the growth
    when the layer grows the parameter otherwise (a fan-in split, a norm's ``eta``) instead
    of handing the value reader a tensor laid out for the layer."""
    for node in analysis.get_attr_nodes:
        claims = analysis.claims.get(analysis.canonical(node.target))
        if not claims:
            continue
        claimed = {c.node for c in claims}.union(*(c.readers for c in claims))
        if all(user in claimed for user in node.users):
            continue
        ctx = NodeAnalysis(analysis, node, _UnknownOp())
        rank = len(analysis.value_dims[node])
        ctx.claim(node.target, [AxisUse("expand", ctx.slot(node, i)) for i in range(rank)])


def _claim_unclaimed_module_params(analysis: WidthAnalysis) -> None:
    """A get_attr parameter nobody claimed is data on its axes: expand every axis."""
    for node in analysis.get_attr_nodes:
        if analysis.canonical(node.target) in analysis.claims:
            continue
        ctx = NodeAnalysis(analysis, node, _UnknownOp())
        rank = len(analysis.value_dims[node])
        ctx.claim(node.target, [AxisUse("expand", ctx.slot(node, i)) for i in range(rank)])
        analysis.claims[analysis.canonical(node.target)][-1].default = True


class _UnknownOp(Rule):
    """No rule: the op is fine only while none of the axes it touches grows.

    Nothing is assumed about what the op computes. To keep axes tied to the model's
    inputs and outputs tied across it, a same-shape op (one tensor in, one out) has its
    axes matched by position, which can only stop growth, never allow it.
    """

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        inputs = _tensor_args(node, ctx._a.value_dims)
        outputs = ctx.outputs()
        touched: list[int] = []
        for value in outputs:
            touched += ctx.dims(value)
        for arg in inputs:
            touched += ctx.dims(arg)
        if ctx.module is not None:
            for name, _ in ctx.module.named_parameters(recurse=True):
                touched += ctx.param_dims(ctx.param(name))
        if len(inputs) == 1 and len(outputs) == 1 and \
                ctx.shape(inputs[0]) == ctx.shape(outputs[0]):
            for a, b in zip(ctx.dims(inputs[0]), ctx.dims(outputs[0])):
                ctx.unify(a, b)
        ctx.forbid_growth(
            touched,
            "no rule for this op, and an axis it reads or writes would grow",
            "register a rule for it with lemon_fx.register (see README), keep this width "
            "fixed in the plan, or trace the module with leaf_modules and a rule",
            kind="unsupported",
        )


def group_name_candidates(params: list[str]) -> str:
    """The longest common dotted prefix of the modules owning ``params``."""
    owners = [p.rsplit(".", 1)[0] if "." in p else "" for p in params]
    if not owners:
        return ""
    parts = owners[0].split(".") if owners[0] else []
    for o in owners[1:]:
        other = o.split(".") if o else []
        n = 0
        while n < min(len(parts), len(other)) and parts[n] == other[n]:
            n += 1
        parts = parts[:n]
    return ".".join(parts)


def matches(pattern: str, name: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern)

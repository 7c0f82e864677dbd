"""What a rule may do in its rewrite half: read the resolved sizes and forms, record edits.

Edits (new literal arguments, new module attributes) are *recorded*, not applied: the
width pass applies them only after every rule of the graph has rewritten without refusing.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from lemon_fx.analysis.width import Slot, Value
from lemon_fx.axes.expansion import AxisGrowth, LeafGrowth
from lemon_fx.axes.vocabulary import CIRC, Form
from lemon_fx.errors import Problem
from lemon_fx.resolution.width import Resolution
from lemon_fx.tracing.graph_facts import op_name, plain_value, source_line

__all__ = ["Edits", "NodeRewrite", "Unevaluable"]


class Unevaluable(Exception):
    """A shape expression whose grown value cannot be worked out statically."""


@dataclass
class Edits:
    """The edits every rule's rewrite recorded, applied by the width pass all at once.

    ``args``: ``(node name, position or keyword, new value)`` for each replaced argument;
    ``attrs``: ``(module name, attribute, new value)`` for each module attribute
    (``in_features``, ``num_heads``...); ``problems``: the rewrite's refusals (any of them
    raises ``NotLosslessError`` before anything is changed); ``notes``: remarks for the
    pass' list of rewrites.
    """

    args: list[tuple[str, int | str, Any]] = field(default_factory=list)
    attrs: list[tuple[str, str, Any]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


_ARITH = {
    operator.add: operator.add, operator.sub: operator.sub, operator.mul: operator.mul,
    operator.floordiv: operator.floordiv, operator.truediv: operator.truediv,
    operator.mod: operator.mod, operator.neg: operator.neg,
}


class NodeRewrite:
    """What a rule's rewrite may read and record for its node (``Rule.rewrite``).

    ``res`` is the ``Resolution`` (grown sizes, chosen forms), ``node`` the node of the
    source graph, ``root`` the source GraphModule, ``module`` the called submodule of a
    ``call_module`` node (else None). Reading: ``dims``, ``shape``, ``grown``,
    ``grown_shape``, ``grows``, ``form``, the layouts, ``grown_value`` of a shape
    expression. Recording: ``set_arg``, ``set_arg_of``, ``set_attr``, ``note`` and
    ``refuse``. Nothing is changed here: the width pass applies the edits after every
    rule rewrote without refusing.
    """

    def __init__(self, res: Resolution, node: torch.fx.Node, edits: Edits):
        self.res = res
        self.node = node
        self.root = res.analysis.gm
        self.module = self.root.get_submodule(node.target) if node.op == "call_module" else None
        self._edits = edits

    # -- reading the resolution ---------------------------------------------------------
    def dims(self, value: Value) -> list[int]:
        """The dim of each axis of ``value`` (a node, or ``(node, i)``)."""
        return self.res.analysis.value_dims[value]

    def shape(self, value: Value) -> tuple[int, ...]:
        """The source sizes of ``value``'s axes."""
        return tuple(self.res.analysis.dims.size(d) for d in self.dims(value))

    def grown_shape(self, value: Value) -> tuple[int, ...]:
        """The grown sizes of ``value``'s axes."""
        return self.res.grown_shape(value)

    def grows(self, dim: int) -> bool:
        """Whether ``dim`` changes size under the plan."""
        return self.res.grows(dim)

    def grown(self, dim: int) -> int:
        """The grown size of ``dim``."""
        return self.res.grown(dim)

    def is_dynamic(self, dim: int) -> bool:
        """Whether the axis' size follows a model input's size (batch, sequence)."""
        return self.res.is_dynamic(dim)

    def slot(self, value: Value, axis: int) -> Slot:
        """The value axis ``(value, axis)``; negative axes allowed."""
        return (value, axis % len(self.dims(value)))

    def form(self, slot: Slot) -> str:
        """The chosen form of a value axis: ``"circ"``, ``"avg"`` or ``"zero"``."""
        return self.res.form(slot)

    def slot_growth(self, slot: Slot) -> AxisGrowth:
        """The layout of a value axis, every leaf in the axis' chosen form."""
        return self.res.slot_growth(slot)

    def axis_growth(self, dim: int, form: Form = CIRC) -> AxisGrowth:
        """The layout of ``dim`` (its leaves' growths, nested as products and sums)."""
        return self.res.axis_growth(dim, form)

    def leaf_growth(self, dim: int, form: Form = CIRC) -> LeafGrowth:
        """The growth of a dim that must be a single leaf (a norm's normalized axis)."""
        return self.res.leaf_growth(dim, form)

    def is_tensor(self, arg: Any) -> bool:
        """Whether ``arg`` is a node whose tensor the analysis has axes for."""
        return isinstance(arg, torch.fx.Node) and arg in self.res.analysis.value_dims

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """The node's argument at position ``index``, else keyword ``name``, else ``default``."""
        if len(self.node.args) > index:
            return self.node.args[index]
        return self.node.kwargs.get(name, default)

    def value(self, arg: Any) -> Any:
        """The plain (non-tensor) value of an argument when the example inputs ran."""
        return plain_value(arg)

    def param(self, attr: str) -> str:
        """The qualified name of this call_module node's parameter or buffer ``attr``."""
        return f"{self.node.target}.{attr}" if self.node.target else attr

    def param_dims(self, qualname: str) -> list[int]:
        """The dim of each axis of a parameter or buffer, by qualified name."""
        analysis = self.res.analysis
        return analysis.param_dims[analysis.canonical(qualname)]

    def grown_value(self, arg: Any) -> Any:
        """What a shape expression evaluates to in the grown graph."""
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.grown_value(a) for a in arg)
        if not isinstance(arg, torch.fx.Node):
            return arg
        if arg in self.res.analysis.value_dims:
            raise Unevaluable(arg.name)
        if arg.op == "call_function" and arg.target is getattr and arg.args[1] == "shape":
            return torch.Size(self.res.grown_shape(arg.args[0]))
        if arg.op == "call_method" and arg.target == "size":
            shape = self.res.grown_shape(arg.args[0])
            dim = arg.args[1] if len(arg.args) > 1 else arg.kwargs.get("dim")
            return torch.Size(shape) if dim is None else shape[self.grown_value(dim)]
        if arg.op == "call_function" and arg.target is torch.ops.aten.sym_size.int:
            return self.res.grown_shape(arg.args[0])[arg.args[1]]
        if arg.op == "call_method" and arg.target == "dim":
            return len(self.res.grown_shape(arg.args[0]))
        if arg.op == "call_function" and arg.target is operator.getitem:
            return self.grown_value(arg.args[0])[self.grown_value(arg.args[1])]
        if arg.op == "call_function" and arg.target in _ARITH:
            return _ARITH[arg.target](*[self.grown_value(a) for a in arg.args])
        if arg.op == "call_function" and arg.target in (int, float):
            return arg.target(self.grown_value(arg.args[0]))
        raise Unevaluable(arg.name)

    # -- recording edits ----------------------------------------------------------------
    def set_arg(self, index: int, name: str, value: Any) -> None:
        """Replace positional ``index`` if present, else keyword ``name``."""
        key: int | str = index if len(self.node.args) > index else name
        self._edits.args.append((self.node.name, key, value))

    def set_arg_of(self, node: torch.fx.Node, index: int, value: Any) -> None:
        """Replace an argument of another node of the same pattern (a decomposed norm)."""
        self._edits.args.append((node.name, index, value))

    def set_attr(self, attr: str, value: Any) -> None:
        """Set the node's module attribute ``attr`` (dotted for a submodule:
        ``out_proj.in_features``) to ``value``."""
        self._edits.attrs.append((self.node.target, attr, value))

    def note(self, text: str) -> None:
        """Record a remark about this node's rewrite."""
        self._edits.notes.append(f"{self.node.name}: {text}")

    def refuse(self, reason: str, fix: str) -> None:
        """Refuse the rewrite: ``grow`` raises ``NotLosslessError`` with this problem
        (and every other refusal) before anything is built."""
        self._edits.problems.append(Problem(
            reason=reason, fix=fix, node=self.node.name, op=op_name(self.node, self.root),
            source=source_line(self.node)))

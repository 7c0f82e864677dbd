"""The rule registry: which rule handles which op.

Rules are keyed by the real op object: the module class for ``call_module`` nodes, the
function for ``call_function`` nodes (every spelling of one op registered together:
``torch.add``, ``operator.add``, ``Tensor.add``...), and the method name for
``call_method`` nodes. A custom op of a library that lemon_fx does not import (a
``torch.library`` op such as ``"transformers::grouped_mm_fallback"``) is keyed by its
qualified name, ``"namespace::name"``, and matches its default overload. A module class
is looked up along its MRO, so a user's subclass of ``nn.Linear`` uses the Linear rule
unless it registers its own. Registering one op twice is an error: two rules for one op
would make growth depend on import order.

This module holds the table type only. The built-in table is built in ``passes.rules``
(by explicit imports of the rule modules), users add to it with ``lemon_fx.register``,
and the api hands it to the analysis: nothing on this floor fetches a registry.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch.fx

if TYPE_CHECKING:
    from lemon_fx.analysis.rule import Rule

__all__ = ["Registry"]


class Registry:
    """A table from ops to rules: module classes, functions (every spelling of one op
    registered together), and ``Tensor`` method names.

    ``add(rule, ops)`` registers one rule instance for several ops and refuses an op that
    already has a rule unless ``replace=True``; ``lookup(node, root)`` finds the rule of
    an fx node; ``module_rule(cls)`` walks the MRO while the subclass keeps its base's
    ``forward``; ``entries()`` lists everything (the source of the support table).
    """

    def __init__(self) -> None:
        self._modules: dict[type, Rule] = {}
        self._functions: dict[Any, Rule] = {}
        self._methods: dict[str, Rule] = {}
        self._op_names: dict[str, Rule] = {}  # "namespace::name" of a torch.library op

    def add(self, rule: Rule, ops: Iterable[Any], *, replace: bool = False) -> Rule:
        """Register ``rule`` for every op of ``ops`` (module classes, functions, method
        names) and return it; ``ValueError`` for an op that already has a rule, unless
        ``replace=True``."""
        for op in dict.fromkeys(ops):  # one op may have two spellings (F.linear is _C._nn.linear)
            table = self._table_for(op)
            if op in table and not replace:
                raise ValueError(
                    f"{op!r} already has the rule {type(table[op]).__name__}; pass "
                    "replace=True to override it on purpose"
                )
            table[op] = rule
        return rule

    def _table_for(self, op: Any) -> dict:
        if isinstance(op, str):
            return self._op_names if "::" in op else self._methods
        if isinstance(op, type):
            return self._modules
        return self._functions

    def module_rule(self, cls: type) -> Rule | None:
        """The rule of ``cls`` or of the nearest base class whose forward it still uses.

        A subclass that replaces ``forward`` (timm's StdConv2d, a LayerNorm2d that permutes)
        computes something else than its base: it gets no rule from the base.
        """
        for base in cls.__mro__:
            if base in self._modules:
                if base is cls or getattr(cls, "forward", None) is getattr(base, "forward", None):
                    return self._modules[base]
                return None
        return None

    def has_module_rule(self, cls: type) -> bool:
        """Whether ``cls`` gets a rule (its own, or its base's: see ``module_rule``)."""
        return self.module_rule(cls) is not None

    def lookup(self, node: torch.fx.Node, root: torch.nn.Module) -> Rule | None:
        """The rule of an fx node of ``root``'s graph, or None (placeholders, outputs,
        ``get_attr`` and ops without a rule)."""
        if node.op == "call_module":
            return self.module_rule(type(root.get_submodule(node.target)))
        if node.op == "call_method":
            return self._methods.get(node.target)
        if node.op == "call_function":
            rule = self._functions.get(node.target)
            if rule is None and isinstance(node.target, torch._ops.OpOverload) \
                    and node.target._overloadname == "default":
                rule = self._op_names.get(node.target.name())
            return rule
        return None

    def entries(self) -> list[tuple[str, Any, Rule]]:
        """(kind, op, rule) for every registered op: the source of the support matrix."""
        out: list[tuple[str, Any, Rule]] = []
        out += [("module", op, r) for op, r in self._modules.items()]
        out += [("function", op, r) for op, r in self._functions.items()]
        out += [("method", op, r) for op, r in self._methods.items()]
        out += [("custom op", op, r) for op, r in self._op_names.items()]
        return out

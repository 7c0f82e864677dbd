"""The rule registry: which rule handles which op.

Rules are keyed by the real op object: the module class for ``call_module`` nodes, the
function for ``call_function`` nodes (every spelling of one op registered together:
``torch.add``, ``operator.add``, ``Tensor.add``...), and the method name for
``call_method`` nodes. A module class is looked up along its MRO, so a user's subclass of
``nn.Linear`` uses the Linear rule unless it registers its own. Registering one op twice is
an error: two rules for one op would make growth depend on import order.

Users register rules for their own modules and functions with ``lemon_fx.register``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch.fx

if TYPE_CHECKING:
    from lemon_fx.rule import Rule

__all__ = ["Registry", "default_registry", "register"]


class Registry:
    def __init__(self) -> None:
        self._modules: dict[type, Rule] = {}
        self._functions: dict[Any, Rule] = {}
        self._methods: dict[str, Rule] = {}

    def add(self, rule: Rule, ops: Iterable[Any], *, replace: bool = False) -> Rule:
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
            return self._methods
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
        return self.module_rule(cls) is not None

    def lookup(self, node: torch.fx.Node, root: torch.nn.Module) -> Rule | None:
        if node.op == "call_module":
            return self.module_rule(type(root.get_submodule(node.target)))
        if node.op == "call_method":
            return self._methods.get(node.target)
        if node.op == "call_function":
            return self._functions.get(node.target)
        return None

    def entries(self) -> list[tuple[str, Any, Rule]]:
        """(kind, op, rule) for every registered op: the source of the support matrix."""
        out: list[tuple[str, Any, Rule]] = []
        out += [("module", op, r) for op, r in self._modules.items()]
        out += [("function", op, r) for op, r in self._functions.items()]
        out += [("method", op, r) for op, r in self._methods.items()]
        return out


_DEFAULT: Registry | None = None
# The built-in rules live with the width pass in ``passes.rules``; they are loaded here,
# once, so that ``inspect`` and ``grow`` consult one table.
_BUILTIN_RULE_MODULES = (
    "passes.rules.linear",
    "passes.rules.norm",
    "passes.rules.elementwise",
    "passes.rules.shape",
    "passes.rules.attention",
    "passes.rules.embedding",
    "passes.rules.reduction",
    "passes.rules.conv",
    "passes.rules.channel_norm",
    "passes.rules.pooling",
    "passes.rules.padding",
)


def default_registry() -> Registry:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Registry()
        for name in _BUILTIN_RULE_MODULES:
            module = importlib.import_module(name)
            module.register_rules(_DEFAULT)
    return _DEFAULT


def register(*ops: Any, replace: bool = False) -> Callable[[type[Rule]], type[Rule]]:
    """Class decorator: register a ``Rule`` subclass for user modules/functions.

    >>> @lemon_fx.register(MyScale)
    ... class MyScaleRule(lemon_fx.Rule):
    ...     def analyze(self, node, ctx): ...
    """

    def decorate(cls: type[Rule]) -> type[Rule]:
        default_registry().add(cls(), ops, replace=replace)
        return cls

    return decorate

"""The built-in rules, one module per op family, and the default registry built from them.

Adding a rule for a new op touches its rule module (the rule and its ``register_rules``
entry), its case in ``tests/test_rules.py`` and the generated support table
(``python tools/support_matrix.py``). A new op family gets a module here and one line
in ``_FAMILIES``.
"""

from __future__ import annotations

from lemon_fx.analysis.registry import Registry
from passes.rules import (
    attention,
    channel_norm,
    conv,
    elementwise,
    embedding,
    linear,
    norm,
    padding,
    pooling,
    reduction,
    selection,
    shape,
)

__all__ = ["build_registry", "default_registry"]

_FAMILIES = (linear, norm, elementwise, shape, attention, embedding, reduction, conv,
             channel_norm, pooling, padding, selection)


def build_registry() -> Registry:
    """A fresh registry holding every built-in rule (and no user rule)."""
    registry = Registry()
    for family in _FAMILIES:
        family.register_rules(registry)
    return registry


_DEFAULT = build_registry()


def default_registry() -> Registry:
    """The process-wide registry: the built-in rules plus what ``lemon_fx.register`` added."""
    return _DEFAULT

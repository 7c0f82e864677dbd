"""The cleanup pass: drop what the rewrites left unused, then check and recompile."""

from __future__ import annotations

import operator

import torch
import torch.fx

from passes.result import PassResult

__all__ = ["cleanup"]

# ``x += y`` on tensors: the tracer records these, and they write into ``x``.
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand,
                      operator.ior, operator.ixor, operator.ilshift, operator.irshift,
                      operator.imatmul, operator.setitem}


def cleanup(gm: torch.fx.GraphModule) -> PassResult:
    """Dead shape arithmetic goes (a literal replaced ``C // num_heads``); lint; recompile.

    torch.fx's dead-code elimination counts a ``call_method`` as pure, so an in-place
    ``a.mul_(2.0)`` whose result is not used would go, and the model with it would change.
    Every node that writes into a tensor is kept.
    """
    modified = gm.graph.eliminate_dead_code(
        is_impure_node=lambda node: node.is_impure() or _writes_in_place(gm, node))
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, modified, ["eliminated dead code"] if modified else [])


def _writes_in_place(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """``x.mul_()``, ``torch.relu_``, ``aten.add_``, ``x += y``, ``inplace=True``."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), "inplace", False) is True
    if node.op == "call_function":
        target = node.target
        if target in _INPLACE_OPERATORS:
            return True
        if isinstance(target, torch._ops.OpOverload):
            return target._schema.is_mutable
        name = getattr(target, "__name__", "")
        return name.endswith("_") and not name.endswith("__")
    return False

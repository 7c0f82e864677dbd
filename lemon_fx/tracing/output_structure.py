"""The model's own output structure on a traced graph.

Growth works on a graph whose output is a flat tuple of tensors; users want back what
their model returns (a ``ModelOutput``, a namedtuple, a dataclass, a dict). The graph's
output node holds the flat leaves and ``OutputTreeCodeGen`` rebuilds the structure in the
generated ``forward`` from a pytree spec: torch.export records that spec itself, and for
symbolic_trace ``lift_output_structure`` takes the namedtuple/dataclass constructors that
only build the output out of the graph (they would otherwise be ops without a rule).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.utils import _pytree as pytree

__all__ = ["OutputTreeCodeGen", "lift_output_structure"]


class OutputTreeCodeGen(_PyTreeCodeGen):
    """Positional inputs as they are, the output rebuilt by ``out_spec``."""

    def __init__(self, out_spec: pytree.TreeSpec):
        super().__init__(_PyTreeInfo([], None, out_spec))

    def process_inputs(self, *inputs: Any) -> Any:
        return list(inputs)

    def gen_fn_def(self, free_vars: list[str], maybe_return_annotation: str, *,
                   expanded_def: bool = False) -> str:
        return torch.fx.graph.CodeGen.gen_fn_def(self, free_vars, maybe_return_annotation,
                                                 expanded_def=expanded_def)


def _is_record_type(target: Any) -> bool:
    """A namedtuple class or a dataclass: a constructor that only groups values."""
    if not isinstance(target, type):
        return False
    if issubclass(target, tuple) and hasattr(target, "_fields"):
        return True
    return dataclasses.is_dataclass(target)


def _registered(cls: type) -> bool:
    if issubclass(cls, tuple):
        return True  # namedtuples are pytree nodes already
    if cls in pytree.SUPPORTED_NODES:
        return True
    try:  # a dataclass becomes a pytree node over its fields
        pytree.register_dataclass(cls)
    except Exception:  # an init=False field, a version without register_dataclass
        return False
    return True


def lift_output_structure(gm: torch.fx.GraphModule) -> bool:
    """Move the namedtuple/dataclass constructors that build only the output into the
    codegen; True when the graph changed."""
    graph = gm.graph
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    lifted: list[torch.fx.Node] = []

    def builds_output(node: torch.fx.Node) -> bool:
        return node.op == "call_function" and _is_record_type(node.target) and all(
            user is output or builds_output(user) for user in node.users)

    def template(arg: Any) -> Any:
        if isinstance(arg, torch.fx.Node) and builds_output(arg) and _registered(arg.target):
            lifted.append(arg)
            return arg.target(*[template(a) for a in arg.args],
                              **{k: template(v) for k, v in arg.kwargs.items()})
        if isinstance(arg, dict):
            return {k: template(v) for k, v in arg.items()}
        if isinstance(arg, (list, tuple)):
            return type(arg)(template(a) for a in arg)
        return arg

    structure = template(output.args[0])
    if not lifted:
        return False
    leaves, spec = pytree.tree_flatten(structure)
    output.args = (tuple(leaves),)
    for node in lifted:  # outer constructors first: each is unused once the one above goes
        graph.erase_node(node)
    graph._codegen = OutputTreeCodeGen(spec)
    graph.lint()
    gm.recompile()
    return True

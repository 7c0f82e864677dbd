"""Block stacks: ModuleList / Sequential children that run one after another on one stream.

Found from the graph: the ``call_module`` and ``get_attr`` targets of each numbered child of
a container, in execution order. A stack's kind is decided from the first block's
subgraph: ``pre_ln`` (the block output is ``x + F(norm(x))``), ``post_ln`` (it ends in a
norm applied to a residual sum), ``residual`` (a residual add without norms) or ``plain``.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

__all__ = ["BlockStack", "find_stacks"]

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)
if hasattr(nn, "RMSNorm"):
    _NORMS = _NORMS + (nn.RMSNorm,)


@dataclass
class BlockStack:
    name: str
    count: int
    kind: str


def _owner(node: torch.fx.Node) -> str | None:
    if node.op in ("call_module", "get_attr"):
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1]
        return path[0] if isinstance(path, tuple) else str(path)
    return None


def _numbered_children(gm: torch.fx.GraphModule) -> dict[str, dict[int, type]]:
    """``{container: {index: class}}`` from the module paths the tracer recorded.

    The GraphModule keeps only the submodules the graph calls, so ModuleLists are gone;
    ``nn_module_stack`` still names every enclosing module with its original class.
    """
    found: dict[str, dict[int, type]] = {}
    paths: dict[str, type] = {}
    for node in gm.graph.nodes:
        for path, cls in (node.meta.get("nn_module_stack") or {}).values():
            paths[path] = cls
        if node.op == "call_module":
            paths.setdefault(str(node.target), type(gm.get_submodule(node.target)))
    for path, cls in paths.items():
        prefix, _, last = path.rpartition(".")
        if last.isdigit():
            found.setdefault(prefix, {})[int(last)] = cls
    return found


def find_stacks(gm: torch.fx.GraphModule) -> list[BlockStack]:
    stacks = []
    for name, children in _numbered_children(gm).items():
        classes = set(children.values())
        if sorted(children) != list(range(len(children))) or len(classes) != 1:
            continue
        if issubclass(next(iter(classes)), (nn.Linear, nn.ReLU, nn.GELU, nn.Dropout,
                                             nn.LayerNorm, nn.Identity)):
            continue  # a Sequential of single layers is an MLP, not a block stack
        block_nodes = _nodes_of_block(gm, name, 0)
        if block_nodes:
            stacks.append(BlockStack(name, len(children), _kind(gm, block_nodes)))
    return stacks


def _nodes_of_block(gm: torch.fx.GraphModule, container: str, index: int) -> list[torch.fx.Node]:
    prefix = re.escape(f"{container}.{index}") + r"(\.|$)"
    return [n for n in gm.graph.nodes if (o := _owner(n)) is not None and re.match(prefix, o)]


def _kind(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> str:
    members = set(nodes)
    adds = [n for n in _block_span(gm, nodes) if n.op == "call_function"
            and n.target in (operator.add, torch.add)]
    last = _block_span(gm, nodes)[-1] if nodes else None
    if last is not None and last.op == "call_module" and isinstance(
            gm.get_submodule(last.target), _NORMS) and last in members:
        src = last.args[0]
        if isinstance(src, torch.fx.Node) and src in adds:
            return "post_ln"
    if adds:
        norms = [n for n in nodes if n.op == "call_module"
                 and isinstance(gm.get_submodule(n.target), _NORMS)]
        return "pre_ln" if norms else "residual"
    return "plain"


def _block_span(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> list[torch.fx.Node]:
    """All graph nodes from the block's first to its last module call (functional adds too)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    if not nodes:
        return []
    lo, hi = min(order[n] for n in nodes), max(order[n] for n in nodes)
    span = [n for n in gm.graph.nodes if lo <= order[n] <= hi]
    # a residual add right after the last module call belongs to the block
    after = [n for n in gm.graph.nodes if order[n] == hi + 1]
    return span + [n for n in after if n.op == "call_function"
                   and n.target in (operator.add, torch.add)]

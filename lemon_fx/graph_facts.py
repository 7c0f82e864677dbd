"""Frontend-neutral facts about fx nodes: shapes, plain values, readable op names, sources.

Everything in the analysis asks these functions, never ``node.meta`` directly, so that a
second frontend (torch.export, whose nodes carry ``meta["val"]``) plugs in here alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from lemon_fx.tracing import VALUE_KEY

__all__ = [
    "has_value",
    "op_name",
    "plain_value",
    "source_line",
    "tensor_shape",
    "tensor_shapes",
]


def _meta_to_shape(meta: Any) -> tuple[int, ...] | None:
    if meta is None:
        return None
    if isinstance(meta, torch.Tensor):  # torch.export's FakeTensor
        return tuple(int(s) for s in meta.shape)
    shape = getattr(meta, "shape", None)
    return None if shape is None else tuple(int(s) for s in shape)


def tensor_shapes(node: torch.fx.Node) -> tuple[tuple[int, ...] | None, ...] | None:
    """Shapes of a node whose result is a tuple of tensors (None entries for non-tensors)."""
    meta = node.meta.get("tensor_meta", node.meta.get("val"))
    if isinstance(meta, (tuple, list)) and not hasattr(meta, "shape"):
        return tuple(_meta_to_shape(m) for m in meta)
    return None


def tensor_shape(node: Any) -> tuple[int, ...] | None:
    """The shape of the tensor a node produces, or None when it produces no single tensor."""
    if not isinstance(node, torch.fx.Node):
        return None
    meta = node.meta.get("tensor_meta", node.meta.get("val"))
    if isinstance(meta, (tuple, list)) and not hasattr(meta, "shape"):
        return None  # a tuple of tensors: see tensor_shapes
    return _meta_to_shape(meta)


def computed_dtypes(gm: torch.fx.GraphModule) -> set[torch.dtype]:
    """The floating dtypes the graph's recorded tensors have: a float64 model that casts
    to float32 inside (Hugging Face's RMSNorm) computes in both."""
    dtypes = set()
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta", node.meta.get("val"))
        for m in meta if isinstance(meta, (tuple, list)) and not hasattr(meta, "shape") \
                else [meta]:
            dtype = getattr(m, "dtype", None)
            if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
                dtypes.add(dtype)
    return dtypes


def has_value(node: Any) -> bool:
    return not isinstance(node, torch.fx.Node) or VALUE_KEY in node.meta


def plain_value(arg: Any) -> Any:
    """The value a non-tensor argument had when the graph ran on the example inputs.

    Literals are returned as they are; nodes give their recorded value; containers are
    evaluated element by element.
    """
    if isinstance(arg, torch.fx.Node):
        if VALUE_KEY in arg.meta:
            return arg.meta[VALUE_KEY]
        val = arg.meta.get("val")
        if val is not None and not isinstance(val, torch.Tensor):
            return int(val) if hasattr(val, "node") else val
        raise KeyError(f"node {arg.name} has no recorded value")
    if isinstance(arg, (tuple, list)):
        return type(arg)(plain_value(a) for a in arg)
    return arg


def op_name(node: torch.fx.Node, root: torch.nn.Module | None = None) -> str:
    """A readable spelling of a node's op: ``nn.Linear``, ``F.gelu``, ``Tensor.view``."""
    if node.op == "call_module":
        if root is None:
            return f"module {node.target}"
        cls = type(root.get_submodule(node.target))
        if cls.__module__.startswith("torch.nn.modules"):
            return f"nn.{cls.__name__}"
        return f"{cls.__module__}.{cls.__qualname__}"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        target = node.target
        module = getattr(target, "__module__", None) or ""
        name = getattr(target, "__name__", str(target))
        if module.startswith("torch.nn.functional"):
            return f"F.{name}"
        if module == "_operator":
            return f"operator.{name}"
        if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
            return str(target)
        return f"{module.replace('torch._C._nn', 'torch')}.{name}" if module else name
    return f"{node.op} {node.target}"


def source_line(node: torch.fx.Node) -> str | None:
    """The user's source line for a node, when the tracer recorded a stack trace."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    found = None
    for i, line in enumerate(lines):
        if not line.startswith("File "):
            continue
        path = line.split('"')[1] if '"' in line else line
        if "/torch/" in path or "/lemon_fx/" in path or path.startswith("<"):
            continue
        code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
        where = line[5:].replace('"', "")
        found = f"{where}: {code}" if code else where
    return found

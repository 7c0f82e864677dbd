"""Graph facts: every ``meta`` key lemon_fx reads or writes, its writer and its readers.

A graph carries facts on its nodes and on the GraphModule:

==========================  =========================================  ====================
key                         what                                       written by
==========================  =========================================  ====================
``tensor_meta``             shape/dtype of a node's tensor(s)          ``record_facts``
``val``                     torch.export's FakeTensor or SymInt        torch.export
``lemon_fx.value``          a non-tensor result (sizes, ints, tuples)  ``record_facts``
``nn_module_stack``         the modules a node was traced inside       torch, ``set_module_stack``
gm ``lemon_fx.example_inputs``  the inputs the facts were recorded on  ``record_facts``
gm ``lemon_fx.source_class``    the traced model's class               ``set_source``
gm ``lemon_fx.frontend``        ``"torch.export"`` for export graphs   ``set_source``
gm ``lemon_fx.config``          a Hugging Face model's config          ``set_source``
gm ``lemon_fx.report``          a grown module's ``GrowthReport``      ``set_growth``
gm ``lemon_fx.plan``            the plan a module was grown with       ``set_growth``
==========================  =========================================  ====================

Everything above this module asks these functions, never ``meta`` directly, so that a
frontend (torch.export's ``val`` beside symbolic_trace's ``tensor_meta``) plugs in here alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

__all__ = [
    "EXAMPLE_INPUTS_KEY",
    "VALUE_KEY",
    "computed_dtypes",
    "example_inputs",
    "export_value",
    "grown_plan",
    "growth_of",
    "has_tensor_fact",
    "has_value",
    "model_config",
    "module_stack",
    "preserved_state",
    "record_facts",
    "set_growth",
    "set_module_stack",
    "set_source",
    "source_class",
    "op_name",
    "plain_value",
    "source_line",
    "tensor_shape",
    "tensor_shapes",
]


# -- keys and writers ----------------------------------------------------------------------
EXAMPLE_INPUTS_KEY = "lemon_fx.example_inputs"
VALUE_KEY = "lemon_fx.value"
SOURCE_CLASS_KEY = "lemon_fx.source_class"
FRONTEND_KEY = "lemon_fx.frontend"
CONFIG_KEY = "lemon_fx.config"
REPORT_KEY = "lemon_fx.report"
PLAN_KEY = "lemon_fx.plan"


class _FactRecorder(torch.fx.Interpreter):
    """Runs the graph once and records each node's tensor metadata or plain value."""

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        _record(n, result)
        return result


def _record(node: torch.fx.Node, result: Any) -> None:
    if isinstance(result, torch.Tensor):
        node.meta["tensor_meta"] = _extract_tensor_metadata(result)
        return
    if isinstance(result, (tuple, list)) and any(isinstance(r, torch.Tensor) for r in result):
        node.meta["tensor_meta"] = tuple(
            _extract_tensor_metadata(r) if isinstance(r, torch.Tensor) else None for r in result
        )
        node.meta[VALUE_KEY] = tuple(None if isinstance(r, torch.Tensor) else r for r in result)
        return
    if isinstance(result, (int, float, bool, str, torch.Size, slice, type(None))) or (
        isinstance(result, (tuple, list))
        and all(isinstance(r, (int, float, bool, type(None))) for r in result)
    ):
        node.meta[VALUE_KEY] = result


def record_facts(gm: torch.fx.GraphModule, example_inputs: Iterable[Any], *,
                 eval_mode: bool = False) -> Any:
    """Run ``gm`` once on ``example_inputs`` (no grad), store shapes and values on nodes,
    and return its output (so a check that needs the output does not run it again).
    ``eval_mode``: run with every submodule in eval mode (the flags are put back); the
    graph is fixed, so the recorded shapes are the same in either mode.

    A model on the meta device (weightless planning) runs on meta copies of the inputs:
    shapes and sizes are recorded, values that need data are not. The run leaves no other
    trace: a BatchNorm in train mode updates its running statistics
    (and ``num_batches_tracked``) on every forward, which would make the traced and the
    grown model differ from the user's; every buffer is put back afterwards.
    """
    example_inputs = tuple(example_inputs)
    run_on = example_inputs
    if any(t.is_meta for t in gm.state_dict().values()):
        # a weightless model: shapes only, so its inputs go to the meta device too
        run_on = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x
                       for x in example_inputs)
    with torch.no_grad(), preserved_state(gm, eval_mode=eval_mode):
        output = _FactRecorder(gm).run(*run_on)
    gm.meta[EXAMPLE_INPUTS_KEY] = example_inputs
    return output


@contextlib.contextmanager
def preserved_state(module: nn.Module, *, eval_mode: bool = False) -> Iterator[nn.Module]:
    """Run ``module`` and leave it as it was: its buffers (running statistics, counters)
    and, with ``eval_mode``, the train/eval flag of every submodule are put back."""
    saved = {name: b.detach().clone() for name, b in module.named_buffers()}
    flags = [(m, m.training) for m in module.modules()]
    if eval_mode:  # the flags themselves: a torch.export module refuses .eval()
        for m, _ in flags:
            m.training = False
    try:
        yield module
    finally:
        for m, training in flags:
            m.training = training
        with torch.no_grad():
            for name, buffer in module.named_buffers():
                buffer.copy_(saved[name])


def set_source(gm: torch.fx.GraphModule, model_class: type, *, exported: bool = False,
               config: Any = None) -> None:
    """Remember what ``gm`` was traced from: the class, the frontend, a HF config."""
    gm.meta[SOURCE_CLASS_KEY] = model_class
    if exported:
        gm.meta[FRONTEND_KEY] = "torch.export"
    if config is not None:
        gm.meta[CONFIG_KEY] = config


def set_module_stack(node: torch.fx.Node, stack: dict) -> None:
    node.meta["nn_module_stack"] = stack


def set_growth(grown: torch.fx.GraphModule, report: Any, plan: Any) -> None:
    """Attach ``grow``'s report and plan to the module it returned."""
    grown.meta[REPORT_KEY] = report
    grown.meta[PLAN_KEY] = plan


# -- readers -----------------------------------------------------------------------------
def example_inputs(gm: torch.fx.GraphModule) -> tuple[Any, ...] | None:
    """The inputs the facts were recorded on, or None for a graph without facts."""
    return gm.meta.get(EXAMPLE_INPUTS_KEY)


def source_class(gm: torch.fx.GraphModule) -> type | None:
    return gm.meta.get(SOURCE_CLASS_KEY)


def model_config(gm: torch.fx.GraphModule) -> Any:
    return gm.meta.get(CONFIG_KEY)


def growth_of(grown: torch.fx.GraphModule) -> Any:
    """The ``GrowthReport`` of a module returned by ``grow``; KeyError for any other."""
    return grown.meta[REPORT_KEY]


def grown_plan(grown: torch.fx.GraphModule) -> Any:
    return grown.meta.get(PLAN_KEY)


def module_stack(node: torch.fx.Node) -> dict:
    """``{key: (qualified path, module class)}`` of the modules a node was traced inside."""
    return node.meta.get("nn_module_stack") or {}


def export_value(node: Any) -> Any:
    """torch.export's own ``val`` of a node (a FakeTensor, a SymInt), or None."""
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def has_tensor_fact(node: torch.fx.Node) -> bool:
    """Whether the node's result was recorded as a tensor (or tensors)."""
    return "tensor_meta" in node.meta or "val" in node.meta


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

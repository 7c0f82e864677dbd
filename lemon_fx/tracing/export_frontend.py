"""The torch.export frontend: for models ``torch.fx.symbolic_trace`` cannot trace
(Hugging Face transformers, data-dependent Python), an ATen-level GraphModule.

``torch.export.export(..., strict=False)`` gives a graph of ATen ops whose parameters are
``get_attr`` nodes under their original qualified names, so the grown state_dict keeps the
source's keys. Batch and sequence are exported as dynamic dims (``Dim.AUTO``): they become
``aten.sym_size.int`` nodes and every int literal left in a view or expand is a width, which
the rules can rewrite. The rest of lemon_fx sees an ordinary GraphModule: the same
analysis, the same registry (ATen ops are registered next to their torch spellings).

Clean-ups after export, each needed for growth or for float64 verification:
- the input guards, pre-hooks and pytree codegen go, so ``forward(input_ids)`` is flat;
- ``_assert_tensor_metadata`` and casts that changed nothing at export go (they would pin
  float32 and break ``.double()``);
- pure nodes nothing reads go (they would constrain widths for nothing);
- ``nn_module_stack`` holds class *names*; they are resolved to classes so block stacks are
  found as for symbolic_trace graphs.
"""

from __future__ import annotations

import copy
import inspect as pyinspect
from typing import Any

import torch
import torch.fx
from torch import nn

from lemon_fx.tracing.graph_facts import export_value, module_stack, set_module_stack, set_source
from lemon_fx.tracing.output_structure import OutputTreeCodeGen

__all__ = ["export_graph"]

aten = torch.ops.aten


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Dims 0 and 1 of every tensor input of rank >= 2 are batch and sequence."""
    bound = pyinspect.signature(model.forward).bind(*args, **kwargs)

    def spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}
        if isinstance(value, dict):  # what forward's **kwargs collected
            return {key: spec(item) for key, item in value.items()}
        return None

    return {name: spec(value) for name, value in bound.arguments.items()}


def export_graph(model: nn.Module, args: tuple, kwargs: dict | None = None
                 ) -> torch.fx.GraphModule:
    """Export a private copy of ``model`` and return a flat, growable GraphModule."""
    private = copy.deepcopy(model).eval()
    config = getattr(private, "config", None)
    if getattr(config, "use_cache", None):
        config.use_cache = False  # a KV cache in the outputs is not exportable
    kwargs = dict(kwargs or {})
    program = torch.export.export(private, args, kwargs, strict=False,
                                  dynamic_shapes=_dynamic_shapes(private, args, kwargs))
    gm = program.module()
    _flatten(gm)
    _accept_pinned(gm, kwargs)
    _drop_dtype_pins(gm)
    _drop_dead_code(gm)
    _resolve_module_stack(gm, private)
    set_source(gm, type(model), exported=True, config=config)
    return gm


def _drop_dead_code(gm: torch.fx.GraphModule) -> None:
    """Pure nodes whose value nothing reads go: BART's ``inputs_embeds[:, :, -1]``, kept
    by export although only its shape was wanted, would otherwise fix the hidden width
    (an int index on it) for nothing."""
    if gm.graph.eliminate_dead_code():
        gm.graph.lint()
        gm.recompile()


def _accept_pinned(gm: torch.fx.GraphModule, kwargs: dict) -> None:
    """Keyword examples that are no tensors (``use_cache=False``) were baked into the
    graph; they become trailing inputs that default to their value and are not read, so
    the traced module is called as the model was (``gm(ids, use_cache=False)``)."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    taken = {n.name for n in placeholders}
    after = placeholders[-1] if placeholders else None
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor) or name in taken or not isinstance(
                value, (bool, int, float, str, type(None))):
            continue
        if after is None:
            with graph.inserting_before(next(iter(graph.nodes))):
                after = graph.placeholder(name, default_value=value)
        else:
            with graph.inserting_after(after):
                after = graph.placeholder(name, default_value=value)
    graph.lint()
    gm.recompile()


def _flatten(gm: torch.fx.GraphModule) -> None:
    graph = gm.graph
    gm._forward_pre_hooks.clear()  # export's input-constraint checks
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        gm.delete_submodule("_guards_fn")
    for node in list(graph.nodes):
        if node.op == "placeholder" and not node.users and not isinstance(
                export_value(node), torch.Tensor):
            graph.erase_node(node)
    out_spec = getattr(getattr(graph._codegen, "pytree_info", None), "out_spec", None)
    # a plain positional forward that returns the model's own output structure
    graph._codegen = (OutputTreeCodeGen(out_spec) if out_spec is not None
                      else torch.fx.graph.CodeGen())
    graph.lint()
    gm.recompile()


_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default}


def _drop_dtype_pins(gm: torch.fx.GraphModule) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten._assert_tensor_metadata.default:
            graph.erase_node(node)
        elif node.target is aten.alias.default or node.target in _CASTS:
            src, out = export_value(node.args[0]), export_value(node)
            same = (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor)
                    and src.dtype == out.dtype and src.device == out.device)
            if node.target is aten.alias.default or same:
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
    graph.lint()
    gm.recompile()


def _resolve_module_stack(gm: torch.fx.GraphModule, model: nn.Module) -> None:
    for node in gm.graph.nodes:
        stack = module_stack(node)
        if not stack:
            continue
        resolved = {}
        for key, (path, cls) in stack.items():
            base = path.split("@")[0]
            try:
                module = model.get_submodule(base) if base else model
            except AttributeError:
                continue  # export's sentinel entries
            resolved[key] = (base, type(module) if isinstance(cls, str) else cls)
        set_module_stack(node, resolved)

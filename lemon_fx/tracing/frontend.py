"""``trace``: turn a user's ``nn.Module`` into a ``torch.fx.GraphModule`` with shape facts.

Two frontends: ``torch.fx.symbolic_trace`` (module-level ops) and ``torch.export``
(ATen ops, ``tracing.export_frontend``). Both leave their facts where
``tracing.graph_facts`` reads them; nothing above this floor touches ``node.meta``.

Which modules stay whole (one ``call_module`` node) is the caller's to say: ``keep_whole``
is a predicate over module classes (the api passes "has a registered rule"), so tracing
knows nothing of rules.
"""

from __future__ import annotations

import copy
import inspect as pyinspect
import traceback
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx
from torch import nn

from lemon_fx.errors import Problem, TraceError, first_line
from lemon_fx.tracing.export_frontend import export_graph
from lemon_fx.tracing.graph_facts import record_facts, set_source
from lemon_fx.tracing.output_structure import lift_output_structure

__all__ = ["trace"]

def _user_frame(exc: BaseException) -> str | None:
    """The innermost traceback frame that is the user's code, not torch's or ours."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        path = frame.filename.replace("\\", "/")
        if "/torch/" in path or "/lemon_fx/" in path or path.startswith("<"):
            continue
        return f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return None


def _fx_arguments(model: nn.Module, example_inputs: Any,
                  example_kwargs: dict[str, Any] | None,
                  concrete_args: dict[str, Any] | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """What symbolic_trace gets for each argument of ``forward``, in its order.

    Positional examples come first; then every parameter is a graph input when its
    keyword example is a tensor, and pinned (a concrete argument) otherwise: a keyword
    example that is no tensor (``use_cache=False``), ``concrete_args``, or the default of
    a parameter given no example (so ``if mask is not None:`` traces the branch the graph
    will run). Keywords may skip parameters: there is no positional gap rule. Returns the
    values to run the graph with (one per placeholder) and the pinned arguments.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    args = tuple(example_inputs)
    kwargs = dict(example_kwargs or {})
    pinned_by_user = dict(concrete_args or {})
    signature = pyinspect.signature(model.forward).parameters.values()
    params = [p for p in signature if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    unknown = sorted(set(kwargs) - {p.name for p in params})
    if unknown and any(p.kind == p.VAR_KEYWORD for p in signature):
        # forward(**kwargs) takes them, symbolic_trace cannot: torch.export can
        raise TraceError(
            "symbolic_trace cannot pass keywords through **kwargs",
            [Problem(reason=f"example_kwargs {unknown} reach forward's **kwargs",
                     fix="trace with frontend='export'")]) from ValueError(unknown)
    if unknown:
        raise TraceError(
            f"{type(model).__name__}.forward has no argument {unknown[0]!r}",
            [Problem(reason=f"example_kwargs {unknown} are not arguments of forward"
                     f"({', '.join(p.name for p in params)})",
                     fix="name forward()'s own arguments in example_kwargs")])
    inputs, pinned = list(args), {}
    for p in params[len(args):]:
        if p.name in pinned_by_user:
            value = pinned_by_user[p.name]
        elif p.name in kwargs and isinstance(kwargs[p.name], torch.Tensor):
            inputs.append(kwargs[p.name])  # a graph input
            continue
        elif p.name in kwargs:
            value = kwargs[p.name]
        elif p.default is not p.empty:
            value = p.default
        else:
            raise TraceError(
                f"{type(model).__name__}.forward needs argument {p.name!r}",
                [Problem(reason=f"no example was given for {p.name!r}",
                         fix="add it to example_inputs or example_kwargs")])
        pinned[p.name] = value
        inputs.append(value)
    return tuple(inputs), pinned


def _pin_defaults(gm: torch.fx.GraphModule, model: nn.Module, pinned: dict[str, Any]) -> None:
    """A pinned argument's placeholder defaults to its pinned value, so the traced module
    is called like the model was (``gm(ids)`` after ``use_cache=False``)."""
    names = [p.name for p in pyinspect.signature(model.forward).parameters.values()
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(names):
        return
    for name, node in zip(names, placeholders):
        if name in pinned and isinstance(pinned[name], (bool, int, float, str, type(None))):
            node.args = (pinned[name],)
    gm.recompile()


def trace(
    model: nn.Module,
    example_inputs: Any,
    example_kwargs: dict[str, Any] | None = None,
    *,
    leaf_modules: Iterable[type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
    frontend: str = "auto",
    keep_whole: Callable[[type[nn.Module]], bool] = lambda cls: False,
) -> torch.fx.GraphModule:
    """Trace ``model`` into a GraphModule with shape facts on every node.

    ``keep_whole(module_class)`` says which modules stay single ``call_module`` nodes
    (``lemon_fx.trace`` passes "has a registered rule"); ``leaf_modules`` adds classes.

    The model is deep-copied first, so tracing and the shape run never touch the user's
    module (a BatchNorm in train mode would otherwise update its running stats).
    ``leaf_modules`` are kept as single ``call_module`` nodes; ``concrete_args`` pins
    Python-level arguments, as in ``torch.fx.symbolic_trace``. ``frontend``: ``"fx"``
    (symbolic_trace), ``"export"`` (torch.export, ATen ops) or ``"auto"`` (fx, and export
    when fx fails, e.g. for Hugging Face models).
    """
    if frontend not in ("auto", "fx", "export"):
        raise TraceError("unknown frontend", [Problem(reason=f"frontend={frontend!r}",
                                                      fix="use 'auto', 'fx' or 'export'")])
    if frontend == "export":
        return _trace_export(model, example_inputs, example_kwargs)
    try:
        return _trace_fx(model, example_inputs, example_kwargs, leaf_modules, concrete_args,
                         keep_whole)
    except TraceError as fx_error:
        if frontend == "fx" or not isinstance(fx_error.__cause__, Exception) or \
                "example inputs" in fx_error.message:
            raise
        try:
            return _trace_export(model, example_inputs, example_kwargs)
        except TraceError as export_error:
            raise TraceError(
                f"neither torch.fx.symbolic_trace nor torch.export could trace "
                f"{type(model).__name__}", list(fx_error.problems) + list(export_error.problems)
            ) from export_error


def _on_meta(value: Any) -> Any:
    return value.to("meta") if isinstance(value, torch.Tensor) else value


def _trace_export(model: nn.Module, example_inputs: Any,
                  example_kwargs: dict[str, Any] | None) -> torch.fx.GraphModule:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    args, kwargs = tuple(example_inputs), dict(example_kwargs or {})
    run_args, run_kwargs = args, kwargs
    if any(t.is_meta for t in model.state_dict().values()):
        # a weightless model: real inputs would meet meta weights (a conv refuses that)
        run_args = tuple(_on_meta(x) for x in args)
        run_kwargs = {k: _on_meta(v) for k, v in kwargs.items()}
    try:
        gm = export_graph(model, run_args, run_kwargs)
    except Exception as exc:  # export raises many types; all mean "could not export"
        raise TraceError(
            f"torch.export could not export {type(model).__name__}",
            [Problem(reason=first_line(exc),
                     source=_user_frame(exc),
                     fix="see torch.export's message; pass only tensors and named forward() "
                     "arguments as example inputs")]) from exc
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    flat = list(args) + [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    record_facts(gm, tuple(flat[: len(placeholders)]))
    return gm


def _constants_out_of_state_dict(gm: torch.fx.GraphModule) -> None:
    """Tensors that forward builds (timm BEiT's ``torch.zeros_like(v_bias)``, an index
    table) are lifted by fx into ``_tensor_constant<N>`` buffers: they are no weights of
    the model, and a state_dict holding them would not load into the model's class. They
    stay buffers of the GraphModule (so ``.to()`` moves them), outside its state_dict."""
    for name, value in list(gm.named_buffers(recurse=False)):
        if name.startswith("_tensor_constant"):
            del gm._buffers[name]
            gm.register_buffer(name, value, persistent=False)


def _trace_fx(
    model: nn.Module,
    example_inputs: Any,
    example_kwargs: dict[str, Any] | None,
    leaf_modules: Iterable[type[nn.Module]],
    concrete_args: dict[str, Any] | None,
    keep_whole: Callable[[type[nn.Module]], bool],
) -> torch.fx.GraphModule:
    if not isinstance(model, nn.Module):
        raise TraceError(
            "lemon_fx.trace needs an nn.Module",
            [Problem(reason=f"got {type(model).__name__}", fix="pass the model instance")],
        )
    inputs, concrete_args = _fx_arguments(model, example_inputs, example_kwargs, concrete_args)
    private = copy.deepcopy(model)
    leaves = tuple(leaf_modules)
    class _Tracer(torch.fx.Tracer):
        # stack traces let every error name the user's source line
        record_stack_traces = True

        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            # a module with a registered rule is grown by that rule, so it stays one node
            return (isinstance(m, leaves) or keep_whole(type(m))
                    or super().is_leaf_module(m, qualname))

    try:
        graph = _Tracer().trace(private, concrete_args=concrete_args)
    except Exception as exc:  # torch.fx raises many types; all mean "could not trace"
        raise TraceError(
            f"torch.fx.symbolic_trace could not trace {type(model).__name__}",
            [
                Problem(
                    reason=first_line(exc),
                    source=_user_frame(exc),
                    fix="make the failing line independent of tensor values, or pass the "
                    "module that contains it in leaf_modules=(...) (it must then keep its "
                    "width), or pin Python arguments with concrete_args={...}",
                )
            ],
        ) from exc
    gm = torch.fx.GraphModule(private, graph, class_name=type(model).__name__)
    _constants_out_of_state_dict(gm)
    _pin_defaults(gm, model, concrete_args)
    lift_output_structure(gm)
    set_source(gm, type(model))
    try:
        record_facts(gm, inputs)
    except Exception as exc:
        raise TraceError(
            f"the traced graph of {type(model).__name__} failed on the example inputs",
            [
                Problem(
                    reason=first_line(exc),
                    source=_user_frame(exc),
                    fix="check that example_inputs are what forward() expects "
                    "(shapes, dtypes, order)",
                )
            ],
        ) from exc
    return gm

"""The width pass: grow every width group of a GraphModule to its resolved size.

Two phases, so that nothing is built unless everything can be:

1. every node's rule rewrites into an ``Edits`` record (new literals, new module
   attributes) and may refuse; any refusal raises before the module is touched;
2. the edits are applied to the private copy, and every parameter with a growing axis is
   rebuilt from the claims made during analysis (``grow_parameter``).

Parameters are transformed in float64 and cast back, so the maths is exact to rounding.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.fx
from torch import nn

from lemon_fx.analysis.width import AxisUse, Claim
from lemon_fx.axes.expansion import embed, split_equal, split_lemon
from lemon_fx.axes.vocabulary import CIRC
from lemon_fx.errors import NotLosslessError
from lemon_fx.resolution.rewrite import Edits, NodeRewrite
from lemon_fx.resolution.width import Resolution
from passes.result import PassResult

__all__ = ["grow_parameter", "plan_edits", "widen"]


def plan_edits(res: Resolution) -> Edits:
    """Phase 1: ask every rule for its rewrite; raise if any refuses."""
    edits = Edits()
    for node, rule in res.analysis.rules.items():
        rule.rewrite(node, NodeRewrite(res, node, edits))
    if edits.problems:
        raise NotLosslessError("the graph cannot be rewritten for this plan", edits.problems)
    return edits


def _generator(seed: int, name: str) -> torch.Generator:
    # per-parameter streams: a weight does not change when another layer is added
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def noise_bound(source: torch.Tensor, fan_in: int) -> float:
    """The bound of LEMON's uniform split noise: the layer's own weight scale.

    LEMON draws the noise from the layer's initialization. What a trained layer was
    initialized with is not recorded, so its weights' spread stands in for it: a uniform
    draw with the same standard deviation (``sqrt(3) * std``). PyTorch's default
    ``U(+-1/sqrt(fan_in))`` is used for a constant weight. Matching the weights' own scale
    matters: noise far above it (a Hugging Face model initialized at std 0.02, split with
    PyTorch's default bound) amplifies float32 rounding differences between copies from
    layer to layer.
    """
    std = float(source.detach().double().std()) if source.numel() > 1 else 0.0
    if std > 0:
        return 3.0**0.5 * std
    return 1.0 / max(fan_in, 1) ** 0.5


def grow_parameter(name: str, tensor: torch.Tensor, claim: Claim, res: Resolution,
                   edits: Edits) -> torch.Tensor:
    """Expand fan-out axes by ``E``, then split fan-in axes (LEMON or Net2Net)."""
    dims = res.analysis.param_dims[name]
    t = tensor.detach().to(torch.float64)
    uses = list(claim.axes) + [None] * (len(dims) - len(claim.axes))
    for axis, use in enumerate(uses):
        if isinstance(use, AxisUse) and use.kind == "expand" and res.grows(dims[axis]):
            t = embed(t, axis, res.axis_growth(dims[axis], res.form(use.slot)))
    for axis, use in enumerate(uses):
        if isinstance(use, AxisUse) and use.kind == "split" and res.grows(dims[axis]):
            growth = res.axis_growth(dims[axis], res.form(use.slot))
            shape = list(t.shape)
            shape[axis] = res.grown(dims[axis])
            if res.plan.method == "net2net":
                t = split_equal(t, axis, growth)
                continue
            fan_in = shape[axis] if axis != 1 else math.prod(shape[1:])
            bound = res.plan.noise_scale * noise_bound(tensor, fan_in)
            noise = torch.rand(shape, generator=_generator(res.plan.seed, name),
                               dtype=torch.float64) * (2 * bound) - bound
            t = split_lemon(t, axis, growth, noise)
    if claim.transform is not None:
        layouts = tuple(res.axis_growth(d, CIRC) for d in claim.transform.dims)
        t = claim.transform.fn(tensor.detach().to(torch.float64), t, layouts)
    return t.to(tensor.dtype)


def _set_tensor(gm: torch.fx.GraphModule, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    old = getattr(owner, attr)
    if isinstance(old, nn.Parameter):
        setattr(owner, attr, nn.Parameter(value, requires_grad=old.requires_grad))
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        setattr(owner, attr, value)


def widen(gm: torch.fx.GraphModule, res: Resolution, edits: Edits | None = None) -> PassResult:
    """Phase 2 on ``gm``, a private copy of ``res.analysis.gm`` (nodes match by name)."""
    edits = edits if edits is not None else plan_edits(res)
    source = res.analysis.gm
    new_tensors = {}
    for name, dims in res.analysis.param_dims.items():
        if not any(res.grows(d) for d in dims):
            continue
        claim = res.analysis.claims[name][0]
        tensor = source.get_parameter(name) if _is_param(source, name) else source.get_buffer(name)
        new_tensors[name] = grow_parameter(name, tensor, claim, res, edits)
    nodes = {n.name: n for n in gm.graph.nodes}
    for node_name, key, value in edits.args:
        node = nodes[node_name]
        # rules speak of the source graph; its nodes match the copy's by name
        value = torch.fx.node.map_arg(value, lambda n: nodes[n.name])
        if isinstance(key, int):
            args = list(node.args)
            args[key] = value
            node.args = tuple(args)
        else:
            kwargs = dict(node.kwargs)
            kwargs[key] = value
            node.kwargs = kwargs
    for module_name, attr, value in edits.attrs:
        path, _, attr = f"{module_name}.{attr}".rpartition(".")
        setattr(gm.get_submodule(path), attr, value)
    for name, value in new_tensors.items():
        _set_tensor(gm, name, value)
    for alias, name in res.analysis.aliases.items():  # keep tied weights tied
        if name in new_tensors:
            owner_name, _, attr = alias.rpartition(".")
            owner = gm.get_submodule(owner_name) if owner_name else gm
            tensor_owner, _, tensor_attr = name.rpartition(".")
            shared = getattr(gm.get_submodule(tensor_owner) if tensor_owner else gm, tensor_attr)
            if isinstance(shared, nn.Parameter):
                setattr(owner, attr, shared)
            else:
                owner._buffers[attr] = shared
    gm.graph.lint()
    gm.recompile()
    rewrites = [f"grew {n}: {tuple(source.get_parameter(n).shape) if _is_param(source, n) else ''}"
                f" -> {tuple(v.shape)}" for n, v in new_tensors.items()] + edits.notes
    return PassResult(gm, bool(new_tensors or edits.args or edits.attrs), rewrites)


def _is_param(gm: torch.nn.Module, name: str) -> bool:
    try:
        gm.get_parameter(name)
        return True
    except AttributeError:
        return False

"""The width pass: grow every width group of a GraphModule to its resolved size.

Two phases, so that nothing is built unless everything can be:

1. every node's rule rewrites into an ``Edits`` record (new literals, new module
   attributes) and may refuse; any refusal raises before the module is touched;
2. the edits are applied to the private copy, and every parameter with a growing axis gets
   its recipe from the claims made during analysis (``width_recipe``): plain data that
   ``GrowthRecipe.apply`` turns into values (in float64, cast back: exact to rounding).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.fx
from torch import nn

from lemon_fx.analysis.width import AxisUse, Claim
from lemon_fx.axes.vocabulary import CIRC
from lemon_fx.errors import NotLosslessError
from lemon_fx.recipe.recipe import GrowthRecipe, Step, TensorRecipe
from lemon_fx.resolution.rewrite import Edits, NodeRewrite
from lemon_fx.resolution.width import Resolution
from passes.result import PassResult

__all__ = ["plan_edits", "tie_aliases", "widen", "width_recipe", "width_recipes"]


def plan_edits(res: Resolution) -> Edits:
    """Phase 1: ask every rule for its rewrite; raise if any refuses."""
    edits = Edits()
    for node, rule in res.analysis.rules.items():
        rule.rewrite(node, NodeRewrite(res, node, edits))
    if edits.problems:
        raise NotLosslessError("the graph cannot be rewritten for this plan", edits.problems)
    return edits


def width_recipe(name: str, dtype: torch.dtype, claim: Claim, res: Resolution
                 ) -> TensorRecipe:
    """How the width pass makes parameter ``name``: expand its fan-out axes by ``E``, then
    split its fan-in axes (LEMON's split with the noise stream ``name``, or Net2Net's),
    then the claim's own transforms. Reads no values: shapes and layouts only."""
    dims = res.analysis.param_dims[name]
    shape = [res.analysis.dims.size(d) for d in dims]
    steps: list[Step] = []
    uses = list(claim.axes) + [None] * (len(dims) - len(claim.axes))
    for axis, use in enumerate(uses):
        if isinstance(use, AxisUse) and use.kind == "expand" and res.grows(dims[axis]):
            steps.append(Step("embed", axis=axis,
                              layout=res.axis_growth(dims[axis], res.form(use.slot))))
            shape[axis] = res.grown(dims[axis])
    for axis, use in enumerate(uses):
        if isinstance(use, AxisUse) and use.kind == "split" and res.grows(dims[axis]):
            layout = res.axis_growth(dims[axis], res.form(use.slot))
            shape[axis] = res.grown(dims[axis])
            if res.plan.method == "net2net":
                steps.append(Step("split", axis=axis, layout=layout))
                continue
            fan_in = shape[axis] if axis != 1 else math.prod(shape[1:])
            steps.append(Step("split", axis=axis, layout=layout, stream=name, fan_in=fan_in))
    for transform in claim.transforms:
        slots = transform.slots or (None,) * len(transform.dims)
        steps.append(Step("transform", name=transform.name, layouts=tuple(
            res.axis_growth(d, CIRC if slot is None else res.form(slot))
            for d, slot in zip(transform.dims, slots)),
            reads=tuple(transform.reads)))
    return TensorRecipe(name, tuple(shape), dtype, tuple(steps))


def width_recipes(res: Resolution) -> dict[str, TensorRecipe]:
    """The recipe of every parameter and buffer that has a growing axis."""
    source = res.analysis.gm
    made = {}
    for name, dims in res.analysis.param_dims.items():
        if not any(res.grows(d) for d in dims):
            continue
        claim = res.analysis.claims[name][0]
        dtype = (source.get_parameter(name) if _is_param(source, name)
                 else source.get_buffer(name)).dtype
        made[name] = width_recipe(name, dtype, claim, res)
    return made


def _tensor(gm: torch.nn.Module, name: str) -> torch.Tensor:
    return gm.get_parameter(name) if _is_param(gm, name) else gm.get_buffer(name)


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


def widen(gm: torch.fx.GraphModule, res: Resolution, edits: Edits | None = None
          ) -> tuple[PassResult, dict[str, TensorRecipe]]:
    """Phase 2 on ``gm``, a private copy of ``res.analysis.gm`` (nodes match by name).

    The graph's literals and module attributes are rewritten; every tensor with a
    growing axis is replaced by an empty one of its grown shape on the meta device, and
    its recipe returned (``GrowthRecipe.apply`` makes the values)."""
    edits = edits if edits is not None else plan_edits(res)
    recipes = width_recipes(res)
    new_tensors = {name: torch.empty(r.shape, dtype=r.dtype, device="meta")
                   for name, r in recipes.items()}
    # a tensor outside the state_dict (BEiT's non-persistent k_bias of zeros) is no
    # weight a checkpoint carries: it is made here, from the source's value
    kept = set(res.analysis.gm.state_dict())
    outside = {name: r for name, r in recipes.items() if name not in kept}
    if outside:
        making = GrowthRecipe(outside, seed=res.plan.seed, noise_scale=res.plan.noise_scale)
        for name in outside:
            value = _tensor(res.analysis.gm, name)
            if not value.is_meta:
                new_tensors[name] = making.make(name, value)
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
    tie_aliases(gm, {alias: name for alias, name in res.analysis.aliases.items()
                     if name in new_tensors})
    gm.graph.lint()
    gm.recompile()
    source = res.analysis.gm
    rewrites = [f"grew {n}: {tuple(source.get_parameter(n).shape) if _is_param(source, n) else ''}"
                f" -> {tuple(v.shape)}" for n, v in new_tensors.items()] + edits.notes
    return PassResult(gm, bool(new_tensors or edits.args or edits.attrs), rewrites), recipes


def tie_aliases(module: nn.Module, aliases: Mapping[str, str]) -> None:
    """Keep tied tensors tied: each ``alias`` attribute becomes the tensor of ``name``."""
    for alias, name in aliases.items():
        owner_name, _, attr = alias.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        target_name, _, target_attr = name.rpartition(".")
        shared = getattr(module.get_submodule(target_name) if target_name else module,
                         target_attr)
        if isinstance(shared, nn.Parameter):
            setattr(owner, attr, shared)
        else:
            owner._buffers[attr] = shared


def _is_param(gm: torch.nn.Module, name: str) -> bool:
    try:
        gm.get_parameter(name)
        return True
    except AttributeError:
        return False

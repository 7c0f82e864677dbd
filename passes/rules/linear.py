"""Rules for affine layers: ``nn.Linear`` and ``F.linear``.

Maths. ``y = x W^T + b`` with ``x`` of width S_in (expansion ``E_in``) and ``y`` of width
S_out (expansion ``E_out``). The grown layer must satisfy ``W' E_in = E_out W`` and
``b' = E_out b``. Rows (fan-out) are expanded by ``E_out`` in the output axis' form;
columns (fan-in) are split so copies sum to the source column: LEMON's unequal "proj"
split with noise at the wide layer's init scale ``U(-1/sqrt(in'), 1/sqrt(in'))``, or
Net2Net's equal split. Leading axes pass through unchanged.

Refuses: a weight that is not a parameter (computed at run time) when its axes grow.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from lemon_fx.analysis.registry import Registry
from lemon_fx.analysis.rule import Rule
from lemon_fx.analysis.width import AxisUse, NodeAnalysis
from lemon_fx.resolution.rewrite import NodeRewrite

__all__ = ["FunctionalLinearRule", "LinearRule", "register_rules"]


def couple_affine(ctx: NodeAnalysis, x, out, weight_dims: list[int], bias_dims: list[int] | None):
    """Shared by every ``y = x W^T + b`` spelling; returns the (in, out) slots."""
    x_dims, out_dims = ctx.dims(x), ctx.dims(out)
    for axis in range(len(x_dims) - 1):
        ctx.unify(x_dims[axis], out_dims[axis])
        ctx.same_form(ctx.slot(x, axis), ctx.slot(out, axis))
    ctx.unify(weight_dims[1], x_dims[-1])
    ctx.unify(weight_dims[0], out_dims[-1])
    if bias_dims is not None:
        ctx.unify(bias_dims[0], out_dims[-1])
    return ctx.slot(x, -1), ctx.slot(out, -1)


class LinearRule(Rule):
    """``nn.Linear``: rows expanded (fan-out), columns split (fan-in)."""

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        x = node.args[0]
        weight = ctx.param("weight")
        bias = ctx.param("bias") if ctx.module.bias is not None else None
        in_slot, out_slot = couple_affine(
            ctx, x, node, ctx.param_dims(weight), ctx.param_dims(bias) if bias else None)
        ctx.claim(weight, [AxisUse("expand", out_slot), AxisUse("split", in_slot)])
        if bias:
            ctx.claim(bias, [AxisUse("expand", out_slot)])

    def rewrite(self, node: torch.fx.Node, ctx: NodeRewrite) -> None:
        dims = ctx.param_dims(ctx.param("weight"))
        ctx.set_attr("out_features", ctx.grown(dims[0]))
        ctx.set_attr("in_features", ctx.grown(dims[1]))


class FunctionalLinearRule(Rule):
    """``F.linear(x, weight, bias)`` with parameters read through ``get_attr``."""

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        x, weight = ctx.arg(0, "input"), ctx.arg(1, "weight")
        bias = ctx.arg(2, "bias")
        in_slot, out_slot = couple_affine(
            ctx, x, node, ctx.dims(weight), ctx.dims(bias) if ctx.is_tensor(bias) else None)
        for arg, uses in ((weight, [AxisUse("expand", out_slot), AxisUse("split", in_slot)]),
                          (bias, [AxisUse("expand", out_slot)])):
            if not ctx.is_tensor(arg):
                continue
            if arg.op == "get_attr":
                ctx.claim(arg.target, uses)
            else:
                ctx.forbid_growth(ctx.dims(arg), "the weight is computed at run time, so "
                                  "there is no parameter to grow",
                                  "make the weight an nn.Parameter, or keep this width fixed")


class AddmmRule(Rule):
    """``torch.addmm(b, x, W)`` = ``b + x @ W`` with ``W`` ``[in, out]`` (GPT-2's Conv1D):
    the same affine maths with the weight transposed."""

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        bias, x, weight = node.args[:3]
        if not (ctx.is_tensor(weight) and weight.op == "get_attr"):
            ctx.forbid_growth([d for a in (bias, x, weight) if ctx.is_tensor(a)
                               for d in ctx.dims(a)], "addmm with a weight computed at run "
                              "time", "make the weight an nn.Parameter")
            return
        w = ctx.dims(weight)
        bias_dims = ctx.dims(bias) if ctx.is_tensor(bias) else None
        in_slot, out_slot = couple_affine(ctx, x, node, [w[1], w[0]], bias_dims)
        ctx.claim(weight.target, [AxisUse("split", in_slot), AxisUse("expand", out_slot)])
        if ctx.is_tensor(bias) and bias.op == "get_attr":
            ctx.claim(bias.target, [AxisUse("expand", out_slot)])


def register_rules(registry: Registry) -> None:
    aten = torch.ops.aten
    registry.add(LinearRule(), [nn.Linear])
    registry.add(FunctionalLinearRule(), [F.linear, torch._C._nn.linear, aten.linear.default])
    registry.add(AddmmRule(), [torch.addmm, aten.addmm.default])

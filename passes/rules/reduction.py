"""Rules for ops that reduce or normalize along one axis: mean, sum, max, softmax.

Maths. Along a grown axis:

- ``mean`` of the avg form is exact: ``(k S mean + r mean) / T = mean``; circ and zero
  forms change it (unless ``r = 0``, where all forms are tiling and the mean is kept);
  the mean of a square inside a decomposed RMSNorm is that norm's business
  (``passes.rules.norm.DecomposedRMSNorm``);
- ``sum`` scales by ``k`` (plus extras): never exact, refused;
- ``amax``/``max`` over copies is the max: exact for circ (and any form at ``r = 0``);
- ``softmax`` / ``log_softmax`` over a grown axis changes the normalizer: refused.

Along every other axis these ops act entry by entry; softmax is not affine, so a grown
axis that is *not* reduced must be circ (each copy gets its own, identical, softmax).

Refuses:
- ``sum`` over an axis that grows, by any factor (reduce with ``mean`` instead);
- ``softmax``/``log_softmax`` over an axis that grows, and one without an explicit
  ``dim`` when any of its axes grows (pass ``dim=-1``);
- at a non-multiple width, an axis whose ops need forms that exclude each other (no
  exact answer): ``mean`` over it needs avg, ``amax`` over it circ, and softmax's other
  axes circ;
- the mean of a square inside a decomposed RMSNorm: what ``DecomposedRMSNorm`` refuses
  (its input must be in the zero form).
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from lemon_fx.analysis.registry import Registry
from lemon_fx.analysis.rule import Rule
from lemon_fx.analysis.width import NodeAnalysis
from lemon_fx.axes.vocabulary import AVG, CIRC
from lemon_fx.resolution.rewrite import NodeRewrite
from passes.rules.norm import DecomposedRMSNorm

__all__ = ["ReduceRule", "SoftmaxRule", "register_rules"]


def _reduced_axes(ctx: NodeAnalysis, dim, rank: int) -> list[int]:
    dim = ctx.value(dim)
    if dim is None:
        return list(range(rank))
    if isinstance(dim, int):
        return [dim % rank]
    return sorted(d % rank for d in dim)


class ReduceRule(Rule):
    """mean / sum / amax over ``dim`` (keepdim or not)."""

    def __init__(self, kind: str):
        self.kind = kind

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        x = node.args[0]
        rank = len(ctx.dims(x))
        axes = _reduced_axes(ctx, ctx.arg(1, "dim"), rank)
        rms = DecomposedRMSNorm.match(node) if self.kind == "mean" and axes == [rank - 1] \
            else None
        keep = ctx.value(ctx.arg(2, "keepdim", False))
        out = ctx.dims(node) if ctx.is_tensor(node) else []
        b = 0
        for a in range(rank):
            if a in axes:
                if rms is not None:
                    rms.analyze(ctx)
                else:
                    self._reduced(node, ctx, x, a)
                if keep:
                    b += 1
                continue
            if b < len(out):
                ctx.unify(ctx.dims(x)[a], out[b])
                ctx.same_form(ctx.slot(x, a), ctx.slot(node, b))
            b += 1

    def rewrite(self, node: torch.fx.Node, ctx: NodeRewrite) -> None:
        rank = len(ctx.dims(node.args[0]))
        if self.kind == "mean" and _reduced_axes(ctx, ctx.arg(1, "dim"), rank) == [rank - 1]:
            rms = DecomposedRMSNorm.match(node)
            if rms is not None:
                rms.rewrite(ctx)

    def _reduced(self, node, ctx: NodeAnalysis, x, axis: int) -> None:
        d = ctx.dims(x)[axis]
        if self.kind == "mean":
            ctx.require_form(ctx.slot(x, axis), {AVG}, "a mean over this axis needs the "
                             "avg form")
        elif self.kind == "max":
            ctx.require_form(ctx.slot(x, axis), {CIRC}, "a max over this axis needs the "
                             "circ form")
        else:
            ctx.forbid_growth(d, f"{self.kind} over this axis changes when it grows",
                              "reduce with mean instead, or keep this width fixed",
                              kind="not_lossless")


class SoftmaxRule(Rule):
    """softmax / log_softmax: the normalized axis must not grow; other axes circ."""

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        x = node.args[0]
        rank = len(ctx.dims(x))
        if ctx.module is not None:
            dim = ctx.module.dim
        else:
            dim = ctx.value(ctx.arg(1, "dim"))
        if dim is None:
            ctx.forbid_growth(ctx.dims(x), "softmax without an explicit dim",
                              "pass dim=-1")
            return
        dim %= rank
        ctx.pass_through(x, node)
        ctx.forbid_growth(ctx.dims(x)[dim], "softmax normalizes over this axis, and more "
                          "entries change the normalizer", "keep this width fixed",
                          kind="not_lossless")
        for axis in range(rank):
            if axis != dim:
                ctx.require_form(ctx.slot(node, axis), {CIRC},
                                 "softmax is not affine: the other axes need the circ form")


def register_rules(registry: Registry) -> None:
    aten = torch.ops.aten
    registry.add(ReduceRule("mean"), ["mean", torch.mean, aten.mean.dim])
    registry.add(ReduceRule("sum"), ["sum", torch.sum, aten.sum.dim_IntList])
    registry.add(ReduceRule("max"), ["amax", torch.amax, aten.amax.default])
    registry.add(SoftmaxRule(), ["softmax", "log_softmax", torch.softmax, torch.log_softmax,
                                 F.softmax, F.log_softmax, nn.Softmax, nn.LogSoftmax,
                                 aten.softmax.int, aten._softmax.default,
                                 aten.log_softmax.int])

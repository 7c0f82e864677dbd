"""Rules for ops that reduce or normalize along one axis: mean, sum, max, p-norms, softmax.

Maths. Along a grown axis:

- ``mean`` of the avg form is exact: ``(k S mean + r mean) / T = mean``; circ and zero
  forms change it (unless ``r = 0``, where all forms are tiling and the mean is kept);
  the mean of a square inside a decomposed RMSNorm is that norm's business
  (``passes.rules.norm.DecomposedRMSNorm``);
- ``sum`` scales by ``k`` (plus extras): never exact, refused;
- ``amax``/``max`` over copies is the max: exact for circ (and any form at ``r = 0``);
- a p-norm (``x.norm``, ``torch.linalg.vector_norm``) counts every copy:
  ``||tile_k(x)||_p = k^(1/p) ||x||_p`` already at whole multiples, never exact; only
  ``p = inf`` (the largest ``|x_i|``) is: copies repeat entries, avg extras hold
  ``|mean(x)| <= max |x_i|``, zero extras 0; ``p = -inf`` (the smallest) in circ only;
- ``softmax`` / ``log_softmax`` over a grown axis changes the normalizer: refused.

Along every other axis these ops act entry by entry; softmax is not affine, so a grown
axis that is *not* reduced must be circ (each copy gets its own, identical, softmax); a
norm is not affine either, but the norm of zeros is 0, so its other axes take circ or
zero (ConvNeXtV2's GRN: ``x.norm(p=2, dim=(1, 2))`` over the spatial axes, then divided
by its mean over the channels, which needs avg: at a non-multiple width no form serves
both, and GRN grows by whole multiples).

Refuses:
- ``sum`` over an axis that grows, by any factor (reduce with ``mean`` instead);
- ``softmax``/``log_softmax`` over an axis that grows, and one without an explicit
  ``dim`` when any of its axes grows (pass ``dim=-1``);
- a p-norm over an axis that grows, by any factor, for every order but ``inf``
  (``2``, ``"fro"``, ``1``, ``0``, negative orders, ``"nuc"``; ``-inf`` at a
  non-multiple width outside the circ form); a norm without ``dim`` reduces every axis;
- at a non-multiple width, an axis whose ops need forms that exclude each other (no
  exact answer): ``mean`` over it needs avg, ``amax`` over it circ, softmax's other
  axes circ, and a norm's other axes circ or zero;
- the mean of a square inside a decomposed RMSNorm: what ``DecomposedRMSNorm`` refuses
  (its input must be in the zero form).
"""

from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from lemon_fx.analysis.registry import Registry
from lemon_fx.analysis.rule import Rule
from lemon_fx.analysis.width import NodeAnalysis
from lemon_fx.axes.vocabulary import AVG, CIRC, CIRC_OR_ZERO
from lemon_fx.resolution.rewrite import NodeRewrite
from passes.rules.norm import DecomposedRMSNorm

__all__ = ["NormRule", "ReduceRule", "SoftmaxRule", "register_rules"]

# the spellings whose order argument is ``ord`` (default 2), not ``p`` (default "fro")
_VECTOR_NORMS = (torch.linalg.vector_norm, torch.ops.aten.linalg_vector_norm.default)


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

    def passes_zero(self, node: torch.fx.Node, root: torch.nn.Module) -> torch.fx.Node | None:
        """The mean, sum or max of zeros is zero: the input (a mixture of experts sums its
        chosen experts' weighted outputs at the end of the branch)."""
        x = node.args[0] if node.args else None
        return x if isinstance(x, torch.fx.Node) else None

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


class NormRule(Rule):
    """A p-norm over ``dim``: ``x.norm``, ``torch.norm``, ``torch.linalg.vector_norm``.

    ``x.norm(p, dim, keepdim)``, ``torch.norm(x, p, dim, keepdim)``,
    ``torch.linalg.vector_norm(x, ord, dim, keepdim)``.

    Maths: ``||x||_p = (sum_i |x_i|^p)^(1/p)`` over the reduced axes, for each position of
    the others. Over a reduced axis that grows it counts every copy: at a whole multiple
    ``||tile_k(x)||_p = k^(1/p) ||x||_p``, and at a non-multiple the circ, avg or zero
    extras add entries of their own, so the result is not the source's norm (the norm's
    scale cannot be corrected downstream in general: ``k^(1/p)`` multiplies every entry,
    and the r extras do not scale at all). Only ``p = inf`` (``max_i |x_i|``) is exact in
    every form: copies repeat entries, an avg extra ``|mean(x)|`` is at most
    ``max |x_i|``, a zero extra 0; ``p = -inf`` (``min_i |x_i|``) is exact in circ (and at
    whole multiples). ``"fro"`` is ``p = 2`` over the reduced entries, ``"nuc"`` (a
    matrix norm) is treated like a finite order. Along the axes that are not reduced the
    norm acts on each slice alone: copies give copies (circ), and the norm of a zero
    slice is 0 (zero); the avg form's extra slice is the mean of the slices, whose norm
    is not the mean of their norms.

    Refuses:
    - growing a reduced axis, by any factor, for every order but ``inf`` (and ``-inf``,
      which needs circ at a non-multiple): normalize with a mean instead
      (``sqrt(mean(x ** 2))``, as RMSNorm does), or keep that width fixed; a norm
      without ``dim`` reduces every axis;
    - at a non-multiple width, an axis that is not reduced but that another op needs in
      the avg form (ConvNeXtV2's GRN divides the spatial norm by its mean over the
      channels: grow those channels by a whole multiple).
    """

    def _order(self, node: torch.fx.Node, ctx: NodeAnalysis):
        if node.target in _VECTOR_NORMS:
            order = ctx.value(ctx.arg(1, "ord", 2))
        else:
            order = ctx.value(ctx.arg(1, "p", "fro"))
        return 2 if order in (None, "fro") else order

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        x = node.args[0]
        rank = len(ctx.dims(x))
        axes = _reduced_axes(ctx, ctx.arg(2, "dim"), rank)
        keep = ctx.value(ctx.arg(3, "keepdim", False))
        order = self._order(node, ctx)
        out = ctx.dims(node)
        b = 0
        for a in range(rank):
            if a in axes:
                self._reduced(ctx, x, a, order)
                b += 1 if keep else 0
                continue
            ctx.unify(ctx.dims(x)[a], out[b])
            ctx.same_form(ctx.slot(x, a), ctx.slot(node, b))
            ctx.require_form(ctx.slot(node, b), CIRC_OR_ZERO, "a norm over other axes needs "
                             "this axis in the circ or zero form (the norm of the avg "
                             "form's mean slice is not the mean of the norms)")
            b += 1

    def _reduced(self, ctx: NodeAnalysis, x, axis: int, order) -> None:
        if order == math.inf:
            return  # max |x_i|: exact in every form
        if order == -math.inf:
            ctx.require_form(ctx.slot(x, axis), {CIRC}, "the smallest |x_i| over this axis "
                             "(a norm of order -inf) needs the circ form")
            return
        ctx.forbid_growth(ctx.dims(x)[axis], f"a norm of order {order!r} over this axis "
                          "counts every copy (k^(1/p) times the source's norm at a whole "
                          "multiple, and more at a non-multiple): it is not the source's "
                          "norm", "normalize with a mean over this axis instead "
                          "(sqrt(mean(x ** 2)), as RMSNorm does), or keep this width fixed",
                          kind="not_lossless")


class NormalizeRule(Rule):
    """``F.normalize(x, p, dim, eps)``: ``x / max(||x||_p, eps)`` over ``dim``.

    Maths: each slice along ``dim`` is divided by its own p-norm. Over ``dim`` growing,
    the norm counts every copy (see ``NormRule``): ``k^(1/p)`` times the source's at a
    whole multiple, so the output is off by that factor; only ``p = inf`` (``max |x_i|``)
    keeps the norm, and then ``x / max|x|`` keeps every form of ``x`` (a common factor per
    slice: copies stay copies, an avg extra stays the mean, a zero stays zero). The other
    axes pass through, each slice alone: copies give copies (circ), a zero slice gives
    ``0 / eps = 0`` (zero); the avg form's mean slice does not normalize to the mean of
    the normalized slices. (Swin V2's cosine attention normalizes q and k over a head's
    dims; XCiT and EdgeNeXt over tokens.)

    Refuses:
    - growing ``dim`` for every finite ``p`` (keep that width fixed: a bare width keeps a
      head's dims);
    - at a non-multiple width, an axis that is not normalized but that another op needs
      in the avg form.
    """

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        x = ctx.arg(0, "input")
        rank = len(ctx.dims(x))
        order = ctx.value(ctx.arg(1, "p", 2.0))
        dim = ctx.value(ctx.arg(2, "dim", 1)) % rank
        ctx.pass_through(x, node)
        for axis in range(rank):
            if axis != dim:
                ctx.require_form(ctx.slot(node, axis), CIRC_OR_ZERO, "normalizing each "
                                 "slice apart needs this axis in the circ or zero form (an "
                                 "avg slice does not normalize to the mean of the slices)")
            elif order != math.inf:
                ctx.forbid_growth(ctx.dims(x)[axis], f"normalizing with the {order!r}-norm "
                                  "over this axis counts every copy, so the grown output is "
                                  "not the source's", "keep this width fixed",
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
    registry.add(NormRule(), ["norm", torch.norm, *_VECTOR_NORMS])
    registry.add(NormalizeRule(), [F.normalize])
    registry.add(SoftmaxRule(), ["softmax", "log_softmax", torch.softmax, torch.log_softmax,
                                 F.softmax, F.log_softmax, nn.Softmax, nn.LogSoftmax,
                                 aten.softmax.int, aten._softmax.default,
                                 aten.log_softmax.int])

"""Rules for convolutions: ``nn.Conv1d/2d/3d`` and ``F.conv1d/2d/3d``, grouped and depthwise
included.

Maths. A convolution is a Linear over the channel axis applied at every position:
``y[:, o] = sum_i W[o, i] * x[:, i] + b[o]``. With ``groups=1`` the output channels
(weight axis 0, the bias) are expanded in the output's form, the input channels (weight
axis 1) are split so copies sum to the source, with noise at the wide layer's init scale
(``1/sqrt(in' * kernel)``).

A grouped convolution (``groups = G``) is ``G`` independent convolutions side by side: the
input channels are the composite axis ``[G, I]`` (``I = in/G`` per group, outer ``G``), the
output channels ``[G, O]``, and the weight is ``[out = (G, O), I, *kernel]``: output channel
``(g, o)`` reads only input channels ``(g, i)``. LEMON grows it **by whole groups**, like
attention grows whole heads: the number of groups ``G`` grows, ``I`` and ``O`` stay (they
are fixed, so a plan counts this width in groups), and group ``g'`` copies group
``g' % G`` (circ form on both sides). Weight axis 1 is ``I``, which does not grow, so the
weight is only *expanded* on axis 0 (rows of group ``g'`` copy the rows of ``g' % G``; no
fan-in split): ``y'[(g', o)] = sum_i W[(g' % G, o), i] * x'[(g', i)]
= sum_i W[(g' % G, o), i] * x[(g' % G, i)] = y[(g' % G, o)]``, exact for any ``G' >= G``.
A depthwise convolution is the case ``G = in`` (``I = 1``, ``O`` = the channel
multiplier): its channels are its groups, and growing the channels grows ``groups``.
``groups``, ``in_channels`` and ``out_channels`` are rewritten.

Spatial axes are tied to the input's size: they never grow (fixed).

The copies of a group start identical; the layer that reads them (a 1x1 convolution after
a depthwise one) splits its columns unequally, so their gradients differ from the first step.

Refuses:
- a functional convolution whose weight or bias is computed at run time, when its
  channels grow (timm's weight-standardized ``StdConv2d``: a subclass with its own
  ``forward`` gets no rule from its base, see ``lemon_fx.registry``, so it is traced
  through and reaches ``F.conv2d`` with a computed weight);
- grouped or depthwise channels at a non-multiple number of groups when another op on
  the axis needs the avg or zero form (a LayerNorm right after a depthwise convolution,
  as in ConvNeXt): a new group must copy a whole group (circ).

Kept at their size: the spatial axes, and the channels of one group (a plan counts a
grouped width in groups).
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from lemon_fx.analysis.registry import Registry
from lemon_fx.analysis.rule import BranchEnd, Rule
from lemon_fx.analysis.width import AxisUse, NodeAnalysis, Slot
from lemon_fx.axes.vocabulary import CHANNELS_HINT, ONLY_CIRC
from lemon_fx.resolution.rewrite import NodeRewrite
from passes.rules.linear import affine_end

__all__ = ["ConvRule", "FunctionalConvRule", "couple_conv", "register_rules"]

PER_GROUP_FIXED = ("the channels of one group of a grouped convolution: it grows by whole "
                   "groups, so a plan counts this width in groups")


CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def couple_conv(ctx: NodeAnalysis, x, out, w: list[int], bias: list[int] | None,
                groups: int) -> tuple[Slot, Slot]:
    """Couple a convolution's input, output and parameter axes; return (in, out) slots."""
    x_dims, out_dims = ctx.dims(x), ctx.dims(out)
    batched = len(x_dims) == len(w)
    channel = 1 if batched else 0
    if batched:
        ctx.unify(x_dims[0], out_dims[0])
        ctx.same_form(ctx.slot(x, 0), ctx.slot(out, 0))
    for d in x_dims[channel + 1:] + out_dims[channel + 1:]:
        ctx.fix(d, f"a spatial axis of the convolution '{ctx.node.name}' (its size follows "
                "the input's)")
    x_ch, out_ch = x_dims[channel], out_dims[channel]
    in_slot, out_slot = ctx.slot(x, channel), ctx.slot(out, channel)
    ctx.hint(out_ch, CHANNELS_HINT)
    ctx.unify(w[0], out_ch)
    if bias is not None:
        ctx.unify(bias[0], out_ch)
    if groups == 1:
        ctx.unify(w[1], x_ch)
        return in_slot, out_slot
    g = ctx.new_dim(groups)
    per_in = ctx.new_dim(ctx.shape(x)[channel] // groups)
    per_out = ctx.new_dim(ctx.shape(out)[channel] // groups)
    ctx.fix(per_in, PER_GROUP_FIXED)
    ctx.fix(per_out, PER_GROUP_FIXED)
    ctx.factor(x_ch, [g, per_in])
    ctx.factor(out_ch, [g, per_out])
    ctx.unify(w[1], per_in)
    ctx.hint(g, CHANNELS_HINT)
    why = "a grouped or depthwise convolution grows by whole groups copied in the circ form"
    ctx.require_form(in_slot, ONLY_CIRC, why)
    ctx.require_form(out_slot, ONLY_CIRC, why)
    return in_slot, out_slot


def _weight_uses(in_slot: Slot, out_slot: Slot, rank: int) -> list[AxisUse | None]:
    # axis 1 is the per-group input width: with groups > 1 it is fixed, so only the
    # expansion of axis 0 ever applies
    return [AxisUse("expand", out_slot), AxisUse("split", in_slot)] + [None] * (rank - 2)


def _batched(ctx: NodeRewrite) -> bool:
    """Whether the convolution's input has a batch axis (its rank is the weight's)."""
    if ctx.module is not None:
        weight_rank = len(ctx.module.kernel_size) + 2
    else:
        weight_rank = len(ctx.dims(ctx.arg(1, "weight")))
    return len(ctx.dims(ctx.arg(0, "input"))) == weight_rank


def _grown_groups(ctx: NodeRewrite, channel: int, groups: int) -> int:
    """Groups grow whole: the per-group output width is fixed."""
    per_out = ctx.shape(ctx.node)[channel] // groups
    return ctx.grown(ctx.dims(ctx.node)[channel]) // per_out


class ConvRule(Rule):
    """``nn.Conv1d/2d/3d``: channel axis 1 (0 unbatched); weight ``[out, in/groups, *k]``."""

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        m = ctx.module
        weight = ctx.param("weight")
        w = ctx.param_dims(weight)
        bias = ctx.param("bias") if m.bias is not None else None
        in_slot, out_slot = couple_conv(ctx, ctx.arg(0, "input"), node, w,
                                        ctx.param_dims(bias) if bias else None, m.groups)
        ctx.claim(weight, _weight_uses(in_slot, out_slot, len(w)))
        if bias:
            ctx.claim(bias, [AxisUse("expand", out_slot)])

    def rewrite(self, node: torch.fx.Node, ctx: NodeRewrite) -> None:
        m = ctx.module
        x = ctx.arg(0, "input")
        channel = 1 if _batched(ctx) else 0
        out_ch = ctx.dims(node)[channel]
        ctx.set_attr("out_channels", ctx.grown(out_ch))
        ctx.set_attr("in_channels", ctx.grown(ctx.dims(x)[channel]))
        if m.groups != 1:
            ctx.set_attr("groups", _grown_groups(ctx, channel, m.groups))

    def branch_end(self, node: torch.fx.Node, root: torch.nn.Module) -> BranchEnd | None:
        """A convolution is linear in its weight: it writes 0 when weight and bias are 0,
        so it may end a residual branch."""
        return affine_end(node, root)


class FunctionalConvRule(Rule):
    """``F.conv1d/2d/3d`` on ``get_attr`` parameters, grouped too; ``groups`` rewritten."""

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        x, weight, bias = ctx.arg(0, "input"), ctx.arg(1, "weight"), ctx.arg(2, "bias")
        groups = ctx.value(ctx.arg(6, "groups", 1))
        w = ctx.dims(weight)
        has_bias = ctx.is_tensor(bias)
        in_slot, out_slot = couple_conv(ctx, x, node, w, ctx.dims(bias) if has_bias else None,
                                        groups)
        for arg, uses in ((weight, _weight_uses(in_slot, out_slot, len(w))),
                          (bias, [AxisUse("expand", out_slot)])):
            if not ctx.is_tensor(arg):
                continue
            if arg.op == "get_attr":
                ctx.claim(arg.target, uses)
            else:
                ctx.forbid_growth(ctx.dims(arg), "the convolution's weight is computed at run "
                                  "time, so there is no parameter to grow",
                                  "make the weight an nn.Parameter, or keep these channels "
                                  "fixed")

    def rewrite(self, node: torch.fx.Node, ctx: NodeRewrite) -> None:
        groups = ctx.value(ctx.arg(6, "groups", 1))
        if groups == 1:
            return
        grown = _grown_groups(ctx, 1 if _batched(ctx) else 0, groups)
        if grown != groups:
            ctx.set_arg(6, "groups", grown)


def register_rules(registry: Registry) -> None:
    registry.add(ConvRule(), CONVS)
    aten = torch.ops.aten
    registry.add(FunctionalConvRule(), [torch.conv1d, torch.conv2d, torch.conv3d,
                                        aten.conv1d.default, aten.conv2d.default,
                                        aten.conv3d.default])

"""Rules for convolutions: ``nn.Conv1d/2d/3d`` with ``groups=1``.

Maths. A convolution is a Linear over the channel axis applied at every position:
``y[:, o] = sum_i W[o, i] * x[:, i] + b[o]``. So the output channels (weight axis 0, the
bias) are expanded in the output's form, the input channels (weight axis 1) are split so
copies sum to the source, with noise at the wide layer's init scale
(``1/sqrt(in' * kernel)``); spatial axes pass through.

Refuses: grouped and depthwise convolutions when their channels grow (they must grow by
whole groups; that rule is not written yet).
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from lemon_fx.analysis import AxisUse, NodeAnalysis
from lemon_fx.registry import Registry
from lemon_fx.rewrite_context import NodeRewrite
from lemon_fx.rule import Rule

__all__ = ["ConvRule", "register_rules"]


class ConvRule(Rule):
    """Channel axis 1 of input and output; weight ``[out, in, *kernel]``."""

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        x = node.args[0]
        m = ctx.module
        weight = ctx.param("weight")
        w = ctx.param_dims(weight)
        x_dims, out = ctx.dims(x), ctx.dims(node)
        batched = len(x_dims) == len(w)
        channel = 1 if batched else 0
        if batched:
            ctx.unify(x_dims[0], out[0])
            ctx.same_form(ctx.slot(x, 0), ctx.slot(node, 0))
        for d in out[channel:]:
            ctx.hint(d, "channels")
        if m.groups != 1:
            ctx.forbid_growth([x_dims[channel], out[channel], w[0]], "grouped or depthwise "
                              "convolution", "keep these channels fixed")
            return
        ctx.unify(w[1], x_dims[channel])
        ctx.unify(w[0], out[channel])
        in_slot, out_slot = ctx.slot(x, channel), ctx.slot(node, channel)
        ctx.hint(out[channel], "channels")
        ctx.claim(weight, [AxisUse("expand", out_slot), AxisUse("split", in_slot)]
                  + [None] * (len(w) - 2))
        if m.bias is not None:
            ctx.unify(ctx.param_dims(ctx.param("bias"))[0], out[channel])
            ctx.claim(ctx.param("bias"), [AxisUse("expand", out_slot)])

    def rewrite(self, node: torch.fx.Node, ctx: NodeRewrite) -> None:
        w = ctx.param_dims(ctx.param("weight"))
        ctx.set_attr("out_channels", ctx.grown(w[0]))
        ctx.set_attr("in_channels", ctx.grown(w[1]))


def register_rules(registry: Registry) -> None:
    registry.add(ConvRule(), [nn.Conv1d, nn.Conv2d, nn.Conv3d])

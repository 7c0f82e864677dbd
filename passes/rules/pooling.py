"""Rules for pooling over spatial axes: max, average, power-average and their adaptive forms,
as modules (``nn.MaxPool2d``, ``nn.AdaptiveAvgPool2d``...) and functions (``F.max_pool2d``,
``F.avg_pool2d``, ``F.adaptive_avg_pool2d``, ``torch.max_pool2d``...), 1d, 2d and 3d; and
resampling (``nn.Upsample``, ``F.interpolate``), which is pooling's linear inverse.

Maths. Pooling acts on each channel separately, over a window of positions: the channel
(and batch) axes pass through with their dims and forms, and the spatial axes are tied to
the input's size (fixed: a window over copied positions would read other values).

- average pooling is *linear* per channel, so it commutes with every form: copies pool to
  copies, an avg extra channel (the mean of the channels) pools to the mean of the pooled
  channels, a zero channel pools to zero (``count_include_pad`` and ``divisor_override``
  only change the constant divisor); so is resampling in every mode (nearest, (bi/tri)linear,
  bicubic, area: each output is a fixed weighted sum of one channel's inputs);
- max pooling and power-average (LP) pooling are nonlinear per channel: copies give copies
  (circ) and an all-zero channel gives zero (zero form), but the max of a channel mean is
  not the mean of the maxima: circ or zero. The indices that ``return_indices=True`` adds
  are positions, which only copies reproduce: circ.

Refuses:
- max and LP pooling at a non-multiple channel width where another op on the channels
  needs the avg form (a stream that must be avg cannot pass a max pooling): circ or zero
  only;
- the indices of ``return_indices=True`` at a non-multiple channel width where another
  op needs the avg or zero form: circ only.

The spatial axes keep their size. A subclass of a pooling module with its own
``forward`` gets no rule from it (see ``lemon_fx.registry``) and is traced through.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from lemon_fx.analysis.registry import Registry
from lemon_fx.analysis.rule import Rule
from lemon_fx.analysis.width import NodeAnalysis
from lemon_fx.axes.vocabulary import CIRC_OR_ZERO, ONLY_CIRC

__all__ = ["PoolRule", "register_rules"]



def _ops() -> dict:
    """op -> (number of spatial axes, "max" | "avg" | "lp"); None: all axes after 1."""
    table: dict = {nn.Upsample: (None, "avg"), F.interpolate: (None, "avg")}
    for name in ("upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
                 "upsample_linear1d", "upsample_bilinear2d", "upsample_bicubic2d",
                 "upsample_trilinear3d"):  # torch.export's spellings of F.interpolate
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None and hasattr(packet, "vec"):
            table[packet.vec] = (None, "avg")
    for n in (1, 2, 3):
        for kind, modules, functions in (
            ("max", (f"MaxPool{n}d", f"AdaptiveMaxPool{n}d"),
             (f"max_pool{n}d", f"max_pool{n}d_with_indices", f"adaptive_max_pool{n}d",
              f"adaptive_max_pool{n}d_with_indices")),
            ("avg", (f"AvgPool{n}d", f"AdaptiveAvgPool{n}d"),
             (f"avg_pool{n}d", f"adaptive_avg_pool{n}d")),
            ("lp", (f"LPPool{n}d",), (f"lp_pool{n}d",)),
        ):
            for name in modules:
                if hasattr(nn, name):
                    table[getattr(nn, name)] = (n, kind)
            for name in functions:
                for namespace in (F, torch):
                    if hasattr(namespace, name):
                        table[getattr(namespace, name)] = (n, kind)
                packet = getattr(torch.ops.aten, name, None)  # torch.export's spelling
                if packet is not None and "with_indices" not in name and hasattr(packet,
                                                                                 "default"):
                    table[packet.default] = (n, kind)
    return table


class PoolRule(Rule):
    """Pooling/resampling: channels pass through (max/LP: circ or zero), spatial axes fixed."""

    def __init__(self) -> None:
        self.ops = _ops()
        self.modules = tuple(op for op in self.ops if isinstance(op, type))

    def _op(self, node: torch.fx.Node, ctx: NodeAnalysis) -> tuple[int | None, str]:
        if ctx.module is not None:
            for cls in type(ctx.module).__mro__:
                if cls in self.ops:
                    return self.ops[cls]
        return self.ops[node.target]

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        x = ctx.arg(0, "input")
        spatial, kind = self._op(node, ctx)
        x_dims = ctx.dims(x)
        channel = 1 if spatial is None else len(x_dims) - spatial - 1
        for d in x_dims[channel + 1:]:
            ctx.fix(d, f"a spatial axis pooled by '{node.name}'")
        outputs = ctx.outputs()
        for i, out in enumerate(outputs):
            out_dims = ctx.dims(out)
            for axis in range(channel + 1):
                ctx.unify(x_dims[axis], out_dims[axis])
                ctx.same_form(ctx.slot(x, axis), ctx.slot(out, axis))
            for d in out_dims[channel + 1:]:
                ctx.fix(d, f"a spatial axis of the output of '{node.name}'")
            if i > 0:
                ctx.require_form(ctx.slot(out, channel), ONLY_CIRC, "the indices of a max pooling "
                                 "are positions, which only copied channels reproduce: the "
                                 "circ form")
            elif kind != "avg":
                ctx.require_form(ctx.slot(out, channel), CIRC_OR_ZERO,
                                 f"{kind} pooling is nonlinear per channel and needs its "
                                 "channels in the circ form (or zero)")


def register_rules(registry: Registry) -> None:
    rule = PoolRule()
    registry.add(rule, list(rule.ops))

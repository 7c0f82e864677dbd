"""Rules for padding: ``F.pad`` (``aten.pad``, ``aten.constant_pad_nd``) and the padding
modules (``nn.ZeroPad2d``, ``nn.ConstantPad2d``, ``nn.ReflectionPad2d``,
``nn.ReplicationPad2d``, ``nn.CircularPad2d``, in 1d, 2d and 3d).

Maths. Padding lengthens some trailing axes; every other axis passes through with its dim
and form, because each slice along it is padded the same way:

- reflect, replicate and circular padding fill a slice from its own entries: copies stay
  copies, an avg extra channel (the mean of the channels) pads to the mean of the padded
  channels, a zero channel to zeros, so every form is kept;
- constant padding writes ``value`` into every slice: copies hold and so does the avg form
  (the mean of equal values is that value), but the zero form's extra entries would read
  ``value``, so a nonzero value needs circ or avg.

A padded axis (or a cropped one: negative padding) is fixed: its entries are picked by
position, which growth moves.

Refuses:
- growth of a padded or cropped axis: it keeps its size;
- constant padding with a nonzero value on an axis that grows by a non-multiple where
  another op on the axis needs the zero form (a RMSNorm's input): circ or avg only.

A subclass of a padding module with its own ``forward`` gets no rule from it (see
``lemon_fx.registry``) and is traced through.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from lemon_fx.analysis.registry import Registry
from lemon_fx.analysis.rule import Rule
from lemon_fx.analysis.width import NodeAnalysis
from lemon_fx.axes.vocabulary import CIRC_OR_AVG

__all__ = ["PadRule", "register_rules"]

aten = torch.ops.aten
_MODULE_MODES = {"Zero": "constant", "Constant": "constant", "Reflection": "reflect",
                 "Replication": "replicate", "Circular": "circular"}


def _modules() -> dict[type, str]:
    """Padding module class -> mode, for the classes this torch has."""
    found = {}
    for prefix, mode in _MODULE_MODES.items():
        for n in (1, 2, 3):
            cls = getattr(nn, f"{prefix}Pad{n}d", None)
            if cls is not None:
                found[cls] = mode
    return found


class PadRule(Rule):
    """Unpadded axes pass through (constant padding with a nonzero value: circ or avg);
    padded axes are fixed."""

    def __init__(self) -> None:
        self.modules = _modules()

    def _padding(self, node: torch.fx.Node, ctx: NodeAnalysis) -> tuple[list[int], str, float]:
        """(pad lengths, last axis first, as F.pad takes them; mode; constant value)."""
        if ctx.module is not None:
            mode = next(m for cls, m in self.modules.items() if isinstance(ctx.module, cls))
            return list(ctx.module.padding), mode, float(getattr(ctx.module, "value", 0.0))
        pad = list(ctx.value(ctx.arg(1, "pad")))
        if node.target is aten.constant_pad_nd.default:
            return pad, "constant", float(ctx.value(ctx.arg(2, "value", 0.0)))
        mode = ctx.value(ctx.arg(2, "mode", "constant"))
        value = ctx.value(ctx.arg(3, "value", None))
        return pad, mode, float(value or 0.0)

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        x = ctx.arg(0, "input")
        pad, mode, value = self._padding(node, ctx)
        in_dims, out_dims = ctx.dims(x), ctx.dims(node)
        rank = len(in_dims)
        padded = {rank - 1 - i for i in range(len(pad) // 2) if pad[2 * i] or pad[2 * i + 1]}
        for axis in range(rank):
            if axis in padded:
                ctx.fix(in_dims[axis], f"an axis padded by '{node.name}'")
                ctx.fix(out_dims[axis], f"an axis padded by '{node.name}'")
                continue
            ctx.unify(in_dims[axis], out_dims[axis])
            ctx.same_form(ctx.slot(x, axis), ctx.slot(node, axis))
            if mode == "constant" and value != 0:
                ctx.require_form(ctx.slot(node, axis), CIRC_OR_AVG,
                                 f"constant padding with value {value:g} writes it into "
                                 "every slice, where the zero form needs zeros")


def register_rules(registry: Registry) -> None:
    rule = PadRule()
    functions = [F.pad, aten.pad.default, aten.constant_pad_nd.default]
    if hasattr(torch, "constant_pad_nd"):
        functions.append(torch.constant_pad_nd)
    registry.add(rule, [*rule.modules, *functions])

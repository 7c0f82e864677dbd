"""Rules for ops that pick entries by their values along one axis: topk, sort, argsort,
argmax and argmin (a mixture-of-experts router's ``topk(softmax(logits), k)``).

Maths. Along the axis ``dim`` these ops compare entries: ``topk`` keeps the ``k``
largest and their positions, ``sort`` orders them, ``argmax`` returns a position. Growing
``dim`` adds entries that take part in the comparison: a copy of the largest entry is
picked a second time (``topk``), every position moves (``sort``'s indices), so no form is
exact. Along every other axis each slice is treated apart, entry by entry: a slice that is
a copy gives the copy's result (circ); the avg form's mean slice does not sort to the
mean of the sorted slices, and a zero slice's positions (ties everywhere) are not zero, so
those axes need the circ form. A router's experts axis is ``dim`` and never grows (a bare
width keeps it: its size is the number of experts); the tokens are the other axis.

Keeps ``dim`` at its size (it is a count of candidates: the experts, the classes), so
no plan grows it; the width groups that feed it grow around it.

Refuses:
- an op that compares over every axis at once (``argmax`` without ``dim``, ``topk`` of
  a 0-d tensor) when any axis grows;
- at a non-multiple width, another axis outside the circ form (an op needs it in avg or
  zero: no exact answer; grow by a whole multiple).
"""

from __future__ import annotations

import torch
import torch.fx

from lemon_fx.analysis.registry import Registry
from lemon_fx.analysis.rule import Rule
from lemon_fx.analysis.width import NodeAnalysis
from lemon_fx.axes.vocabulary import ONLY_CIRC

__all__ = ["SelectByValueRule", "register_rules"]

_KEEPDIM_ARG = {"argmax": 2, "argmin": 2}  # (input, dim, keepdim)
_DIM_ARG = {"topk": (2, -1), "sort": (1, -1), "argsort": (1, -1), "argmax": (1, None),
            "argmin": (1, None)}  # position of ``dim`` and its default


class SelectByValueRule(Rule):
    """``topk``, ``sort``, ``argsort``, ``argmax``, ``argmin``: the compared axis keeps its
    size, every other axis passes in the circ form (see the module text)."""

    def __init__(self, kind: str):
        self.kind = kind

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        x = ctx.arg(0, "input")
        in_dims = ctx.dims(x)
        rank = len(in_dims)
        position, default = _DIM_ARG[self.kind]
        dim = ctx.value(ctx.arg(position, "dim", default))
        if dim is None or rank == 0:
            dims = in_dims + [d for out in ctx.outputs() for d in ctx.dims(out)]
            ctx.forbid_growth(dims, f"{self.kind} without a dim compares every entry of the "
                              "tensor", f"pass dim= to {self.kind}, or keep these widths "
                              "fixed")
            return
        dim %= rank
        # the compared entries are candidates (experts, classes), not a width: kept
        ctx.fix(in_dims[dim], f"an axis whose entries {self.kind} compares by value at "
                f"'{node.name}'")
        keepdim = bool(ctx.value(ctx.arg(_KEEPDIM_ARG[self.kind], "keepdim", False))) \
            if self.kind in _KEEPDIM_ARG else True
        for out in ctx.outputs():
            out_dims = ctx.dims(out)
            b = 0
            for a in range(rank):
                if a == dim:
                    b += 1 if keepdim else 0
                    continue
                ctx.unify(in_dims[a], out_dims[b])
                ctx.same_form(ctx.slot(x, a), ctx.slot(out, b))
                ctx.require_form(ctx.slot(out, b), ONLY_CIRC, f"{self.kind} treats each "
                                 "slice apart, and the avg form's mean slice or a zero "
                                 "slice does not give the mean or zero of the results: "
                                 "this axis needs the circ form")
                b += 1
            if keepdim:
                ctx.fix(out_dims[dim], f"the picked entries of {self.kind} at "
                        f"'{node.name}'")


def register_rules(registry: Registry) -> None:
    aten = torch.ops.aten
    registry.add(SelectByValueRule("topk"), ["topk", torch.topk, aten.topk.default])
    registry.add(SelectByValueRule("sort"), ["sort", torch.sort, aten.sort.default,
                                             aten.sort.stable])
    registry.add(SelectByValueRule("argsort"), ["argsort", torch.argsort,
                                                aten.argsort.default, aten.argsort.stable])
    registry.add(SelectByValueRule("argmax"), ["argmax", torch.argmax, aten.argmax.default])
    registry.add(SelectByValueRule("argmin"), ["argmin", torch.argmin, aten.argmin.default])

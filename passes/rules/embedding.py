"""Rules for lookup tables: ``nn.Embedding`` and ``F.embedding``.

Maths. ``y = W[ids]`` reads a row of ``W`` ``[V, D]``: the output's feature axis is the
weight's column axis, so the columns are expanded in the output's form (``W' = W E^T``
row by row: each looked-up row is ``E W[id]``). The vocabulary axis is indexed by the
input's values and never grows.

Refuses: ``max_norm`` when the width grows (renormalization depends on the row norm,
which the expansion changes).
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from lemon_fx.analysis import AxisUse, NodeAnalysis
from lemon_fx.registry import Registry
from lemon_fx.rewrite_context import NodeRewrite
from lemon_fx.rule import Rule

__all__ = ["EmbeddingRule", "register_rules"]


class EmbeddingRule(Rule):
    """Vocabulary axis fixed; feature axis expanded in the output's form."""

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        ids = ctx.arg(0, "input")
        if ctx.module is not None:
            name = ctx.param("weight")
            w = ctx.param_dims(name)
            max_norm = ctx.module.max_norm
        else:
            weight = ctx.arg(1, "weight")
            if weight.op != "get_attr":
                ctx.forbid_growth(ctx.dims(node), "the embedding table is computed at run "
                                  "time", "make it an nn.Parameter")
                return
            name, w = weight.target, ctx.dims(weight)
            max_norm = ctx.value(ctx.arg(3, "max_norm"))
        ctx.fix(w[0], "the vocabulary (rows indexed by input values)")
        out = ctx.dims(node)
        for axis, d in enumerate(ctx.dims(ids)):
            ctx.unify(d, out[axis])
        ctx.unify(w[1], out[-1])
        ctx.claim(name, [None, AxisUse("expand", ctx.slot(node, -1))])
        if max_norm is not None:
            ctx.forbid_growth(out[-1], "max_norm renormalizes rows by their norm",
                              "drop max_norm, or keep this width fixed", kind="not_lossless")

    def rewrite(self, node: torch.fx.Node, ctx: NodeRewrite) -> None:
        if ctx.module is not None:
            ctx.set_attr("embedding_dim", ctx.grown(ctx.param_dims(ctx.param("weight"))[1]))


def register_rules(registry: Registry) -> None:
    registry.add(EmbeddingRule(), [nn.Embedding, F.embedding])

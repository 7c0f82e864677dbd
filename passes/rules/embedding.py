"""Rules for lookup tables: ``nn.Embedding`` and ``F.embedding``.

Maths. ``y = W[ids]`` reads a row of ``W`` ``[V, D]``: the output's feature axis is the
weight's column axis, so the columns are expanded in the output's form (``W' = W E^T``
row by row: each looked-up row is ``E W[id]``). The vocabulary axis is indexed by the
input's values and never grows.

Tied LM head (LEMON, "Tied weights"). When the head ``logits = W h`` shares ``W`` with
the embedding, its columns cannot be split: they are the embedding's expanded columns,
``W' = W E^T``. The head's input is a norm's output, in the zero form ``E_z h``, and
``E^T E_z = k I`` for every form (the tiles meet the tiles, the extras meet zeros), so the
logits come out ``k`` times too large; dividing that final norm's ``gamma`` and ``beta``
by ``k`` makes them exact. Refused when the head does not read a norm used by it alone.

Refuses:
- ``max_norm`` when the width grows (renormalization depends on the row norm, which the
  expansion changes);
- ``F.embedding`` with a table computed at run time (not read from a parameter), when
  its feature width grows: make it an ``nn.Parameter``;
- a tied LM head (a layer splitting the columns of the embedding's weight) that does not
  read, directly or through views and slices, the output of a LayerNorm, RMSNorm or
  decomposed RMSNorm used by it alone: the shared weight would need split columns for the
  head and expanded ones for the embedding, which the resolution refuses as a parameter
  shared by ops that need it grown differently.

The vocabulary axis keeps its size.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from lemon_fx.analysis.registry import Registry
from lemon_fx.analysis.rule import Rule
from lemon_fx.analysis.width import AxisUse, Claim, NodeAnalysis, ParamTransform, WidthAnalysis
from lemon_fx.axes.expansion import AxisGrowth, source_size, target_size
from lemon_fx.recipe.transforms import register_transform
from lemon_fx.resolution.rewrite import NodeRewrite
from passes.rules.norm import _CASTS, MEANS, DecomposedRMSNorm, _FeatureNormRule

__all__ = ["EmbeddingRule", "register_rules"]


class EmbeddingRule(Rule):
    """Vocabulary axis fixed; feature axis expanded in the output's form."""

    def __init__(self, weight_first: bool = False):
        self.weight_first = weight_first  # aten.embedding(weight, indices)

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        ids = ctx.arg(1 if self.weight_first else 0, "input")
        if ctx.module is not None:
            name = ctx.param("weight")
            w = ctx.param_dims(name)
            max_norm = ctx.module.max_norm
        else:
            weight = ctx.arg(0 if self.weight_first else 1, "weight")
            if weight.op != "get_attr":
                ctx.forbid_growth(ctx.dims(node), "the embedding table is computed at run "
                                  "time", "make it an nn.Parameter")
                return
            name, w = weight.target, ctx.dims(weight)
            max_norm = None if self.weight_first else ctx.value(ctx.arg(3, "max_norm"))
        ctx.fix(w[0], "the vocabulary (rows indexed by input values)")
        out = ctx.dims(node)
        for axis, d in enumerate(ctx.dims(ids)):
            ctx.unify(d, out[axis])
        ctx.unify(w[1], out[-1])
        ctx.claim(name, [None, AxisUse("expand", ctx.slot(node, -1))])
        if max_norm is not None:
            ctx.forbid_growth(out[-1], "max_norm renormalizes rows by their norm",
                              "drop max_norm, or keep this width fixed", kind="not_lossless")

    def finalize(self, analysis: WidthAnalysis) -> None:
        for name, claims in analysis.claims.items():
            mine = [c for c in claims if analysis.rules.get(c.node) is self]
            heads = [c for c in claims if c not in mine and len(c.axes) > 1
                     and isinstance(c.axes[1], AxisUse) and c.axes[1].kind == "split"]
            if not mine or not heads:
                continue
            for head in heads:
                norm = _final_norm(analysis, head.node)
                if norm is None:
                    continue  # resolution reports the conflicting claims
                head.axes = (head.axes[0], mine[0].axes[1])
                dim = analysis.param_dims[name][1]
                for claim in _norm_claims(analysis, norm):
                    one_plus = any(t.name == "norm.one_plus_gamma" for t in claim.transforms)
                    name_of = ("tied_head.one_plus_divided_by_copies" if one_plus
                               else "tied_head.divided_by_copies")
                    claim.transforms += (ParamTransform(name_of, (dim,)),)

    def rewrite(self, node: torch.fx.Node, ctx: NodeRewrite) -> None:
        if ctx.module is not None:
            ctx.set_attr("embedding_dim", ctx.grown(ctx.param_dims(ctx.param("weight"))[1]))


def _final_norm(analysis: WidthAnalysis, head: torch.fx.Node) -> torch.fx.Node | None:
    """The node holding the claims of the norm that only the tied head reads, if any:
    the norm itself, or the ``mean`` of a decomposed RMSNorm."""
    x = head.args[0]
    while isinstance(x, torch.fx.Node) and len(x.users) == 1 and x.target in _RELAYOUTS:
        x = x.args[0]  # GPT-2 views and slices the norm's output before its head
    # Gemma casts it back (``type_as``): the norm's output is before the casts
    while isinstance(x, torch.fx.Node) and len(x.users) == 1 and x.target in _CASTS:
        x = x.args[0]
    if not isinstance(x, torch.fx.Node) or len(x.users) != 1:
        return None
    rule = analysis.rules.get(x)
    if isinstance(rule, _FeatureNormRule):
        # the head's logits grow k-fold; only the norm's gamma (and beta) can take 1/k
        gamma, _ = rule.stream_norm_params(x, analysis.gm)
        return x if gamma is not None else None
    for node in analysis.rules:
        if node.target in MEANS:
            rms = DecomposedRMSNorm.match(node)
            if rms is not None and rms.output is x and rms.weight is not None:
                return node
    return None


_RELAYOUTS = {"view", "reshape", "contiguous", torch.reshape, torch.ops.aten.view.default,
              torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default,
              torch.ops.aten.clone.default, torch.ops.aten.slice.Tensor}


def _norm_claims(analysis: WidthAnalysis, norm: torch.fx.Node) -> list[Claim]:
    return [c for claims in analysis.claims.values() for c in claims if c.node is norm]


def _divided_by_copies(_source: torch.Tensor, grown: torch.Tensor,
                       layouts: tuple[AxisGrowth, ...]) -> torch.Tensor:
    """A tied head's final norm: what the steps before made, divided by ``k`` (the tied
    width's copy count), so that the head's k-fold logits come out as the source's."""
    (layout,) = layouts
    return grown / (target_size(layout) // source_size(layout))


def _one_plus_divided_by_copies(_source: torch.Tensor, grown: torch.Tensor,
                                layouts: tuple[AxisGrowth, ...]) -> torch.Tensor:
    """The same for Gemma's ``(1 + w)`` scale: ``1 + w`` divided by ``k``."""
    (layout,) = layouts
    return (1 + grown) / (target_size(layout) // source_size(layout)) - 1


register_transform("tied_head.divided_by_copies", _divided_by_copies)
register_transform("tied_head.one_plus_divided_by_copies", _one_plus_divided_by_copies)


def register_rules(registry: Registry) -> None:
    registry.add(EmbeddingRule(), [nn.Embedding, F.embedding])
    registry.add(EmbeddingRule(weight_first=True), [torch.ops.aten.embedding.default])

"""Rules for attention: matmul/bmm/baddbmm between activations,
``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention``.

Maths (LEMON, "Attention"). Grow the **number of heads**, keep ``head_dim``: the q, k and v
rows of head ``h'`` copy head ``h' % H`` (circ form on the heads axis), so every new head
computes the same logits, softmax and output as its source, and the ``1/sqrt(head_dim)``
scale is unchanged. The output projection reads the heads' outputs (``[H, Dh]`` composite
axis) and splits its columns per copied head.

A matmul of two activations sums over its contraction axis; growing that axis changes the
sum, so the contraction axis (``head_dim`` in ``q @ k^T``, keys in ``att @ v``) must not
grow. The value head size (v's last axis in ``att @ v``, ``att`` a softmax's output, and
in ``scaled_dot_product_attention``) could grow exactly, but it is a ``head_dim`` as q's
and k's are (one ``head_dim`` in a model's config: GPT-Neo), so it is hinted as one and
a bare width keeps it. Batch axes of the matmul (the heads) must be circ: softmax is not
affine. A matmul
``x @ W`` with a 2-d parameter ``W`` ``[in, out]`` is an affine layer (see
``passes.rules.linear``) and grows like one, and so does ``bmm(P[ids], x)``, a mixture of
experts' layer whose weights ``P`` are gathered per row by expert ids (``expert_weight``).

Refuses:
- growing ``head_dim``: the contraction axis of ``q @ k^T``, the last axis of
  ``scaled_dot_product_attention``'s query and key, ``nn.MultiheadAttention``'s
  ``head_dim`` (possible with zero-padded q/k and a fixed scale, but not LEMON's choice:
  grow the number of heads instead);
- growing any other axis a matmul of two activations sums over (the keys in
  ``att @ v``), and the keys' sequence axis of ``scaled_dot_product_attention``;
- a matmul with a 1-d operand, when any of its axes grows;
- for ``baddbmm`` (``beta * input + alpha * b1 @ b2``, Bloom's ALiBi scores), what
  ``bmm`` refuses; its ``input`` is added, in every form;
- a non-multiple width on a batch axis of a matmul or of attention (the heads) where
  another op on that axis needs the avg or zero form: heads are copied whole (circ);
- ``nn.MultiheadAttention`` with ``kdim``/``vdim`` other than ``embed_dim`` or with
  ``add_bias_kv``, when its width or its heads grow;
- a plan that breaks ``nn.MultiheadAttention``'s ``embed_dim == num_heads * head_dim``
  on its input or its output (``PlanError``: grow ``@heads`` by the same factor as the
  width);
- ``nn.MultiheadAttention`` returning attention weights averaged over heads
  (``average_attn_weights=True``) at a non-multiple head count (call it with
  ``need_weights=False``, or grow the heads by a whole multiple).

With ``enable_gqa`` the number of query heads per kv head is kept: the query heads grow
with the kv heads.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from lemon_fx.analysis.registry import Registry
from lemon_fx.analysis.rule import BranchEnd, Rule
from lemon_fx.analysis.width import AxisUse, NodeAnalysis
from lemon_fx.axes.vocabulary import HEAD_DIM_HINT, HEADS_HINT, KV_HINT, ONLY_CIRC
from lemon_fx.resolution.rewrite import NodeRewrite
from passes.rules.linear import affine_end, couple_affine, couple_expert_matmul, expert_weight

__all__ = ["BaddbmmRule", "MatmulRule", "MultiheadAttentionRule", "SDPARule", "couple_matmul",
           "register_rules"]

HEAD_DIM_FIX = ("grow the number of heads instead (LEMON keeps head_dim): leave "
                "'@head_dim' out of the plan")


def _batch_axes(ctx: NodeAnalysis, operands: list, out, core: int) -> None:
    """Unify broadcast batch axes (all but the last ``core`` axes), circ form, heads hint."""
    out_dims = ctx.dims(out)
    n_batch = len(out_dims) - core
    for t in operands:
        t_dims = ctx.dims(t)
        t_batch = len(t_dims) - core
        for axis in range(t_batch):
            o_axis = axis + n_batch - t_batch
            if ctx.shape(t)[axis] == ctx.shape(out)[o_axis]:
                ctx.unify(t_dims[axis], out_dims[o_axis])
                ctx.same_form(ctx.slot(t, axis), ctx.slot(out, o_axis))
    for axis in range(n_batch):
        if ctx.shape(out)[axis] > 1:
            ctx.require_form(ctx.slot(out, axis), ONLY_CIRC, "attention heads need the circ form")
            if axis == n_batch - 1 and n_batch >= 2:
                ctx.hint(out_dims[axis], HEADS_HINT)


_SOFTMAX = {torch.softmax, F.softmax, torch.nn.Softmax, "softmax",
            torch.ops.aten._softmax.default, torch.ops.aten.softmax.int}
_VALUE_KEEPING = {"to", "type_as", "contiguous", "float", "half", "bfloat16", "dropout",
                  F.dropout, torch.nn.Dropout, torch.ops.aten.dropout.default,
                  torch.ops.aten._to_copy.default}


def _attention_weights(node: Any, steps: int = 4) -> bool:
    """Whether ``node`` is a softmax's output (through casts and dropout): the left
    operand of ``att @ v``."""
    for _ in range(steps):
        if not isinstance(node, torch.fx.Node):
            return False
        target = node.target
        if node.op == "call_module":
            target = type(node.graph.owning_module.get_submodule(node.target))
        if target in _SOFTMAX:
            return True
        if target not in _VALUE_KEEPING or not node.args:
            return False
        node = node.args[0]
    return False


class MatmulRule(Rule):
    """``a @ b`` for ``[..., n, k] @ [..., k, m]``; a parameter ``b`` makes it a Linear."""

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        a, b = node.args[0], node.args[1]
        if not (ctx.is_tensor(a) and ctx.is_tensor(b)):
            return
        if len(ctx.dims(a)) < 2 or len(ctx.dims(b)) < 2:
            ctx.forbid_growth(ctx.dims(a) + ctx.dims(b) + ctx.dims(node),
                              "matmul with a 1-d operand", "use 2-d operands")
            return
        if b.op == "get_attr" and len(ctx.dims(b)) == 2:
            # x @ W with W [in, out]: an affine layer with a transposed weight
            w = ctx.dims(b)
            in_slot, out_slot = couple_affine(ctx, a, node, [w[1], w[0]], None)
            ctx.claim(b.target, [AxisUse("split", in_slot), AxisUse("expand", out_slot)])
            return
        if couple_expert_matmul(ctx, a, b, node):  # a mixture of experts' batched layer
            return
        couple_matmul(ctx, a, b, node)

    def branch_end(self, node: torch.fx.Node, root: torch.nn.Module) -> BranchEnd | None:
        """``bmm(P[ids], x)``, a mixture of experts' last layer (no bias), writes zero when
        ``P`` is zero: LEMON's cancelling ``P_c`` (``P_c[e] E = 0`` for every expert)."""
        for operand in node.args[:2]:
            name = expert_weight(operand)
            if name is not None:
                return BranchEnd(node, name, None)
        return None


def couple_matmul(ctx: NodeAnalysis, a, b, out) -> None:
    """``out = a @ b`` of two activations ``[..., n, k] @ [..., k, m]``: rows and columns
    pass, the contraction axis ``k`` must not grow, batch axes are circ (the heads)."""
    ad, bd, od = ctx.dims(a), ctx.dims(b), ctx.dims(out)
    ctx.unify(ad[-1], bd[-2])
    ctx.unify(ad[-2], od[-2])
    ctx.unify(bd[-1], od[-1])
    ctx.same_form(ctx.slot(a, -2), ctx.slot(out, -2))
    ctx.same_form(ctx.slot(b, -1), ctx.slot(out, -1))
    ctx.hint(ad[-1], HEAD_DIM_HINT)
    if _attention_weights(a):
        # att @ v: v's last axis is the value head size, a head_dim like q's and k's
        # (it could grow exactly, but a model's config has one head_dim: GPT-Neo)
        ctx.hint(bd[-1], HEAD_DIM_HINT)
    ctx.forbid_growth(ad[-1], "a matmul of two activations sums over this axis, and "
                      "growing it changes the sum", HEAD_DIM_FIX, kind="not_lossless")
    _batch_axes(ctx, [a, b], out, core=2)


class BaddbmmRule(Rule):
    """``torch.baddbmm(input, b1, b2, beta=1, alpha=1)`` = ``beta * input + alpha * (b1 @ b2)``.

    Maths: the batched product is ``bmm``'s (``MatmulRule``: ``[B, n, k] @ [B, k, m]``;
    the contraction axis ``k``, ``head_dim`` in Bloom's ``alibi.baddbmm(q, k^T, beta=1,
    alpha=1/sqrt(head_dim))``, must not grow; the batch axis, heads folded into it, is
    circ), and ``input`` is added to it: it broadcasts to the output as in ``add``, one
    dim and one form per shared axis, a size-1 axis read once for every copy (the ALiBi
    bias ``[B * H, 1, keys]``). ``beta`` and ``alpha`` are numbers and stay: neither
    depends on a width that grows (``1/sqrt(head_dim)`` with ``head_dim`` kept).

    Refuses what ``bmm`` refuses: growing the contraction axis (``head_dim``: grow the
    number of heads instead), and at a non-multiple width the avg or zero form on the
    batch axis (heads are copied whole). An ``input`` computed from ``num_heads`` (Bloom's
    ALiBi slopes: ``arange`` and ``pow`` of created tensors) shares the output's batch
    axis, and with it the heads: their growth is refused where that input is computed.
    """

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        first = ctx.arg(0, "input")
        b1, b2 = ctx.arg(1, "batch1"), ctx.arg(2, "batch2")
        couple_matmul(ctx, b1, b2, node)
        ctx.broadcast([first], node)


class SDPARule(Rule):
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, ..., is_causal, scale)``."""

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
        qd, kd, vd, od = ctx.dims(q), ctx.dims(k), ctx.dims(v), ctx.dims(node)
        ctx.unify(qd[-1], kd[-1])
        ctx.unify(qd[-2], od[-2])
        ctx.unify(kd[-2], vd[-2])
        ctx.unify(vd[-1], od[-1])
        ctx.same_form(ctx.slot(v, -1), ctx.slot(node, -1))
        for d in (qd[-1], vd[-1]):
            ctx.hint(d, HEAD_DIM_HINT)
        ctx.forbid_growth(qd[-1], "the attention logits sum over head_dim, and the scale "
                          "1/sqrt(head_dim) depends on it", HEAD_DIM_FIX, kind="not_lossless")
        ctx.forbid_growth(kd[-2], "attention sums over the keys", "keep the sequence fixed",
                          kind="not_lossless")
        if ctx.value(ctx.arg(7, "enable_gqa", False)) and ctx.shape(q)[-3] != ctx.shape(k)[-3]:
            # query head h reads kv head h // g: the query heads are [kv_heads, g], g inner
            group = ctx.new_dim(ctx.shape(q)[-3] // ctx.shape(k)[-3])
            ctx.fix(group, "query heads per kv head (enable_gqa)")
            ctx.factor(qd[-3], [kd[-3], group])
            ctx.unify(kd[-3], vd[-3])
            ctx.hint(kd[-3], KV_HINT)
            _batch_axes(ctx, [q], node, core=2)
            _batch_axes(ctx, [k, v], k, core=2)
        else:
            _batch_axes(ctx, [q, k, v], node, core=2)
            if len(qd) >= 3 and len(ctx._a.dims.leaves(qd[-3])) > 1:
                # query heads [kv_heads, g] from repeat_kv's expand + reshape
                for leaf in ctx._a.dims.leaves(qd[-3]):
                    ctx.hint(leaf, KV_HINT)
        mask = ctx.arg(3, "attn_mask")
        if ctx.is_tensor(mask):
            m_dims, m_shape = ctx.dims(mask), ctx.shape(mask)
            rank = len(od)
            full = list(od[:-2]) + [qd[-2], kd[-2]]
            full_shape = list(ctx.shape(node)[:-2]) + [ctx.shape(q)[-2], ctx.shape(k)[-2]]
            for axis, d in enumerate(m_dims):
                o_axis = axis + rank - len(m_dims)
                if o_axis >= 0 and m_shape[axis] == full_shape[o_axis] and m_shape[axis] > 1:
                    ctx.unify(d, full[o_axis])
                    if o_axis < rank - 2:
                        ctx.same_form(ctx.slot(mask, axis), ctx.slot(node, o_axis))


class MultiheadAttentionRule(Rule):
    """``nn.MultiheadAttention``: heads grow whole, ``embed_dim = num_heads * head_dim``.

    ``in_proj_weight`` is ``[3, H, Dh] x E``: rows expanded per head (circ), columns split
    in the input's form; ``out_proj`` columns split per head. The module uses one
    ``embed_dim`` for its input, its heads and its output, so the plan must keep
    ``E_in = E_out = H' * Dh`` (a size tie).

    Its output (item 0) may end a residual branch: ``out_proj`` set to write zero.
    """

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        m: nn.MultiheadAttention = ctx.module
        query, key, value = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
        outputs = {out[1]: out for out in ctx.outputs()}
        attn_out = outputs.get(0)
        q_dims = ctx.dims(query)
        e_in = q_dims[-1]
        heads, head_dim, three = (ctx.new_dim(m.num_heads), ctx.new_dim(m.head_dim),
                                  ctx.new_dim(3))
        ctx.fix(three, "the q/k/v split of nn.MultiheadAttention")
        ctx.hint(heads, HEADS_HINT)
        ctx.hint(head_dim, HEAD_DIM_HINT)
        ctx.forbid_growth(head_dim, "nn.MultiheadAttention's head_dim", HEAD_DIM_FIX,
                          kind="not_lossless")
        everything = list(q_dims) + [heads]
        if not m._qkv_same_embed_dim or m.bias_k is not None:
            ctx.forbid_growth(everything, "nn.MultiheadAttention with kdim/vdim or "
                              "add_bias_kv", "use the default kdim/vdim and no bias_kv")
            return
        for other in (key, value):
            if ctx.is_tensor(other):
                ctx.unify(ctx.dims(other)[-1], e_in)
                ctx.same_form(ctx.slot(other, -1), ctx.slot(query, -1))
        w = ctx.param_dims(ctx.param("in_proj_weight"))
        ctx.factor(w[0], [three, heads, head_dim])
        ctx.unify(w[1], e_in)
        ctx.claim(ctx.param("in_proj_weight"),
                  [AxisUse("expand", None), AxisUse("split", ctx.slot(query, -1))])
        if m.in_proj_bias is not None:
            ctx.unify(ctx.param_dims(ctx.param("in_proj_bias"))[0], w[0])
            ctx.claim(ctx.param("in_proj_bias"), [AxisUse("expand", None)])
        ow = ctx.param_dims(ctx.param("out_proj.weight"))
        ctx.factor(ow[1], [heads, head_dim])
        if attn_out is not None:
            out_dims = ctx.dims(attn_out)
            for axis in range(len(out_dims) - 1):
                ctx.unify(q_dims[axis], out_dims[axis])
                ctx.same_form(ctx.slot(query, axis), ctx.slot(attn_out, axis))
            ctx.unify(ow[0], out_dims[-1])
            out_slot = ctx.slot(attn_out, -1)
        else:
            out_slot = None
        ctx.claim(ctx.param("out_proj.weight"), [AxisUse("expand", out_slot),
                                                  AxisUse("split", None)])
        if m.out_proj.bias is not None:
            ctx.unify(ctx.param_dims(ctx.param("out_proj.bias"))[0], ow[0])
            ctx.claim(ctx.param("out_proj.bias"), [AxisUse("expand", out_slot)])
        ctx.tie(e_in, [heads, head_dim], "nn.MultiheadAttention needs embed_dim == "
                "num_heads * head_dim", "grow '@heads' by the same factor as the input width")
        ctx.tie(ow[0], [heads, head_dim], "nn.MultiheadAttention needs its output width == "
                "num_heads * head_dim", "grow '@heads' by the same factor as the output width")
        if 1 in outputs:
            weights = outputs[1]
            averaged = ctx.value(ctx.arg(6, "average_attn_weights", True))
            if averaged:
                ctx.forbid_growth(heads, "the attention weights are averaged over heads",
                                  "grow the heads by a whole multiple, or call with "
                                  "need_weights=False", kind="not_lossless",
                                  whole_multiples_ok=True)
            else:
                ctx.unify(ctx.dims(weights)[-3], heads)

    def rewrite(self, node: torch.fx.Node, ctx: NodeRewrite) -> None:
        w = ctx.param_dims(ctx.param("in_proj_weight"))
        e = ctx.grown(w[1])
        heads = ctx.grown(w[0]) // 3 // ctx.module.head_dim
        ctx.set_attr("embed_dim", e)
        ctx.set_attr("kdim", e)
        ctx.set_attr("vdim", e)
        ctx.set_attr("num_heads", heads)
        ow = ctx.param_dims(ctx.param("out_proj.weight"))
        ctx.set_attr("out_proj.in_features", ctx.grown(ow[1]))
        ctx.set_attr("out_proj.out_features", ctx.grown(ow[0]))

    def branch_end(self, node: torch.fx.Node, root: torch.nn.Module) -> BranchEnd | None:
        """The attention output (the first item of ``(out, weights)``) is
        ``out_proj(heads)``: its weight and bias set to zero write zero."""
        return affine_end(node, root, "out_proj")


def register_rules(registry: Registry) -> None:
    aten = torch.ops.aten
    registry.add(MatmulRule(), [operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm",
                                "__matmul__", aten.matmul.default, aten.bmm.default,
                                aten.mm.default, torch.mm, "mm"])
    registry.add(BaddbmmRule(), [torch.baddbmm, "baddbmm", aten.baddbmm.default])
    registry.add(SDPARule(), [F.scaled_dot_product_attention,
                              aten.scaled_dot_product_attention.default])
    registry.add(MultiheadAttentionRule(), [nn.MultiheadAttention])

"""Rules for affine layers: ``nn.Linear``, ``F.linear`` and ``torch.addmm``.

Maths. ``y = x W^T + b`` with ``x`` of width S_in (expansion ``E_in``) and ``y`` of width
S_out (expansion ``E_out``). The grown layer must satisfy ``W' E_in = E_out W`` and
``b' = E_out b``. Rows (fan-out) are expanded by ``E_out`` in the output axis' form;
columns (fan-in) are split so copies sum to the source column: LEMON's unequal "proj"
split with noise at the wide layer's init scale ``U(-1/sqrt(in'), 1/sqrt(in'))``, or
Net2Net's equal split. Leading axes pass through unchanged, row by row: a copied row maps
to a copy (circ), a mean row to the mean of the outputs (avg: the map is affine), but a
zero row to the bias, not to zero, so with a bias a leading axis that grows by a
non-multiple needs the circ or avg form (a Linear over the token axis of a LayerNorm's
zero-form output, as in a token-mixing MLP). ``addmm(b, x, W)`` (GPT-2's Conv1D) is the
same with ``W`` stored ``[in, out]``.

Experts (a mixture of experts' batched layers, transformers' ``batched_mm``): ``W[e] @ x``
as ``bmm(P[ids], x[..., None])`` with ``P`` ``[experts, out, in]`` gathered per row by the
router's expert ids is, row by row, the affine layer of expert ``ids[n]`` without a bias:
``P'[e] = E_out P[e] P_in`` for every expert ``e`` satisfies ``P'[e] E_in = E_out P[e]``,
so each row's product is exact, whichever expert it picked (``expert_weight``). The
experts axis itself is picked by position and never grows. The grouped spelling
(transformers' default ``grouped_mm``: ``grouped_mm(x_sorted, W, offs)``, rows sorted by
expert and ``W`` ``[experts, in, out]``, often a transposed view of ``P`` ``[experts, out,
in]``) is the same layer: rows ``offs[e-1]:offs[e]`` are multiplied by ``W[e]``
(``GroupedMatmulRule``).

Refuses:
- at a non-multiple width, a leading axis in the zero form when the layer has a bias
  (no exact answer; grow by a whole multiple, or drop the bias);
- ``F.linear`` whose weight is computed at run time (not read from a parameter), when one
  of its axes grows: there is no parameter to grow; make it an ``nn.Parameter``. A bias
  computed at run time is an added activation, grown by the ops that compute it;
- ``torch.addmm`` whose weight is computed at run time, when any axis of its bias, input
  or weight grows;
- a grouped matmul whose weight is not a parameter (or a transposed view of one), or whose
  operands are not a 2-d input and a 3-d weight, when any of its axes grows.

``nn.Linear`` itself refuses nothing: every width of its input and output can grow. (A
weight it shares with an op that must grow it differently is refused for the pair when
the plan is resolved: untie it, or keep that width.)
"""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from lemon_fx.analysis.registry import Registry
from lemon_fx.analysis.rule import BranchEnd, Rule, argument, parameter_name
from lemon_fx.analysis.width import AxisUse, NodeAnalysis
from lemon_fx.axes.vocabulary import CIRC_OR_AVG
from lemon_fx.resolution.rewrite import NodeRewrite

__all__ = ["FunctionalLinearRule", "GroupedMatmulRule", "LinearRule", "affine_end",
           "couple_expert_matmul", "expert_weight", "register_rules"]


def couple_affine(ctx: NodeAnalysis, x, out, weight_dims: list[int], bias_dims: list[int] | None):
    """Shared by every ``y = x W^T + b`` spelling; returns the (in, out) slots."""
    x_dims, out_dims = ctx.dims(x), ctx.dims(out)
    for axis in range(len(x_dims) - 1):
        ctx.unify(x_dims[axis], out_dims[axis])
        ctx.same_form(ctx.slot(x, axis), ctx.slot(out, axis))
        if bias_dims is not None:  # a zero row of x becomes the bias, not zero
            ctx.require_form(ctx.slot(out, axis), CIRC_OR_AVG,
                             "a layer with a bias maps a zero row to its bias: the axes it "
                             "maps row by row need the circ or avg form", own_axis_only=True)
    ctx.unify(weight_dims[1], x_dims[-1])
    ctx.unify(weight_dims[0], out_dims[-1])
    if bias_dims is not None:
        ctx.unify(bias_dims[0], out_dims[-1])
    return ctx.slot(x, -1), ctx.slot(out, -1)


def expert_weight(value) -> str | None:
    """The parameter ``P`` ``[experts, out, in]`` when ``value`` is ``P[ids]``, the experts'
    weights gathered per row by a 1-d tensor of expert ids (``aten.index.Tensor`` under
    torch.export, ``operator.getitem`` under symbolic tracing); else None."""
    if not isinstance(value, torch.fx.Node) or value.op != "call_function":
        return None
    if value.target is torch.ops.aten.index.Tensor:
        source, index = value.args[0], value.args[1]
        if not (isinstance(index, (list, tuple)) and len(index) == 1):
            return None
        index = index[0]
    elif value.target is operator.getitem:
        source, index = value.args[0], value.args[1]
    else:
        return None
    name = parameter_name(source)
    ids = getattr(index, "meta", {}).get("val") if isinstance(index, torch.fx.Node) else None
    weight = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
    if name is None or not isinstance(ids, torch.Tensor) or ids.dim() != 1 \
            or ids.is_floating_point() or not isinstance(weight, torch.Tensor) \
            or weight.dim() != 3:
        return None
    return name


def couple_expert_matmul(ctx: NodeAnalysis, a, b, out) -> bool:
    """``bmm(P[ids], x)`` (``[N, out, in] @ [N, in, m]``) or ``bmm(x, P[ids])`` with ``P``
    ``[experts, in, out]``: the experts' affine layer of each row (module text). Returns
    False, stating nothing, when neither operand is gathered experts' weights."""
    for gathered, other, weight_is_left in ((a, b, True), (b, a, False)):
        name = expert_weight(gathered)
        if name is None or len(ctx.dims(other)) != 3 or len(ctx.dims(out)) != 3:
            continue
        g, x, o = ctx.dims(gathered), ctx.dims(other), ctx.dims(out)
        gather = frozenset({gathered})  # its read of P is this layer's, not a value read
        for d in (x[0], o[0]):  # one row per (token, expert) pair
            ctx.unify(g[0], d)
        ctx.same_form(ctx.slot(other, 0), ctx.slot(out, 0))
        # P[ids] @ x: [N, out, in] @ [N, in, m]; x @ P[ids]: [N, m, in] @ [N, in, out]. The
        # weight's out axis is the output's axis there, and the other operand's contraction
        # axis; the weight's in axis is where the other operand's free axis sits
        rows, cols = (1, 2) if weight_is_left else (2, 1)
        ctx.unify(g[cols], x[rows])
        ctx.unify(g[rows], o[rows])
        ctx.unify(x[cols], o[cols])
        ctx.same_form(ctx.slot(other, cols), ctx.slot(out, cols))
        uses: list[AxisUse | None] = [None, None, None]
        uses[rows] = AxisUse("expand", ctx.slot(out, rows))
        uses[cols] = AxisUse("split", ctx.slot(other, rows))
        ctx.claim(name, uses, readers=gather)
        return True
    return False


def affine_end(node: torch.fx.Node, root: torch.nn.Module, layer: str = "") -> BranchEnd:
    """The ``BranchEnd`` of a ``call_module`` node whose module (or its submodule
    ``layer``, e.g. ``"out_proj"``) computes ``h W^T + b`` with ``weight`` and ``bias``."""
    path = f"{node.target}.{layer}" if layer else str(node.target)
    bias = getattr(root.get_submodule(path), "bias", None)
    return BranchEnd(node, f"{path}.weight", f"{path}.bias" if bias is not None else None)


def _functional_end(node: torch.fx.Node, weight, bias) -> BranchEnd | None:
    """A functional affine layer ends a branch when its weight (and bias) are parameters."""
    weight_name, bias_name = parameter_name(weight), parameter_name(bias)
    if weight_name is None or (bias is not None and bias_name is None):
        return None  # computed at run time: there is nothing to set to zero
    return BranchEnd(node, weight_name, bias_name)


class LinearRule(Rule):
    """``nn.Linear``: rows expanded (fan-out), columns split (fan-in).

    Ends a residual branch (depth growth): its weight and bias can be set to write zero.
    """

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        x = node.args[0]
        weight = ctx.param("weight")
        bias = ctx.param("bias") if ctx.module.bias is not None else None
        in_slot, out_slot = couple_affine(
            ctx, x, node, ctx.param_dims(weight), ctx.param_dims(bias) if bias else None)
        ctx.claim(weight, [AxisUse("expand", out_slot), AxisUse("split", in_slot)])
        if bias:
            ctx.claim(bias, [AxisUse("expand", out_slot)])

    def rewrite(self, node: torch.fx.Node, ctx: NodeRewrite) -> None:
        dims = ctx.param_dims(ctx.param("weight"))
        ctx.set_attr("out_features", ctx.grown(dims[0]))
        ctx.set_attr("in_features", ctx.grown(dims[1]))

    def branch_end(self, node: torch.fx.Node, root: torch.nn.Module) -> BranchEnd | None:
        """Zero stays zero: ``x W^T + b`` writes 0 when ``W`` and ``b`` are set to."""
        return affine_end(node, root)


class FunctionalLinearRule(Rule):
    """``F.linear(x, weight, bias)`` with its weight read through ``get_attr``; the bias is
    a parameter or a tensor computed from them (an added activation).

    Ends a residual branch when its weight and bias are parameters (not computed).
    """

    def branch_end(self, node: torch.fx.Node, root: torch.nn.Module) -> BranchEnd | None:
        """The layer's weight and bias when both are parameters (``get_attr``)."""
        return _functional_end(node, argument(node, 1, "weight"), argument(node, 2, "bias"))

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        x, weight = ctx.arg(0, "input"), ctx.arg(1, "weight")
        bias = ctx.arg(2, "bias")
        in_slot, out_slot = couple_affine(
            ctx, x, node, ctx.dims(weight), ctx.dims(bias) if ctx.is_tensor(bias) else None)
        if weight.op == "get_attr":
            ctx.claim(weight.target, [AxisUse("expand", out_slot), AxisUse("split", in_slot)])
        else:
            ctx.forbid_growth(ctx.dims(weight), "the weight is computed at run time, so "
                              "there is no parameter to grow",
                              "make the weight an nn.Parameter, or keep this width fixed")
        if ctx.is_tensor(bias) and bias.op == "get_attr":
            ctx.claim(bias.target, [AxisUse("expand", out_slot)])
        # a bias computed at run time (BEiT's cat(q_bias, zeros_like(v_bias), v_bias)) is
        # an added activation on the output axis: the ops that compute it grow it


class AddmmRule(Rule):
    """``torch.addmm(b, x, W)`` = ``b + x @ W`` with ``W`` ``[in, out]`` (GPT-2's Conv1D):
    the same affine maths with the weight transposed; it ends a residual branch when its
    weight and bias are parameters."""

    def branch_end(self, node: torch.fx.Node, root: torch.nn.Module) -> BranchEnd | None:
        """``W`` (``mat2``) and the added ``b`` (``input``) when both are parameters."""
        return _functional_end(node, argument(node, 2, "mat2"), argument(node, 0, "input"))

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        bias, x, weight = node.args[:3]
        if not (ctx.is_tensor(weight) and weight.op == "get_attr"):
            ctx.forbid_growth([d for a in (bias, x, weight) if ctx.is_tensor(a)
                               for d in ctx.dims(a)], "addmm with a weight computed at run "
                              "time", "make the weight an nn.Parameter")
            return
        w = ctx.dims(weight)
        bias_dims = ctx.dims(bias) if ctx.is_tensor(bias) else None
        in_slot, out_slot = couple_affine(ctx, x, node, [w[1], w[0]], bias_dims)
        ctx.claim(weight.target, [AxisUse("split", in_slot), AxisUse("expand", out_slot)])
        if ctx.is_tensor(bias) and bias.op == "get_attr":
            ctx.claim(bias.target, [AxisUse("expand", out_slot)])


_TRANSPOSES = (torch.ops.aten.transpose.int, torch.transpose, "transpose")


def _parameter_view(value) -> tuple[str, list[int], frozenset] | None:
    """``(name, axes, nodes)`` when ``value`` is a parameter or a transpose of one:
    ``axes[i]`` is the parameter's axis that ``value``'s axis ``i`` is, ``nodes`` the
    transpose read on the way (its read of the parameter is the layer's)."""
    if not isinstance(value, torch.fx.Node):
        return None
    name = parameter_name(value)
    rank = value.meta["val"].dim() if isinstance(value.meta.get("val"), torch.Tensor) else None
    if name is not None and rank is not None:
        return name, list(range(rank)), frozenset()
    if value.target in _TRANSPOSES and len(value.args) == 3:
        inner = _parameter_view(value.args[0])
        if inner is None or not all(isinstance(a, int) for a in value.args[1:]):
            return None
        name, axes, nodes = inner
        i, j = (a % len(axes) for a in value.args[1:])
        axes[i], axes[j] = axes[j], axes[i]
        return name, axes, nodes | {value}
    return None


class GroupedMatmulRule(Rule):
    """``grouped_mm(x, W, offs)``: rows ``x[offs[e-1]:offs[e]]`` times ``W[e]`` (``x``
    ``[S, in]``, ``W`` ``[experts, in, out]``, a parameter or a transposed view of one):
    each group is an affine layer without a bias, so the rows pass, ``in`` is split and
    ``out`` expanded per expert (module text). The experts axis keeps its size.

    Ends a residual branch (a mixture of experts' down projection): ``W = 0`` writes zero.
    """

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        x, weight = ctx.arg(0, "input"), ctx.arg(1, "weight")
        view = _parameter_view(weight)
        tensors = [a for a in (x, weight) if ctx.is_tensor(a)]
        if view is None or len(tensors) != 2 or len(ctx.dims(x)) != 2 \
                or len(ctx.dims(weight)) != 3:
            ctx.forbid_growth([d for t in tensors for d in ctx.dims(t)] + ctx.dims(node),
                              "a grouped matmul whose weight is not a 3-d parameter (or a "
                              "transposed view of one) read by a 2-d input",
                              "make the experts' weights an nn.Parameter [experts, out, in]")
            return
        name, axes, views = view
        w, xd, od = ctx.dims(weight), ctx.dims(x), ctx.dims(node)
        ctx.unify(xd[0], od[0])
        ctx.same_form(ctx.slot(x, 0), ctx.slot(node, 0))
        ctx.unify(w[1], xd[1])
        ctx.unify(w[2], od[1])
        uses: list[AxisUse | None] = [None, None, None]
        uses[axes[1]] = AxisUse("split", ctx.slot(x, 1))
        uses[axes[2]] = AxisUse("expand", ctx.slot(node, 1))
        ctx.claim(name, uses, readers=views)

    def branch_end(self, node: torch.fx.Node, root: torch.nn.Module) -> BranchEnd | None:
        """The experts' weight when it is a parameter (or a transposed view of one)."""
        view = _parameter_view(argument(node, 1, "weight"))
        return BranchEnd(node, view[0], None) if view is not None else None


def register_rules(registry: Registry) -> None:
    aten = torch.ops.aten
    registry.add(LinearRule(), [nn.Linear])
    registry.add(FunctionalLinearRule(), [F.linear, torch._C._nn.linear, aten.linear.default])
    registry.add(AddmmRule(), [torch.addmm, aten.addmm.default])
    # transformers' experts (grouped_mm, its default), and torch's own grouped matmul
    registry.add(GroupedMatmulRule(), ["transformers::grouped_mm_fallback",
                                       aten._grouped_mm.default])

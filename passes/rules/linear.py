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

Refuses:
- at a non-multiple width, a leading axis in the zero form when the layer has a bias
  (no exact answer; grow by a whole multiple, or drop the bias);
- ``F.linear`` whose weight is computed at run time (not read from a parameter), when one
  of its axes grows: there is no parameter to grow; make it an ``nn.Parameter``. A bias
  computed at run time is an added activation, grown by the ops that compute it;
- ``torch.addmm`` whose weight is computed at run time, when any axis of its bias, input
  or weight grows.

``nn.Linear`` itself refuses nothing: every width of its input and output can grow. (A
weight it shares with an op that must grow it differently is refused for the pair when
the plan is resolved: untie it, or keep that width.)
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from lemon_fx.analysis.registry import Registry
from lemon_fx.analysis.rule import BranchEnd, Rule, argument, parameter_name
from lemon_fx.analysis.width import AxisUse, NodeAnalysis
from lemon_fx.axes.vocabulary import CIRC_OR_AVG
from lemon_fx.resolution.rewrite import NodeRewrite

__all__ = ["FunctionalLinearRule", "LinearRule", "affine_end", "register_rules"]


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


def register_rules(registry: Registry) -> None:
    aten = torch.ops.aten
    registry.add(LinearRule(), [nn.Linear])
    registry.add(FunctionalLinearRule(), [F.linear, torch._C._nn.linear, aten.linear.default])
    registry.add(AddmmRule(), [torch.addmm, aten.addmm.default])

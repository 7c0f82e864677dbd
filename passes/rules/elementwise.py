"""Rules for elementwise ops: activations, arithmetic with broadcasting, masks.

Maths. An elementwise op ``f`` commutes with an expansion ``E`` exactly when the extra
entries it produces are the ones the output form asks for:

- tiles (``i < kS``, and every circ entry) are copies, so any ``f`` maps copies to copies;
- avg extras hold ``mean(x)``: only *affine* maps keep "mean of the entries"
  (``x + y``, ``a * x``, ``x + b`` with ``b`` a tensor in the same form);
- zero extras hold 0: fine when ``f(0, ..., 0) = 0`` (ReLU, GELU, SiLU, tanh, products).

So additive ops accept every form, products need circ or zero, nonlinearities with
``f(0) = 0`` circ or zero, and the others (sigmoid, exp, division by a grown tensor)
circ only. A size-1 axis broadcast against a grown axis reads one value for all copies,
which every form accepts.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from lemon_fx.analysis.registry import Registry
from lemon_fx.analysis.rule import Rule
from lemon_fx.analysis.width import NodeAnalysis
from lemon_fx.axes.vocabulary import (
    ANY_FORM,
    CIRC_OR_ZERO,
    NONLINEAR_HINT,
    ONLY_CIRC,
    RESIDUAL_ADD_HINT,
    Form,
)

__all__ = [
    "ActivationRule",
    "AdditiveRule",
    "PassThroughRule",
    "ProductRule",
    "QuotientRule",
    "register_rules",
]



def _first_tensor(node: torch.fx.Node, ctx: NodeAnalysis):
    for arg in list(node.args) + list(node.kwargs.values()):
        if ctx.is_tensor(arg):
            return arg
    return None


class PassThroughRule(Rule):
    """Identity-like ops (Dropout, Identity, contiguous, dtype casts): same axes, same form.

    Dropout in training mode multiplies every entry by an independent mask, so copies
    stop being copies after one step; in eval mode (and for verification) it is exact.
    """

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        x = _first_tensor(node, ctx)
        if x is not None and ctx.is_tensor(node) and ctx.shape(x) == ctx.shape(node):
            ctx.pass_through(x, node)


class ActivationRule(Rule):
    """``y = f(x)`` elementwise; circ always, zero too when ``f(0) = 0``.

    ``zero_at_zero`` is the op's answer with its default arguments; a node's own arguments
    can change it (``nn.Hardtanh(0.5, 1.0)`` maps 0 to 0.5), so each node is evaluated at 0
    with its constant arguments, and one whose arguments are not constants gets circ only.
    """

    def __init__(self, zero_at_zero: bool):
        self.zero_at_zero = zero_at_zero

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        x = _first_tensor(node, ctx)
        ctx.pass_through(x, node)
        zero = self.zero_at_zero and _node_maps_zero_to_zero(node, ctx)
        allowed = CIRC_OR_ZERO if zero else ONLY_CIRC
        for axis, dim in enumerate(ctx.dims(node)):
            ctx.hint(dim, NONLINEAR_HINT)
            ctx.require_form(ctx.slot(node, axis), allowed,
                             "a nonlinearity needs its axis in the circ form"
                             + (" (or zero)" if zero else ""))


def _node_maps_zero_to_zero(node: torch.fx.Node, ctx: NodeAnalysis) -> bool:
    """Whether this node, with its own constant arguments, computes ``f(0) = 0``."""
    rest, kwargs = node.args[1:], dict(node.kwargs)
    if any(isinstance(a, torch.fx.Node) for a in (*rest, *kwargs.values())):
        return False
    zero = torch.zeros(1, dtype=torch.float64)
    if node.op == "call_module":
        value = ctx.module(zero)
    elif node.op == "call_method":
        value = getattr(zero, node.target)(*rest, **kwargs)
    else:
        value = node.target(zero, *rest, **kwargs)
    return bool(value.abs().item() == 0)


class PowRule(Rule):
    """``x ** p`` for a number ``p``: circ, or zero too when ``p > 0`` (``0 ** p = 0``)."""

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        base, exponent = node.args[0], ctx.arg(1, "exponent")
        if not ctx.is_tensor(base) or ctx.is_tensor(exponent):
            ctx.forbid_growth([d for a in (base, exponent, node) if ctx.is_tensor(a)
                               for d in ctx.dims(a)], "a power with a tensor exponent",
                              "use a number as the exponent")
            return
        ActivationRule(zero_at_zero=ctx.value(exponent) > 0).analyze(node, ctx)


class _BinaryRule(Rule):
    """Broadcasting binary op; subclasses say which forms shared grown axes allow."""

    allowed: frozenset[Form] = ANY_FORM
    why = ""

    def _operands(self, node: torch.fx.Node, ctx: NodeAnalysis) -> list:
        return [a for a in list(node.args[:2]) + [node.kwargs.get("other")] if a is not None]

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        operands = self._operands(node, ctx)
        ctx.broadcast(operands, node)
        tensors = [a for a in operands if ctx.is_tensor(a)]
        out_rank = len(ctx.dims(node))
        for axis in range(out_rank):
            size = ctx.shape(node)[axis]
            sharing = [t for t in tensors if len(ctx.dims(t)) >= out_rank - axis
                       and ctx.shape(t)[axis - out_rank] == size]
            if size > 1 and self.restrict(len(sharing), len(tensors)):
                ctx.require_form(ctx.slot(node, axis), self.allowed, self.why)
        if (len(tensors) == 2 and all(t.op != "get_attr" for t in tensors)
                and ctx.shape(tensors[0]) == ctx.shape(tensors[1])):
            for dim in ctx.dims(node):
                ctx.hint(dim, RESIDUAL_ADD_HINT)

    def restrict(self, sharing: int, tensors: int) -> bool:
        return False


class AdditiveRule(_BinaryRule):
    """``x + y``, ``x - y``, ``-x``: affine, exact in every form."""


class ProductRule(_BinaryRule):
    """``x * y`` where both vary along a grown axis: circ or zero (``E x * E y = E(x y)``)."""

    allowed = CIRC_OR_ZERO
    why = "a product of two tensors along this axis needs the circ or zero form"

    def restrict(self, sharing: int, tensors: int) -> bool:
        return sharing >= 2

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        super().analyze(node, ctx)
        tensors = [a for a in self._operands(node, ctx) if ctx.is_tensor(a)]
        if len(tensors) == 2 and ctx.shape(tensors[0]) == ctx.shape(tensors[1]):
            for dim in ctx.dims(node):
                ctx.hint(dim, NONLINEAR_HINT)  # a gated MLP's hidden axis is an ffn axis


class QuotientRule(_BinaryRule):
    """``x / y``: dividing by a tensor that varies along a grown axis needs circ."""

    allowed = ONLY_CIRC
    why = "dividing by a tensor along this axis needs the circ form"

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        operands = self._operands(node, ctx)
        ctx.broadcast(operands, node)
        divisor = operands[1] if len(operands) > 1 else None
        if not ctx.is_tensor(divisor):
            return
        rank = len(ctx.dims(node))
        for axis, size in enumerate(ctx.shape(divisor)):
            if size > 1:
                ctx.require_form(ctx.slot(node, axis + rank - len(ctx.shape(divisor))),
                                 self.allowed, self.why)


class MaskedFillRule(Rule):
    """``x.masked_fill(mask, v)``: a mask that varies along a grown axis needs circ."""

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        x, mask = node.args[0], ctx.arg(1, "mask")
        ctx.pass_through(x, node)
        ctx.broadcast([mask], node)
        if ctx.is_tensor(mask):
            rank = len(ctx.dims(node))
            for axis, size in enumerate(ctx.shape(mask)):
                if size > 1:
                    ctx.require_form(ctx.slot(node, axis + rank - len(ctx.shape(mask))), ONLY_CIRC,
                                     "a mask that varies along this axis needs the circ form")


class WhereRule(Rule):
    """``torch.where(cond, a, b)``: selection along a grown axis needs circ."""

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        operands = list(node.args[:3])
        ctx.broadcast(operands, node)
        for axis in range(len(ctx.dims(node))):
            ctx.require_form(ctx.slot(node, axis), ONLY_CIRC, "torch.where needs the circ form")


def _zero_at_zero(fn) -> bool:
    return bool(fn(torch.zeros(1, dtype=torch.float64)).abs().item() == 0)


def register_rules(registry: Registry) -> None:
    aten = torch.ops.aten
    passthrough = PassThroughRule()
    registry.add(passthrough, [
        nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, F.dropout, F.alpha_dropout,
        "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "type_as",
        "type", torch.clone, torch.zeros_like, aten.dropout.default, aten.dropout_.default,
        aten.clone.default,
        aten.contiguous.default, aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default,
        aten.alias.default, aten.detach.default, aten.zeros_like.default,
        aten.type_as.default,
    ])
    activations = {
        nn.ReLU: F.relu, nn.GELU: F.gelu, nn.SiLU: F.silu, nn.Tanh: torch.tanh,
        nn.Sigmoid: torch.sigmoid, nn.Mish: F.mish, nn.ELU: F.elu, nn.LeakyReLU: F.leaky_relu,
        nn.Softplus: F.softplus, nn.Hardswish: F.hardswish, nn.Hardsigmoid: F.hardsigmoid,
        nn.ReLU6: F.relu6, nn.Hardtanh: F.hardtanh,
    }
    with_zero = ActivationRule(zero_at_zero=True)
    without_zero = ActivationRule(zero_at_zero=False)
    extra_functions = {
        torch.relu: "relu", torch.tanh: "tanh", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
        F.tanh: "tanh", torch.exp: "exp", torch.sqrt: "sqrt", torch.rsqrt: "rsqrt",
        torch.abs: "abs", torch.square: "square", torch.erf: "erf", torch.log: "log",
        torch.cos: "cos", torch.sin: "sin",
    }
    zero_ops, other_ops = [], []
    for module, fn in activations.items():
        (zero_ops if _zero_at_zero(fn) else other_ops).extend([module, fn])
    for fn, method in extra_functions.items():
        zero = method in ("relu", "tanh", "abs", "square", "erf", "sin", "sqrt")
        (zero_ops if zero else other_ops).extend([fn, method])
    for method in ("gelu", "silu"):
        zero_ops.append(method)
    zero_ops += [torch.relu_, F.relu_, "relu_"]  # in place: the same function
    # torch.export keeps in-place activations (nn.ReLU(inplace=True)) as their _ spelling.
    zero_ops += [aten.relu.default, aten.gelu.default, aten.silu.default, aten.tanh.default,
                 aten.sin.default, aten.abs.default, aten.sqrt.default, aten.erf.default,
                 aten.relu_.default, aten.silu_.default,
                 aten.hardtanh.default, aten.hardtanh_.default]  # ReLU6; f(0) per node
    other_ops += [aten.sigmoid.default, aten.exp.default, aten.rsqrt.default, aten.cos.default,
                  aten.log.default]
    registry.add(with_zero, zero_ops)
    registry.add(without_zero, other_ops + ["reciprocal"])
    registry.add(PowRule(), ["pow", operator.pow, torch.pow, aten.pow.Tensor_Scalar])
    registry.add(AdditiveRule(), [
        operator.add, operator.sub, operator.neg, operator.iadd, operator.isub, torch.add,
        torch.sub, torch.subtract, torch.neg, "add", "sub", "neg", "add_", "sub_", torch.rsub,
        aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.neg.default,
        aten.rsub.Scalar, aten.add_.Tensor, aten.add_.Scalar, aten.sub_.Tensor,
        aten.sub_.Scalar,
    ])
    registry.add(ProductRule(), [operator.mul, operator.imul, torch.mul, torch.multiply, "mul",
                                 "mul_", aten.mul.Tensor, aten.mul.Scalar, aten.mul_.Tensor,
                                 aten.mul_.Scalar])
    registry.add(QuotientRule(), [operator.truediv, operator.itruediv, torch.div, torch.divide,
                                  torch.true_divide, "div", "div_", "true_divide",
                                  aten.div.Tensor, aten.div.Scalar, aten.div_.Tensor,
                                  aten.div_.Scalar])
    registry.add(MaskedFillRule(), ["masked_fill", "masked_fill_", torch.masked_fill,
                                    aten.masked_fill.Scalar, aten.masked_fill.Tensor])
    registry.add(WhereRule(), [torch.where, torch.ones_like, torch.full_like, aten.where.self,
                               aten.ones_like.default, aten.full_like.default])
    comparison = WhereRule()
    registry.add(comparison, [operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
                              operator.ge, torch.eq, torch.ne, "eq", "ne", "logical_not",
                              torch.logical_not, operator.invert, aten.eq.Tensor,
                              aten.eq.Scalar, aten.ne.Scalar, aten.ne.Tensor, aten.le.Tensor,
                              aten.ge.Scalar, aten.lt.Tensor, aten.gt.Tensor,
                              aten.logical_not.default, aten.__and__.Tensor,
                              aten.bitwise_and.Tensor])

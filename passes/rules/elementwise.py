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

Refuses:
- at a non-multiple width, an axis whose ops need forms that exclude each other (no
  exact answer; grow by a whole multiple, 2x, 3x, ...). The needs stated here: circ only
  for an activation with ``f(0) != 0`` (sigmoid, exp, cos, log...), for one whose node
  has non-constant arguments, for ``x ** p`` with ``p <= 0``, for division by a tensor
  that varies along the axis, for ``masked_fill`` with a mask that varies along it, and
  for ``torch.where``, comparisons and ``ones_like``/``full_like``; circ or zero for an
  activation with ``f(0) = 0``, for ``x ** p`` with ``p > 0`` and for the product of two
  tensors that both vary along the axis (``mul``, and the ``t1 * t2`` of ``addcmul``). (A
  LayerNorm's avg input after a GELU, or a LayerNorm's input multiplied by a gate, is
  such a conflict.)

Layer scale on an avg stream (DeiT-3, BEiT, CaiT at 1.5x): ``gamma * h`` with ``h = W x +
b`` the output of the layer just before it (read by nothing else) and ``gamma`` a per-
channel parameter. The extras of the avg form must hold ``mean_j(gamma_j h_j)``, which
``mean(gamma) * mean(h)`` is not; but the scale can move into the layer's extra rows:
``gamma'`` = ``gamma`` tiled with extras 1, the layer's extra rows ``mean_j(gamma_j W_j)``
and extra bias ``mean_j(gamma_j b_j)`` (``fold_layer_scale``). The circ and zero forms
need nothing more (copies, and zeros times anything), so such a product states no form
need. A scale whose layer is read elsewhere, or is no Linear/Conv (a pooling mixer), keeps
the circ-or-zero need.
- a power whose exponent is a tensor (or whose base is not one), when any of its axes
  grows: use a number as the exponent.
- ``torch.where(cond)`` with one argument (the positions of the nonzero entries), when
  any axis of ``cond`` grows.

Additive ops, dropout, stochastic depth (drop path), casts and the other identity-like ops
refuse nothing.
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
from lemon_fx.analysis.width import AxisUse, NodeAnalysis, ParamTransform
from lemon_fx.axes.expansion import LeafGrowth, split_equal
from lemon_fx.axes.vocabulary import (
    ANY_FORM,
    AVG,
    CIRC_OR_ZERO,
    NONLINEAR_HINT,
    ONLY_CIRC,
    RESIDUAL_ADD_HINT,
    Form,
)
from lemon_fx.recipe.transforms import register_transform

__all__ = [
    "ActivationRule",
    "AdditiveRule",
    "AddcmulRule",
    "PassThroughRule",
    "ProductRule",
    "QuotientRule",
    "WhereRule",
    "register_rules",
]



def _first_tensor(node: torch.fx.Node, ctx: NodeAnalysis):
    for arg in list(node.args) + list(node.kwargs.values()):
        if ctx.is_tensor(arg):
            return arg
    return None


def _first_node(node: torch.fx.Node) -> torch.fx.Node | None:
    """The first node among the arguments: the input of a one-input op."""
    for arg in list(node.args) + list(node.kwargs.values()):
        if isinstance(arg, torch.fx.Node):
            return arg
    return None


def _reads_only_parameters(node: torch.fx.Node, depth: int = 8) -> bool:
    """Whether ``node`` is computed from parameters and numbers alone (a ``get_attr``, or
    a view of one: ConvNeXt's ``gamma.reshape(1, -1, 1, 1)``), never from an input."""
    if node.op == "get_attr":
        return True
    if node.op not in ("call_method", "call_function") or depth == 0:
        return False
    inputs = node.all_input_nodes
    return bool(inputs) and all(_reads_only_parameters(n, depth - 1) for n in inputs)


def _computed_from(node: torch.fx.Node, source: torch.fx.Node, limit: int = 64) -> bool:
    """Whether ``source`` is among the nodes ``node`` is computed from (looking back at
    most ``limit`` nodes: a gate is a few ops from the tensor it gates)."""
    seen, todo = set(), [node]
    while todo and len(seen) < limit:
        current = todo.pop()
        for arg in current.all_input_nodes:
            if arg is source:
                return True
            if arg not in seen:
                seen.add(arg)
                todo.append(arg)
    return False


# ops that hand a parameter on with its zeros where they were: a layer scale read as
# ``gamma.view(C, 1, 1)`` or ``gamma[:, None, None]`` is zero exactly when gamma is
_PARAMETER_VIEWS = {"view", "reshape", "unsqueeze", "expand", "flatten", "squeeze", "to",
                    "float", "double", "half", "bfloat16", "contiguous", "type_as",
                    torch.reshape, torch.unsqueeze, operator.getitem}


def _viewed_parameter(value) -> str | None:
    """The qualified name of the parameter ``value`` reads, directly (``get_attr``) or
    through views and casts (``gamma.view(C, 1, 1)``, ``gamma[:, None, None]``), else None
    (``gamma.exp()`` is not zero where gamma is)."""
    node = value
    for _ in range(8):
        if not isinstance(node, torch.fx.Node):
            return None
        if node.op == "get_attr":
            return str(node.target)
        if node.target not in _PARAMETER_VIEWS or len(node.all_input_nodes) != 1:
            return None
        node = node.all_input_nodes[0]
    return None


def _parameter_reads(value) -> tuple[str, frozenset[torch.fx.Node]] | None:
    """``_viewed_parameter`` with the view nodes on the way (their reads are the rule's)."""
    name, views, node = _viewed_parameter(value), set(), value
    if name is None:
        return None
    while node.op != "get_attr":
        views.add(node)
        node = node.all_input_nodes[0]
    return name, frozenset(views)


def _layer_scale_parts(node: torch.fx.Node, ctx: NodeAnalysis):
    """``(gamma, its view nodes, the layer node)`` when ``node`` is ``gamma * h`` with
    ``gamma`` a 1-d parameter (or a view of one) and ``h`` the output of a Linear or Conv
    (through identity-like ops) that nothing else reads; else None."""
    a, b = (list(node.args) + [None, None])[:2]
    for scale, h in ((a, b), (b, a)):
        reads = _parameter_reads(scale)
        if reads is None or not isinstance(h, torch.fx.Node) or not ctx.is_tensor(h) \
                or len(ctx.param_dims(ctx.canonical(reads[0]))) != 1:
            continue
        layer = h
        while len(layer.users) == 1 and isinstance(ctx.rule_of(layer), PassThroughRule):
            layer = layer.all_input_nodes[0] if layer.all_input_nodes else layer
        claims = ctx.claims_made_by(layer)
        if len(layer.users) != 1 or not any(
                len(c.axes) >= 2 and isinstance(c.axes[0], AxisUse)
                and c.axes[0].kind == "expand" and isinstance(c.axes[1], AxisUse)
                and c.axes[1].kind == "split" for c in claims):
            continue
        if any(ctx.claims_on(c.param)[0] is not c for c in claims):
            continue  # a weight another op claimed first (tied) grows by that claim
        return reads[0], reads[1], layer
    return None


def fold_layer_scale(node: torch.fx.Node, ctx: NodeAnalysis) -> int | None:
    """The output axis of ``node`` along which it is a layer scale that folds into the
    layer before it (module text: every form is then exact), else None."""
    parts = _layer_scale_parts(node, ctx)
    if parts is None:
        return None
    gamma, _, layer = parts
    ctx.broadcast([a for a in node.args[:2] if ctx.is_tensor(a)], node)  # gamma's axis
    (gamma_dim,) = ctx.param_dims(ctx.canonical(gamma))
    rows = next(c for c in ctx.claims_made_by(layer) if len(c.axes) >= 2).axes[0].slot
    row_dim = ctx.dims(rows[0])[rows[1]]
    if rows[0] is not layer or not ctx.same_dim(row_dim, gamma_dim):
        return None  # gamma scales another axis than the layer's rows
    out_dims = ctx.dims(node)
    return next((axis for axis, d in enumerate(out_dims) if ctx.same_dim(d, gamma_dim)), None)


def _fold_gamma(gamma: torch.Tensor, generic: torch.Tensor,
                layouts: tuple) -> torch.Tensor:
    """A folded layer scale: gamma tiled (the generic step), its avg extras 1."""
    (layout,) = layouts
    if not (isinstance(layout, LeafGrowth) and layout.form == AVG and layout.r):
        return generic
    out = generic.clone()
    out[layout.k * layout.source:] = 1
    return out


def _fold_rows(source: torch.Tensor, generic: torch.Tensor, layouts: tuple,
               gamma: torch.Tensor) -> torch.Tensor:
    """The layer under a folded scale: its avg extra rows ``mean_j(gamma_j W_j)`` (the
    generic step made ``mean_j W_j``, split along the columns like every row), its bias
    ``mean_j(gamma_j b_j)``."""
    rows = layouts[0]
    if not (isinstance(rows, LeafGrowth) and rows.form == AVG and rows.r):
        return generic
    scale = (gamma - 1).reshape(-1, *[1] * (source.dim() - 1))
    missing = (scale * source).mean(0, keepdim=True)  # mean_j((gamma_j - 1) W_j)
    if len(layouts) > 1 and not (isinstance(layouts[1], LeafGrowth)
                                 and layouts[1].identity):
        missing = split_equal(missing, 1, layouts[1])
    out = generic.clone()
    out[rows.k * rows.source:] += missing.to(out.dtype)
    return out


register_transform("layer_scale.gamma", _fold_gamma)
register_transform("layer_scale.rows", _fold_rows)


def _single_activation(node: torch.fx.Node) -> torch.fx.Node | None:
    """The one operand of a binary op that is an activation (not a parameter, nor a view of
    one, nor a number), or None when there are two or none."""
    tensors = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)
               and not _reads_only_parameters(a)]
    return tensors[0] if len(tensors) == 1 else None


class PassThroughRule(Rule):
    """Identity-like ops (Dropout, Identity, contiguous, dtype casts): same axes, same form.

    Dropout in training mode multiplies every entry by an independent mask, so copies
    stop being copies after one step; in eval mode (and for verification) it is exact.

    ``keeps_value``: whether the op hands its input's values on (depth's walks along the
    stream and the branches go on through it); False for ``zeros_like``, which keeps
    only the shape.
    """

    def __init__(self, keeps_value: bool = True):
        self.keeps_value = keeps_value

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        x = _first_tensor(node, ctx)
        if x is not None and ctx.is_tensor(node) and ctx.shape(x) == ctx.shape(node):
            ctx.pass_through(x, node)

    def passes_value(self, node: torch.fx.Node, root: torch.nn.Module) -> torch.fx.Node | None:
        """The input, for an op that keeps its values (eval-mode dropout, casts...)."""
        return _first_node(node) if self.keeps_value else None


class ActivationRule(Rule):
    """``y = f(x)`` elementwise; circ always, zero too when ``f(0) = 0``.

    ``zero_at_zero`` is the op's answer with its default arguments; a node's own arguments
    can change it (``nn.Hardtanh(0.5, 1.0)`` maps 0 to 0.5), so each node is evaluated at 0
    with its constant arguments, and one whose arguments are not constants gets circ only.

    ``is_idempotent`` (ReLU: ``f(f(y)) = f(y)``): the op may close a ResNet block's stream,
    ``relu(x + F(x))`` with ``x`` itself a ReLU output (see ``Rule.idempotent``).
    """

    def __init__(self, zero_at_zero: bool, is_idempotent: bool = False):
        self.zero_at_zero = zero_at_zero
        self.is_idempotent = is_idempotent

    def idempotent(self, node: torch.fx.Node, root: torch.nn.Module) -> torch.fx.Node | None:
        """The input of an idempotent activation (ReLU), else None."""
        return _first_node(node) if self.is_idempotent else None

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
            # the output's axes are its operands' (Bloom's alibi slopes, pow(base,
            # arange(H)): a created axis, kept at its size, and what it meets with it)
            ctx.broadcast([a for a in (base, exponent) if ctx.is_tensor(a)], node)
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

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis,
                free_axes: frozenset[int] = frozenset()) -> None:
        """``free_axes``: output axes a subclass has made exact in every form itself."""
        operands = self._operands(node, ctx)
        ctx.broadcast(operands, node)
        tensors = [a for a in operands if ctx.is_tensor(a)]
        out_rank = len(ctx.dims(node))
        for axis in range(out_rank):
            size = ctx.shape(node)[axis]
            sharing = [t for t in tensors if len(ctx.dims(t)) >= out_rank - axis
                       and ctx.shape(t)[axis - out_rank] == size]
            if size > 1 and axis not in free_axes and self.restrict(len(sharing),
                                                                    len(tensors)):
                ctx.require_form(ctx.slot(node, axis), self.allowed, self.why)
        if (len(tensors) == 2 and all(t.op != "get_attr" for t in tensors)
                and ctx.shape(tensors[0]) == ctx.shape(tensors[1])):
            for dim in ctx.dims(node):
                ctx.hint(dim, RESIDUAL_ADD_HINT)

    def restrict(self, sharing: int, tensors: int) -> bool:
        """Whether an output axis of size > 1 needs ``allowed``, given how many of the
        ``tensors`` operands vary along it (``sharing``); additive ops never do."""
        return False


class AdditiveRule(_BinaryRule):
    """``x + y``, ``x - y``, ``-x``: affine, exact in every form.

    ``residual``: whether the op is an add ``first + alpha * second`` that may join a
    residual branch to the stream (depth growth; see ``residual_operands``).
    """

    def __init__(self, residual: bool = False):
        self.residual = residual

    def residual_operands(self, node: torch.fx.Node, root: torch.nn.Module
                          ) -> tuple[Any, Any, Any] | None:
        """``(first, second, alpha)`` of an add computing ``first + alpha * second``.

        The operands may be keywords (``torch.add(x, other=y)``); ``torch.add``'s
        deprecated ``add(input, alpha, other)`` puts alpha in the middle. torch.export
        keeps ``x += residual`` as ``aten.add_``: a residual add all the same.
        """
        if not self.residual:
            return None
        args, kwargs = node.args, node.kwargs
        if len(args) == 3 and not isinstance(args[1], torch.fx.Node):
            return args[0], args[2], args[1]
        first = args[0] if args else kwargs.get("input", kwargs.get("self"))
        second = args[1] if len(args) > 1 else kwargs.get("other")
        return first, second, kwargs.get("alpha", 1)


class ProductRule(_BinaryRule):
    """``x * y`` where both vary along a grown axis: circ or zero (``E x * E y = E(x y)``)."""

    allowed = CIRC_OR_ZERO
    why = "a product of two tensors along this axis needs the circ or zero form"

    def restrict(self, sharing: int, tensors: int) -> bool:
        return sharing >= 2

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        folded = fold_layer_scale(node, ctx)
        super().analyze(node, ctx, free_axes=frozenset() if folded is None else {folded})
        if folded is not None:
            self._claim_folded(node, ctx, folded)
        tensors = [a for a in self._operands(node, ctx) if ctx.is_tensor(a)]
        if len(tensors) == 2 and ctx.shape(tensors[0]) == ctx.shape(tensors[1]):
            for dim in ctx.dims(node):
                ctx.hint(dim, NONLINEAR_HINT)  # a gated MLP's hidden axis is an ffn axis

    def _claim_folded(self, node: torch.fx.Node, ctx: NodeAnalysis, axis: int) -> None:
        """``gamma * (W x + b)`` along output ``axis``: gamma's extras are 1 and the
        layer's extra rows and bias take the scale (module text)."""
        gamma, views, layer = _layer_scale_parts(node, ctx)
        slot = ctx.slot(node, axis)
        gamma_name = ctx.canonical(gamma)
        (gamma_dim,) = ctx.param_dims(gamma_name)
        ctx.claim(gamma_name, [AxisUse("expand", slot)],
                  transform=ParamTransform("layer_scale.gamma", (gamma_dim,), (slot,)),
                  readers=views)
        for claim in ctx.claims_made_by(layer):
            dims = ctx.param_dims(claim.param)
            uses = claim.axes
            if len(uses) >= 2 and isinstance(uses[1], AxisUse):  # the weight [out, in, ...]
                transform = ParamTransform("layer_scale.rows", (dims[0], dims[1]),
                                           (uses[0].slot, uses[1].slot), (gamma_name,))
            else:  # the bias [out]
                transform = ParamTransform("layer_scale.rows", (dims[0],), (uses[0].slot,),
                                           (gamma_name,))
            claim.transforms += (transform,)

    def passes_zero(self, node: torch.fx.Node, root: torch.nn.Module) -> torch.fx.Node | None:
        """``c * h`` or ``h * gamma`` (layer scale: ``gamma`` a parameter) is zero when
        ``h`` is: ``h``. A product of two activations ``h * g(h)``, one computed from the
        other (a squeeze-excitation gate ``h * sigmoid(fc(mean(h)))``, RMSNorm's
        ``h * rsqrt(mean(h ** 2) + eps)``, OLMo2's and Gemma2's norms after a branch), is
        zero when ``h`` is and ``g(0)`` is finite: ``h``. (A ``g`` that divides by ``h``
        would give 0 * inf; grow's last check on the example inputs would see the NaN.)
        Two unrelated activations answer None (see ``zero_factors``)."""
        single = _single_activation(node)
        if single is not None:
            return single
        a, b = (node.args + (None, None))[:2]
        if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
            return None
        if _computed_from(b, a):
            return a
        if _computed_from(a, b):
            return b
        return None

    def zero_factors(self, node: torch.fx.Node, root: torch.nn.Module
                     ) -> tuple[torch.fx.Node, ...]:
        """``a * b`` of two activations neither computed from the other (a mixture of
        experts' ``expert(x) * routing_weight``, Qwen2-MoE's ``sigmoid(gate(x)) *
        shared_expert(x)``) is zero when either is, the other being finite: both, in
        order. The walk keeps the one that reaches a layer ending the branch (through
        ``sigmoid``, which does not pass zero, it reaches none)."""
        if _single_activation(node) is not None:
            return ()
        return tuple(a for a in node.args[:2] if isinstance(a, torch.fx.Node))

    def branch_end(self, node: torch.fx.Node, root: torch.nn.Module) -> BranchEnd | None:
        """``h * gamma`` with ``gamma`` a parameter (or a view of one: ``gamma.view(C, 1,
        1)``): zero when ``gamma`` is. A kind ``"scale"`` end, which depth growth uses only
        where no layer with weights ends the branch deeper in."""
        if _single_activation(node) is None:
            return None
        for operand in node.args[:2]:
            name = _viewed_parameter(operand)
            if name is not None:
                return BranchEnd(node, name, None, kind="scale")
        return None


class QuotientRule(_BinaryRule):
    """``x / y``: dividing by a tensor that varies along a grown axis needs circ."""

    allowed = ONLY_CIRC
    why = "dividing by a tensor along this axis needs the circ form"

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis,
                free_axes: frozenset[int] = frozenset()) -> None:
        """``free_axes``: output axes a subclass has made exact in every form itself."""
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

    def passes_zero(self, node: torch.fx.Node, root: torch.nn.Module) -> torch.fx.Node | None:
        """``h / c`` is zero when ``h`` is: ``h``. Not ``c / h`` (a zero ``h`` divides by
        zero), nor a quotient of two activations."""
        h = _single_activation(node)
        return h if h is not None and node.args[0] is h else None


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
    """``torch.where(cond, a, b)``: selection along a grown axis needs circ.

    Maths: ``where(c, a, b)[i] = a[i] if c[i] else b[i]``. The three operands broadcast to
    the output as in ``add`` (one dim and one form per shared axis; a size-1 axis reads
    one entry for every copy). In the circ form every copy selects as its source did, so
    copies stay copies; the avg and zero extras are not selections of the operands'
    extras in general (a mean of ``a``'s entries where ``c`` is mixed, a number ``b``
    where zeros are needed), so every output axis asks for circ: conservative, and what
    the masks (``where(mask, scores, min)``) and T5's position buckets need. The same rule
    serves the ops whose output is a selection or a flag per entry: comparisons,
    ``logical_not``, ``ones_like``, ``full_like`` (one operand). ``x.where(c, y)`` (the
    method, ``self`` first) reads the same three operands.

    Refuses: at a non-multiple width, an output axis that another op needs in the avg or
    zero form (a conflict of forms); ``torch.where(cond)`` with one argument (it returns
    the positions of the nonzero entries, which growth moves), when any axis of ``cond``
    grows.
    """

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        named = [node.kwargs[k] for k in ("condition", "input", "self", "other")
                 if k in node.kwargs]
        operands = list(node.args[:3]) + named
        if not ctx.is_tensor(node):  # where(cond): a tuple of positions
            ctx.forbid_growth([d for a in operands if ctx.is_tensor(a) for d in ctx.dims(a)],
                              "the result is not one tensor: torch.where with one "
                              "argument returns the positions of the nonzero entries, "
                              "which growth moves",
                              "keep this width fixed", kind="not_lossless")
            return
        ctx.broadcast(operands, node)
        for axis in range(len(ctx.dims(node))):
            ctx.require_form(ctx.slot(node, axis), ONLY_CIRC, "torch.where needs the circ form")


class AddcmulRule(Rule):
    """``torch.addcmul(input, t1, t2, value=v)`` = ``input + v * t1 * t2``, elementwise.

    Maths: an add and a product, each as its own rule says. The three operands broadcast
    to the output as in ``add`` and ``mul`` (one dim and one form per shared axis; a
    size-1 axis reads one entry for every copy); a parameter operand (ResMLP's
    ``Affine``: ``addcmul(beta, alpha, x)``; ConvNeXtV2's GRN:
    ``addcmul(bias.view(...), weight.view(...), x * nx)``) is read as a value, so it is
    expanded in its axes' form, as the ``gamma * x`` of layer scale is. Along an output
    axis on which ``t1`` and ``t2`` both vary, ``E t1 * E t2 = E (t1 t2)`` holds in the
    circ and zero forms only (avg extras would hold ``mean(t1) mean(t2)``, not
    ``mean(t1 t2)``); where one of them is constant along the axis the product is
    linear, and the add of ``input`` is affine: every form. ``v`` is a number, unchanged.
    The deprecated spelling ``addcmul(input, v, t1, t2)`` is read the same way.

    Refuses: at a non-multiple width, an axis on which ``t1`` and ``t2`` both vary that
    another op needs in the avg form (a mean over it: a LayerNorm's input) -- the
    conflict of forms ``mul`` has. Depth: it answers none of the depth questions
    (``input + v t1 t2`` is not zero when one factor is, unless ``input`` is too, and it
    is no residual add ``x + alpha * y`` with a number ``alpha``): depth's walks along a
    stream or a branch stop at it.
    """

    def _operands(self, node: torch.fx.Node) -> tuple[Any, Any, Any]:
        args = node.args
        if len(args) == 4 and not isinstance(args[1], torch.fx.Node):
            return args[0], args[2], args[3]  # addcmul(input, value, t1, t2)
        get = node.kwargs.get
        first = args[0] if args else get("input", get("self"))
        t1 = args[1] if len(args) > 1 else get("tensor1")
        t2 = args[2] if len(args) > 2 else get("tensor2")
        return first, t1, t2

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        first, t1, t2 = self._operands(node)
        ctx.broadcast([first, t1, t2], node)
        factors = [t for t in (t1, t2) if ctx.is_tensor(t)]
        rank = len(ctx.dims(node))
        for axis, size in enumerate(ctx.shape(node)):
            varying = [t for t in factors if len(ctx.dims(t)) >= rank - axis
                       and ctx.shape(t)[axis - rank] == size]
            if size > 1 and len(varying) == 2:
                ctx.require_form(ctx.slot(node, axis), CIRC_OR_ZERO,
                                 "a product of two tensors along this axis (addcmul's "
                                 "t1 * t2) needs the circ or zero form")


def _zero_at_zero(fn) -> bool:
    return bool(fn(torch.zeros(1, dtype=torch.float64)).abs().item() == 0)


def _drop_path_ops() -> list:
    """Stochastic depth (timm's ``DropPath``, torchvision's ``StochasticDepth`` and
    ``stochastic_depth``): the identity in eval mode. In training mode it scales a whole
    sample's branch by one number (0 or ``1 / keep``), which every entry of an axis shares,
    so the copies of a width group stay copies, and a branch that writes zero still does.
    Only the libraries that are installed are registered."""
    ops = []
    try:
        from timm.layers import DropPath
    except ImportError:
        DropPath = None
    if DropPath is not None:
        ops.append(DropPath)
    try:
        from torchvision.ops import StochasticDepth, stochastic_depth
    except (ImportError, RuntimeError):  # a torchvision built for another torch
        StochasticDepth = None
    if StochasticDepth is not None:
        ops += [StochasticDepth, stochastic_depth]
    return ops


def register_rules(registry: Registry) -> None:
    aten = torch.ops.aten
    passthrough = PassThroughRule()
    registry.add(passthrough, [
        nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, F.dropout, F.alpha_dropout,
        "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "type_as",
        "type", torch.clone, aten.dropout.default, aten.dropout_.default,
        aten.clone.default,
        aten.contiguous.default, aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default,
        aten.alias.default, aten.detach.default,
        aten.type_as.default,
    ])
    registry.add(passthrough, _drop_path_ops())
    registry.add(PassThroughRule(keeps_value=False), [torch.zeros_like,
                                                      aten.zeros_like.default])
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
    # clamp: f(0) = 0 or not by its bounds, which the rule evaluates per node
    zero_ops += ["clamp", "clamp_min", "clamp_max", torch.clamp, torch.clamp_min,
                 torch.clamp_max, aten.clamp.default, aten.clamp_min.default,
                 aten.clamp_max.default]
    zero_ops += [aten.relu.default, aten.gelu.default, aten.silu.default, aten.tanh.default,
                 aten.sin.default, aten.abs.default, aten.sqrt.default, aten.erf.default,
                 aten.square.default,
                 aten.relu_.default, aten.silu_.default,
                 aten.hardtanh.default, aten.hardtanh_.default]  # ReLU6; f(0) per node
    other_ops += [aten.sigmoid.default, aten.exp.default, aten.rsqrt.default, aten.cos.default,
                  aten.log.default]
    # ReLU is idempotent: it may close a ResNet block's stream, relu(x + F(x))
    relus = {nn.ReLU, F.relu, torch.relu, "relu", torch.relu_, F.relu_, "relu_",
             aten.relu.default, aten.relu_.default}
    registry.add(ActivationRule(zero_at_zero=True, is_idempotent=True),
                 [op for op in zero_ops if op in relus])
    registry.add(with_zero, [op for op in zero_ops if op not in relus])
    registry.add(without_zero, other_ops + ["reciprocal"])
    registry.add(PowRule(), ["pow", operator.pow, torch.pow, aten.pow.Tensor_Scalar,
                             aten.pow.Tensor_Tensor, aten.pow.Scalar])
    # the adds that may join a residual branch to the stream (torch.export keeps
    # ``x += residual`` as aten.add_)
    registry.add(AdditiveRule(residual=True), [operator.add, operator.iadd, torch.add, "add",
                                               aten.add.Tensor, aten.add_.Tensor])
    registry.add(AdditiveRule(), [
        operator.sub, operator.neg, operator.isub,
        torch.sub, torch.subtract, torch.neg, "sub", "neg", "add_", "sub_", torch.rsub,
        aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.neg.default,
        aten.rsub.Scalar, aten.add_.Scalar, aten.sub_.Tensor,
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
    registry.add(WhereRule(), [torch.where, "where", torch.ones_like, torch.full_like,
                               aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf,
                               aten.where.Scalar, aten.ones_like.default,
                               aten.full_like.default])
    registry.add(AddcmulRule(), [torch.addcmul, "addcmul", aten.addcmul.default])
    comparison = WhereRule()
    registry.add(comparison, [operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
                              operator.ge, torch.eq, torch.ne, "eq", "ne", "logical_not",
                              torch.logical_not, operator.invert, aten.eq.Tensor,
                              aten.eq.Scalar, aten.ne.Scalar, aten.ne.Tensor, aten.le.Tensor,
                              aten.ge.Scalar, aten.lt.Tensor, aten.gt.Tensor,
                              aten.gt.Scalar, aten.lt.Scalar, aten.le.Scalar, aten.ge.Tensor,
                              aten.logical_not.default, aten.__and__.Tensor,
                              aten.bitwise_and.Tensor])

"""Rules for normalization over the feature axis: LayerNorm and RMSNorm.

LayerNorm over an **avg**-formed input (``k`` tiles of ``x``, then ``r`` entries
``mean(x)``): the grown input keeps the mean ``mu`` and has variance ``alpha * var``
(``alpha = kS/T``). With ``eps' = alpha * eps``, ``gamma' = eta * [gamma tiled, r free]``
(``eta = sqrt(alpha)``) and ``beta' = [beta tiled, r zeros]``::

    gamma'_i (x'_i - mu) / sqrt(alpha var + alpha eps) = gamma_i (x_i - mu) / sqrt(var + eps)

so the output is the **zero** form of ``LN(x)`` (its extra entries are ``beta' = 0``).

RMSNorm over a **zero**-formed input: the mean square becomes ``alpha * ms``; with
``eps' = alpha * eps`` and ``gamma' = eta * [gamma tiled, r free]`` the output is the zero
form of ``RMSNorm(x)``. (The algebra of LEMON's LayerNorm rule; checked numerically.)

The decomposed RMSNorm of Hugging Face LLaMA, ``w * (x * rsqrt(mean(x ** 2) + eps))``,
is the same rule spread over six nodes; ``DecomposedRMSNorm`` recognizes it from its
``mean`` node (the mean of a zero-form square is ``alpha`` times the source's), rewrites
the ``eps`` literal to ``alpha * eps`` and scales ``w`` by ``eta``.

For whole multiples (``r = 0``) every form is plain tiling and ``alpha = eta = 1``.
A normalized axis made of several width groups (``cat`` of slices of the stream, as in
Swin's PatchMerging, or a flattened ``[H, Dh]``) grows as its own layout: each part's
gamma and beta go with that part's copies. Its mean and variance stay exact only when
every entry is copied the same number of times ``K`` (then ``alpha = eta = 1``).

The axes before the normalized one (rows) pass through; each row is normalized apart, so
a leading axis's extra rows must be ones the norm maps to its extras: copies (circ), or
zero rows when the norm has no beta (``n(0) = 0``; with a beta a zero row becomes
``beta``). An avg row is no answer: the norm of a mean row is not the mean of the norms.

Refuses:
- at a non-multiple width, a leading axis in the avg form, or in the zero form under a
  norm with a beta (no exact answer; grow by a whole multiple);
- normalization over several axes when one of them grows;
- a normalized axis of several width groups whose entries are not all copied equally
  (parts grown by different factors, or any part by a non-multiple);
- a non-multiple width where another op on the axis needs another form (no exact answer);
- a non-multiple width without an affine weight (nowhere to put ``eta``), or with the
  default eps of a module or functional call that does not state it (``eps`` cannot be
  scaled by ``alpha``);
- an affine weight or bias computed at run time (Nemotron's ``weight + 1``) on an axis
  grown by a non-multiple (its ``eta`` has nowhere to go); at whole multiples the ops that
  compute it grow it, tiled.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from lemon_fx.analysis.registry import Registry
from lemon_fx.analysis.rule import BranchEnd, Rule, argument, parameter_name
from lemon_fx.analysis.width import AxisUse, NodeAnalysis, ParamTransform
from lemon_fx.axes.expansion import AxisGrowth, LeafGrowth, embed, source_size, with_form
from lemon_fx.axes.vocabulary import AVG, CIRC_OR_ZERO, NORM_HINT, ONLY_CIRC, ZERO, Form
from lemon_fx.recipe.transforms import register_transform
from lemon_fx.resolution.rewrite import NodeRewrite

__all__ = ["DecomposedRMSNorm", "LayerNormRule", "RMSNormRule", "register_rules"]


def _uniform_copies(layout: AxisGrowth) -> int | None:
    """``K`` when every entry of a normalized axis appears exactly ``K`` times in the grown
    axis (each leaf a whole multiple, the parts of a concatenation by the same factor),
    else ``None``. Only then are a composite axis' mean and variance those of the source.
    """
    if isinstance(layout, LeafGrowth):
        return layout.k if layout.r == 0 else None
    kind, children = layout
    counts = [_uniform_copies(child) for child in children]
    if any(c is None for c in counts):
        return None
    if kind == "prod":
        return math.prod(counts)
    return counts[0] if len(set(counts)) == 1 else None


def norm_growth(layout: AxisGrowth) -> LeafGrowth | None:
    """The growth that a norm over an axis of this layout sees: alpha, eta, ``r != 0``.

    A single width group may grow by any amount (the forms carry it). An axis made of
    several groups (``cat`` of slices, a flattened ``[H, Dh]``) is exact only when every
    entry is copied the same number of times ``K``: then it counts as a whole multiple
    (``alpha = 1``). ``None`` when it is not.
    """
    if isinstance(layout, LeafGrowth):
        return layout
    copies = _uniform_copies(layout)
    if copies is None:
        return None
    size = source_size(layout)
    return LeafGrowth(size, size * copies)


def _grow_gamma(gamma: torch.Tensor, _generic: torch.Tensor,
                layouts: tuple[AxisGrowth, ...]) -> torch.Tensor:
    """gamma' = eta * gamma laid out as the axis (circ: every copy keeps its gamma)."""
    (layout,) = layouts
    return embed(gamma, 0, layout) * norm_growth(layout).eta


def _grow_beta(beta: torch.Tensor, _generic: torch.Tensor,
               layouts: tuple[AxisGrowth, ...]) -> torch.Tensor:
    """beta' = beta laid out as the axis, with zeros in the extra entries."""
    (layout,) = layouts
    return embed(beta, 0, with_form(layout, ZERO))


def _grow_one_plus_gamma(gamma: torch.Tensor, _generic: torch.Tensor,
                         layouts: tuple[AxisGrowth, ...]) -> torch.Tensor:
    """Gemma's scale ``1 + w``: ``1 + w' = eta * (1 + w)`` laid out as the axis."""
    (layout,) = layouts
    return (1 + embed(gamma, 0, layout)) * norm_growth(layout).eta - 1


register_transform("norm.gamma", _grow_gamma)
register_transform("norm.one_plus_gamma", _grow_one_plus_gamma)
register_transform("norm.beta", _grow_beta)


def _scaled_gamma(dim: int) -> ParamTransform:
    return ParamTransform("norm.gamma", (dim,))


def _zero_padded(dim: int) -> ParamTransform:
    return ParamTransform("norm.beta", (dim,))


_UNEQUAL_COPIES = ("the normalized axis is made of several width groups (a concatenation, "
                   "a flattened [heads, head_dim]) that grow by different or non-whole "
                   "factors, so its mean and variance change",
                   "grow every width group of this axis by the same whole multiple (2x, 3x)")


class _FeatureNormRule(Rule):
    """Shared analysis: normalize over the last axes, with input/output forms."""

    input_form: Form = AVG
    module_weight = "weight"
    module_bias: str | None = "bias"

    def _normalized_rank(self, node: torch.fx.Node, ctx: NodeAnalysis) -> int:
        if ctx.module is not None:
            shape = getattr(ctx.module, "normalized_shape", None)
            return len(shape) if shape is not None else 1
        shape = ctx.value(ctx.arg(1, "normalized_shape"))
        return 1 if isinstance(shape, int) else len(shape)

    def _params(self, node: torch.fx.Node, ctx: NodeAnalysis) -> list[tuple[str, list[int], str]]:
        """(qualified name, dims, 'gamma'|'beta') of the affine parameters."""
        found = []
        if ctx.module is not None:
            for attr, kind in ((self.module_weight, "gamma"), (self.module_bias, "beta")):
                if attr and getattr(ctx.module, attr, None) is not None:
                    found.append((ctx.param(attr), ctx.param_dims(ctx.param(attr)), kind))
            return found
        x_dims = ctx.dims(ctx.arg(0, "input"))
        for index, name, kind in self.functional_params:
            arg = ctx.arg(index, name)
            if ctx.is_tensor(arg):
                if arg.op != "get_attr":
                    # computed (Nemotron's LayerNorm1P passes weight + 1): the ops that
                    # compute it grow it along the normalized axis, tiled, which is exact
                    # at whole multiples; a non-multiple needs eta in it, which it cannot take
                    ctx.unify(ctx.dims(arg)[-1], x_dims[-1])
                    ctx.forbid_growth(x_dims[-1], f"the norm's affine {kind} is computed at "
                                      "run time, so the factor a non-multiple width needs "
                                      "cannot be put into it", "grow this width by a whole "
                                      "multiple (2x, 3x, ...), or make it an nn.Parameter",
                                      kind="not_lossless", whole_multiples_ok=True)
                    continue
                found.append((arg.target, ctx.dims(arg), kind))
        return found

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        x = ctx.arg(0, "input")
        rank = self._normalized_rank(node, ctx)
        x_dims = ctx.dims(x)
        params = self._params(node, ctx)
        # each row is normalized on its own: a leading axis's extra rows must be rows the
        # norm maps to their own extras (copies always; zero rows only without a beta)
        has_beta = any(kind == "beta" for _, _, kind in params)
        leading = ONLY_CIRC if has_beta else CIRC_OR_ZERO
        for axis, (a, b) in enumerate(zip(x_dims, ctx.dims(node))):
            ctx.unify(a, b)
            if axis < len(x_dims) - rank:
                ctx.same_form(ctx.slot(x, axis), ctx.slot(node, axis))
                ctx.require_form(ctx.slot(node, axis), leading,
                                 f"{type(self).__name__[:-4]} normalizes each row apart: a "
                                 "leading axis needs the circ form" + (
                                     " (or zero: no beta)" if not has_beta
                                     else " (a zero row becomes beta)"), own_axis_only=True)
        if rank != 1:
            ctx.forbid_growth(x_dims[-rank:], "normalization over several axes",
                              "normalize over the last axis only, or keep these widths fixed")
            return
        dim = x_dims[-1]
        ctx.hint(dim, NORM_HINT)
        ctx.require_form(ctx.slot(x, -1), {self.input_form},
                         f"{type(self).__name__[:-4]} needs its input in the "
                         f"{self.input_form} form")
        ctx.require_form(ctx.slot(node, -1), {ZERO},
                         "a norm's output is in the zero form")
        for name, dims, kind in params:
            ctx.unify(dims[0], dim)
            transform = _scaled_gamma(dim) if kind == "gamma" else _zero_padded(dim)
            ctx.claim(name, [AxisUse("expand", ctx.slot(node, -1))], transform=transform)

    def stream_norm_params(self, node: torch.fx.Node, root: torch.nn.Module
                           ) -> tuple[str | None, str | None]:
        """A feature norm (depth growth: on the stream it makes a block Post-LN): the
        qualified names of its ``(gamma, beta)``, from the module's attributes or from the
        functional call's ``weight``/``bias`` arguments when they are parameters."""
        found: dict[str, str | None] = {"gamma": None, "beta": None}
        if node.op == "call_module":
            module = root.get_submodule(node.target)
            for attr, kind in ((self.module_weight, "gamma"), (self.module_bias, "beta")):
                if attr and getattr(module, attr, None) is not None:
                    found[kind] = f"{node.target}.{attr}"
        else:
            for index, name, kind in self.functional_params:
                found[kind] = parameter_name(argument(node, index, name))
        return found["gamma"], found["beta"]

    def branch_end(self, node: torch.fx.Node, root: torch.nn.Module) -> BranchEnd | None:
        """A norm with a beta closing a residual branch (Swin V2's ``x + norm(mlp(x))``):
        ``n(h) = gamma * ... + beta`` writes zero with ``gamma = beta = 0`` (kind
        ``"norm"``). Without a beta it passes zero instead (``passes_zero``), so the layer
        before it ends the branch."""
        gamma, beta = self.stream_norm_params(node, root)
        if gamma is None or beta is None:
            return None
        return BranchEnd(node, gamma, beta, kind="norm")

    def passes_zero(self, node: torch.fx.Node, root: torch.nn.Module) -> torch.fx.Node | None:
        """Without a beta the norm of a zero row is zero (``0 / sqrt(0 + eps)``): its
        input. With a beta it is beta: None (``branch_end`` answers instead)."""
        gamma, beta = self.stream_norm_params(node, root)
        x = argument(node, 0, "input")
        if beta is None and isinstance(x, torch.fx.Node):
            return x
        return None

    def _has_gamma(self, ctx: NodeRewrite) -> bool:
        if ctx.module is not None:
            return getattr(ctx.module, self.module_weight, None) is not None
        index, name, _ = self.functional_params[0]
        return ctx.is_tensor(ctx.arg(index, name))

    def rewrite(self, node: torch.fx.Node, ctx: NodeRewrite) -> None:
        x = ctx.arg(0, "input")
        dim = ctx.dims(x)[-1]
        if not ctx.grows(dim):
            return
        growth = norm_growth(ctx.axis_growth(dim))
        if growth is None:
            ctx.refuse(*_UNEQUAL_COPIES)
            return
        width = ctx.grown(dim)
        if growth.r and not self._has_gamma(ctx):
            ctx.refuse("without an affine weight there is nowhere to put the factor "
                       "eta = sqrt(alpha) that a non-multiple width needs",
                       "give the norm an affine weight (elementwise_affine=True), or grow "
                       "this width by a whole multiple")
            return
        if ctx.module is not None:
            ctx.set_attr("normalized_shape", (width,))
            eps = getattr(ctx.module, "eps", None)
            if eps is not None:
                ctx.set_attr("eps", eps * growth.alpha)
            elif growth.r:
                ctx.refuse("the norm uses its default eps, which cannot be scaled by alpha",
                           "set eps explicitly in the module, or grow by a whole multiple")
            return
        ctx.set_arg(1, "normalized_shape", [width])
        eps = ctx.value(ctx.arg(self.eps_index, "eps", self.default_eps))
        if eps is None:
            if growth.r:
                ctx.refuse("the norm uses its default eps, which cannot be scaled by alpha",
                           "pass eps explicitly, or grow by a whole multiple")
            return
        ctx.set_arg(self.eps_index, "eps", eps * growth.alpha)


class LayerNormRule(_FeatureNormRule):
    """``nn.LayerNorm`` and ``F.layer_norm``: avg in, zero out, ``eps' = alpha eps``."""

    input_form: Form = AVG
    functional_params = ((2, "weight", "gamma"), (3, "bias", "beta"))
    eps_index = 4
    default_eps = 1e-5


class RMSNormRule(_FeatureNormRule):
    """``nn.RMSNorm`` and ``F.rms_norm``: zero in, zero out, ``eps' = alpha eps``."""

    input_form: Form = ZERO
    module_bias = None
    functional_params = ((2, "weight", "gamma"),)
    eps_index = 3
    default_eps = None


_aten = torch.ops.aten
_SQUARES = {"pow", torch.pow, operator.pow, _aten.pow.Tensor_Scalar}
_MULS = {"mul", torch.mul, operator.mul, _aten.mul.Tensor}
_ADDS = {"add", torch.add, operator.add, _aten.add.Tensor, _aten.add.Scalar}
_RSQRTS = {"rsqrt", torch.rsqrt, _aten.rsqrt.default}
_CASTS = {"to", "float", "type_as", "type", _aten.to.dtype, _aten._to_copy.default,
          _aten.type_as.default}
MEANS = {"mean", torch.mean, _aten.mean.dim}


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _through_casts(node: torch.fx.Node) -> torch.fx.Node:
    while node.target in _CASTS and len(node.users) == 1:
        node = next(iter(node.users))
    return node


def _one_plus_parameter(value) -> tuple[torch.fx.Node, tuple[torch.fx.Node, ...]] | None:
    """``1 + w`` (through casts of ``w``: Gemma's ``1.0 + self.weight.float()``): the
    get_attr of ``w`` and the nodes from it to the sum, else None."""
    if not (isinstance(value, torch.fx.Node) and value.target in _ADDS):
        return None
    numbers = [a for a in value.args[:2] if not isinstance(a, torch.fx.Node)]
    nodes = [a for a in value.args[:2] if isinstance(a, torch.fx.Node)]
    if numbers != [1] or len(nodes) != 1 or value.kwargs.get("alpha", 1) != 1:
        return None
    path, node = [value], nodes[0]
    while node.target in _CASTS and node.op != "get_attr":
        path.append(node)
        node = node.args[0]
    if not (isinstance(node, torch.fx.Node) and node.op == "get_attr"):
        return None
    return node, tuple(path)


@dataclass
class DecomposedRMSNorm:
    """``w * (x * rsqrt(mean(x ** 2, -1, keepdim=True) + eps))``, found from its mean.

    Hugging Face LLaMA's RMSNorm as six nodes: ``x`` the normalized input, ``mean`` the
    ``mean`` of ``x ** 2`` over the last axis, ``eps_add`` the ``+ eps`` (a number literal,
    rewritten to ``alpha * eps``), ``weight`` the ``get_attr`` of ``w`` (None for a norm
    without one; dtype casts between the scale and ``w *`` are allowed) and ``output`` the
    node holding the result (``w * ...``, or ``x * rsqrt(...)`` without a weight). The
    mean rule calls ``analyze`` and ``rewrite`` in place of its own: the input must be in
    the zero form and ``w`` is scaled by ``eta``, as in ``RMSNormRule``.

    Gemma writes the scale as ``(1 + w)``: then ``1 + w' = eta (1 + w)`` (and a tied
    head's ``1/k`` goes on ``1 + w`` too).

    Refuses (in ``rewrite``, when the normalized axis grows): an axis of several width
    groups whose entries are not all copied equally; a non-multiple width without a
    weight (nowhere to put ``eta``). A non-multiple width where another op on the axis
    needs another form has no exact answer.
    """

    x: torch.fx.Node
    mean: torch.fx.Node
    eps_add: torch.fx.Node
    weight: torch.fx.Node | None  # the get_attr of w, if the norm has one
    output: torch.fx.Node
    # Gemma's ``(1 + w) * ...``: the scale is one plus the parameter; the nodes between the
    # get_attr and the product (casts, the ``+ 1``) read it as part of the pattern
    one_plus: bool = False
    weight_path: tuple[torch.fx.Node, ...] = ()

    @classmethod
    def match(cls, mean: torch.fx.Node) -> DecomposedRMSNorm | None:
        """The pattern around a ``mean`` node, or None when the node is not its mean."""
        square = mean.args[0]
        if not (isinstance(square, torch.fx.Node) and square.target in _SQUARES
                and len(square.args) > 1 and square.args[1] == 2):
            return None
        x = square.args[0]
        add = _only_user(mean)
        if add is None or add.target not in _ADDS or not isinstance(add.args[1], (int, float)):
            return None
        rsqrt = _only_user(add)
        if rsqrt is None or rsqrt.target not in _RSQRTS:
            return None
        scale = _only_user(rsqrt)
        if scale is None or scale.target not in _MULS or x not in scale.args:
            return None
        out = _through_casts(_only_user(scale) or scale) if len(scale.users) == 1 else scale
        weight = None
        if out.target in _MULS and out is not scale:
            params = [a for a in out.args[:2] if isinstance(a, torch.fx.Node)
                      and a.op == "get_attr"]
            weight = params[0] if params else None
            if weight is None:
                for a in out.args[:2]:
                    found = _one_plus_parameter(a)
                    if found is not None:
                        return cls(x, mean, add, found[0], out, True, found[1])
        return cls(x, mean, add, weight, out if weight is not None else scale)

    def analyze(self, ctx: NodeAnalysis) -> None:
        """Called by the mean rule in place of "a mean needs the avg form"."""
        square = self.mean.args[0]
        dim = ctx.dims(square)[-1]
        ctx.hint(dim, NORM_HINT)
        ctx.require_form(ctx.slot(square, -1), {ZERO},
                         "a decomposed RMSNorm needs its input in the zero form")
        if self.weight is not None:
            transform = (ParamTransform("norm.one_plus_gamma", (dim,)) if self.one_plus
                         else _scaled_gamma(dim))
            ctx.claim(self.weight.target, [AxisUse("expand", ctx.slot(self.output, -1))],
                      transform=transform,
                      readers=frozenset({self.output, *self.weight_path}))

    def rewrite(self, ctx: NodeRewrite) -> None:
        """Called by the mean rule: ``eps`` becomes ``alpha * eps``, or the growth is
        refused (see the class docstring)."""
        dim = ctx.dims(self.mean.args[0])[-1]
        if not ctx.grows(dim):
            return
        growth = norm_growth(ctx.axis_growth(dim))
        if growth is None:
            ctx.refuse(*_UNEQUAL_COPIES)
            return
        if growth.r and self.weight is None:
            ctx.refuse("without a weight there is nowhere to put the factor eta = "
                       "sqrt(alpha) that a non-multiple width needs",
                       "give the RMSNorm a weight, or grow this width by a whole multiple")
            return
        ctx.set_arg_of(self.eps_add, 1, self.eps_add.args[1] * growth.alpha)


def register_rules(registry: Registry) -> None:
    aten = torch.ops.aten
    registry.add(LayerNormRule(), [nn.LayerNorm, F.layer_norm, aten.layer_norm.default])
    rms_ops: list = [op for op in (getattr(nn, "RMSNorm", None), getattr(F, "rms_norm", None),
                                   getattr(aten, "rms_norm", None) and aten.rms_norm.default)
                     if op is not None]
    registry.add(RMSNormRule(), rms_ops)

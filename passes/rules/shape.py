"""Rules for ops that move axes around: view/reshape/flatten, permute/transpose,
unsqueeze/squeeze, expand/repeat, cat/stack, split/chunk/unbind, roll, indexing, shape
queries.

Maths. These ops only relabel entries, so they commute with any expansion as long as the
grown layout of each axis is followed: a reshape that splits ``C`` into ``[H, Dh]``
*factors* the dim (``C = H x Dh``, outer first) and the grown axis is the Kronecker
layout of the grown factors; ``cat`` makes the output axis the *concatenation* of its
inputs' axes; ``stack`` adds an axis with one entry per input (a count, fixed) and keeps
the others; ``chunk(n)`` factors the axis into ``[n, C/n]``; ``repeat(r)`` makes the axis
the product ``[r, C]`` (r outer, fixed); ``roll`` moves entries along an axis, which
commutes with a growth that tiles that axis (see ``RollRule``). All of it is recorded in
the ``DimTable``; a reshape whose factors do not refine each other fixes those axes.

Rewrites: size literals (``view(B, T, 12, 64)``, ``expand(B, -1, 768)``, split sizes)
become the grown sizes. A size computed from tensor shapes (``C // self.num_heads``) is
kept if it still evaluates to the right size in the grown graph, else replaced by the
grown literal (a static axis) or by ``-1`` (an axis that follows an input's size).

Refuses:
- slicing by position along a growing axis (``h[..., :4]``, ``aten.slice`` with literal
  bounds); bounds read from tensor shapes (``pos[:, :T]``) tie the axis to an input's
  size instead;
- advanced indexing (a list or tensor of positions) along a growing axis;
- every growth through a subscript whose layout is not proven: several advanced indices
  in one subscript, several ellipses, more indices than axes, a Python bool, a
  top-level list holding anything but ints, a list index that is not a rectangular list
  of ints, an index whose value cannot be read, or a result whose shape is not the one
  PyTorch's indexing rules give (a boolean mask with several axes);
- an item of a tuple result that cannot be traced to its source (a nested tuple, an
  index that cannot be evaluated);
- ``cat`` and ``stack`` of a sequence whose pieces are not visible (a nested tuple), for
  every axis of their output;
- ``roll`` along an axis that grows, unless the growth tiles it (the axis is one width,
  or a product whose outer factor alone grows, by a whole multiple); ``roll`` without
  ``dims`` (it rolls the flattened tensor) when any axis of a tensor of rank > 1 grows;
- ``repeat_interleave`` with tensor repeats or without ``dim``, when any of its axes
  grows;
- reading an attribute of a growing tensor other than ``shape``, ``dtype``, ``device``,
  ``ndim`` and ``is_cuda``; and (checked by the analysis for every shape query) a size
  read from a growing axis and used as a number rather than as a size of
  ``view``/``reshape``/``expand`` (``scores * q.size(-1) ** -0.5``);
- in the rewrite of ``view``/``reshape``/``expand``: a size computed from tensor shapes
  that no longer evaluates to its axis' grown size, on an axis that follows an input's
  size, when ``-1`` already stands for another axis (write it as a literal or as -1).

A composite axis (a reshape's ``[H, Dh]``, a ``cat`` of parts) that grows by a
non-multiple in one of its parts is exact in the circ form only. Kept at their size
(never widths): axes indexed by an int, taken apart by ``unbind`` or picked from by
``select``; repeat and broadcast counts and new axes made by ``repeat``; the axis
``stack`` adds; the number of pieces of an equal split; the axes of created tensors
(``arange``, ``zeros``...) and the axes they read; and axes a reshape couples by
factors that do not refine each other (``inspect`` lists those among the held widths).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
from torch import nn

from lemon_fx.analysis.registry import Registry
from lemon_fx.analysis.rule import Rule
from lemon_fx.analysis.width import NodeAnalysis, Value, WidthAnalysis
from lemon_fx.axes.vocabulary import KV_HINT
from lemon_fx.resolution.rewrite import NodeRewrite, Unevaluable
from lemon_fx.tracing.graph_facts import tensor_shape, tensor_shapes

__all__ = ["register_rules"]

aten = torch.ops.aten
_TRANSPOSES = ("transpose", torch.transpose, "swapaxes", torch.swapaxes, aten.transpose.int)
_EXPANDS = ("expand", aten.expand.default)
_SPLITS = ("split", torch.split, torch.functional.split, aten.split.Tensor,
           aten.split_with_sizes.default)
_UNBINDS = ("unbind", torch.unbind, aten.unbind.int)


def _size_args(node: torch.fx.Node, first: int = 1, name: str = "shape") -> tuple[list, str]:
    """The size arguments of view/reshape/expand in either spelling, and how to set them."""
    rest = list(node.args[first:])
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        return list(rest[0]), "packed"
    if not rest and name in node.kwargs:
        return list(node.kwargs[name]), "kw"
    return rest, "spread"


def _set_size_args(node: torch.fx.Node, ctx: NodeRewrite, sizes: list, how: str,
                   first: int = 1, name: str = "shape") -> None:
    if how == "packed":
        ctx.set_arg(first, name, list(sizes))
    elif how == "kw":
        ctx.set_arg(10_000, name, list(sizes))
    else:
        for i, s in enumerate(sizes):
            ctx.set_arg(first + i, name, s)


def rewrite_sizes(node: torch.fx.Node, ctx: NodeRewrite, out_dims: list[int], sizes: list,
                  how: str, first: int = 1, name: str = "shape") -> None:
    """Make each size argument evaluate to its axis' grown size (see module docstring)."""
    if len(sizes) != len(out_dims):
        return
    new = list(sizes)
    changed = False
    free = -1 not in [s for s in sizes if isinstance(s, int)]
    for i, (arg, dim) in enumerate(zip(sizes, out_dims)):
        want = ctx.grown(dim)
        if isinstance(arg, int):
            if arg != -1 and arg != want:
                new[i], changed = want, True
            continue
        try:
            if ctx.grown_value(arg) == want:
                continue
        except Unevaluable:
            if not ctx.grows(dim):
                continue
        if not ctx.is_dynamic(dim):
            new[i], changed = want, True
        elif free:
            new[i], changed, free = -1, True, False
        else:
            ctx.refuse(f"size argument {i} is computed from tensor shapes and cannot be "
                       "rewritten for the grown width",
                       "write that size as a literal, or use -1 for it")
    if changed:
        _set_size_args(node, ctx, new, how, first, name)


def couple_reshape(ctx: NodeAnalysis, x, out) -> None:
    """Align input and output axes by products and factor where one splits into many."""
    in_dims, out_dims = ctx.dims(x), ctx.dims(out)
    ins = [i for i, d in enumerate(in_dims) if ctx.shape(x)[i] != 1]
    outs = [j for j, d in enumerate(out_dims) if ctx.shape(out)[j] != 1]
    size_in, size_out = ctx.shape(x), ctx.shape(out)
    i = j = 0
    while i < len(ins) and j < len(outs):
        group_in, group_out = [ins[i]], [outs[j]]
        p_in, p_out = size_in[ins[i]], size_out[outs[j]]
        while p_in != p_out:
            if p_in < p_out and i + 1 < len(ins):
                i += 1
                group_in.append(ins[i])
                p_in *= size_in[ins[i]]
            elif p_out < p_in and j + 1 < len(outs):
                j += 1
                group_out.append(outs[j])
                p_out *= size_out[outs[j]]
            else:
                break
        i, j = i + 1, j + 1
        slots = [ctx.slot(x, a) for a in group_in] + [ctx.slot(out, b) for b in group_out]
        ctx.same_form(*slots)
        if len(group_in) == 1 and len(group_out) == 1:
            ctx.unify(in_dims[group_in[0]], out_dims[group_out[0]])
        elif len(group_in) == 1:
            ctx.factor(in_dims[group_in[0]], [out_dims[b] for b in group_out])
        elif len(group_out) == 1:
            ctx.factor(out_dims[group_out[0]], [in_dims[a] for a in group_in])
        else:
            joint = ctx.new_dim(p_in)
            ctx.factor(joint, [in_dims[a] for a in group_in])
            ctx.factor(joint, [out_dims[b] for b in group_out])


def _relaid(node: torch.fx.Node) -> torch.fx.Node | None:
    """The tensor a relayout (reshape, permute) reads: its first argument."""
    x = node.args[0] if node.args else None
    return x if isinstance(x, torch.fx.Node) else None


class ReshapeRule(Rule):
    """view / reshape / flatten / unflatten / squeeze / unsqueeze: factor and follow axes."""

    def __init__(self, sizes_from: int | None):
        self.sizes_from = sizes_from  # index of the first size argument, or None

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        couple_reshape(ctx, node.args[0], node)

    def passes_value(self, node: torch.fx.Node, root: torch.nn.Module) -> torch.fx.Node | None:
        """The same entries in another shape: depth's walks go on through it."""
        return _relaid(node)

    def rewrites_size_args(self, node: torch.fx.Node) -> bool:
        return self.sizes_from is not None

    def rewrite(self, node: torch.fx.Node, ctx: NodeRewrite) -> None:
        if self.sizes_from is None:
            if node.target in ("unflatten", torch.unflatten):
                self._rewrite_unflatten(node, ctx)
            return
        sizes, how = _size_args(node, self.sizes_from)
        rewrite_sizes(node, ctx, ctx.dims(node), sizes, how, self.sizes_from)

    def _rewrite_unflatten(self, node: torch.fx.Node, ctx: NodeRewrite) -> None:
        dim = ctx.value(ctx.arg(1, "dim"))
        sizes = list(ctx.arg(2, "sizes"))
        rank_in = len(ctx.dims(node.args[0]))
        dim = dim % rank_in
        out_dims = ctx.dims(node)[dim:dim + len(sizes)]
        new = [ctx.grown(d) if isinstance(s, int) and s != -1 else s
               for s, d in zip(sizes, out_dims)]
        if new != sizes:
            ctx.set_arg(2, "sizes", new)


class PermuteRule(Rule):
    """permute / transpose / ``.T`` / movedim: output axis ``i`` is input axis ``perm[i]``."""

    def _perm(self, node: torch.fx.Node, ctx: NodeAnalysis, rank: int) -> list[int]:
        if node.target in _TRANSPOSES:
            a = ctx.value(ctx.arg(1, "dim0")) % rank
            b = ctx.value(ctx.arg(2, "dim1")) % rank
            perm = list(range(rank))
            perm[a], perm[b] = perm[b], perm[a]
            return perm
        if node.target in ("t", torch.t, aten.t.default):
            return list(reversed(range(rank)))
        if node.target in ("movedim", torch.movedim):
            src = ctx.value(ctx.arg(1, "source"))
            dst = ctx.value(ctx.arg(2, "destination"))
            src = [src] if isinstance(src, int) else list(src)
            dst = [dst] if isinstance(dst, int) else list(dst)
            return _movedim_perm(rank, src, dst)
        sizes, _ = _size_args(node, 1, "dims")
        return [ctx.value(s) % rank for s in sizes]

    def passes_value(self, node: torch.fx.Node, root: torch.nn.Module) -> torch.fx.Node | None:
        """The same entries with the axes in another order: depth's walks go on."""
        return _relaid(node)

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        x = node.args[0]
        rank = len(ctx.dims(x))
        for out_axis, in_axis in enumerate(self._perm(node, ctx, rank)):
            ctx.unify(ctx.dims(x)[in_axis], ctx.dims(node)[out_axis])
            ctx.same_form(ctx.slot(x, in_axis), ctx.slot(node, out_axis))


def _movedim_perm(rank: int, src: list[int], dst: list[int]) -> list[int]:
    src = [s % rank for s in src]
    dst = [d % rank for d in dst]
    order = [None] * rank
    for s, d in zip(src, dst):
        order[d] = s
    rest = iter(a for a in range(rank) if a not in src)
    return [o if o is not None else next(rest) for o in order]


class ExpandRule(Rule):
    """``x.expand(sizes)`` / ``expand_as``: broadcast size-1 axes; others keep their dim."""

    def rewrites_size_args(self, node: torch.fx.Node) -> bool:
        return node.target in _EXPANDS

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        x = node.args[0]
        in_dims, out_dims = ctx.dims(x), ctx.dims(node)
        offset = len(out_dims) - len(in_dims)
        for axis, d in enumerate(in_dims):
            if ctx.shape(x)[axis] == ctx.shape(node)[axis + offset]:
                ctx.unify(d, out_dims[axis + offset])
                ctx.same_form(ctx.slot(x, axis), ctx.slot(node, axis + offset))
            elif node.target in _EXPANDS:
                # n broadcast copies (repeat_kv's n_rep): a count, not a width
                ctx.fix(out_dims[axis + offset], f"an axis broadcast by '{node.name}'")
        if node.target in ("expand_as", aten.expand_as.default):
            other = node.args[1]
            for a, b in zip(ctx.dims(other), out_dims):
                ctx.unify(a, b)

    def rewrite(self, node: torch.fx.Node, ctx: NodeRewrite) -> None:
        if node.target in _EXPANDS:
            sizes, how = _size_args(node, 1, "size")
            rewrite_sizes(node, ctx, ctx.dims(node), sizes, how, 1, "size")


class RepeatRule(Rule):
    """``x.repeat(r...)``: an axis repeated ``r > 1`` times is the product ``[r, axis]``.

    Maths: ``x.repeat(r)`` along an axis of size ``C`` lays ``r`` copies of ``x`` end to
    end, entry ``t C + j`` is ``x[j]``: the product ``[r, C]`` with the count outer. Growing
    ``C`` to ``C'`` in any form gives ``r`` copies of ``E x`` end to end, which is that
    product's grown layout, so a repeated axis grows exactly; an axis repeated once is
    the input's axis, same dim and form. The count and the leading axes ``repeat`` adds
    (more counts than axes) are fixed. A repeat count read from a tensor's size (DeBERTa's
    ``size(0) // num_heads``) is a number the analysis follows: growing the axis it is
    read from is refused there.

    Refuses nothing itself; at a non-multiple width a repeated axis is a composite axis
    and takes the circ form (see the module docstring).
    """

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        x = node.args[0]
        reps = [ctx.value(r) for r in _size_args(node, 1, "repeats")[0]]
        in_dims, out_dims = ctx.dims(x), ctx.dims(node)
        offset = len(out_dims) - len(in_dims)
        for axis, rep in enumerate(reps):
            out = out_dims[axis]
            if axis < offset:
                ctx.fix(out, "a new axis made by repeat")
                continue
            src = in_dims[axis - offset]
            ctx.same_form(ctx.slot(x, axis - offset), ctx.slot(node, axis))
            if rep == 1:
                ctx.unify(src, out)
            else:
                times = ctx.new_dim(rep)
                ctx.fix(times, "a repeat count")
                ctx.factor(out, [times, src])


class RepeatInterleaveRule(Rule):
    """``x.repeat_interleave(g, dim)``: each entry ``g`` times in a row, so the output axis
    is the product ``[axis, g]`` (g inner, fixed). Grouped-query attention uses it to give
    every query head its kv head; the kv heads then grow whole, in step with the queries.
    """

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        x = node.args[0]
        repeats = ctx.value(ctx.arg(1, "repeats"))
        dim = ctx.value(ctx.arg(2, "dim"))
        if not isinstance(repeats, int) or dim is None:
            ctx.forbid_growth(ctx.dims(x) + ctx.dims(node), "repeat_interleave with tensor "
                              "repeats or without dim", "pass an int and a dim")
            return
        rank = len(ctx.dims(x))
        dim %= rank
        for axis in range(rank):
            ctx.same_form(ctx.slot(x, axis), ctx.slot(node, axis))
            if axis != dim:
                ctx.unify(ctx.dims(x)[axis], ctx.dims(node)[axis])
        times = ctx.new_dim(repeats)
        ctx.fix(times, "a repeat_interleave count")
        ctx.factor(ctx.dims(node)[dim], [ctx.dims(x)[dim], times])
        ctx.hint(ctx.dims(x)[dim], KV_HINT)


class RollRule(Rule):
    """``torch.roll(x, shifts, dims)``: entries move along the rolled axes, the rest pass.

    Maths: ``roll(x, s, d)[..., i, ...] = x[..., (i - s) mod n, ...]`` along each rolled
    axis ``d`` of size ``n``; it acts the same on every slice, so the other axes keep
    their dim and form (Swin's shifted windows roll the token axes, the channels pass).
    A rolled axis that keeps its size passes through unchanged. One that grows from ``S``
    to ``T`` in a *tiling* layout (entry ``i`` is ``x[i mod S]``) is exact with the same
    shift: ``((i - s) mod T) mod S = (i - s) mod S`` when ``S`` divides ``T``. The layout
    tiles when the axis is one width grown by a whole multiple (every form is tiling
    then), or a product ``[a, b, ...]`` (a reshape's ``[H, Dh]``, a ``repeat``) whose
    outer factor alone grows, by a whole multiple.

    Refuses (``NotLosslessError``), when the plan grows them:
    - a rolled axis grown by a non-multiple (the circ, avg and zero extras all land at
      the wrong places);
    - an inner factor of a rolled product axis, or any part of a rolled concatenation
      (their grown layouts are not tilings of the axis);
    - every axis of a tensor of rank > 1 rolled without ``dims`` (it rolls the flattened
      tensor): pass ``dims``.
    Checked once every node was analyzed (``finalize``), when the axes' layouts are known.
    """

    def _rolled(self, node: torch.fx.Node, ctx: NodeAnalysis) -> list[int] | None:
        """The rolled axes, or None for a roll of the flattened tensor."""
        x = ctx.arg(0, "input")
        rank = len(ctx.dims(x))
        dims = ctx.value(ctx.arg(2, "dims"))
        if dims is None or (isinstance(dims, (list, tuple)) and not dims):
            return [0] if rank == 1 else None
        dims = [dims] if isinstance(dims, int) else list(dims)
        return sorted({d % rank for d in dims})

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        ctx.pass_through(ctx.arg(0, "input"), node)

    def passes_zero(self, node: torch.fx.Node, root: torch.nn.Module) -> torch.fx.Node | None:
        """A rolled zero is zero (Swin's branch rolls its windows back before the residual
        add): the input. Not ``passes_value``: the entries move."""
        x = node.args[0] if node.args else node.kwargs.get("input")
        return x if isinstance(x, torch.fx.Node) else None

    def finalize(self, analysis: WidthAnalysis) -> None:
        for node, rule in analysis.rules.items():
            if rule is not self:
                continue
            ctx = NodeAnalysis(analysis, node, self)
            x = ctx.arg(0, "input")
            axes = self._rolled(node, ctx)
            if axes is None:
                ctx.forbid_growth(ctx.dims(x), "roll without dims rolls the flattened "
                                  "tensor, whose grown layout is not a tiling",
                                  "pass dims (torch.roll(x, shifts, dims)), or keep these "
                                  "widths fixed", kind="not_lossless")
                continue
            for axis in axes:
                self._tiling_only(ctx, analysis.dims.tree(ctx.dims(x)[axis]), axis)

    def _tiling_only(self, ctx: NodeAnalysis, tree, axis: int) -> None:
        """Forbid every growth of ``tree`` that does not tile the rolled axis."""
        reason = (f"roll along axis {axis} moves entries by position, which matches the "
                  "grown axis only when its growth tiles it (one width grown by a whole "
                  "multiple, or a product whose outer factor alone grows so)")
        fix = "grow this width by a whole multiple (2x, 3x, ...), or keep it fixed"
        if isinstance(tree, int):
            ctx.forbid_growth(tree, reason, fix, kind="not_lossless", whole_multiples_ok=True)
            return
        kind, children = tree
        inner = children if kind == "sum" else children[1:]
        if kind == "prod":
            self._tiling_only(ctx, children[0], axis)
        for child in inner:
            for leaf in _tree_leaves(child):
                ctx.forbid_growth(leaf, reason + ("; this is a part of a concatenation"
                                                  if kind == "sum" else
                                                  "; this is an inner factor"),
                                  "keep this width fixed", kind="not_lossless")


def _tree_leaves(tree) -> list[int]:
    if isinstance(tree, int):
        return [tree]
    return [leaf for child in tree[1] for leaf in _tree_leaves(child)]


def _visible_pieces(node: torch.fx.Node, ctx: NodeAnalysis, what: str, spelling: str):
    """The tensors ``cat``/``stack`` join, or None (growth of every output axis refused)
    when they are not visible: a nested tuple whose items the analysis cannot see."""
    arg = ctx.arg(0, "tensors")
    tensors = _pieces(ctx, arg)
    if tensors is None:
        name = f"'{arg.name}'" if isinstance(arg, torch.fx.Node) else "its argument"
        ctx.forbid_growth(ctx.dims(node), f"the pieces of this {what} are not visible: "
                          f"{name} is not a list of tensors or a tuple whose items lemon_fx "
                          "can see", f"pass the pieces as a list, {spelling}, or keep this "
                          "width fixed")
    return tensors


class CatRule(Rule):
    """``torch.cat(xs, dim)``: the output axis is the inputs' axes laid end to end.

    ``xs`` is a list of tensors, or one node returning a tuple (``torch.cat(h.chunk(2))``,
    ``torch.cat(h.chunk(2)[::-1])``) whose items the analysis sees one by one. Refuses,
    for every axis of the output, a ``xs`` whose pieces are not visible (a nested tuple).
    """

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        tensors = _visible_pieces(node, ctx, "concatenation", "torch.cat([a, b], dim)")
        if tensors is None:
            return
        rank = len(ctx.dims(node))
        dim = ctx.value(ctx.arg(1, "dim", 0)) % rank
        for t in tensors:
            for axis in range(rank):
                ctx.same_form(ctx.slot(t, axis), ctx.slot(node, axis))
                if axis != dim:
                    ctx.unify(ctx.dims(t)[axis], ctx.dims(node)[axis])
        ctx.concatenate(ctx.dims(node)[dim], [ctx.dims(t)[dim] for t in tensors])


class StackRule(Rule):
    """``torch.stack(xs, dim)``: a new axis, one entry per input; the others are shared.

    Maths: ``stack(xs, d)[..., i, ...] = xs[i]``, so each input's axes are the output's
    axes with ``d`` left out: one dim and one form across every input (as ``cat``'s
    other axes), and an entry of the new axis is a whole input, grown alike. The new axis
    counts the inputs: fixed. Interleaved rotary (GPT-J, Cohere:
    ``stack((-x2, x1), -1).flatten(-2)``) and channel stacks (EdgeNeXt, XCiT) grow through it.

    ``xs`` is a list of tensors, or one node returning a tuple (``stack(h.chunk(2))``).
    Refuses, for every axis of the output, a ``xs`` whose pieces are not visible (a
    nested tuple), as ``cat`` does.
    """

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        tensors = _visible_pieces(node, ctx, "stack", "torch.stack([a, b], dim)")
        if tensors is None:
            return
        rank = len(ctx.dims(node))
        dim = ctx.value(ctx.arg(1, "dim", 0)) % rank
        ctx.fix(ctx.dims(node)[dim], f"the axis '{node.name}' stacks its inputs along")
        for t in tensors:
            for axis in range(rank - 1):
                out_axis = axis if axis < dim else axis + 1
                ctx.unify(ctx.dims(t)[axis], ctx.dims(node)[out_axis])
                ctx.same_form(ctx.slot(t, axis), ctx.slot(node, out_axis))


def _seen(ctx: NodeAnalysis, value: Value) -> bool:
    """Whether ``value`` (a node, or item ``i`` of a node returning a tuple) has axes."""
    return value in ctx._a.value_dims


def _tuple_values(ctx: NodeAnalysis, node: Any) -> list[Value] | None:
    """The items of a node that returns a tuple, in order, or None if any is not a
    tensor the analysis sees (a nested tuple, a None) or ``node`` returns no tuple."""
    shapes = tensor_shapes(node) if isinstance(node, torch.fx.Node) else None
    if shapes is None or ctx.is_tensor(node):
        return None
    items: list[Value] = [(node, i) for i in range(len(shapes))]
    return items if all(_seen(ctx, v) for v in items) else None


def _pieces(ctx: NodeAnalysis, arg: Any) -> list[Value] | None:
    """The tensors a sequence argument holds (``torch.cat``'s), or None if not visible."""
    if isinstance(arg, (list, tuple)):
        return list(arg) if all(ctx.is_tensor(t) for t in arg) else None
    return _tuple_values(ctx, arg)


class SplitRule(Rule):
    """split / chunk / tensor_split: equal pieces factor the axis as ``[n, piece]``;
    unequal pieces make it a concatenation. ``unbind`` removes an axis (fixed)."""

    def rewrites_size_args(self, node: torch.fx.Node) -> bool:
        return node.target in _SPLITS  # chunk's count is not a size: it is not rewritten

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        x = node.args[0]
        outputs = ctx.outputs()
        rank = len(ctx.dims(x))
        if node.target in _UNBINDS:
            dim = ctx.value(ctx.arg(1, "dim", 0)) % rank
            ctx.fix(ctx.dims(x)[dim], "an axis taken apart by unbind")
            for out in outputs:
                kept = [a for a in range(rank) if a != dim]
                for o_axis, i_axis in enumerate(kept):
                    ctx.unify(ctx.dims(x)[i_axis], ctx.dims(out)[o_axis])
                    ctx.same_form(ctx.slot(x, i_axis), ctx.slot(out, o_axis))
            return
        default_dim = 0
        name = "dim"
        dim = ctx.value(ctx.arg(2, name, default_dim)) % rank
        for out in outputs:
            for axis in range(rank):
                ctx.same_form(ctx.slot(x, axis), ctx.slot(out, axis))
                if axis != dim:
                    ctx.unify(ctx.dims(x)[axis], ctx.dims(out)[axis])
        pieces = [ctx.dims(out)[dim] for out in outputs]
        sizes = [ctx.shape(out)[dim] for out in outputs]
        if len(set(sizes)) == 1:
            count = ctx.new_dim(len(sizes))
            ctx.fix(count, "the number of pieces of a split")
            piece = pieces[0]
            for p in pieces[1:]:
                ctx.unify(piece, p)
            ctx.factor(ctx.dims(x)[dim], [count, piece])
        else:
            ctx.concatenate(ctx.dims(x)[dim], pieces)

    def rewrite(self, node: torch.fx.Node, ctx: NodeRewrite) -> None:
        if node.target not in _SPLITS:
            return
        outputs = [k for k in ctx.res.analysis.value_dims if isinstance(k, tuple)
                   and k[0] is node]
        rank = len(ctx.dims(node.args[0]))
        dim = ctx.value(ctx.arg(2, "dim", 0)) % rank
        grown = [ctx.grown(ctx.dims(out)[dim]) for out in outputs]
        size_arg = ctx.arg(1, "split_size_or_sections")
        value = ctx.value(size_arg)
        if isinstance(value, int):
            if len(set(grown)) == 1 and grown[0] != value:
                ctx.set_arg(1, "split_size_or_sections", grown[0])
        elif list(value) != grown:
            ctx.set_arg(1, "split_size_or_sections", grown)


class TupleItemRule(Rule):
    """``operator.getitem``: an element of a tuple result, or tensor indexing.

    On a tuple (``h.chunk(2)[-1]``, ``h.split(s)[1:]``) each item picked is the source's
    item, same axes and forms; an item the analysis cannot trace to its source (a nested
    tuple, an index it cannot evaluate) refuses growth of its axes.

    On a tensor, indexing follows PyTorch: ints are applied first (each removes its axis,
    which is a list of things, q/k/v or tokens, and is fixed), ``None`` adds an axis, full
    slices (``:``) keep theirs; other slices pick entries by position (see
    ``_positional``). One *advanced* index, a list of ints (nested lists too) or an integer
    tensor, replaces its axis, in place, by the index's axes: the others keep their dims,
    the new axes count lookups and are fixed (so are an index tensor's), and the indexed
    axis picks entries by position, so its growth is refused (``NotLosslessError``; fix:
    keep that width, or index it with a full slice).

    Refuses growth of every axis of the source and the result when the layout is not
    proven: several advanced indices in one subscript (PyTorch moves their axes by rules
    that depend on where they sit), a Python bool, a top-level list holding anything but
    ints (PyTorch reads it as a tuple of indices), or a result whose recorded shape is not
    the one these rules give (a boolean mask with several axes).
    """

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        src, index = node.args[:2]
        if node.target is aten.index.Tensor:
            # torch.export's spelling of advanced indexing: one entry per leading axis,
            # None where the subscript had a full slice (``table[index]``, ``h[:, idx]``)
            index = tuple(slice(None) if i is None else i for i in index)
        if ctx.is_tensor(src):
            self._index(node, ctx, src, index)
        else:
            self._tuple_item(node, ctx, src, index)

    def passes_zero(self, node: torch.fx.Node, root: torch.nn.Module) -> torch.fx.Node | None:
        """``t[...]``: the node ``t``. Any entries of a zero tensor are zero (a slice, an
        int, a list of positions: Swin's crop ``x[:, :H, :W]`` after its windows, a mixture
        of experts' outputs put back in token order ``out[inv_perm]``); for a tuple (an
        attention's ``(out, weights)``) only item 0, and the walk asks ``t``'s own rule,
        whose ``branch_end`` answers for its first item."""
        src, index = node.args[:2]
        if tensor_shape(src) is not None:
            return src
        if isinstance(src, torch.fx.Node) and isinstance(index, int) and \
                not isinstance(index, bool) and index == 0:
            return src
        return None

    def _tuple_item(self, node: torch.fx.Node, ctx: NodeAnalysis, src, index) -> None:
        shapes = tensor_shapes(src) if isinstance(src, torch.fx.Node) else None
        try:
            picked = _evaluated(ctx, index)
        except (KeyError, TypeError):
            picked = None
        pairs: list[tuple[Value, Value]] = []
        if shapes is not None:
            items: list[Value] = [(src, i) for i in range(len(shapes))]
            if isinstance(picked, int) and not isinstance(picked, bool) \
                    and -len(items) <= picked < len(items):
                pairs = [(items[picked], node)]
            elif isinstance(picked, slice):
                pairs = [(v, (node, i)) for i, v in enumerate(items[picked])]
        done = set()
        for item, out in pairs:
            if _seen(ctx, item) and _seen(ctx, out) and ctx.shape(item) == ctx.shape(out):
                ctx.pass_through(item, out)
                done.add(out)
        for out in ctx.outputs():
            if out not in done:
                ctx.forbid_growth(ctx.dims(out), "an item of a tuple that lemon_fx cannot "
                                  "trace to its source (a nested tuple, or an index it "
                                  "cannot evaluate)", "index the tuple with an int or a "
                                  "slice of ints, or keep this width fixed")

    def _index(self, node, ctx: NodeAnalysis, src, index) -> None:
        in_dims, out_dims = ctx.dims(src), ctx.dims(node)
        items, why = _read_index(ctx, index, len(in_dims))
        if items is not None and not _same_shape(ctx.shape(node),
                                                 _indexed_shape(ctx, ctx.shape(src), items)):
            items, why = None, "the result's shape is not the one PyTorch's indexing " \
                               "rules give for this subscript (a boolean mask?)"
        if items is None:
            index_dims = [d for t in _index_tensors(ctx, index) for d in ctx.dims(t)]
            ctx.forbid_growth(in_dims + out_dims + index_dims, f"indexing whose axis layout "
                              f"lemon_fx cannot prove: {why}",
                              "index one axis at a time with ints, slices or one list "
                              "(y[a][:, b]), or keep these widths fixed")
            return
        a = b = 0
        for kind, item in items:
            if kind == "new":
                b += 1
            elif kind == "int":
                # an axis indexed by an int is a list of things (q/k/v, tokens), not a width
                ctx.fix(in_dims[a], f"an axis indexed by an int at '{node.name}'")
                a += 1
            elif kind == "slice":
                full = item == slice(None) or (
                    ctx.value(item.start) in (None, 0) and ctx.value(item.step) in (None, 1)
                    and ctx.value(item.stop) in (None,)
                )
                if full:
                    ctx.unify(in_dims[a], out_dims[b])
                    ctx.same_form(ctx.slot(src, a), ctx.slot(node, b))
                else:
                    self._positional(ctx, node, in_dims[a], (item.start, item.stop, item.step))
                    ctx.fix(out_dims[b], f"an axis sliced by '{node.name}'")
                    ctx.picked_from(out_dims[b], in_dims[a])
                a, b = a + 1, b + 1
            else:  # advanced: item is (index shape, index tensor node or None)
                shape, tensor = item
                ctx.forbid_growth(in_dims[a], "entries of this axis are picked by a list or "
                                  "tensor of positions, which growth moves",
                                  "keep this width fixed, or index it with a full slice (:)",
                                  kind="not_lossless")
                for d in out_dims[b:b + len(shape)]:
                    ctx.fix(d, f"an axis of lookups made by advanced indexing at "
                            f"'{node.name}'")
                if tensor is not None:
                    for d in ctx.dims(tensor):
                        ctx.fix(d, f"an axis of an index tensor read by '{node.name}'")
                a, b = a + 1, b + len(shape)

    def _positional(self, ctx: NodeAnalysis, node, dim: int, bounds: tuple) -> None:
        """An axis whose entries are picked by position cannot grow.

        Bounds computed from tensor shapes (``pos[:, :T]``) tie the axis to an input;
        literal bounds on a width (``h[..., :4]``) refuse its growth.
        """
        if any(isinstance(b, torch.fx.Node) for b in bounds):
            ctx.fix(dim, f"an axis sliced by '{node.name}' to a size read from a tensor")
        else:
            ctx.forbid_growth(dim, "entries of this axis are picked by position, which "
                              "growth moves", "keep this width fixed", kind="not_lossless")


def _evaluated(ctx: NodeAnalysis, index: Any) -> Any:
    """The example value of an int or slice index (slice bounds may be nodes)."""
    if isinstance(index, slice):
        return slice(*(ctx.value(f) for f in (index.start, index.stop, index.step)))
    return ctx.value(index)


def _index_tensors(ctx: NodeAnalysis, index: Any) -> list[torch.fx.Node]:
    items = index if isinstance(index, (tuple, list)) else [index]
    return [i for i in items if ctx.is_tensor(i)]


def _is_int(ctx: NodeAnalysis, arg: Any) -> bool:
    try:
        value = None if ctx.is_tensor(arg) else ctx.value(arg)
    except KeyError:
        return False
    return isinstance(value, int) and not isinstance(value, bool)


def _read_index(ctx: NodeAnalysis, index: Any, rank: int) -> tuple[list | None, str]:
    """A subscript as ``(kind, item)`` per position, ``Ellipsis`` expanded and trailing
    ``:`` added: kind is "new" (None), "int", "slice" or "adv" (item: the index's shape and
    its tensor node or None). None and the reason when the layout is not proven."""
    if isinstance(index, tuple):
        raw = list(index)
    elif isinstance(index, list) and not all(_is_int(ctx, i) for i in index):
        return None, "a list holding more than ints as the whole subscript (PyTorch reads " \
                     "it as a tuple of indices, a spelling it deprecates)"
    else:
        raw = [index]
    items: list = []
    for i in raw:
        if i is None:
            items.append(("new", None))
        elif i is Ellipsis:
            items.append(("...", None))
        elif isinstance(i, slice):
            items.append(("slice", i))
        elif ctx.is_tensor(i):
            items.append(("adv", (ctx.shape(i), i)))
        else:
            try:
                value = ctx.value(i)
            except KeyError:
                return None, "an index whose value lemon_fx cannot read"
            if isinstance(value, bool):
                return None, "a Python bool as an index"
            if isinstance(value, int):
                items.append(("int", None))
            elif isinstance(value, slice):
                items.append(("slice", value))
            elif isinstance(value, (list, tuple)):
                try:
                    positions = torch.tensor(value)
                except (TypeError, ValueError, RuntimeError):
                    return None, "a list index that is not a rectangular list of ints"
                if positions.dtype != torch.int64:
                    return None, "a list index that is not a list of ints (a mask?)"
                items.append(("adv", (tuple(positions.shape), None)))
            else:
                return None, f"an index of type {type(value).__name__}"
    if sum(1 for k, _ in items if k == "adv") > 1:
        return None, "several list or tensor indices in one subscript (PyTorch moves " \
                     "their axes by where they sit)"
    if sum(1 for k, _ in items if k == "...") > 1:
        return None, "several ellipses"
    used = sum(1 for k, _ in items if k in ("int", "slice", "adv"))
    if used > rank:
        return None, "more indices than axes"
    fill = [("slice", slice(None))] * (rank - used)
    at = next((n for n, (k, _) in enumerate(items) if k == "..."), None)
    if at is None:
        items += fill
    else:
        items[at:at + 1] = fill
    return items, ""


def _indexed_shape(ctx: NodeAnalysis, shape: tuple[int, ...], items: list) -> list:
    """The result shape PyTorch gives ``x[items]`` (ints first, one advanced index); None
    for a slice whose bounds have no recorded value."""
    out: list[int | None] = []
    a = 0
    for kind, item in items:
        if kind == "new":
            out.append(1)
            continue
        if kind == "slice":
            try:
                out.append(len(range(shape[a])[_evaluated(ctx, item)]))
            except (KeyError, TypeError, ValueError):
                out.append(None)
        elif kind == "adv":
            out.extend(item[0])
        a += 1
    return out


def _same_shape(shape: tuple[int, ...], predicted: list) -> bool:
    return len(shape) == len(predicted) and all(
        p is None or p == s for s, p in zip(shape, predicted))


class SliceRule(Rule):
    """``aten.slice.Tensor(x, dim, start, end, step)``: a full slice keeps the axis; any
    other picks entries by position, like indexing (see ``TupleItemRule``)."""

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        x = node.args[0]
        rank = len(ctx.dims(x))
        dim = ctx.value(ctx.arg(1, "dim", 0)) % rank
        start, end, step = ctx.arg(2, "start"), ctx.arg(3, "end"), ctx.arg(4, "step", 1)
        for axis in range(rank):
            if axis == dim:
                continue
            ctx.unify(ctx.dims(x)[axis], ctx.dims(node)[axis])
            ctx.same_form(ctx.slot(x, axis), ctx.slot(node, axis))
        size = ctx.shape(x)[dim]
        full = (ctx.value(start) in (None, 0) and ctx.value(step) in (None, 1)
                and (end is None or (isinstance(end, int) and end >= size)))
        if full:
            ctx.unify(ctx.dims(x)[dim], ctx.dims(node)[dim])
            ctx.same_form(ctx.slot(x, dim), ctx.slot(node, dim))
            return
        ctx.fix(ctx.dims(node)[dim], f"an axis sliced by '{node.name}'")
        ctx.picked_from(ctx.dims(node)[dim], ctx.dims(x)[dim])
        if any(isinstance(b, torch.fx.Node) for b in (start, end, step)):
            ctx.fix(ctx.dims(x)[dim], f"an axis sliced by '{node.name}' to a size read from "
                    "a tensor")
        else:
            ctx.forbid_growth(ctx.dims(x)[dim], "entries of this axis are picked by position, "
                              "which growth moves", "keep this width fixed",
                              kind="not_lossless")


class SelectRule(Rule):
    """``aten.select.int(x, dim, index)``: the indexed axis is a list of things, fixed."""

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        x = node.args[0]
        rank = len(ctx.dims(x))
        dim = ctx.value(ctx.arg(1, "dim")) % rank
        ctx.fix(ctx.dims(x)[dim], f"an axis indexed by an int at '{node.name}'")
        kept = [a for a in range(rank) if a != dim]
        for out_axis, in_axis in enumerate(kept):
            ctx.unify(ctx.dims(x)[in_axis], ctx.dims(node)[out_axis])
            ctx.same_form(ctx.slot(x, in_axis), ctx.slot(node, out_axis))


class ShapeQueryRule(Rule):
    """``x.shape``, ``x.size()``, ``x.dim()``, dtype/device: no axes are coupled."""

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        if node.op == "call_function" and node.target is getattr:
            src = node.args[0]
            if not ctx.is_tensor(src):  # a field of a named tuple: torch.sort(x).values
                fields = {"values": 0, "indices": 1}
                key = (src, fields.get(node.args[1], -1))
                if ctx.is_tensor(node) and key in ctx._a.value_dims:
                    ctx.pass_through(key, node)
                return
            if node.args[1] not in ("shape", "dtype", "device", "ndim", "is_cuda"):
                ctx.forbid_growth(ctx.dims(node.args[0]), f"attribute {node.args[1]!r} of a "
                                  "tensor", "keep this width fixed")


class CreationRule(Rule):
    """Tensors made from sizes (arange, zeros, ones, full, tril of a buffer): axes fixed."""

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        for out in ctx.outputs():
            for axis, d in enumerate(ctx.dims(out)):
                ctx.fix(d, f"axis {axis} of a tensor created by '{node.name}'")
        for arg in node.args:
            if ctx.is_tensor(arg):
                for d in ctx.dims(arg):
                    ctx.fix(d, f"an axis read by '{node.name}'")


def register_rules(registry: Registry) -> None:
    registry.add(ReshapeRule(sizes_from=1), ["view", "reshape", torch.reshape,
                                             aten.view.default, aten.reshape.default,
                                             aten._unsafe_view.default])
    registry.add(ReshapeRule(sizes_from=None), [
        "flatten", torch.flatten, "unflatten", torch.unflatten, "squeeze", torch.squeeze,
        "unsqueeze", torch.unsqueeze, nn.Flatten, nn.Unflatten, "view_as", "reshape_as",
        aten.unsqueeze.default, aten.squeeze.dim, aten.flatten.using_ints,
        aten.reshape_as.default,
    ])
    registry.add(PermuteRule(), ["permute", torch.permute, "t", torch.t, "movedim",
                                 torch.movedim, aten.permute.default, aten.t.default,
                                 *_TRANSPOSES])
    registry.add(ExpandRule(), ["expand_as", aten.expand_as.default, *_EXPANDS])
    registry.add(RepeatRule(), ["repeat", aten.repeat.default])
    registry.add(RepeatInterleaveRule(), ["repeat_interleave", torch.repeat_interleave,
                                          aten.repeat_interleave.self_int])
    registry.add(CatRule(), [torch.cat, torch.concat, torch.concatenate, aten.cat.default])
    registry.add(StackRule(), [torch.stack, aten.stack.default])
    registry.add(RollRule(), [torch.roll, "roll", aten.roll.default])
    registry.add(SplitRule(), ["chunk", torch.chunk, aten.chunk.default, *_SPLITS, *_UNBINDS])
    registry.add(TupleItemRule(), [operator.getitem, aten.index.Tensor])
    registry.add(SliceRule(), [aten.slice.Tensor])
    registry.add(SelectRule(), [aten.select.int])
    registry.add(ShapeQueryRule(), [getattr, "size", "dim", aten.sym_size.int])
    registry.add(CreationRule(), [torch.arange, torch.zeros, torch.ones, torch.full,
                                  torch.empty, torch.tril, torch.triu, "tril", "triu",
                                  "new_zeros", "new_ones", "new_full", "new_empty",
                                  aten.arange.default, aten.arange.start,
                                  aten.arange.start_step, aten.new_ones.default,
                                  aten.new_zeros.default, aten.full.default, aten.zeros.default,
                                  aten.ones.default, aten.tril.default, aten.triu.default,
                                  aten.scalar_tensor.default])


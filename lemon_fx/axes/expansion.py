"""LEMON's expansion maps along one tensor axis, and the fan-in split.

An activation ``x`` of width ``S`` lives in the wide model as ``E x`` (width ``T``), where
``E`` depends on the axis' *form* (``k = T // S``, ``r = T % S``):

- circ: entry ``i`` is ``x[i % S]``;
- avg:  ``k`` tiles of ``x``, then ``r`` entries ``mean(x)``;
- zero: ``k`` tiles of ``x``, then ``r`` zeros.

A composite axis (``[H, Dh]`` after a head split, ``[3, H, Dh]`` for fused qkv) expands
as the Kronecker product of its leaves' maps, outer leaf first; a concatenated axis as its
parts' maps one after another. Everything below applies these maps with index operations
along one dim, never as dense matrices.

Fan-out (producers): ``W' = E W`` along the output axis (``expand``).
Fan-in (consumers): any ``W'`` with ``W' E = W`` is exact. With ``P`` the equal split
(``P E = I``: copy ``c`` of column ``j`` gets ``1/m_j``; avg/zero extras get 0), LEMON's
"proj" split is ``W' = W P + R - (R E) P`` for noise ``R`` drawn at the wide layer's init
scale: each copy is ``W[:, j]/m`` plus zero-mean noise, and ``W' E = W P E + R E - R E P E
= W``. ``net2net`` is ``R = 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lemon_fx.axes.vocabulary import AVG, CIRC, Form

__all__ = ["AxisGrowth", "LeafGrowth", "copy_map", "embed", "gather", "source_size",
           "split_equal", "split_lemon", "split_lemon_drawn", "target_size", "with_form"]


@dataclass(frozen=True)
class LeafGrowth:
    """How one width group (a leaf of the axis algebra) grows: ``source`` -> ``target``
    entries, laid out in ``form`` (``circ``, ``avg`` or ``zero``; see the module text).

    ``k = target // source`` whole tiles and ``r = target % source`` extra entries.
    ``alpha = k * source / target`` is the share of the grown axis that the tiles fill:
    an avg/zero-formed input to a norm has ``alpha`` times the source's variance (mean
    square), so the norm's eps becomes ``alpha * eps`` and its gamma is scaled by
    ``eta = sqrt(alpha)``. For whole multiples ``alpha = eta = 1``. ``identity``: the axis
    keeps its size. ``copies()`` is how often each source entry appears (``m_j``, the
    divisor of the equal split).
    """

    source: int
    target: int
    form: Form = CIRC

    @property
    def k(self) -> int:
        """Whole tiles of the source: ``target // source``."""
        return self.target // self.source

    @property
    def r(self) -> int:
        """Extra entries after the tiles: ``target % source`` (0 for a whole multiple)."""
        return self.target % self.source

    @property
    def alpha(self) -> float:
        """``k * source / target``: the share of the grown axis the tiles fill."""
        return self.k * self.source / self.target

    @property
    def eta(self) -> float:
        """``sqrt(alpha)``: the factor a norm's gamma is scaled by."""
        return math.sqrt(self.alpha)

    @property
    def identity(self) -> bool:
        """Whether the axis keeps its size (``source == target``)."""
        return self.source == self.target

    def copies(self) -> torch.Tensor:
        """How many times each source entry appears (m_j)."""
        m = torch.full((self.source,), self.k, dtype=torch.long)
        if self.form == CIRC:
            m[: self.r] += 1
        return m


# An axis layout: a leaf, or ("prod" | "sum", [children]).
AxisGrowth = LeafGrowth | tuple


def _sizes(g: AxisGrowth, attr: str) -> int:
    if isinstance(g, LeafGrowth):
        return getattr(g, attr)
    kind, children = g
    values = [_sizes(c, attr) for c in children]
    return math.prod(values) if kind == "prod" else sum(values)


def source_size(g: AxisGrowth) -> int:
    return _sizes(g, "source")


def target_size(g: AxisGrowth) -> int:
    return _sizes(g, "target")


def with_form(g: AxisGrowth, form: Form) -> AxisGrowth:
    """The same layout with every leaf in ``form``."""
    if isinstance(g, LeafGrowth):
        return LeafGrowth(g.source, g.target, form)
    kind, children = g
    return (kind, [with_form(c, form) for c in children])


def _along(t: torch.Tensor, dim: int, g: AxisGrowth, leaf_op, in_attr: str) -> torch.Tensor:
    """Apply ``leaf_op`` to every leaf of layout ``g`` on axis ``dim`` of ``t``."""
    dim = dim % t.dim()
    if isinstance(g, LeafGrowth):
        return t if g.identity else leaf_op(t, dim, g)
    kind, children = g
    if kind == "prod":
        sizes = [_sizes(c, in_attr) for c in children]
        shaped = t.reshape(*t.shape[:dim], *sizes, *t.shape[dim + 1:])
        for i, child in enumerate(children):
            shaped = _along(shaped, dim + i, child, leaf_op, in_attr)
        return shaped.reshape(*shaped.shape[:dim], -1, *shaped.shape[dim + len(sizes):])
    sizes = [_sizes(c, in_attr) for c in children]
    parts = torch.split(t, sizes, dim=dim)
    return torch.cat([_along(p, dim, c, leaf_op, in_attr) for p, c in zip(parts, children)],
                     dim=dim)


def _tile(t: torch.Tensor, dim: int, g: LeafGrowth) -> torch.Tensor:
    """The circ layout: ``k`` whole copies of ``t`` along ``dim``, then its first ``r``
    entries (the same entries as an index_select of ``i % S``, copied as blocks)."""
    parts = [t] * g.k + ([t.narrow(dim, 0, g.r)] if g.r else [])
    return torch.cat(parts, dim=dim)


def _embed_leaf(t: torch.Tensor, dim: int, g: LeafGrowth) -> torch.Tensor:
    out = _tile(t, dim, g)
    if g.form == CIRC or g.r == 0:
        return out
    extra = out.narrow(dim, g.k * g.source, g.r)
    if g.form == AVG:
        extra.copy_(t.mean(dim=dim, keepdim=True).expand_as(extra))
    else:
        extra.zero_()
    return out


def _gather_leaf(t: torch.Tensor, dim: int, g: LeafGrowth) -> torch.Tensor:
    """``R E`` along ``dim``: sum the copies of each source entry (T -> S)."""
    idx = torch.arange(g.target, device=t.device) % g.source
    shape = list(t.shape)
    shape[dim] = g.source
    out = torch.zeros(shape, dtype=t.dtype, device=t.device)
    if g.form == CIRC or g.r == 0:
        return out.index_add_(dim, idx, t)
    tiles = g.k * g.source
    out.index_add_(dim, idx[:tiles], t.narrow(dim, 0, tiles))
    if g.form == AVG:
        out += t.narrow(dim, tiles, g.r).sum(dim=dim, keepdim=True) / g.source
    return out


def _split_leaf(t: torch.Tensor, dim: int, g: LeafGrowth) -> torch.Tensor:
    """``W P`` along ``dim``: copy ``c`` of entry ``j`` gets ``W[j] / m_j`` (S -> T)."""
    if g.r == 0:
        scaled = t / float(g.k)  # every entry has k copies
    else:
        m = g.copies().to(device=t.device, dtype=t.dtype)
        scaled = t / m.reshape([-1 if i == dim else 1 for i in range(t.dim())])
    out = _tile(scaled, dim, g)
    if g.form != CIRC and g.r:
        out.narrow(dim, g.k * g.source, g.r).zero_()
    return out


def embed(t: torch.Tensor, dim: int, g: AxisGrowth) -> torch.Tensor:
    """``E t`` along ``dim``: the fan-out expansion of rows, biases, activations."""
    return _along(t, dim, g, _embed_leaf, "source")


def gather(t: torch.Tensor, dim: int, g: AxisGrowth) -> torch.Tensor:
    """``t E`` along ``dim`` (wide to narrow): sums the copies of each entry."""
    return _along(t, dim, g, _gather_leaf, "target")


def split_equal(t: torch.Tensor, dim: int, g: AxisGrowth) -> torch.Tensor:
    """``t P`` along ``dim``: Net2Net's equal fan-in split."""
    return _along(t, dim, g, _split_leaf, "source")


def split_lemon(t: torch.Tensor, dim: int, g: AxisGrowth, noise: torch.Tensor) -> torch.Tensor:
    """LEMON's unequal split ``W P + R - (R E) P``; ``noise`` has the grown shape."""
    return split_equal(t, dim, g) + noise - split_equal(gather(noise, dim, g), dim, g)


def copy_map(g: AxisGrowth) -> torch.Tensor | None:
    """The source entry each grown entry copies (``E`` as an index), or ``None`` when
    some grown entry is not a copy (an avg/zero leaf with extra entries)."""
    if isinstance(g, LeafGrowth):
        if g.form != CIRC and g.r:
            return None
        return torch.arange(g.target) % g.source
    kind, children = g
    maps = [copy_map(c) for c in children]
    if any(m is None for m in maps):
        return None
    if kind == "prod":  # outer leaf first: entry (i, j) of [A, B] is i * B + j
        index = maps[0]
        for child, inner in zip(children[1:], maps[1:]):
            index = (index[:, None] * source_size(child) + inner[None, :]).reshape(-1)
        return index
    offsets = [0]
    for child in children[:-1]:
        offsets.append(offsets[-1] + source_size(child))
    return torch.cat([m + o for m, o in zip(maps, offsets)])


def _stretches(index: torch.Tensor, noisy: torch.Tensor) -> list[tuple[int, int, int, bool]]:
    """``(grown start, source start, length, noisy)`` of the maximal stretches of the
    grown axis that copy consecutive source entries and are all noisy or all not."""
    breaks = ((index[1:] - index[:-1] != 1) | (noisy[1:] != noisy[:-1])).nonzero()
    starts = [0] + (breaks.flatten() + 1).tolist()
    ends = starts[1:] + [index.numel()]
    return [(a, int(index[a]), b - a, bool(noisy[a])) for a, b in zip(starts, ends)]


# Above this many stretches, index operations beat a narrow per stretch.
MAX_STRETCHES = 64


def split_lemon_drawn(t: torch.Tensor, dim: int, g: AxisGrowth, fill,
                      out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """LEMON's split ``W P + R - (R E) P``, drawing only the noise that does not cancel.

    Where every grown entry copies a source entry (``copy_map``), grown entry ``i`` of
    source entry ``j`` is ``(W_j - sum_{c in copies(j)} R_c) / m_j + R_i``: for ``m_j = 1``
    that is ``W_j`` whatever ``R_i`` is. So noise is drawn only for the entries whose
    source entry has several copies: ``fill(tensor)`` overwrites a tensor of each such
    stretch's shape (or one of all of them, in grown order along ``dim``) with noise, in a
    fixed order. The result has the distribution of ``split_lemon`` with a full draw, and
    far fewer draws when the axis grows by less than 2x.

    A single avg/zero leaf with ``k = 1`` has the same property: each tile entry is its
    source entry's only copy, so only the ``r`` extra entries' noise stays; they are
    ``R_e``, and (avg, whose extras read ``mean(x)``) every tile entry is
    ``W_j - sum_e R_e / S``. Other layouts with avg/zero extras draw the full ``R``.

    The arithmetic runs in ``t``'s dtype; ``out_dtype`` (default ``t``'s) is the dtype the
    result is written in, so a bfloat16 weight never holds a float32 copy of its grown size.
    """
    dim = dim % t.dim()
    out_dtype = out_dtype or t.dtype
    shape = list(t.shape)
    shape[dim] = target_size(g)
    index = copy_map(g)
    if index is None and isinstance(g, LeafGrowth) and g.k == 1:
        extra_shape = list(t.shape)
        extra_shape[dim] = g.r
        extras = t.new_empty(extra_shape)
        fill(extras)
        out = t.new_empty(shape, dtype=out_dtype)
        tiles = t - extras.sum(dim=dim, keepdim=True) / g.source if g.form == AVG else t
        out.narrow(dim, 0, g.source).copy_(tiles)
        out.narrow(dim, g.source, g.r).copy_(extras)
        return out
    if index is None:
        noise = t.new_empty(shape)
        fill(noise)
        return split_lemon(t, dim, g, noise).to(out_dtype)
    copies = torch.bincount(index, minlength=source_size(g))
    noisy = copies[index] > 1
    broadcast = [-1 if i == dim else 1 for i in range(t.dim())]
    divisor = copies.to(device=t.device, dtype=t.dtype).reshape(broadcast)
    if not noisy.any():
        return embed(t / divisor, dim, g).to(out_dtype)
    stretches = _stretches(index, noisy)
    if len(stretches) > MAX_STRETCHES:
        return _split_lemon_indexed(t, dim, g, fill, index, noisy, divisor).to(out_dtype)
    # noise per noisy stretch; W - (R E), then / m, is source-sized; the grown tensor is
    # written once, in its own dtype
    noises = {}
    for grown, _, length, is_noisy in stretches:
        if is_noisy:
            part = list(t.shape)
            part[dim] = length
            noises[grown] = t.new_empty(part)
            fill(noises[grown])
    base = t.clone()
    for grown, source, length, is_noisy in stretches:
        if is_noisy:
            base.narrow(dim, source, length).sub_(noises[grown])
    base.div_(divisor)
    out = t.new_empty(shape, dtype=out_dtype)
    same_dtype = out_dtype == t.dtype
    for grown, source, length, is_noisy in stretches:
        part, region = base.narrow(dim, source, length), out.narrow(dim, grown, length)
        if not is_noisy:
            region.copy_(part)
        elif same_dtype:  # in place: no temporary of the stretch's size
            region.copy_(part).add_(noises[grown])
        else:  # added in the working dtype, rounded once
            region.copy_(part + noises[grown])
    return out


def _split_lemon_indexed(t: torch.Tensor, dim: int, g: AxisGrowth, fill, index: torch.Tensor,
                         noisy: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
    """``split_lemon_drawn`` by index operations, for axes with many stretches."""
    positions = noisy.nonzero().flatten()
    shape = list(t.shape)
    shape[dim] = positions.numel()
    noise = t.new_empty(shape)
    fill(noise)
    base = t.clone().index_add_(dim, index[positions].to(t.device), noise, alpha=-1)
    out = embed(base.div_(divisor), dim, g)
    return out.index_add_(dim, positions.to(t.device), noise)

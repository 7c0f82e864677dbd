"""Symbolic dimensions: which tensor axes must have the same size, and how axes factor.

Every axis of every activation and parameter gets a ``Dim``. Ops *unify* dims that must
stay equal when the model grows (a Linear's input axis and its weight's columns) and
*factor* a dim into a product when a reshape splits it (``[B, T, H*Dh] -> [B, T, H, Dh]``
factors the width into ``H`` and ``Dh``, outer first). Unifying two factored dims finds
their common refinement, so a fused ``3*C`` axis viewed as ``[3, H, Dh]`` and a ``C`` axis
viewed as ``[H, Dh]`` end up sharing the ``H`` and ``Dh`` leaves.

A dim can also be a *concatenation* of parts (``torch.split`` with unequal sizes, ``cat``
along a feature axis): its grown layout is the parts' grown layouts one after another.

The *leaves* of a dim (its factors, recursively, without size-1 dims) are what a plan
grows: a width group is one equivalence class of leaves. A grown composite axis is the
Kronecker product of its leaves' expansions, outer leaf first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DimTable", "FactorMismatch"]


class FactorMismatch(Exception):
    """Two descriptions of one axis cannot both hold: factorizations that do not refine
    each other (e.g. [6, 4] vs [4, 6]), different sizes, or a product against a
    concatenation. ``NodeAnalysis`` catches it and keeps those axes at their size."""


@dataclass
class DimTable:
    """The table of dims: a union-find of axes with their sizes, factorizations and marks.

    A dim is an int index. ``sizes[d]``: the source size of ``d`` (read at its root:
    ``size(d)``); ``parent``: the union-find links (``find(d)`` is the root, the one dim
    standing for all dims unified with ``d``); ``factors``: root -> its parts, outer first,
    a product or, for roots in ``concatenations``, parts laid end to end; ``fixed``: root
    -> the first reason it may never grow (a model input or output axis, a spatial axis).
    ``unify`` and the factorizations raise ``FactorMismatch`` when two descriptions of one
    axis cannot both hold.
    """

    sizes: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    factors: dict[int, list[int]] = field(default_factory=dict)
    # roots whose ``factors`` are a concatenation (sum of sizes) rather than a product
    concatenations: set[int] = field(default_factory=set)
    fixed: dict[int, str] = field(default_factory=dict)

    def new(self, size: int) -> int:
        """A fresh dim of ``size``, its own root."""
        self.sizes.append(int(size))
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, d: int) -> int:
        """The root of ``d``'s class (compressing the path on the way)."""
        root = d
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[d] != root:
            self.parent[d], d = root, self.parent[d]
        return root

    def size(self, d: int) -> int:
        """The source size of ``d``."""
        return self.sizes[self.find(d)]

    def leaves(self, d: int) -> list[int]:
        """Roots of the non-unit leaves of ``d``, outer first."""
        root = self.find(d)
        if self.sizes[root] == 1:
            return []
        parts = self.factors.get(root)
        if parts is None:
            return [root]
        out: list[int] = []
        for p in parts:
            out.extend(self.leaves(p))
        return out

    def fix(self, d: int, reason: str) -> None:
        """Mark ``d`` (and so every leaf of it) as not growable, keeping the first reason."""
        root = self.find(d)
        self.fixed.setdefault(root, reason)

    def unify(self, a: int, b: int) -> None:
        """Make ``a`` and ``b`` one dim, merging their factorizations into a common
        refinement and keeping a fixed mark; ``FactorMismatch`` when their sizes differ or
        their factorizations do not refine each other."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.sizes[ra] != self.sizes[rb]:
            raise FactorMismatch(f"sizes {self.sizes[ra]} and {self.sizes[rb]} differ")
        fa, fb = self.factors.get(ra), self.factors.get(rb)
        if fa is not None and fb is not None and \
                (ra in self.concatenations) != (rb in self.concatenations):
            # a concatenation of equal parts can be the product: [q, 0, v] as [3, C]
            self._as_product_of_equal_parts(ra if ra in self.concatenations else rb)
        cat_a, cat_b = ra in self.concatenations, rb in self.concatenations
        fa, fb = self.factors.get(ra), self.factors.get(rb)
        if fa is not None and fb is not None and cat_a != cat_b:
            raise FactorMismatch("a product and a concatenation cannot describe one axis")
        self.parent[rb] = ra
        self.factors.pop(rb, None)
        self.concatenations.discard(rb)
        if rb in self.fixed:
            self.fixed.setdefault(ra, self.fixed.pop(rb))
        if fb is not None and fa is None:
            self.factors[ra] = fb
            if cat_b:
                self.concatenations.add(ra)
        elif fb is not None and fa is not None:
            if cat_a:
                self._refine_sum(list(fa), list(fb))
            else:
                self._refine(self.leaves_of_list(fa), self.leaves_of_list(fb))

    def leaves_of_list(self, dims: list[int]) -> list[int]:
        """The leaves of every dim of ``dims``, in order."""
        out: list[int] = []
        for d in dims:
            out.extend(self.leaves(d))
        return out

    def factor_as(self, d: int, parts: list[int]) -> None:
        """Declare ``d`` == product of ``parts`` (outer first), refining what is known."""
        parts = [p for p in parts if self.size(p) != 1]
        product = 1
        for p in parts:
            product *= self.size(p)
        if product != self.size(d):
            raise FactorMismatch(f"{product} != {self.size(d)}")
        if len(parts) == 1:
            self.unify(d, parts[0])
            return
        root = self.find(d)
        if root in self.concatenations:
            self._as_product_of_equal_parts(root)
        if root in self.factors:
            self._refine(self.leaves(root), self.leaves_of_list(parts))
        else:
            if any(root in self.leaves(p) for p in parts):
                raise FactorMismatch("an axis cannot be a factor of itself")
            self.factors[root] = list(parts)

    def concatenate_as(self, d: int, parts: list[int]) -> None:
        """Declare ``d`` == ``parts`` laid one after another along the axis."""
        parts = [p for p in parts if self.size(p) != 0]
        if sum(self.size(p) for p in parts) != self.size(d):
            raise FactorMismatch("concatenated sizes do not add up")
        if len(parts) == 1:
            self.unify(d, parts[0])
            return
        root = self.find(d)
        if root in self.factors and root not in self.concatenations:
            raise FactorMismatch("a factored axis cannot be concatenated")
        if root in self.factors:
            self._refine_sum(list(self.factors[root]), list(parts))
        else:
            self.factors[root] = list(parts)
            self.concatenations.add(root)

    def _as_product_of_equal_parts(self, root: int) -> None:
        """Turn the concatenation ``root`` of ``k`` parts of one size into the product
        ``[k, P]``, the parts unified into ``P``; ``FactorMismatch`` when it is not one.

        ``cat([a, b, c])`` grows as ``[a', b', c']``; ``[3, P]`` as ``[P', P', P']`` (the
        Kronecker product with a leading factor that keeps its size). The two agree
        exactly when every part has one layout, so the parts become one dim: BEiT's fused
        bias ``cat(q_bias, zeros_like(v_bias), v_bias)`` viewed as ``[3, H, Dh]``. The
        leading factor counts parts, never a width: it is fixed.
        """
        parts = [self.find(p) for p in self.factors[root]]
        sizes = {self.sizes[p] for p in parts}
        if len(parts) < 2 or len(sizes) != 1:
            raise FactorMismatch("a concatenated axis cannot be factored")
        shared = parts[0]
        for part in parts[1:]:
            self.unify(shared, part)
        count = self.new(len(parts))
        self.fix(count, "the number of equal parts of a concatenation")
        root = self.find(root)
        self.concatenations.discard(root)
        self.factors[root] = [count, self.find(shared)]

    def _refine_sum(self, left: list[int], right: list[int]) -> None:
        i = j = 0
        while i < len(left) and j < len(right):
            a, b = self.find(left[i]), self.find(right[j])
            sa, sb = self.sizes[a], self.sizes[b]
            if a == b or sa == sb:
                self.unify(a, b)
                i, j = i + 1, j + 1
            elif sa < sb:
                rest = self.new(sb - sa)
                self.concatenate_as(b, [a, rest])
                right[j] = rest
                i += 1
            else:
                rest = self.new(sa - sb)
                self.concatenate_as(a, [b, rest])
                left[i] = rest
                j += 1
        if i != len(left) or j != len(right):
            raise FactorMismatch("concatenations of different length")

    def tree(self, d: int) -> int | tuple[str, list]:
        """The structure of ``d``: a leaf root, or ("prod"|"sum", [subtrees])."""
        root = self.find(d)
        parts = self.factors.get(root)
        if parts is None or self.sizes[root] == 1:
            return root
        kind = "sum" if root in self.concatenations else "prod"
        subs = [self.tree(p) for p in parts if self.size(p) != 1 or kind == "sum"]
        return (kind, subs) if len(subs) != 1 else subs[0]

    def _refine(self, left: list[int], right: list[int]) -> None:
        """Make two leaf sequences of one axis (equal products) share their leaves."""
        left, right = list(left), list(right)
        i = j = 0
        while i < len(left) and j < len(right):
            a, b = self.find(left[i]), self.find(right[j])
            if a == b:
                i, j = i + 1, j + 1
                continue
            sa, sb = self.sizes[a], self.sizes[b]
            if sa == sb:
                self.unify(a, b)
                i, j = i + 1, j + 1
            elif b in self.concatenations or a in self.concatenations:
                raise FactorMismatch("a concatenated axis cannot be factored")
            elif sb % sa == 0:
                rest = self.new(sb // sa)
                self.factors[b] = [a, rest]
                right[j] = rest
                i += 1
            elif sa % sb == 0:
                rest = self.new(sa // sb)
                self.factors[a] = [b, rest]
                left[i] = rest
                j += 1
            else:
                raise FactorMismatch(f"axis parts {sa} and {sb} do not divide each other")
        if i != len(left) or j != len(right):
            raise FactorMismatch("factorizations of different length")

    def is_fixed(self, leaf: int) -> str | None:
        """Why a leaf is not growable (its own mark or a mark on any dim it is part of)."""
        return self._fixed_leaves().get(self.find(leaf))

    def _fixed_leaves(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for root, reason in self.fixed.items():
            r = self.find(root)
            for leaf in self.leaves(r) or [r]:
                out.setdefault(leaf, reason)
        return out

    def fixed_leaves(self) -> dict[int, str]:
        """Every leaf that may not grow -> the reason (a mark on it or on a dim it is
        part of)."""
        return self._fixed_leaves()

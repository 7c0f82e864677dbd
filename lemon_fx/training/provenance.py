"""Which grown entry comes from which source entry: a growth recipe read entry by entry.

A ``GrowthRecipe`` says how each grown tensor is *made*; training after growth needs the
same facts the other way round, per entry ``i`` of a grown tensor: the source entry
``s(i)`` it continues, the coefficient ``c_i`` its value carries (``theta'_i = c_i
theta_s(i)``, up to noise that cancels), how many grown entries ``n_s`` continue the same
source entry, and whether it is an *original* (the first copy) or new capacity. This module
derives them from the recipe alone; ``optimizer_state`` (AdamW moments, learning-rate
scales, clipping) and ``param_groups`` (inherited against new capacity) build on it.

Per step (see ``lemon_fx.recipe.recipe``), along the step's axis, with ``m_j`` the copies of
source entry ``j`` (``LeafGrowth.copies``):

- ``embed``: grown entry ``i`` copies ``j = E(i)``, ``c = 1``;
- ``split``: ``W P + (noise in the null space of E)``: ``c = 1/m_j`` (LEMON's noisy split is
  taken at its equal share: the noise moves no function, ``(R - R E P) E = 0``);
- avg/zero extras (entries ``kS..T-1`` of a non-circ leaf: a mean, a zero, a split's free
  column) continue no source entry: they are *extras*, recorded with the entry a circ
  layout would have copied there (``i mod S``) as their neighbour;
- ``transform``: a rule's named function. It is probed with three random sources: when its
  output is ``r * generic + b`` entry by entry (the norm rules' ``eta`` and the tied head's
  ``1/k`` are), ``c`` is multiplied by ``r`` (the offset ``b``, e.g. Gemma's ``1 + w``, moves
  no gradient); any other transform leaves the tensor *fresh*;
- ``fill`` and ``cancel`` (a new block's branch end) leave the tensor *fresh*: its values
  continue nothing of the source.

Tensors of new blocks are fresh as a whole: ``PlannedGrowth.new_blocks`` names them; from a
bare ``GrowthRecipe`` a new block is the prefix of a tensor with a ``cancel`` step that is
not shared with its source's name (``blocks.1.attn.proj.weight`` made from
``blocks.0.attn.proj.weight``: block ``blocks.1``), and every tensor under that prefix is new.

Composite axes (``[H, Dh]`` heads, fused ``[3, H, Dh]``, concatenations) combine their leaves
as ``expansion.copy_map`` does (outer leaf first; parts one after another).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from lemon_fx.api import PlannedGrowth
from lemon_fx.axes.expansion import AxisGrowth, LeafGrowth, source_size
from lemon_fx.axes.vocabulary import CIRC
from lemon_fx.errors import PlanError, Problem
from lemon_fx.recipe.recipe import GrowthRecipe, TensorRecipe
from lemon_fx.recipe.transforms import transform_named

__all__ = ["AxisProvenance", "Growth", "TensorProvenance", "axis_provenance", "canonical_name",
           "compact", "new_block_names", "of_parameters", "provenance", "recipe_of"]

Growth = GrowthRecipe | PlannedGrowth
Kind = Literal["mapped", "fresh"]


@dataclass(frozen=True)
class AxisProvenance:
    """One axis of a grown tensor: for each grown position, the source position it
    continues (``index``), the coefficient its values carry (``scale``, float64) and
    whether it is an extra (``extra``: continues no source position; ``index`` then names
    its neighbour)."""

    index: torch.Tensor
    scale: torch.Tensor
    extra: torch.Tensor

    @property
    def size(self) -> int:
        return self.index.numel()

    @classmethod
    def identity(cls, size: int) -> AxisProvenance:
        return cls(torch.arange(size), torch.ones(size, dtype=torch.float64),
                   torch.zeros(size, dtype=torch.bool))

    def then(self, step: AxisProvenance) -> AxisProvenance:
        """This axis followed by a step whose positions index this axis' positions."""
        return AxisProvenance(self.index[step.index], self.scale[step.index] * step.scale,
                              self.extra[step.index] | step.extra)

    def copies(self) -> torch.Tensor:
        """``n`` per grown position: how many non-extra positions continue its source
        position (at least 1: an extra counts its neighbour's copies)."""
        keep = ~self.extra
        counts = torch.bincount(self.index[keep], minlength=int(self.index.max()) + 1)
        return counts[self.index].clamp(min=1)

    def _first(self) -> torch.Tensor:
        """Per source position, the first non-extra grown position continuing it."""
        positions = torch.arange(self.size)
        keep = ~self.extra
        first = torch.full((int(self.index.max()) + 1,), self.size, dtype=torch.long)
        return first.scatter_reduce_(0, self.index[keep], positions[keep], reduce="amin")

    def original(self) -> torch.Tensor:
        """Whether each grown position is the first non-extra copy of its source position."""
        return (torch.arange(self.size) == self._first()[self.index]) & ~self.extra

    def neighbour(self) -> torch.Tensor:
        """Each position itself, an extra the first copy of its neighbour source entry."""
        return torch.where(self.extra, self._first()[self.index], torch.arange(self.size))


def _leaf_axis(g: LeafGrowth, split: bool) -> AxisProvenance:
    if g.identity:
        return AxisProvenance.identity(g.source)
    positions = torch.arange(g.target)
    index = positions % g.source
    extra = (positions >= g.k * g.source) if (g.form != CIRC and g.r) else \
        torch.zeros(g.target, dtype=torch.bool)
    scale = torch.ones(g.target, dtype=torch.float64)
    if split:  # the equal split's divisor m_j (an extra's neighbour's, for its seed)
        scale = 1.0 / g.copies().to(torch.float64)[index]
    return AxisProvenance(index, scale, extra)


def axis_provenance(g: AxisGrowth, split: bool) -> AxisProvenance:
    """The provenance of an ``embed`` (``split=False``) or ``split`` along layout ``g``."""
    if isinstance(g, LeafGrowth):
        return _leaf_axis(g, split)
    kind, children = g
    parts = [axis_provenance(c, split) for c in children]
    if kind == "prod":  # outer leaf first: entry (i, j) of [A, B] is i * B + j
        out = parts[0]
        for child, inner in zip(children[1:], parts[1:]):
            size = source_size(child)
            out = AxisProvenance(
                (out.index[:, None] * size + inner.index[None, :]).reshape(-1),
                (out.scale[:, None] * inner.scale[None, :]).reshape(-1),
                (out.extra[:, None] | inner.extra[None, :]).reshape(-1))
        return out
    offsets = [0]
    for child in children[:-1]:
        offsets.append(offsets[-1] + source_size(child))
    return AxisProvenance(torch.cat([p.index + o for p, o in zip(parts, offsets)]),
                          torch.cat([p.scale for p in parts]),
                          torch.cat([p.extra for p in parts]))


def _along(vector: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    return vector.reshape([-1 if d == dim else 1 for d in range(ndim)])


def compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` reduced to its smallest broadcastable shape: every axis it is constant along
    becomes size 1 (a scale that varies only by column is stored as a row)."""
    for d in range(t.dim()):
        if t.shape[d] > 1 and bool((t.amax(d, keepdim=True) == t.amin(d, keepdim=True)).all()):
            t = t.narrow(d, 0, 1)
    return t.contiguous()


@dataclass(frozen=True)
class TensorProvenance:
    """Where the entries of one grown tensor come from (see the module text).

    ``kind``: ``"mapped"`` (every entry continues a source entry or is an extra seeded from
    a neighbour) or ``"fresh"`` (nothing of the source continues: a new block, a ``fill``,
    a transform that is not an entrywise rescale); ``reason`` says why a tensor is fresh.
    ``new_block``: the new block it belongs to, if any. For a mapped tensor, ``axes`` holds
    one ``AxisProvenance`` per dim and ``value_scale`` a transform's entrywise factor.

    The entrywise quantities are float64 tensors broadcastable to ``shape`` (see
    ``compact``): ``coefficient()`` ``c_i``, ``copies()`` ``n_s(i)``, ``share()`` ``a_i =
    1 / (n c)``; ``extra()`` and ``original()`` are bool masks; ``gather(t)`` maps a
    source-shaped tensor to the grown shape (entry ``i`` takes ``t[s(i)]``).
    """

    name: str
    source: str
    shape: tuple[int, ...]
    kind: Kind
    reason: str = ""
    new_block: str | None = None
    axes: tuple[AxisProvenance, ...] = ()
    value_scale: torch.Tensor | None = field(default=None, repr=False)

    @property
    def source_shape(self) -> tuple[int, ...]:
        """The source tensor's shape as the recipe implies it (mapped tensors)."""
        return tuple(int(a.index.max()) + 1 if a.size else 0 for a in self.axes)

    def _product(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        out = torch.ones((), dtype=vectors[0].dtype if vectors else torch.float64)
        for d, v in enumerate(vectors):
            if bool((v == v[0]).all()):
                out = out * v[0]
            else:
                out = out * _along(v, d, len(self.shape))
        return out

    def coefficient(self) -> torch.Tensor:
        """``c_i``: the grown value is ``c_i`` times its source entry's."""
        c = self._product([a.scale for a in self.axes])
        return c if self.value_scale is None else compact(c * self.value_scale)

    def copies(self) -> torch.Tensor:
        """``n_s``: grown non-extra entries that continue the same source entry."""
        return self._product([a.copies().to(torch.float64) for a in self.axes])

    def share(self) -> torch.Tensor:
        """``a_i = 1 / (n_s c_i)``: the share of the source entry's gradient that entry
        ``i`` receives at growth when the copies are symmetric (the chain rule gives
        ``sum_i c_i a_i = 1``; symmetric copies split it equally)."""
        return compact(1.0 / (self.copies() * self.coefficient()))

    def extra(self) -> torch.Tensor:
        """Entries that continue no source entry (avg/zero extras)."""
        out = torch.zeros((), dtype=torch.bool)
        for d, a in enumerate(self.axes):
            if a.extra.any():
                out = out | _along(a.extra, d, len(self.shape))
        return out

    def original(self) -> torch.Tensor:
        """Entries that are the first copy along every axis (not extras): the inherited
        capacity; every other entry is a new copy or an extra."""
        out = torch.ones((), dtype=torch.bool)
        for d, a in enumerate(self.axes):
            first = a.original()
            if not first.all():
                out = out & _along(first, d, len(self.shape))
        return out

    def source_ids(self) -> torch.Tensor:
        """The flat index of each entry's source entry (full shape; an extra's neighbour)."""
        flat = torch.zeros(self.shape, dtype=torch.long)
        stride = 1
        for d in reversed(range(len(self.shape))):
            flat = flat + _along(self.axes[d].index, d, len(self.shape)) * stride
            stride *= self.source_shape[d]
        return flat

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """The source-shaped ``t`` laid out on the grown tensor: entry ``i`` is
        ``t[s(i)]`` (an extra takes its neighbour's)."""
        for d, a in enumerate(self.axes):
            if a.size != t.shape[d] or not bool((a.index == torch.arange(a.size)).all()):
                t = t.index_select(d, a.index.to(t.device))
        return t


# -- new blocks ------------------------------------------------------------------------------
def _block_prefix(grown: str, source: str) -> str:
    """``grown`` without the dotted suffix it shares with ``source``."""
    g, s = grown.split("."), source.split(".")
    common = 0
    while common < min(len(g), len(s)) and g[-1 - common] == s[-1 - common]:
        common += 1
    return ".".join(g[: len(g) - common])


def new_block_names(growth: Growth) -> list[str]:
    """The names of the new blocks: ``PlannedGrowth.new_blocks``, or, from a bare recipe,
    the prefix of each ``cancel``-step tensor that it does not share with its source."""
    if isinstance(growth, PlannedGrowth):
        return [b.name for b in growth.new_blocks]
    names = []
    for name, r in growth.tensors.items():
        if any(s.kind == "cancel" for s in r.steps):
            prefix = _block_prefix(name, r.source)
            if prefix and prefix not in names:
                names.append(prefix)
    return names


def recipe_of(growth: Growth) -> GrowthRecipe:
    if isinstance(growth, PlannedGrowth):
        return growth.recipe
    if isinstance(growth, GrowthRecipe):
        return growth
    raise PlanError("training after growth needs the growth's recipe", [Problem(
        reason=f"got {type(growth).__name__}",
        fix="pass lemon_fx.plan_growth(gm, plan) (a GrowthRecipe) or "
            "lemon_fx.api.plan_in_detail(gm, plan) (a PlannedGrowth)")])


def canonical_name(recipe: GrowthRecipe, name: str) -> str | None:
    """The recipe's name for grown tensor ``name`` (a tied alias resolves to the tensor it
    shares), or None when the recipe does not make it."""
    if name in recipe.tensors:
        return name
    return recipe.aliases.get(name)


# -- transforms ------------------------------------------------------------------------------
def _generic(axes: list[AxisProvenance], value_scale: torch.Tensor | None,
             source: torch.Tensor) -> torch.Tensor:
    """What the steps so far make of ``source``, as the provenance says (extras 0)."""
    t = source
    c = torch.ones((), dtype=torch.float64)
    extra = torch.zeros((), dtype=torch.bool)
    for d, a in enumerate(axes):
        t = t.index_select(d, a.index)
        c = c * _along(a.scale, d, len(axes))
        extra = extra | _along(a.extra, d, len(axes))
    t = t * c if value_scale is None else t * c * value_scale
    return t.masked_fill(extra, 0.0)


# a transform is taken as ``r * generic + b`` when three random probes agree to this
PROBE_TOLERANCE = 1e-9


def _probe_transform(name: str, layouts: tuple[AxisGrowth, ...], axes: list[AxisProvenance],
                     value_scale: torch.Tensor | None, shape: tuple[int, ...]
                     ) -> torch.Tensor | None:
    """The entrywise factor ``r`` when transform ``name`` maps what the steps made to
    ``r * generic + b`` on every non-extra entry, else None.

    ``r`` and ``b`` come from the sources 1 and 2 (so that ``r`` is exact for a transform
    that multiplies by a constant: ``(2 eta - eta) / (2 - 1) = eta``), and a random source
    checks the fit (a transform that mixes entries fails it). An extra takes its
    neighbour's factor."""
    try:
        fn = transform_named(name)
    except KeyError:
        return None
    source_shape = tuple(int(a.index.max()) + 1 for a in axes)
    extra = torch.zeros((), dtype=torch.bool)
    for d, a in enumerate(axes):
        extra = extra | _along(a.extra, d, len(axes))
    keep = ~extra.expand(shape)
    gen = torch.Generator().manual_seed(0)
    sources = [torch.ones(source_shape, dtype=torch.float64),
               torch.full(source_shape, 2.0, dtype=torch.float64),
               1.0 + torch.rand(source_shape, generator=gen, dtype=torch.float64)]
    probes = []
    for source in sources:
        generic = _generic(axes, value_scale, source)
        try:
            out = fn(source, generic.clone(), layouts)
        except Exception:  # a transform that cannot take these probes is not mapped
            return None
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape:
            return None
        probes.append((generic, out.to(torch.float64)))
    (g1, o1), (g2, o2), (g3, o3) = probes
    dg = torch.where(keep, g2 - g1, 1.0)
    if not bool((dg != 0).all()):
        return None
    r = torch.where(keep, (o2 - o1) / dg, 1.0)
    predicted = r * (g3 - g1) + o1
    if not bool(torch.isfinite(r).all()) or not bool((r[keep] != 0).all()):
        return None
    if not bool(((predicted - o3).abs()[keep] <= PROBE_TOLERANCE * (1 + o3.abs()[keep])).all()):
        return None
    for d, a in enumerate(axes):
        if a.extra.any():
            r = r.index_select(d, a.neighbour())
    return compact(r)


# -- the provenance of a recipe ------------------------------------------------------------
def _tensor(name: str, r: TensorRecipe, new_blocks: list[str]) -> TensorProvenance:
    block = next((b for b in new_blocks if name.startswith(b + ".")), None)

    def fresh(reason: str) -> TensorProvenance:
        return TensorProvenance(name, r.source, r.shape, "fresh", reason, block)

    if block is not None:
        return fresh(f"it belongs to the new block '{block}'")
    ndim = len(r.shape)
    axes: list[AxisProvenance | None] = [None] * ndim
    value_scale: torch.Tensor | None = None
    for step in r.steps:
        if step.kind in ("embed", "split"):
            d = step.axis % ndim
            here = axes[d] or AxisProvenance.identity(source_size(step.layout))
            if here.size != source_size(step.layout):
                return fresh(f"its {step.kind} step along axis {d} reads {source_size(step.layout)}"
                             f" entries where the steps before made {here.size}")
            axes[d] = here.then(axis_provenance(step.layout, step.kind == "split"))
            continue
        if step.kind == "transform":
            grows_itself = ndim == 1 and len(step.layouts) == 1 and axes[0] is None
            if grows_itself:  # the transform lays the source out itself (circ copies)
                axes[0] = axis_provenance(step.layouts[0], split=False)
            here = [a if a is not None else AxisProvenance.identity(r.shape[d])
                    for d, a in enumerate(axes)]
            factor = _probe_transform(step.name, step.layouts, here, value_scale, r.shape)
            if factor is None:
                return fresh(f"transform '{step.name}' is not an entrywise rescale of what "
                             "the steps before made")
            axes = list(here)
            value_scale = factor if value_scale is None else compact(value_scale * factor)
            continue
        if step.kind == "fill":
            return fresh(f"a fill step sets it to {step.value}")
        if step.kind == "cancel":
            return fresh("a cancel step gives it a new block's cancelling weights")
        return fresh(f"unknown step kind {step.kind!r}")
    done = tuple(a if a is not None else AxisProvenance.identity(r.shape[d])
                 for d, a in enumerate(axes))
    if tuple(a.size for a in done) != tuple(r.shape):
        return fresh("its steps do not make its recorded shape")
    return TensorProvenance(name, r.source, tuple(r.shape), "mapped", axes=done,
                            value_scale=value_scale)


def provenance(growth: Growth) -> dict[str, TensorProvenance]:
    """The ``TensorProvenance`` of every tensor the recipe makes, keyed by grown name
    (tied aliases included, sharing their tensor's object). Reads no weight values."""
    recipe = recipe_of(growth)
    blocks = new_block_names(growth)
    out = {name: _tensor(name, r, blocks) for name, r in recipe.tensors.items()}
    for alias, name in recipe.aliases.items():
        out[alias] = out[name]
    return out


def of_parameters(growth: Growth, grown: Any) -> dict[str, TensorProvenance]:
    """``provenance`` for each parameter of the grown model ``grown`` (an ``nn.Module``),
    keyed by parameter name (tied parameters once, under their first name); ``PlanError``
    when the recipe does not make a parameter, or makes it at another shape."""
    recipe = recipe_of(growth)
    table = provenance(growth)
    out, problems = {}, []
    for name, p in grown.named_parameters():
        key = canonical_name(recipe, name)
        if key is None:
            problems.append(Problem(reason="the recipe makes no tensor of this name",
                                    node=name, fix="pass the model that this recipe grew"))
            continue
        if tuple(p.shape) != tuple(table[key].shape):
            problems.append(Problem(
                reason=f"the parameter has shape {tuple(p.shape)}, the recipe makes "
                       f"{tuple(table[key].shape)}", node=name,
                fix="pass the model that this recipe grew"))
            continue
        out[name] = table[key]
    if problems:
        raise PlanError("the grown model does not match the growth", problems)
    return out

"""``GrowthRecipe``: what every tensor of the grown state_dict is made of, as plain data.

The passes decide, per tensor, which source tensor it starts from and which steps make
it (LEMON's maps along axes, splits with their noise streams, a rule's named transform,
a new block's cancelling weights). That decision is this object; applying it is separate,
so one recipe grows a state_dict in memory, a sharded safetensors checkpoint one tensor
at a time, on CPU or GPU, and is planned without any weight values.

A ``TensorRecipe`` is ``source`` (a key of the source state_dict) and ``steps``, applied
in order to that tensor:

- ``embed(axis, layout)``: ``E t`` along ``axis`` (fan-out: rows, biases, norms' weights);
- ``split(axis, layout, stream)``: LEMON's fan-in split ``W P + R - (R E) P`` with ``R``
  uniform in ``+-noise_scale * bound`` (``bound`` from the *source* tensor's spread,
  ``noise_bound`` below), drawn from the stream ``(seed, stream)``; without a
  stream, Net2Net's equal split ``W P``;
- ``transform(name, layouts, reads)``: a rule's named transform (``recipe.transforms``),
  given the source tensors named in ``reads`` too (a layer scale folded into the layer
  before it reads the scale);
- ``cancel(axis, layout, stream)``: replace the tensor by ``W_c = R - (R E) P`` (a new
  block's branch end: ``W_c E = 0``), ``R`` bounded by the tensor's own spread;
- ``fill(value)``: replace the tensor by a constant (zeroed biases, identity norms).

Arithmetic runs one tensor at a time in float32 for 32-bit and narrower tensors and in
float64 for float64 ones (``working_dtype``), and is cast back to the tensor's dtype;
noise is drawn only where it does not cancel (``split_lemon_drawn``); a tensor made only
of copies (every step an ``embed`` whose leaves copy entries) is
tiled in its own dtype, which is the same bytes. Noise comes from ``(seed, stream)``
alone, so the order in which tensors are made never matters.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import threading
import zlib
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lemon_fx.axes.expansion import (
    AxisGrowth,
    LeafGrowth,
    embed,
    source_size,
    split_equal,
    split_lemon_drawn,
)
from lemon_fx.axes.vocabulary import CIRC, FORMS
from lemon_fx.recipe.transforms import transform_named

__all__ = ["GrowthRecipe", "Step", "TensorRecipe", "layout_from_json", "layout_to_json",
           "noise_bound", "noise_generator"]

FORMAT = "lemon_fx.recipe"
VERSION = 2  # 2: a transform step may read other source tensors ("reads")
READABLE_VERSIONS = (1, 2)


# -- noise ---------------------------------------------------------------------------------
def noise_generator(seed: int, stream: str) -> torch.Generator:
    """The generator of one noise stream: a weight does not change when another layer
    is added, and tensors can be made in any order."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(stream.encode()))
                                         % 2**63)


def noise_bound(source: torch.Tensor, fan_in: int) -> float:
    """The bound of LEMON's uniform split noise: the layer's own weight scale.

    LEMON draws the noise from the layer's initialization. What a trained layer was
    initialized with is not recorded, so its weights' spread stands in for it: a uniform
    draw with the same standard deviation (``sqrt(3) * std``). PyTorch's default
    ``U(+-1/sqrt(fan_in))`` is used for a constant weight. Matching the weights' own scale
    matters: noise far above it (a Hugging Face model initialized at std 0.02, split with
    PyTorch's default bound) amplifies float32 rounding differences between copies from
    layer to layer.
    """
    source = source.detach().to(working_dtype(source.dtype))
    std = float(source.std()) if source.numel() > 1 else 0.0
    if std > 0:
        return 3.0**0.5 * std
    return 1.0 / max(fan_in, 1) ** 0.5


# Noise is drawn in chunks of this many values, each from its own generator: PyTorch draws
# serially from one generator, so a large tensor's chunks are drawn on several threads. The
# chunk size is fixed (not the thread count), so the bytes are the same on every machine.
NOISE_CHUNK = 1 << 18


_POOL: list[ThreadPoolExecutor] = []
_POOL_LOCK = threading.Lock()


def _drawing_threads() -> ThreadPoolExecutor:
    """One pool for every draw (starting threads per tensor costs more than drawing)."""
    with _POOL_LOCK:
        if not _POOL:
            _POOL.append(ThreadPoolExecutor(max_workers=torch.get_num_threads(),
                                            thread_name_prefix="lemon_fx-noise"))
        return _POOL[0]


class _UniformFill:
    """Overwrites views with noise uniform in ``+-bound`` from the stream ``(seed,
    stream)``, view after view: each chunk of about ``NOISE_CHUNK`` values (row blocks
    along dim 0) from its own generator, several chunks at once. The chunks depend only
    on the views' shapes, and noise is drawn on the CPU, so the bytes are the same on
    every machine and device."""

    def __init__(self, seed: int, stream: str, bound: float) -> None:
        self.seed, self.stream, self.bound = seed, stream, bound
        self.drawn = 0  # chunks so far: the next chunk's generator

    def __call__(self, view: torch.Tensor) -> None:
        if view.numel() == 0:
            return
        # drawn into contiguous CPU memory (a strided draw is slower than drawing and
        # copying), then copied into the view
        direct = view.device.type == "cpu" and view.is_contiguous()
        target = view if direct else torch.empty(view.shape, dtype=view.dtype)
        per_row = max(target[0].numel(), 1) if target.dim() > 1 else 1
        rows = max(NOISE_CHUNK // per_row, 1)
        chunks = list(target.split(rows, dim=0))
        first, self.drawn = self.drawn, self.drawn + len(chunks)

        def draw(i: int) -> None:
            n = first + i
            name = self.stream if n == 0 else f"{self.stream}#{n}"
            chunks[i].uniform_(-self.bound, self.bound,
                               generator=noise_generator(self.seed, name))

        if len(chunks) > 1 and torch.get_num_threads() > 1:
            list(_drawing_threads().map(draw, range(len(chunks))))
        else:
            for i in range(len(chunks)):
                draw(i)
        if target is not view:
            view.copy_(target)


def _source_bound(bounds: dict[tuple, float] | None, name: str, source: torch.Tensor,
                  fan_in: int) -> float:
    """``noise_bound`` of the source tensor ``name``, looked up in ``bounds`` (one pass's
    cache, keyed by source name) when given."""
    if bounds is None or not name:
        return noise_bound(source, fan_in)
    key = (name, fan_in)
    if key not in bounds:
        bounds[key] = noise_bound(source, fan_in)
    return bounds[key]


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor's arithmetic runs in: float32 for 32-bit and narrower floats
    (their result is rounded to at most float32 anyway), float64 otherwise."""
    return torch.float32 if dtype in (torch.float32, torch.float16, torch.bfloat16) \
        else torch.float64


# -- memory ------------------------------------------------------------------------------
# Making a tensor leaves freed temporaries (a source-sized copy, its noise) between the
# grown tensors kept on glibc's heap, and the process keeps those pages: growing GPT-2
# small to medium held 1.4-1.8 GB for 1.3 GB of weights, by the luck of the allocation
# order. Handing the free pages back every so often keeps it at the weights' size, at the
# price of touching fresh pages again (measured: under 5% of the time at this interval).
RELEASE_EVERY_BYTES = 256 << 20


def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):  # not glibc: nothing to hand back this way
        return None


_TRIM = _malloc_trim()


class _FreedMemoryRelease:
    """Counts the bytes made and hands freed heap pages back to the system."""

    def __init__(self) -> None:
        self.made = 0

    def after(self, tensor: torch.Tensor) -> None:
        if _TRIM is None or tensor.device.type != "cpu":
            return
        self.made += tensor.numel() * tensor.element_size()
        if self.made >= RELEASE_EVERY_BYTES:
            _TRIM(0)
            self.made = 0


# -- layouts as JSON -----------------------------------------------------------------------
def layout_to_json(g: AxisGrowth) -> Any:
    """A leaf as ``[source, target, form]``; a product or sum as ``{"prod"|"sum": [...]}``."""
    if isinstance(g, LeafGrowth):
        return [g.source, g.target, g.form]
    kind, children = g
    return {kind: [layout_to_json(c) for c in children]}


def layout_from_json(data: Any) -> AxisGrowth:
    if isinstance(data, list):
        source, target, form = data
        if form not in FORMS:
            raise ValueError(f"unknown form {form!r} in a recipe layout")
        return LeafGrowth(int(source), int(target), form)
    (kind, children), = data.items()
    if kind not in ("prod", "sum"):
        raise ValueError(f"unknown layout kind {kind!r} in a recipe")
    return (kind, [layout_from_json(c) for c in children])


def _copies_only(g: AxisGrowth) -> bool:
    """Whether ``embed`` along ``g`` only copies entries (no mean of an avg form)."""
    if isinstance(g, LeafGrowth):
        return g.form == CIRC or g.r == 0 or g.form == "zero"
    return all(_copies_only(c) for c in g[1])


# -- steps and tensors ---------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One operation of a tensor's recipe; ``kind`` says which fields it uses (see the
    module text): ``embed``/``split``/``cancel`` use ``axis`` and ``layout`` (split and
    cancel a noise ``stream`` and the layer's ``fan_in``), ``transform`` uses ``name``,
    ``layouts`` and ``reads`` (source tensors it also reads), ``fill`` uses ``value``."""

    kind: str
    axis: int | None = None
    layout: AxisGrowth | None = None
    stream: str | None = None
    fan_in: int | None = None
    name: str | None = None
    layouts: tuple[AxisGrowth, ...] = ()
    value: float | None = None
    reads: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.axis is not None:
            out["axis"] = self.axis
        if self.layout is not None:
            out["layout"] = layout_to_json(self.layout)
        for key in ("stream", "fan_in", "name", "value"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.layouts:
            out["layouts"] = [layout_to_json(g) for g in self.layouts]
        if self.reads:
            out["reads"] = list(self.reads)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Step:
        if data["kind"] not in ("embed", "split", "transform", "cancel", "fill"):
            raise ValueError(f"unknown recipe step {data['kind']!r}")
        return cls(
            kind=data["kind"], axis=data.get("axis"),
            layout=layout_from_json(data["layout"]) if "layout" in data else None,
            stream=data.get("stream"), fan_in=data.get("fan_in"), name=data.get("name"),
            layouts=tuple(layout_from_json(g) for g in data.get("layouts", ())),
            value=data.get("value"), reads=tuple(data.get("reads", ())))


@dataclass(frozen=True)
class TensorRecipe:
    """How one grown tensor is made: ``steps`` applied to the source tensor ``source``;
    ``shape`` and ``dtype`` are the grown tensor's."""

    source: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    steps: tuple[Step, ...] = ()

    def with_steps(self, *steps: Step) -> TensorRecipe:
        return TensorRecipe(self.source, self.shape, self.dtype, self.steps + steps)

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "shape": list(self.shape),
                "dtype": str(self.dtype).removeprefix("torch."),
                "steps": [s.to_json() for s in self.steps]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TensorRecipe:
        dtype = getattr(torch, data["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {data['dtype']!r} in a recipe")
        return cls(data["source"], tuple(int(s) for s in data["shape"]), dtype,
                   tuple(Step.from_json(s) for s in data["steps"]))


@dataclass
class GrowthRecipe:
    """For every tensor of the grown state_dict, what it is made of; reads no weights.

    ``tensors``: grown name -> ``TensorRecipe``, in the grown state_dict's order;
    ``aliases``: grown name -> the grown name it shares storage with (tied weights);
    ``seed`` and ``noise_scale``: the plan's, for the noise streams.

    ``shapes`` gives ``{name: (shape, dtype)}``; ``apply(state_dict)`` makes the grown
    state_dict; ``apply_safetensors(src, out_dir)`` does so from and to safetensors files
    one tensor at a time; ``save(path)`` / ``GrowthRecipe.load(path)`` are plain JSON.
    """

    tensors: dict[str, TensorRecipe]
    aliases: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    noise_scale: float = 1.0

    # -- what it makes ---------------------------------------------------------------------
    @property
    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        out = {name: (r.shape, r.dtype) for name, r in self.tensors.items()}
        for alias, name in self.aliases.items():
            out[alias] = out[name]
        return out

    def source_names(self) -> set[str]:
        """The source tensors the recipe reads (a transform's ``reads`` too)."""
        return {r.source for r in self.tensors.values()} | {
            name for r in self.tensors.values() for s in r.steps for name in s.reads}

    def make(self, name: str, source: torch.Tensor, device: torch.device | str | None = None,
             *, bounds: dict[tuple, float] | None = None,
             read: Callable[[str], torch.Tensor] | None = None) -> torch.Tensor:
        """The grown tensor ``name`` from its source tensor. ``bounds``: a dict that one
        pass over the recipe shares, so a source tensor's noise bound is computed once (a
        new block's copy of a layer reads the same source tensor again). ``read``: the
        source tensor of a name, for transforms that read other tensors (``reads``)."""
        recipe = self.tensors[name]
        device = None if device is None else torch.device(device)
        tensor = source.detach()
        if device is not None:
            tensor = tensor.to(device)
        if not recipe.steps:  # a new tensor all the same: the grown model owns its weights
            return tensor.to(recipe.dtype, copy=True)
        if recipe.steps[-1].kind == "fill":  # nothing before it shows: no copy to replace
            return torch.full(recipe.shape, recipe.steps[-1].value, dtype=recipe.dtype,
                              device=tensor.device)
        if all(s.kind == "embed" and _copies_only(s.layout) for s in recipe.steps):
            out = tensor  # copies only: the same bytes in the tensor's own dtype
            for step in recipe.steps:
                out = embed(out, step.axis, step.layout)
            # an axis that keeps its size gives a view: the grown model owns its weights
            return out.to(recipe.dtype, copy=out.data_ptr() == tensor.data_ptr())
        wide = tensor.to(working_dtype(tensor.dtype))
        out = wide
        for i, step in enumerate(recipe.steps):
            if step.reads and read is None:
                raise ValueError(f"{name}'s recipe reads {list(step.reads)}: pass read=")
            others = tuple(read(n).detach().to(wide.device, working_dtype(wide.dtype))
                           for n in step.reads)
            out = self._step(step, wide, out, recipe.dtype, last=i == len(recipe.steps) - 1,
                             source_name=recipe.source, bounds=bounds, others=others)
        return out.to(recipe.dtype, copy=out.data_ptr() == tensor.data_ptr())

    def _step(self, step: Step, source_wide: torch.Tensor, t: torch.Tensor,
              dtype: torch.dtype, last: bool = False, source_name: str = "",
              bounds: dict[tuple, float] | None = None,
              others: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        """One step in the working dtype; the last split writes ``dtype`` directly;
        ``others``: the tensors a transform reads, in the working dtype."""
        if step.kind == "embed":
            return embed(t, step.axis, step.layout)
        if step.kind == "split":
            if step.stream is None:
                return split_equal(t, step.axis, step.layout)
            bound = self.noise_scale * _source_bound(bounds, source_name, source_wide,
                                                     step.fan_in)
            return split_lemon_drawn(t, step.axis, step.layout,
                                     _UniformFill(self.seed, step.stream, bound),
                                     out_dtype=dtype if last else None)
        if step.kind == "transform":
            return transform_named(step.name)(source_wide, t, step.layouts, *others)
        if step.kind == "cancel":
            if step.stream is None:
                return torch.zeros_like(t)
            # the bound is the spread of the weight being replaced, as it is stored
            bound = self.noise_scale * noise_bound(t.to(dtype), step.fan_in)
            shape = list(t.shape)
            shape[step.axis] = source_size(step.layout)
            zeros = torch.zeros(shape, dtype=t.dtype, device=t.device)
            return split_lemon_drawn(zeros, step.axis, step.layout,
                                     _UniformFill(self.seed, step.stream, bound))
        if step.kind == "fill":
            return torch.full_like(t, step.value)
        raise ValueError(f"unknown recipe step {step.kind!r}")

    def apply(self, state_dict: Mapping[str, torch.Tensor],
              device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The grown state_dict from the source's, one tensor at a time (tied names share
        one tensor). ``device``: where the grown tensors are made (default: where each
        source tensor is)."""
        missing = sorted(self.source_names() - set(state_dict))
        if missing:
            raise KeyError(f"the state_dict lacks {len(missing)} tensors the recipe reads, "
                           f"e.g. {missing[:3]}")
        release, out, bounds = _FreedMemoryRelease(), {}, {}
        for name, r in self.tensors.items():
            out[name] = self.make(name, state_dict[r.source], device, bounds=bounds,
                                  read=state_dict.__getitem__)
            release.after(out[name])
        for alias, name in self.aliases.items():
            out[alias] = out[name]
        return out

    def apply_safetensors(self, src: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                          max_shard_size: int | str = "5GB",
                          device: torch.device | str | None = None,
                          progress: bool | None = None) -> Path:
        """Grow a safetensors checkpoint on disk without loading it.

        ``src``: a ``.safetensors`` file, or a folder with one ``model.safetensors`` or
        shards and ``model.safetensors.index.json`` (as transformers writes them). Each
        source tensor is read when a grown tensor needs it and each grown tensor is
        written as soon as it is made, so memory holds a few tensors, not the model.
        Writes ``model.safetensors`` (one shard) or ``model-0000k-of-0000n.safetensors``
        with ``model.safetensors.index.json`` into ``out_dir``; the same bytes as
        ``apply``. ``progress``: a line on stderr per tensor (default: when stderr is a
        terminal).
        """
        from lemon_fx.recipe.safetensors_io import SourceCheckpoint, write_sharded

        checkpoint = SourceCheckpoint(src)
        missing = sorted(self.source_names() - set(checkpoint.keys()))
        if missing:
            raise KeyError(f"{src} lacks {len(missing)} tensors the recipe reads, e.g. "
                           f"{missing[:3]}")

        def made() -> Iterator[tuple[str, torch.Tensor]]:
            release, bounds = _FreedMemoryRelease(), {}
            for name, recipe in self.tensors.items():
                tensor = self.make(name, checkpoint.tensor(recipe.source), device,
                                   bounds=bounds, read=checkpoint.tensor)
                release.after(tensor)
                yield name, tensor

        return write_sharded(made(), self.shapes, self.aliases, out_dir, max_shard_size,
                             progress=progress)

    # -- JSON ------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "seed": self.seed,
                "noise_scale": self.noise_scale, "aliases": dict(self.aliases),
                "tensors": {name: r.to_json() for name, r in self.tensors.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GrowthRecipe:
        if data.get("format") != FORMAT or data.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"not a lemon_fx recipe of version {READABLE_VERSIONS} "
                             f"(format {data.get('format')!r}, version {data.get('version')!r})")
        return cls({name: TensorRecipe.from_json(r) for name, r in data["tensors"].items()},
                   dict(data.get("aliases", {})), int(data["seed"]),
                   float(data["noise_scale"]))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the recipe as JSON (no pickle) and return the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> GrowthRecipe:
        return cls.from_json(json.loads(Path(path).read_text()))

    def __repr__(self) -> str:
        grown = sum(math.prod(s) for s, _ in self.shapes.values())
        return (f"GrowthRecipe({len(self.tensors)} tensors, {grown:,} values, "
                f"seed={self.seed})")


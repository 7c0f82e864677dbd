"""Reading and writing safetensors checkpoints one tensor at a time.

``SourceCheckpoint`` opens a ``.safetensors`` file or a folder of shards with
``model.safetensors.index.json`` (as transformers writes them) and reads one tensor when
asked. ``write_sharded`` writes tensors as they come: the shard layout is fixed up front
from the known shapes, so each shard's header is written first and each tensor's bytes
are appended the moment it is made. Memory holds the tensor being written, never a
shard. The files are standard safetensors (8-byte header length, JSON header, data).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

__all__ = ["INDEX_NAME", "SourceCheckpoint", "parse_size", "write_sharded"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
    torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def parse_size(size: int | str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count, as transformers reads them."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read the size {size!r}: use e.g. '5GB' or 500000000")
    number, unit = float(match[1]), (match[2] or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(number * scale)


class SourceCheckpoint:
    """A safetensors checkpoint on disk, read one tensor at a time."""

    def __init__(self, src: str | os.PathLike[str]):
        path = Path(src)
        if path.is_dir():
            index = path / INDEX_NAME
            if index.exists():
                weight_map = json.loads(index.read_text())["weight_map"]
                self._files = {name: path / file for name, file in weight_map.items()}
            elif (path / SINGLE_NAME).exists():
                self._files = self._keys_of(path / SINGLE_NAME)
            else:
                raise FileNotFoundError(f"{path} has neither {INDEX_NAME} nor {SINGLE_NAME}")
        elif path.exists():
            self._files = self._keys_of(path)
        else:
            raise FileNotFoundError(f"no checkpoint at {path}")

    @staticmethod
    def _keys_of(file: Path) -> dict[str, Path]:
        with safe_open(str(file), framework="pt") as handle:
            return {name: file for name in handle.keys()}

    def keys(self) -> list[str]:
        return list(self._files)

    def tensor(self, name: str) -> torch.Tensor:
        # opened for each read: a file kept mapped keeps every page read so far resident,
        # and the whole source would end up counted in the process' memory
        with safe_open(str(self._files[name]), framework="pt") as handle:
            return handle.get_tensor(name)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _plan_shards(order: list[str], shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                 max_bytes: int) -> list[list[str]]:
    """Names per shard, in writing order: a shard closes before the tensor that would
    overflow it (a tensor larger than the limit gets a shard of its own), as transformers
    does."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in order:
        shape, dtype = shapes[name]
        nbytes = _nbytes(shape, dtype)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _header(names: list[str], shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]]
            ) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        shape, dtype = shapes[name]
        if dtype not in _DTYPES:
            raise ValueError(f"safetensors cannot store {name} of dtype {dtype}")
        end = offset + _nbytes(shape, dtype)
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)  # the data starts 8-byte aligned


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def write_sharded(tensors: Iterable[tuple[str, torch.Tensor]],
                  shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                  aliases: Mapping[str, str], out_dir: str | os.PathLike[str],
                  max_shard_size: int | str = "5GB", *, progress: bool | None = None) -> Path:
    """Write ``tensors`` (name, tensor; in the order of ``shapes``, aliases omitted) as
    safetensors shards into ``out_dir``; an alias is written as a copy under its own name.
    Returns ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    copies_of: dict[str, list[str]] = {}
    for alias, name in aliases.items():
        copies_of.setdefault(name, []).append(alias)
    # each tensor is followed by its aliases' copies: the order the bytes are written in
    order = [key for name in shapes if name not in aliases
             for key in [name, *copies_of.get(name, [])]]
    shards = _plan_shards(order, shapes, parse_size(max_shard_size))
    count = len(shards)
    files = ([SINGLE_NAME] if count == 1 else
             [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
    shard_of = {name: i for i, names in enumerate(shards) for name in names}
    show = sys.stderr.isatty() if progress is None else progress
    handles = {}
    written = 0
    total = len(shapes)
    try:
        for name, tensor in tensors:
            for key in [name, *copies_of.get(name, [])]:
                index = shard_of[key]
                handle = handles.get(index)
                if handle is None:
                    for done in [i for i in handles if i < index]:
                        handles.pop(done).close()  # shards fill in order
                    header = _header(shards[index], shapes)
                    handle = handles[index] = open(out / files[index], "wb")  # noqa: SIM115
                    handle.write(len(header).to_bytes(8, "little"))
                    handle.write(header)
                expected = shapes[key]
                if tuple(tensor.shape) != tuple(expected[0]) or tensor.dtype != expected[1]:
                    raise ValueError(f"{key}: made {tuple(tensor.shape)} {tensor.dtype}, "
                                     f"the recipe says {expected[0]} {expected[1]}")
                handle.write(_raw_bytes(tensor))
                written += 1
                if show:
                    print(f"\rgrowing tensors {written}/{total}", end="", file=sys.stderr,
                          flush=True)
    finally:
        for handle in handles.values():
            handle.close()
        if show:
            print(file=sys.stderr)
    if written != total:
        raise ValueError(f"wrote {written} of {total} tensors")
    if count > 1:
        total_size = sum(_nbytes(*shapes[n]) for n in shapes)
        index = {"metadata": {"total_size": total_size},
                 "weight_map": {name: files[shard_of[name]] for name in order}}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return out

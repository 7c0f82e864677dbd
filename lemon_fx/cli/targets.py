"""What the command line grows: a model factory, its checkpoint, and example inputs.

``TARGET`` is ``path/to/file.py:factory`` or ``package.module:factory``: a callable that
returns an ``nn.Module``; or ``timm:NAME``, the timm architecture ``NAME`` built with
``timm.create_model`` (random weights; ``--checkpoint`` loads them). ``SPEC`` is
``SHAPE[:DTYPE[:HIGH]]``: ``2x3x224x224`` (float32 normal), ``2x128:int64:50000``
(integers drawn below HIGH). Every mistake is a ``TargetError`` naming the fix, so the
command line prints one line, not a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

from lemon_fx.errors import LemonError, Problem, first_line

__all__ = ["TargetError", "load_checkpoint", "load_target", "make_inputs", "parse_spec"]

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32,
          "bool": torch.bool}


class TargetError(LemonError):
    """The model, checkpoint or input specification given on the command line is wrong.

    Raised for a ``TARGET`` that is not ``FILE.py:FACTORY``/``MODULE:FACTORY``, does not
    import, names no callable, or whose factory raises or returns no ``nn.Module``; a
    checkpoint that is missing, unreadable or does not fit the model; an input ``SPEC``
    that does not parse (shape, dtype, ``HIGH``); and for command-line options that do not
    go together (``--out`` naming a file, ``--dynamic-batch`` without ``--onnx``). The
    command line prints its problems, not a traceback.
    """


def _fail(reason: str, fix: str) -> TargetError:
    return TargetError(reason, [Problem(reason=reason, fix=fix)])


def load_target(target: str) -> nn.Module:
    """Import ``file.py:factory`` or ``package.module:factory`` and call the factory."""
    where, sep, name = target.rpartition(":")
    if where == "timm" and name:
        return _timm_model(name)
    if not sep or not where or not name:
        raise _fail(f"TARGET {target!r} is not FILE.py:FACTORY or MODULE:FACTORY",
                    "write e.g. models.py:build or my_pkg.models:build")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise _fail(f"no file {where}", "check the path before the ':'")
        spec = importlib.util.spec_from_file_location(f"lemon_fx_target_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.parent.resolve()))
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # the user's file: a SyntaxError, a failing import
            raise _fail(f"{where} failed to load: {first_line(exc)}",
                        f"fix {where} so that `python {where}` runs") from exc
        finally:
            sys.path.pop(0)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise _fail(f"cannot import {where}: {exc}", "install the package or fix the "
                        "module name") from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        raise _fail(f"{where} has no callable {name!r}", "name a function or class that "
                    "returns the model")
    try:
        model = factory()
    except Exception as exc:
        raise _fail(f"{target} raised {first_line(exc)}",
                    f"make {name}() build the model with no arguments") from exc
    if not isinstance(model, nn.Module):
        raise _fail(f"{target} returned {type(model).__name__}, not an nn.Module",
                    "make the factory return the model")
    return model


def _timm_model(name: str) -> nn.Module:
    try:
        import timm
    except ImportError as exc:
        raise _fail(f"timm:{name} needs timm, which is not installed", "pip install timm") \
            from exc
    if not timm.is_model(name):
        raise _fail(f"timm has no architecture {name!r}",
                    "pick a name from timm.list_models()")
    return timm.create_model(name, pretrained=False)


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a ``.safetensors`` or ``.pt`` state_dict, or a folder of safetensors shards
    with ``model.safetensors.index.json``, into ``model`` (strictly)."""
    file = Path(path)
    if not file.exists():
        raise _fail(f"no checkpoint file {path}", "check the --checkpoint path")
    try:
        if file.is_dir():
            from lemon_fx.recipe.safetensors_io import SourceCheckpoint

            folder = SourceCheckpoint(file)
            state = {name: folder.tensor(name) for name in folder.keys()}
        elif file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(str(file), map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
    except Exception as exc:  # not a checkpoint, a truncated file, a pickle of objects
        raise _fail(f"cannot read checkpoint {path}: {first_line(exc)}",
                    "pass a .safetensors file or a .pt file holding a state_dict of "
                    "tensors") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise _fail(f"checkpoint {path} does not fit the model: {first_line(exc)}",
                    "use the checkpoint of this model class and config") from exc


def parse_spec(spec: str) -> tuple[tuple[int, ...], torch.dtype, int | None]:
    parts = spec.split(":")
    if not 1 <= len(parts) <= 3:
        raise _fail(f"input SPEC {spec!r} is not SHAPE[:DTYPE[:HIGH]]",
                    "write e.g. 2x3x224x224 or 2x128:int64:50000")
    try:
        shape = tuple(int(s) for s in parts[0].lower().split("x"))
    except ValueError:
        raise _fail(f"input shape {parts[0]!r} is not sizes joined by 'x'",
                    "write e.g. 2x3x224x224") from None
    if any(size < 0 for size in shape):
        raise _fail(f"input shape {parts[0]!r} has a negative size", "write e.g. 2x3x224x224")
    dtype_name = parts[1] if len(parts) > 1 and parts[1] else "float32"
    if dtype_name not in DTYPES:
        raise _fail(f"unknown dtype {dtype_name!r} in {spec!r}",
                    f"use one of {', '.join(DTYPES)}")
    high = None
    if len(parts) > 2:
        try:
            high = int(parts[2])
        except ValueError:
            raise _fail(f"HIGH {parts[2]!r} in {spec!r} is not an int",
                        "write e.g. 2x128:int64:50000") from None
    dtype = DTYPES[dtype_name]
    if not dtype.is_floating_point and high is None and dtype is not torch.bool:
        raise _fail(f"integer input {spec!r} needs HIGH (exclusive upper bound)",
                    "append it, e.g. 2x128:int64:50000")
    if high is not None and high <= 0:
        raise _fail(f"HIGH {high} in {spec!r} leaves no integer to draw (ids are drawn "
                    "from 0 to HIGH - 1)", "use the vocabulary size, e.g. 2x128:int64:50000")
    return shape, dtype, high


def make_inputs(specs: list[str], seed: int) -> tuple[torch.Tensor, ...]:
    """One tensor per SPEC, drawn from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    tensors: list[torch.Tensor] = []
    for spec in specs:
        shape, dtype, high = parse_spec(spec)
        if dtype is torch.bool:
            tensors.append(torch.rand(shape, generator=generator) < 0.5)
        elif dtype.is_floating_point:
            tensors.append(torch.randn(shape, generator=generator).to(dtype))
        else:
            tensors.append(torch.randint(0, high, shape, generator=generator, dtype=dtype))
    return tuple(tensors)



"""The table of named parameter transforms a recipe may name, filled by the rules.

A rule whose parameter is not grown by the generic expand/split (a norm's gamma scaled
by ``eta``, its beta padded with zeros) registers a function under a name; its claim and
the recipe then carry only that name and the dims whose layouts the function receives.
So a recipe stays plain data (JSON), and applying it needs no graph: the rules fill this
table when ``passes.rules`` is imported, and ``GrowthRecipe.apply`` looks names up here.

A transform is ``fn(source, generic, layouts, *reads) -> tensor``: ``source`` is the
source tensor in float64, ``generic`` what the generic steps made of it, ``layouts`` the
growth (``AxisGrowth``; circ form unless the claim named the value axes whose forms they
take) of each of its dims, and ``reads`` the source tensors of the other parameters the
step names (a layer scale's gamma, for the layer it is folded into).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["TransformFn", "register_transform", "transform_named"]

TransformFn = Callable[..., torch.Tensor]  # (source, generic, layouts, *reads) -> tensor

_TABLE: dict[str, TransformFn] = {}


def register_transform(name: str, fn: TransformFn) -> TransformFn:
    """Make ``fn`` available to recipes as ``name``; a second function for one name is
    an error (a recipe saved with one meaning must not be applied with another)."""
    if name in _TABLE and _TABLE[name] is not fn:
        raise ValueError(f"a parameter transform named {name!r} is already registered")
    _TABLE[name] = fn
    return fn


def transform_named(name: str) -> TransformFn:
    try:
        return _TABLE[name]
    except KeyError:
        raise KeyError(f"no parameter transform named {name!r}: import the rules that "
                       "define it (lemon_fx does so for its own) before applying the "
                       "recipe") from None

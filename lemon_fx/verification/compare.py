"""How two models' outputs are compared: the one measure shared by ``verify``, the ONNX
check and ``grow``'s last guard.

Errors are measured per output against that output's scale: ``max_abs_error`` is the
largest absolute difference, ``max_rel_error`` is that divided by ``max|reference|``, and an
output passes when ``max_abs_error <= atol + rtol * max|reference|``. A per-element relative
error would blow up on outputs that cross zero and say nothing useful.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

__all__ = [
    "BUG_FIX",
    "DEFAULT_TOLERANCES",
    "ONNX_TOLERANCE",
    "OutputComparison",
    "compare_outputs",
    "compare_tensors",
    "dtype_name",
    "flatten_outputs",
    "json_float",
    "leading_part",
]

# (rtol, atol) per check dtype. float64 is where lossless growth is exact up to rounding;
# the others leave room for the different summation order of wider matmuls.
DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}
ONNX_TOLERANCE: tuple[float, float] = (1e-5, 1e-6)

BUG_FIX = (
    "report this as a bug with the plan and the model: lemon_fx promised a lossless model "
    "(a custom rule registered with lemon_fx.register is the first suspect)"
)


@dataclasses.dataclass(frozen=True)
class OutputComparison:
    """How one output tensor of the grown model compares with the source's.

    ``name``: the output's path (``output``, ``output[0]``, ``output['logits']``);
    ``shape`` and ``dtype``: the source's output; ``max_abs_error``: the largest absolute
    difference; ``max_rel_error``: that divided by ``max|ref|``; ``passed``: whether
    ``max_abs_error <= tolerance``. ``tolerance`` is the absolute error allowed for this
    output (``atol + rtol * max|ref|``); ``reason`` says why an output failed without a
    number (shape, dtype, structure), else None.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    max_abs_error: float
    max_rel_error: float
    passed: bool
    tolerance: float = math.nan
    reason: str | None = None

    @classmethod
    def structure_failure(cls, reason: str) -> OutputComparison:
        """A failure of the whole output (its structure or count), not of one tensor."""
        return cls(name="output", shape=(), dtype="", max_abs_error=math.inf,
                   max_rel_error=math.inf, passed=False, reason=reason)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (non-finite errors are written as the strings "inf"/"nan")."""
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "max_abs_error": json_float(self.max_abs_error),
            "max_rel_error": json_float(self.max_rel_error),
            "tolerance": json_float(self.tolerance),
            "passed": self.passed,
            "reason": self.reason,
        }


def flatten_outputs(value: Any, name: str = "output") -> list[tuple[str, Any]]:
    """Name every leaf of a model's output: ``output``, ``output[0]``, ``output['logits']``.

    Tuples and lists are indexed, dicts (Hugging Face ``ModelOutput`` is one) keyed in
    their order, namedtuples and dataclasses by field, objects with ``to_tuple()`` by
    index. ``None`` leaves are dropped, as exporters drop them. Other leaves (ints,
    strings) are kept so that the structure can be compared.
    """
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [(name, value)]
    if isinstance(value, dict):
        return [
            leaf
            for key, item in value.items()
            for leaf in flatten_outputs(item, f"{name}[{key!r}]")
        ]
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return [
            leaf
            for field in value._fields
            for leaf in flatten_outputs(getattr(value, field), f"{name}.{field}")
        ]
    if isinstance(value, (tuple, list)):
        return [
            leaf for i, item in enumerate(value) for leaf in flatten_outputs(item, f"{name}[{i}]")
        ]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [
            leaf
            for field in dataclasses.fields(value)
            for leaf in flatten_outputs(getattr(value, field.name), f"{name}.{field.name}")
        ]
    if callable(getattr(value, "to_tuple", None)):
        return flatten_outputs(tuple(value.to_tuple()), name)
    return [(name, value)]


def leading_part(candidate: Any, reference: Any) -> Any:
    """The first ``S`` entries of each axis of a grown output, ``S`` the reference's size
    (``Plan(grow_outputs=True)``: that part is the source's output); anything else as is."""
    if not (isinstance(candidate, torch.Tensor) and isinstance(reference, torch.Tensor)):
        return candidate
    if candidate.dim() != reference.dim() or any(
            c < r for c, r in zip(candidate.shape, reference.shape)):
        return candidate
    return candidate[tuple(slice(0, r) for r in reference.shape)]


def compare_outputs(
    reference: Any, candidate: Any, *, rtol: float, atol: float, check_dtype: bool = True,
    leading: bool = False,
) -> list[OutputComparison]:
    """Compare two output structures leaf by leaf; a structural difference is a failure.
    ``leading``: compare each candidate tensor's leading part of the reference's shape
    (outputs that grew with ``grow_outputs``)."""
    ref_leaves = flatten_outputs(reference)
    cand_leaves = flatten_outputs(candidate)
    ref_names = [n for n, _ in ref_leaves]
    cand_names = [n for n, _ in cand_leaves]
    if ref_names != cand_names:
        missing = [n for n in ref_names if n not in cand_names]
        extra = [n for n in cand_names if n not in ref_names]
        detail = f"source has {ref_names}, grown has {cand_names}"
        if missing or extra:
            detail += f" (missing in grown: {missing}, extra in grown: {extra})"
        return [OutputComparison.structure_failure(f"output structure differs: {detail}")]
    return [
        _compare_leaf(name, ref, leading_part(cand, ref) if leading else cand, rtol=rtol,
                      atol=atol, check_dtype=check_dtype)
        for (name, ref), (_, cand) in zip(ref_leaves, cand_leaves, strict=True)
    ]


def compare_tensors(
    name: str,
    reference: torch.Tensor,
    candidate: torch.Tensor,
    *,
    rtol: float,
    atol: float,
    check_dtype: bool = True,
) -> OutputComparison:
    """Max absolute and scale-relative error of ``candidate`` against ``reference``.

    NaN matches NaN and equal infinities match (a model may legitimately output them);
    a NaN or infinity on one side only is an infinite error. Integer and bool outputs
    must match exactly.
    """
    shape = tuple(reference.shape)
    dtype = dtype_name(reference.dtype)

    def failed(reason: str) -> OutputComparison:
        return OutputComparison(name, shape, dtype, math.inf, math.inf, False, math.nan, reason)

    if tuple(candidate.shape) != shape:
        return failed(f"shape differs: source {shape}, grown {tuple(candidate.shape)}")
    if check_dtype and candidate.dtype != reference.dtype:
        return failed(f"dtype differs: source {dtype}, grown {dtype_name(candidate.dtype)}")
    exact = not (reference.is_floating_point() or reference.is_complex())
    wide = torch.complex128 if reference.is_complex() or candidate.is_complex() else torch.float64
    ref = reference.detach().to("cpu", wide)
    cand = candidate.detach().to("cpu", wide)
    if ref.numel() == 0:
        return OutputComparison(name, shape, dtype, 0.0, 0.0, True, 0.0 if exact else atol)

    same = (ref == cand) | (ref.isnan() & cand.isnan())
    diff = torch.where(same, torch.zeros((), dtype=torch.float64), (ref - cand).abs())
    diff = torch.nan_to_num(diff, nan=math.inf)
    max_abs = float(diff.max())
    finite_ref = ref.abs()[torch.isfinite(ref)]
    scale = float(finite_ref.max()) if finite_ref.numel() else 0.0
    if scale > 0:
        max_rel = max_abs / scale
    else:
        max_rel = 0.0 if max_abs == 0 else math.inf
    tolerance = 0.0 if exact else atol + rtol * scale
    passed = max_abs <= tolerance
    return OutputComparison(name, shape, dtype, max_abs, max_rel, passed, tolerance)


def _compare_leaf(
    name: str, ref: Any, cand: Any, *, rtol: float, atol: float, check_dtype: bool
) -> OutputComparison:
    if isinstance(ref, torch.Tensor) and isinstance(cand, torch.Tensor):
        return compare_tensors(name, ref, cand, rtol=rtol, atol=atol, check_dtype=check_dtype)
    if isinstance(ref, torch.Tensor) or isinstance(cand, torch.Tensor):
        kinds = f"source {type(ref).__name__}, grown {type(cand).__name__}"
        return OutputComparison(
            name, (), "", math.inf, math.inf, False, reason=f"output kind differs: {kinds}"
        )
    equal = ref == cand
    return OutputComparison(
        name,
        (),
        type(ref).__name__,
        0.0 if equal else math.inf,
        0.0 if equal else math.inf,
        bool(equal),
        0.0,
        None if equal else f"value differs: source {ref!r}, grown {cand!r}",
    )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def json_float(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)

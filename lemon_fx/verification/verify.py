"""Check that a grown model computes the source model's function.

lemon_fx promises a lossless model; this module is where that promise is measured rather
than trusted. The torch check runs private copies of both models in float64 by default,
where LEMON's expansions are exact up to rounding (~1e-12), so any real mistake stands far
above the noise. The optional ONNX check covers what users deploy: the grown model exported
in float32, checked by ``onnx.checker`` and run in onnxruntime, against the *source*
model's own float32 outputs.
How outputs are compared (per output, against its scale) is ``verification.compare``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import pathlib
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from lemon_fx.errors import Problem, VerificationError
from lemon_fx.tracing.graph_facts import grown_plan
from lemon_fx.verification import onnx_export
from lemon_fx.verification.compare import (
    BUG_FIX,
    DEFAULT_TOLERANCES,
    ONNX_TOLERANCE,
    OutputComparison,
    compare_outputs,
    compare_tensors,
    dtype_name,
    flatten_outputs,
    json_float,
    leading_part,
)

__all__ = ["VerificationReport", "verify"]


@dataclasses.dataclass
class VerificationReport:
    """The measured agreement of a grown model with its source.

    ``outputs`` is the torch check (one ``OutputComparison`` per output tensor), run in
    ``dtype`` (its name, e.g. ``"float64"``) with tolerances ``rtol``/``atol``;
    ``onnx_outputs`` the onnxruntime check (None when ONNX was not asked for), with
    ``onnx_rtol``/``onnx_atol``. ``onnx_path`` is the file written for ``onnx="path"``;
    None for ``onnx=True``, whose temporary file is removed. ``ok``, the largest errors of
    each check, ``to_dict()`` (JSON) and ``str(report)`` (tables) summarize it.
    """

    outputs: list[OutputComparison]
    dtype: str
    rtol: float
    atol: float
    onnx_outputs: list[OutputComparison] | None = None
    onnx_path: pathlib.Path | None = None
    onnx_rtol: float | None = None
    onnx_atol: float | None = None

    @property
    def ok(self) -> bool:
        """Whether every output of the torch check (and of the ONNX check, if run) passed."""
        torch_ok = bool(self.outputs) and all(o.passed for o in self.outputs)
        onnx_ok = self.onnx_outputs is None or (
            bool(self.onnx_outputs) and all(o.passed for o in self.onnx_outputs)
        )
        return torch_ok and onnx_ok

    @property
    def max_abs_error(self) -> float:
        """Largest absolute error over the torch check's outputs."""
        return max((o.max_abs_error for o in self.outputs), default=0.0)

    @property
    def max_rel_error(self) -> float:
        """Largest scale-relative error over the torch check's outputs."""
        return max((o.max_rel_error for o in self.outputs), default=0.0)

    @property
    def onnx_max_abs_error(self) -> float | None:
        """Largest absolute error over the ONNX check's outputs; None without it."""
        if self.onnx_outputs is None:
            return None
        return max((o.max_abs_error for o in self.onnx_outputs), default=0.0)

    @property
    def onnx_max_rel_error(self) -> float | None:
        """Largest scale-relative error over the ONNX check's outputs; None without it."""
        if self.onnx_outputs is None:
            return None
        return max((o.max_rel_error for o in self.onnx_outputs), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (non-finite errors are written as the strings "inf"/"nan")."""
        return {
            "ok": self.ok,
            "dtype": self.dtype,
            "rtol": self.rtol,
            "atol": self.atol,
            "max_abs_error": json_float(self.max_abs_error),
            "max_rel_error": json_float(self.max_rel_error),
            "outputs": [o.to_dict() for o in self.outputs],
            "onnx_outputs": (
                None if self.onnx_outputs is None else [o.to_dict() for o in self.onnx_outputs]
            ),
            "onnx_path": None if self.onnx_path is None else str(self.onnx_path),
            "onnx_rtol": self.onnx_rtol,
            "onnx_atol": self.onnx_atol,
        }

    def __str__(self) -> str:
        status = "ok" if self.ok else "FAILED"
        lines = [f"verification: {status}"]
        lines += _table(
            f"torch check ({self.dtype}, pass when abs err <= {self.atol:g} + "
            f"{self.rtol:g} * max|ref|)",
            self.outputs,
        )
        if self.onnx_outputs is not None:
            where = f", {self.onnx_path}" if self.onnx_path is not None else ""
            lines += _table(
                f"onnxruntime check (float32, CPUExecutionProvider{where}; pass when abs err "
                f"<= {self.onnx_atol:g} + {self.onnx_rtol:g} * max|ref|)",
                self.onnx_outputs,
            )
        return "\n".join(lines)


def verify(
    source: nn.Module,
    grown: nn.Module,
    example_inputs: Any,
    onnx: bool | str | os.PathLike[str] = False,
    *,
    example_kwargs: dict[str, Any] | None = None,
    dtype: torch.dtype | str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> VerificationReport:
    """Check that ``grown`` computes the same function as ``source``; return the report.

    Both models are deep-copied, cast to ``dtype`` (float64 by default: floating weights,
    buffers and inputs; integer inputs such as token ids untouched) and run in eval mode
    under ``torch.no_grad``; the caller's modules and tensors are never modified. Use
    inputs that were not used for tracing: they test the function, not one point.

    ``onnx``: False (torch check only), True (export to a temporary file) or a path to
    write. The grown model is exported in float32, checked with
    ``onnx.checker.check_model(full_check=True)``, run in onnxruntime on CPU and compared
    with the source model's float32 torch outputs.

    ``rtol``/``atol`` replace the torch check's defaults, which follow the coarser of the
    check dtype and the dtype the weights are stored in (float64: 1e-10/1e-10, float32:
    1e-5/1e-6): float32 weights, split and rounded by growth, cannot agree to 1e-12 even
    when run in float64. The ONNX check uses 1e-5/1e-6, loosened to the given values when those
    are larger: float32 cannot be held to a float64 tolerance.

    Raises ``VerificationError`` naming each failing output, its errors and the tolerance.
    """
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    kwargs = dict(example_kwargs or {})
    check_dtype = _resolve_dtype(dtype)
    default_rtol, default_atol = DEFAULT_TOLERANCES.get(
        _tolerance_dtype(check_dtype, source, grown), (1e-5, 1e-6)
    )
    rtol = default_rtol if rtol is None else float(rtol)
    atol = default_atol if atol is None else float(atol)

    reference = _run(source, args, kwargs, check_dtype, role="source")
    candidate = _run(grown, args, kwargs, check_dtype, role="grown")
    leading = _grew_outputs(grown)
    report = VerificationReport(
        outputs=compare_outputs(reference, candidate, rtol=rtol, atol=atol, leading=leading),
        dtype=dtype_name(check_dtype),
        rtol=rtol,
        atol=atol,
    )
    if not report.ok:
        raise _failure(report, "torch check", report.outputs)

    if onnx is not False and onnx is not None:
        report.onnx_rtol = max(ONNX_TOLERANCE[0], rtol)
        report.onnx_atol = max(ONNX_TOLERANCE[1], atol)
        if onnx is True:
            with tempfile.TemporaryDirectory(prefix="lemon_fx_verify_") as tmp:
                report.onnx_outputs = _onnx_check(
                    source, grown, args, kwargs, pathlib.Path(tmp) / "grown.onnx", report
                )
        else:
            report.onnx_path = pathlib.Path(onnx)
            report.onnx_outputs = _onnx_check(source, grown, args, kwargs, report.onnx_path, report)
        if not report.ok:
            raise _failure(report, "onnxruntime check", report.onnx_outputs)
    return report


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float64
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use e.g. torch.float64 or 'float32'")
        dtype = resolved
    if not dtype.is_floating_point:
        raise ValueError(f"verify compares floating-point models; got dtype={dtype}")
    return dtype


def _tolerance_dtype(check_dtype: torch.dtype, *modules: nn.Module) -> torch.dtype:
    """The coarsest of the check dtype and the dtypes the weights are stored in.

    A model grown from float32 weights stores its split weights rounded to float32, so in
    float64 it agrees with its source to ~1e-7 relative, not ~1e-12: holding it to the
    float64 tolerance would fail every correct growth of a float32 model.
    """
    coarsest = check_dtype
    for module in modules:
        tensors = [*module.parameters(), *module.buffers()]
        for tensor in tensors:
            if tensor.is_floating_point() and (
                torch.finfo(tensor.dtype).eps > torch.finfo(coarsest).eps
            ):
                coarsest = tensor.dtype
    return coarsest


def _private_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A deep copy in eval mode with every floating tensor in ``dtype``.

    symbolic_trace stores tensor constants as plain attributes, which ``Module.to`` skips;
    they are cast too, or a float64 input would meet a float32 constant in a matmul.
    """
    model = copy.deepcopy(module).to(dtype).eval()
    for sub in model.modules():
        for attr, value in list(vars(sub).items()):
            if (
                isinstance(value, torch.Tensor)
                and not isinstance(value, nn.Parameter)
                and value.is_floating_point()
            ):
                setattr(sub, attr, value.detach().to(dtype))
    return model


def _private_inputs(tree: Any, dtype: torch.dtype) -> Any:
    """Fresh copies of the inputs (a model may write into its inputs), floats in ``dtype``."""

    def cast(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        value = value.detach().clone()
        return value.to(dtype) if value.is_floating_point() else value

    return pytree.tree_map(cast, tree)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Tensors a forward creates (``torch.zeros(n)``, masks) follow the check's dtype."""
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        changed = True
    except (TypeError, RuntimeError):  # a dtype this torch refuses as default: leave it
        changed = False
    try:
        yield
    finally:
        if changed:
            torch.set_default_dtype(previous)


def _run(
    module: nn.Module,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    dtype: torch.dtype,
    *,
    role: str,
) -> Any:
    try:
        model = _private_copy(module, dtype)
        inputs, kw = _private_inputs(tuple(args), dtype), _private_inputs(kwargs, dtype)
        with torch.no_grad(), _default_dtype(dtype):
            return model(*inputs, **kw)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        fix = (
            BUG_FIX
            if role == "grown"
            else "check that example_inputs (and example_kwargs) are what the model's "
            "forward takes, and that the model runs in " + dtype_name(dtype)
        )
        raise VerificationError(
            f"the {role} model failed to run in {dtype_name(dtype)}",
            [Problem(reason=f"{type(exc).__name__}: {first}", fix=fix)],
        ) from exc


def _onnx_check(
    source: nn.Module,
    grown: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    path: pathlib.Path,
    report: VerificationReport,
) -> list[OutputComparison]:
    """Export ``grown``, check the file, run it in onnxruntime, compare with ``source``."""
    import onnx as onnx_lib


    reference = _run(source, args, kwargs, torch.float32, role="source")
    # through the module, so a test can stand in for the exporter
    onnx_export.export_onnx(grown, args, path, example_kwargs=kwargs)
    try:
        onnx_lib.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise VerificationError(
            "the exported ONNX model is invalid",
            [
                Problem(
                    reason=f"onnx.checker: {type(exc).__name__}: {first}",
                    fix="try export_onnx(..., opset=...) with another opset; if that does "
                    "not help, report it with the model (an exporter or lemon_fx bug)",
                )
            ],
        ) from exc

    try:
        results = onnx_export.onnxruntime_outputs(path, onnx_export.onnx_input_feed(args, kwargs))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise VerificationError(
            "onnxruntime could not run the exported model",
            [Problem(reason=f"{type(exc).__name__}: {first}", fix=BUG_FIX)],
        ) from exc

    ref_tensors = [(n, t) for n, t in flatten_outputs(reference) if isinstance(t, torch.Tensor)]
    if len(results) != len(ref_tensors):
        return [OutputComparison.structure_failure(
            f"the ONNX model has {len(results)} outputs, the source model "
            f"{len(ref_tensors)} tensors ({[n for n, _ in ref_tensors]})")]
    assert report.onnx_rtol is not None and report.onnx_atol is not None
    return [
        compare_tensors(
            name,
            ref,
            leading_part(torch.from_numpy(result), ref) if _grew_outputs(grown)
            else torch.from_numpy(result),
            rtol=report.onnx_rtol,
            atol=report.onnx_atol,
            check_dtype=False,
        )
        for (name, ref), result in zip(ref_tensors, results, strict=True)
    ]


def _grew_outputs(grown: nn.Module) -> bool:
    """Whether ``grown`` came from ``grow`` with ``Plan(grow_outputs=True)``."""
    plan = grown_plan(grown) if isinstance(grown, torch.fx.GraphModule) else None
    return bool(getattr(plan, "grow_outputs", False))


def _failure(
    report: VerificationReport, check: str, outputs: list[OutputComparison]
) -> VerificationError:
    problems = []
    for out in outputs:
        if out.passed:
            continue
        if out.reason is not None:
            reason = f"{out.name}: {out.reason}"
        else:
            reason = (
                f"{out.name} (shape {list(out.shape)}): max abs error {out.max_abs_error:.3e}, "
                f"max rel error {out.max_rel_error:.3e}, allowed abs error {out.tolerance:.3e}"
            )
        problems.append(Problem(reason=reason, fix=BUG_FIX))
    if not outputs:
        problems.append(Problem(reason="the model returned no tensors to compare", fix=BUG_FIX))
    if check == "torch check":
        what = f"torch check in {report.dtype}, rtol={report.rtol:g}, atol={report.atol:g}"
    else:
        what = f"onnxruntime check in float32, rtol={report.onnx_rtol:g}, atol={report.onnx_atol:g}"
    error = VerificationError(
        f"the grown model does not compute the source model's function ({what})", problems
    )
    error.report = report  # type: ignore[attr-defined]
    return error


def _table(title: str, outputs: list[OutputComparison]) -> list[str]:
    header = ("output", "shape", "dtype", "max abs err", "max rel err", "allowed", "ok")
    rows = [
        (
            o.name,
            str(tuple(o.shape)),
            o.dtype,
            f"{o.max_abs_error:.2e}",
            f"{o.max_rel_error:.2e}",
            f"{o.tolerance:.2e}",
            "yes" if o.passed else "NO" + (f" ({o.reason})" if o.reason else ""),
        )
        for o in outputs
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = [title]
    for row in [header, *rows]:
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
        lines.append("  " + "  ".join([*cells, row[-1]]))
    return lines

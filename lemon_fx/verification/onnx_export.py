"""Export a (grown) model to one self-contained ONNX file.

Which exporter: ``torch.onnx.export`` has two. The torch.export-based one (``dynamo=True``)
is the maintained path: the default since torch 2.9, documented as the exporter "for
PyTorch 2.6 and newer", and it needs ``onnxscript``. The TorchScript one (``dynamo=False``)
still exists in torch 2.13 but warns that it is deprecated and will be removed; it is the
only exporter on torch 2.4/2.5. Both export the graphs lemon_fx produces (symbolic_trace
GraphModules with SDPA, MultiheadAttention, LayerNorm, GELU, embeddings over int64 ids,
tuple and dict outputs) with float32 errors ~1e-7 in onnxruntime. So the torch.export path
is tried first where it is available, and the TorchScript path is the fallback when it is
missing or fails; when every exporter fails, one error lists each exporter's reason.

A fallback cannot hide a wrong model from ``lemon_fx.verify``: it runs the exported file in
onnxruntime and compares it with the source model's outputs.

A dynamic batch (``dynamic_batch=True``) is a claim about every batch size, and both
exporters can break it without an error: torch.export specialises a dimension the graph
treats as a constant, and the TorchScript tracer records the example's sizes in reshapes.
So the claim is checked, not assumed: the file is run in onnxruntime at batch sizes other
than the example's and compared with the module, and an exporter whose file fails counts as
failed.

The exporters are noisy (deprecation warnings, tracer warnings, logging about optional
packages such as torchvision, graph dumps on failure). Users read that noise as failure, so
it is captured while exporting and replayed on the ``lemon_fx.onnx_export`` logger at DEBUG
level; exceptions are never swallowed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import inspect
import io
import logging
import os
import pathlib
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from lemon_fx.errors import Problem, VerificationError
from lemon_fx.verification.compare import ONNX_TOLERANCE, compare_tensors, flatten_outputs

__all__ = [
    "export_onnx",
    "onnx_input_feed",
    "onnx_input_names",
    "onnx_output_names",
    "onnxruntime_outputs",
]

_log = logging.getLogger(__name__)

# Protobuf cannot serialize a message above 2 GiB; keep a margin for the graph itself.
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Loggers whose WARNING/INFO chatter during export is noise to a lemon_fx user.
_NOISY_LOGGERS = ("torch", "onnxscript", "onnx_ir")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

Exporter = Callable[..., None]

_BATCH_FIX = (
    "the model, or the graph an exporter made of it, holds the example's batch size as a "
    "constant (a view, reshape or expand with a literal size, or a Python loop over the "
    "batch): read the size from the input (x.shape[0]) in the model, or export with a fixed "
    "batch (dynamic_batch=False; lemon-fx export without --dynamic-batch)"
)


def export_onnx(
    module: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    example_kwargs: dict[str, Any] | None = None,
    opset: int | None = None,
    dynamic_batch: bool = False,
    external_data: bool | None = None,
) -> pathlib.Path:
    """Write ``module`` as a float32 ONNX model to ``path`` and return the path.

    The module is deep-copied, put in eval mode and cast to float32 (floating inputs too;
    integer inputs such as token ids keep their dtype), so the caller's module and tensors
    are untouched. Graph inputs are named ``input_0, input_1, ...`` for positional tensors
    and by keyword for ``example_kwargs``; outputs are named after their place in the
    output structure (``output``, ``output_0``, ``output_logits``). The file carries its
    weights inline, or in an external ``<name>.data`` file beside it: above protobuf's
    2 GiB limit, or always with ``external_data=True`` (``False`` forbids it). A file with
    external data is run in onnxruntime once more after it is written and compared with
    the module (float32, rtol 1e-5, atol 1e-6): the layout on disk is what gets checked.
    ``opset=None`` lets the exporter choose its default opset.

    ``dynamic_batch=True`` names dimension 0 of every tensor input ``batch`` (they must
    agree on its size), and of every output whose dimension 0 follows it; the file is then
    run in onnxruntime at batch 1, the example's batch and one more, and compared with the
    module (float32, rtol 1e-5, atol 1e-6). The default keeps the example's sizes fixed.

    Raises ``VerificationError`` naming each exporter's reason when no exporter succeeds.
    """
    path = pathlib.Path(path)
    args, kwargs = _as_args(example_inputs), dict(example_kwargs or {})
    model = _float32_copy(module)
    args32, kwargs32 = _float32_inputs(args), _float32_inputs(kwargs)
    input_names = onnx_input_names(args32, kwargs32)
    with torch.no_grad():
        outputs = model(*args32, **kwargs32)
    output_names = onnx_output_names(outputs)
    batch_checks: list[BatchCheck] = []
    dynamic_axes: dict[str, dict[int, str]] | None = None
    if dynamic_batch:
        batch_checks = batch_checks_for(model, args32, kwargs32)
        dynamic_axes = _batch_axes(args32, kwargs32, outputs, batch_checks)

    failures: list[tuple[str, BaseException]] = []
    with tempfile.TemporaryDirectory(prefix="lemon_fx_onnx_") as tmp:
        exported = pathlib.Path(tmp) / "model.onnx"
        for exporter_name, exporter in _exporters():
            try:
                with _quiet_exporter(exporter_name):
                    exporter(model, args32, kwargs32, exported, input_names, output_names, opset,
                             dynamic_axes)
                for check in batch_checks:
                    check.run(exported)
            except Exception as exc:  # every exporter's reason goes into the error below
                failures.append((exporter_name, exc))
                exported.unlink(missing_ok=True)
                continue
            if failures:
                _log.info(
                    "ONNX export used the %s exporter after: %s",
                    exporter_name,
                    "; ".join(f"{n}: {_exception_summary(e)}" for n, e in failures),
                )
            if _save(exported, path, external_data):
                _check_saved(path, model, args32, kwargs32, outputs)
            return path
    raise _export_error(failures, opset, dynamic_batch)


def onnxruntime_outputs(path: str | os.PathLike[str], feed: dict[str, np.ndarray]) -> list[Any]:
    """Run an exported file in onnxruntime on CPU, feeding the inputs the file declares.

    The exporters drop inputs the graph does not use, so ``feed`` may hold more names than
    the file asks for; a name the file asks for and ``feed`` lacks is a ``KeyError``.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # initializer-pruning notices are not problems
    session = ort.InferenceSession(
        str(path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    wanted = [i.name for i in session.get_inputs()]
    unknown = [name for name in wanted if name not in feed]
    if unknown:
        raise KeyError(f"graph inputs {unknown} not among the example inputs {list(feed)}")
    run_options = ort.RunOptions()
    run_options.log_severity_level = 4  # a failing run raises with the same message
    return session.run(None, {name: feed[name] for name in wanted}, run_options)


class BatchMismatch(Exception):
    """An exported file that does not compute the module's function at another batch size."""


@dataclasses.dataclass(frozen=True)
class BatchCheck:
    """One batch size a dynamic-batch file must handle: the feed and the module's outputs."""

    batch: int
    feed: dict[str, np.ndarray]
    expected: list[tuple[str, torch.Tensor]]

    def run(self, exported: pathlib.Path) -> None:
        """Raise ``BatchMismatch`` unless the file matches the module at this batch size."""
        try:
            results = onnxruntime_outputs(exported, self.feed)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise BatchMismatch(
                f"onnxruntime cannot run the file at batch {self.batch}: "
                f"{type(exc).__name__}: {first}"
            ) from exc
        if len(results) != len(self.expected):
            raise BatchMismatch(
                f"at batch {self.batch} the file gives {len(results)} outputs, the module "
                f"{len(self.expected)}"
            )
        for (name, want), got in zip(self.expected, results, strict=True):
            comparison = compare_tensors(
                name, want, torch.from_numpy(np.asarray(got)),
                rtol=ONNX_TOLERANCE[0], atol=ONNX_TOLERANCE[1],
            )
            if not comparison.passed:
                why = comparison.reason or (
                    f"max abs error {comparison.max_abs_error:.3g} (allowed "
                    f"{ONNX_TOLERANCE[1]:g} + {ONNX_TOLERANCE[0]:g} * max|ref|)"
                )
                raise BatchMismatch(f"at batch {self.batch}, {name} differs from the module: {why}")


def batch_checks_for(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[BatchCheck]:
    """The module's float32 outputs at batch 1, the example's batch and one more.

    Dimension 0 of every tensor input is the batch, so the inputs must agree on it. Each
    batch reuses the example's rows, rotated by one so that a file that mixes up positions
    along the batch is caught. Raises ``VerificationError`` when there is no batch
    dimension to vary or the module itself fails at another batch size.
    """
    batched = [(name, t) for name, t in _named_input_tensors(args, kwargs) if t.dim() >= 1]
    sizes = {int(t.shape[0]) for _, t in batched}
    if len(sizes) != 1:
        reason = (
            "no tensor input has a dimension 0" if not batched else
            "the inputs disagree on dimension 0 ("
            + ", ".join(f"{name}: {t.shape[0]}" for name, t in batched)
            + "), so it is not one batch dimension"
        )
        raise VerificationError("cannot export with a dynamic batch", [Problem(
            reason=reason, fix="export with a fixed batch (dynamic_batch=False), or pass "
            "inputs whose dimension 0 is the batch")])
    (batch,) = sizes
    checks = []
    for size in sorted({1, batch, batch + 1}):
        rows = torch.tensor([(i + 1) % batch for i in range(size)])
        resized = pytree.tree_map(
            lambda v, rows=rows: v.index_select(0, rows) if _is_tensor(v) and v.dim() >= 1 else v,
            (args, kwargs),
        )
        try:
            with torch.no_grad():
                outputs = model(*resized[0], **resized[1])
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise VerificationError("cannot export with a dynamic batch", [Problem(
                reason=f"the model itself fails at batch {size} (the example's is {batch}): "
                f"{type(exc).__name__}: {first}", fix=_BATCH_FIX)]) from exc
        feed = {name: _to_numpy(t) for name, t in _named_input_tensors(*resized)}
        expected = [(n, t) for n, t in flatten_outputs(outputs) if _is_tensor(t)]
        checks.append(BatchCheck(size, feed, expected))
    return checks


def _batch_axes(
    args: tuple[Any, ...], kwargs: dict[str, Any], outputs: Any, checks: list[BatchCheck]
) -> dict[str, dict[int, str]]:
    """``dynamic_axes`` for the exporters: dimension 0 of the inputs, and of each output
    whose dimension 0 equals the batch at the example's size and at every checked size."""
    named = [(name, t) for name, t in _named_input_tensors(args, kwargs) if t.dim() >= 1]
    axes = {name: {0: "batch"} for name, _ in named}
    batch = int(named[0][1].shape[0])
    leaves = [t for _, t in flatten_outputs(outputs) if _is_tensor(t)]
    for i, (name, leaf) in enumerate(zip(onnx_output_names(outputs), leaves, strict=True)):
        follows = leaf.dim() >= 1 and leaf.shape[0] == batch and all(
            check.expected[i][1].dim() >= 1 and check.expected[i][1].shape[0] == check.batch
            for check in checks
        )
        if follows:
            axes[name] = {0: "batch"}
    return axes


def onnx_input_names(args: Sequence[Any], kwargs: dict[str, Any]) -> list[str]:
    """Graph input names: ``input_<i>`` for positional tensors, the keyword for keywords.

    Non-tensor arguments are baked into the graph by the exporters, so they get no name.
    """
    return [name for name, _ in _named_input_tensors(args, kwargs)]


def onnx_input_feed(
    example_inputs: Any, example_kwargs: dict[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """The onnxruntime feed for ``export_onnx``'s graph: name -> numpy array.

    Floating tensors become float32 (the exported dtype); integer and bool tensors keep
    their dtype, as the exported graph declares them.
    """
    args = _float32_inputs(_as_args(example_inputs))
    kwargs = _float32_inputs(dict(example_kwargs or {}))
    return {name: _to_numpy(t) for name, t in _named_input_tensors(args, kwargs)}


def onnx_output_names(outputs: Any) -> list[str]:
    """Graph output names derived from the position of each tensor in the output structure."""
    names = []
    for name, value in flatten_outputs(outputs):
        if isinstance(value, torch.Tensor):
            names.append(re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_") or "output")
    return names


def _as_args(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _named_input_tensors(args: Sequence[Any], kwargs: dict[str, Any]) -> list[tuple[str, Any]]:
    named = [
        (f"input_{i}", t)
        for i, t in enumerate(t for t in pytree.tree_leaves(tuple(args)) if _is_tensor(t))
    ]
    for key, value in kwargs.items():
        leaves = [t for t in pytree.tree_leaves(value) if _is_tensor(t)]
        if isinstance(value, torch.Tensor):
            named.append((key, value))
        else:
            named.extend((f"{key}_{j}", t) for j, t in enumerate(leaves))
    return named


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def _float32_copy(module: nn.Module) -> nn.Module:
    """A private float32 CPU copy in eval mode: ONNX files are float32 and CPU-exported."""
    model = copy.deepcopy(module).cpu().float().eval()
    # symbolic_trace keeps tensor constants as plain attributes, which .float() skips.
    for sub in model.modules():
        for name, value in list(vars(sub).items()):
            if (
                isinstance(value, torch.Tensor)
                and not isinstance(value, nn.Parameter)
                and value.is_floating_point()
            ):
                setattr(sub, name, value.detach().cpu().float())
    return model


def _float32_inputs(tree: Any) -> Any:
    def cast(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        value = value.detach().cpu().clone()
        return value.float() if value.is_floating_point() else value

    return pytree.tree_map(cast, tree)


def _exporters() -> list[tuple[str, Exporter]]:
    exporters: list[tuple[str, Exporter]] = []
    if _dynamo_exporter_available():
        exporters.append(("torch.export-based (dynamo=True)", _export_dynamo))
    exporters.append(("TorchScript (dynamo=False)", _export_torchscript))
    return exporters


def _export_params() -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(torch.onnx.export).parameters)


def _dynamo_exporter_available() -> bool:
    """torch>=2.6 with onnxscript: before 2.6 ``dynamo=True`` was an early preview."""
    if "dynamo" not in _export_params():
        return False
    major, minor = (int(part) for part in re.findall(r"\d+", torch.__version__)[:2])
    return (major, minor) >= (2, 6) and importlib.util.find_spec("onnxscript") is not None


def _export_dynamo(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    path: pathlib.Path,
    input_names: list[str],
    output_names: list[str],
    opset: int | None,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> None:
    options: dict[str, Any] = {
        "kwargs": kwargs or None,
        "dynamo": True,
        "verbose": False,
        "input_names": input_names,
        "output_names": output_names,
    }
    if opset is not None:
        options["opset_version"] = opset
    if dynamic_axes:
        options["dynamic_axes"] = dynamic_axes
    if "external_data" in _export_params():
        options["external_data"] = False
    torch.onnx.export(model, args, str(path), **options)


def _export_torchscript(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    path: pathlib.Path,
    input_names: list[str],
    output_names: list[str],
    opset: int | None,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> None:
    params = _export_params()
    options: dict[str, Any] = {
        "verbose": False,
        "input_names": input_names,
        "output_names": output_names,
    }
    if "dynamo" in params:
        options["dynamo"] = False
    if opset is not None:
        options["opset_version"] = opset
    if dynamic_axes:
        options["dynamic_axes"] = dynamic_axes
    if kwargs and "kwargs" in params:
        options["kwargs"] = kwargs
    elif kwargs:
        # torch<2.5 takes keyword inputs as a trailing dict in ``args``.
        args = (*args, kwargs)
    torch.onnx.export(model, args, str(path), **options)


@contextlib.contextmanager
def _quiet_exporter(exporter_name: str) -> Iterator[None]:
    """Capture the exporter's warnings, log chatter and prints; re-log them at DEBUG."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    stdout = io.StringIO()
    caught: list[warnings.WarningMessage] = []
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(record=True) as recorded, contextlib.redirect_stdout(stdout):
            warnings.simplefilter("always")
            try:
                yield
            finally:
                caught = list(recorded or [])
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        for w in caught:
            _log.debug("%s exporter warned: %s: %s", exporter_name, w.category.__name__, w.message)
        if stdout.getvalue().strip():
            _log.debug("%s exporter printed:\n%s", exporter_name, stdout.getvalue())


def _save(exported: pathlib.Path, path: pathlib.Path, external: bool | None) -> bool:
    """Re-save with the weights inline, whatever layout the exporter chose, unless they
    pass protobuf's limit or ``external`` asks for a data file; True when one was written.

    Some torch versions write weights to an external data file by default; a file that
    travels alone is what users expect from ``big.onnx``.
    """
    import onnx

    model = onnx.load(str(exported), load_external_data=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_file = path.with_name(path.name + ".data")
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    if external is None:
        external = weight_bytes >= _EXTERNAL_DATA_THRESHOLD
    data_file.unlink(missing_ok=True)  # onnx appends to an existing data file
    if not external:
        if weight_bytes >= _EXTERNAL_DATA_THRESHOLD:
            raise VerificationError("the ONNX file would pass protobuf's 2 GiB limit", [
                Problem(reason=f"{weight_bytes / 2**30:.1f} GiB of weights with "
                        "external_data=False", fix="pass external_data=True or None")])
        onnx.save_model(model, str(path))
        return False
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_file.name,
        size_threshold=0,
    )
    return True


def _check_saved(path: pathlib.Path, model: nn.Module, args: tuple, kwargs: dict,
                 outputs: Any) -> None:
    """Run the file as written (external data included) and compare with the module."""
    got = onnxruntime_outputs(path, onnx_input_feed(args, kwargs))
    want = [t for _, t in flatten_outputs(outputs) if isinstance(t, torch.Tensor)]
    rtol, atol = ONNX_TOLERANCE
    failed = [c for c in (compare_tensors(f"output {i}", w, torch.from_numpy(np.asarray(g)),
                                          rtol=rtol, atol=atol, check_dtype=False)
                          for i, (w, g) in enumerate(zip(want, got))) if not c.passed]
    if failed or len(got) != len(want):
        raise VerificationError(f"{path} with external data does not match the module", [
            Problem(reason=c.reason or f"{c.name}: max abs error {c.max_abs_error:.3e}",
                    fix="report this as a bug with the model") for c in failed] or [
            Problem(reason=f"{len(got)} outputs in the file, {len(want)} in the module",
                    fix="report this as a bug with the model")])


def _exception_summary(exc: BaseException, max_lines: int = 4) -> str:
    """The lines of an exporter error that say why, without its boilerplate next steps."""
    lines = [ln.rstrip() for ln in _ANSI.sub("", str(exc)).splitlines()]
    if "## Exception summary" in lines:
        lines = lines[lines.index("## Exception summary") + 1 :]
    kept = [
        ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith(("(Refer to", "⬆"))
    ]
    head = " | ".join(kept[:max_lines]) or "(no message)"
    return f"{type(exc).__name__}: {head}"


def _export_error(
    failures: list[tuple[str, BaseException]], opset: int | None, dynamic_batch: bool
) -> VerificationError:
    opset_hint = (
        "try another opset (export_onnx(..., opset=17) or opset=20)"
        if opset is None
        else f"try another opset than {opset}, or opset=None for the exporter's default"
    )
    general = (
        f"{opset_hint}; an op without an ONNX translation needs a custom "
        "translation or a rewrite of that op. If the source model exports and the "
        "grown one does not, report it as a lemon_fx bug with the plan and the model."
    )
    if dynamic_batch:  # torch.export refuses a batch dimension the model fixes
        general = f"if it exports with a fixed batch, {_BATCH_FIX}; otherwise {general}"
    problems = [
        Problem(
            reason=f"the {name} exporter failed: {_exception_summary(exc)}",
            fix=_BATCH_FIX if isinstance(exc, BatchMismatch) else general,
        )
        for name, exc in failures
    ]
    error = VerificationError("ONNX export failed", problems)
    error.__cause__ = failures[-1][1] if failures else None
    return error

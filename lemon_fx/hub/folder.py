"""What every grown model folder shares, whichever library reads it: the report of what was
written and measured, the staging folder that becomes ``out_dir`` only when the check
passed, the check of the reloaded model against the source, and the model card."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lemon_fx.axes.vocabulary import NORM_HINT
from lemon_fx.errors import PlanError, Problem, VerificationError
from lemon_fx.plan import Plan
from lemon_fx.verification.compare import DEFAULT_TOLERANCES, compare_outputs

__all__ = ["PretrainedGrowth", "check_reloaded", "model_card", "norm_eps_scale",
           "staged_folder"]


@dataclass
class PretrainedGrowth:
    """What ``grow_pretrained`` wrote and measured: ``out_dir``; the plan; ``config``, the
    config fields or model arguments it rewrote (``{name: (source, grown)}``);
    ``max_abs_error`` of the reloaded folder against the source on fresh inputs (float32);
    ``generate_equal`` (causal LMs: greedy ``generate()`` with the KV cache gave the
    source's tokens; None for other models); ``loader``, what reloaded it."""

    out_dir: Path
    plan: Plan
    config: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    max_abs_error: float = 0.0
    generate_equal: bool | None = None
    loader: str = "from_pretrained"

    def __str__(self) -> str:
        lines = [f"grew into {self.out_dir}", f"plan: {self.plan.to_dict()}"]
        lines += [f"config {k}: {a} -> {b}" for k, (a, b) in self.config.items()]
        lines.append(f"reloaded with {self.loader}: max abs error {self.max_abs_error:.3g}"
                     " on fresh inputs (float32)")
        if self.generate_equal is not None:
            lines.append("greedy generate() with the KV cache: the source's tokens")
        return "\n".join(lines)


def norm_eps_scale(planned: Any) -> float | None:
    """The factor the grown model's norms scale their eps by: ``alpha = k S / T`` when a
    normalized width grows by a non-multiple (its extra entries change the mean square by
    ``alpha``, and the norm rule rewrites ``eps`` to ``alpha * eps`` in the graph), 1.0 when
    none does, None when two normalized widths need different factors.

    A model rebuilt by its library from a config takes its eps from the config: a folder
    must carry the scaled eps, or the reloaded model computes another function."""
    res, analysis = planned.resolution, planned.analysis
    normalized = {leaf for d, hints in analysis.hints.items() if NORM_HINT in hints
                  for leaf in analysis.dims.leaves(d)}
    factors = set()
    for leaf in normalized:
        source, target = analysis.dims.size(leaf), res.target(leaf)
        if target != source and res.non_multiple(leaf):
            factors.add((target // source) * source / target)
    if len(factors) > 1:
        return None
    return factors.pop() if factors else 1.0


@contextlib.contextmanager
def staged_folder(out_dir: str | Path) -> Iterator[Path]:
    """A new folder beside ``out_dir`` that is renamed to it when the block succeeds and
    removed when it raises, so a failed check leaves no folder. ``out_dir`` must be new
    or empty (PlanError before anything is written)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PlanError(f"{out} is not empty", [Problem(
            reason=f"{out} already holds files", node="out_dir",
            fix="name a new or empty folder")])
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield staging
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_reloaded(want: Any, got: Any, loader: str) -> float:
    """Compare the source's outputs with the reloaded folder's at float32 tolerance (with
    ``grow_outputs`` the leading entries of each grown output); raise VerificationError on
    a difference, else return the largest error."""
    rtol, atol = DEFAULT_TOLERANCES[torch.float32]
    compared = compare_outputs(want, got, rtol=rtol, atol=atol, check_dtype=False,
                               leading=True)
    failed = [c for c in compared if not c.passed]
    if failed:
        raise VerificationError(
            f"the grown folder, reloaded with {loader}, does not compute the source's "
            "function", [Problem(reason=c.reason or f"{c.name}: max abs error "
                                 f"{c.max_abs_error:.3e}, allowed {c.tolerance:.3e}",
                                 fix="report this as a bug with the model and the plan")
                         for c in failed])
    return max((c.max_abs_error for c in compared), default=0.0)


def model_card(source: str, plan: Plan, growth: PretrainedGrowth) -> str:
    """A README.md: base model, plan, lemon_fx version, the rewritten sizes, the check."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        lemon_version = version("lemon-fx")
    except PackageNotFoundError:
        lemon_version = "unknown"
    changes = "\n".join(f"- `{k}`: {a} -> {b}" for k, (a, b) in growth.config.items())
    generate = ("\n- greedy `generate()` with the KV cache gives the source's tokens"
                if growth.generate_equal else "")
    return (f"---\nbase_model: {source}\ntags:\n- lemon_fx\n---\n\n"
            f"# Grown from {source} with lemon_fx {lemon_version}\n\n"
            f"This model computes the same function as `{source}` (LEMON, lossless growth).\n\n"
            f"Plan: `{json.dumps(plan.to_dict())}`\n\n{changes}\n\n"
            f"Check: reloaded with `{growth.loader}`, max abs error "
            f"{growth.max_abs_error:.3g} against the source on fresh inputs (float32)"
            f"{generate}\n")

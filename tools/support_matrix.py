"""Generate ``docs/support.md``, the table of ops lemon_fx has a rule for.

``python tools/support_matrix.py`` writes the file; ``python tools/support_matrix.py --check``
exits 1 when the file on disk differs from what the registry gives now.

The table is built from the built-in rules only (a fresh ``Registry`` filled from the rule
modules ``lemon_fx.registry`` loads), so rules that tests or users registered in this
process never leak into it. Every name is derived from ``__module__`` / ``__qualname__`` /
``__name__`` and identity checks against public namespaces, never from ``repr`` (which holds
memory addresses), and every list is sorted: the output depends only on the rules and on
torch's public names.
"""

from __future__ import annotations

import argparse
import builtins
import inspect
import json
import math
import operator
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lemon_fx.analysis.registry import Registry
from lemon_fx.axes.vocabulary import FORMS
from passes.rules import build_registry

REPO = Path(__file__).resolve().parent.parent
OUTPUT = REPO / "docs" / "support.md"
COMMAND = "python tools/support_matrix.py"
RULES_PACKAGE = "passes.rules."
KIND_ORDER = {"module": 0, "function": 1, "custom op": 2, "method": 3}
KIND_NODE = {"module": "call_module", "function": "call_function", "custom op": "call_function",
             "method": "call_method"}

# Public namespaces an op may be spelled from, in the order tried; "" means a builtin.
NAMESPACES: tuple[tuple[str, Any], ...] = (
    ("torch", torch),
    ("F", F),
    ("Tensor", torch.Tensor),
    ("operator", operator),
    ("math", math),
    ("", builtins),
)
# The namespace an op's own ``__module__`` points at is tried first (``torch._C._nn.linear``
# is ``F.linear``; ``torch.conv2d`` is also ``F.conv2d`` but its module says ``torch``).
MODULE_HINTS = {
    "torch": "torch",
    "torch.functional": "torch",
    "torch.nn.functional": "F",
    "torch._C._nn": "F",
    "_operator": "operator",
    "operator": "operator",
    "math": "math",
    "builtins": "",
}
MODULE_ALIASES = {"_operator": "operator"}

FORM_LINES = {
    "circ": "entry `i` of the wide axis is `x[i % S]` (copies in a cycle).",
    "avg": "`k` whole tiles of `x`, then `r` entries equal to `mean(x)`.",
    "zero": "`k` whole tiles of `x`, then `r` zeros.",
}


@dataclass(frozen=True, order=True)
class Row:
    """One registered op: where it is grouped, how it is spelled, and which rule owns it."""

    family: str
    rule: str
    kind_order: int
    op: str
    kind: str
    summary: str
    rule_module: str


# -- the registry ------------------------------------------------------------------------


def builtin_registry() -> Registry:
    """A fresh registry holding only the built-in rules (no user rule registered since)."""
    return build_registry()


# -- stable names ------------------------------------------------------------------------


def qualified_name(obj: Any) -> str:
    """``module.qualname`` of ``obj``, or of its type when it has no name of its own."""
    module = getattr(obj, "__module__", None)
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if isinstance(module, str) and isinstance(name, str):
        return f"{MODULE_ALIASES.get(module, module)}.{name}"
    kind = type(obj)
    return f"{kind.__module__}.{kind.__qualname__} instance"


def candidate_namespaces(fn: Any) -> list[tuple[str, Any]]:
    """``NAMESPACES`` with the one ``fn.__module__`` points at moved to the front."""
    hint = MODULE_HINTS.get(getattr(fn, "__module__", None) or "")
    return sorted(NAMESPACES, key=lambda item: item[0] != hint)


def function_spelling(fn: Any) -> str:
    """How a ``call_function`` target is written: ``F.linear``, ``torch.add``, ``operator.add``.

    A public spelling is used only when that attribute *is* ``fn``; otherwise the name falls
    back to ``module.qualname``. ``torch.ops`` operators are named by their schema name.
    """
    if isinstance(fn, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return f"torch.ops.{fn}"
    name = getattr(fn, "__name__", None)
    if isinstance(name, str):
        for prefix, namespace in candidate_namespaces(fn):
            if getattr(namespace, name, None) is fn:
                return f"{prefix}.{name}" if prefix else name
    return qualified_name(fn)


def module_spelling(cls: type) -> str:
    """``nn.Linear`` for a class exported by ``torch.nn``, else ``module.qualname``."""
    if getattr(torch.nn, cls.__name__, None) is cls:
        return f"nn.{cls.__name__}"
    return qualified_name(cls)


def op_spelling(kind: str, op: Any) -> str:
    """The readable, address-free name of a registered op of the given kind."""
    if kind == "method":
        return f"Tensor.{op}"
    if kind == "module":
        return module_spelling(op)
    if kind == "custom op":  # "namespace::name", a torch.library op lemon_fx does not import
        return "torch.ops." + op.replace("::", ".")
    return function_spelling(op)


# -- rules -------------------------------------------------------------------------------


def family(rule_module: str) -> str:
    """``passes.rules.linear`` -> ``linear``; a rule defined elsewhere keeps its module."""
    return rule_module.removeprefix(RULES_PACKAGE)


def summary(rule_cls: type) -> str:
    """The first line of the rule class's own docstring (not an inherited one)."""
    doc = rule_cls.__dict__.get("__doc__")
    if not isinstance(doc, str) or not doc.strip():
        return "(no docstring)"
    return inspect.cleandoc(doc).splitlines()[0].strip()


# ops of libraries registered only when installed (stochastic depth): left out, so the
# table is the same on every machine; the header names them
OPTIONAL_LIBRARIES = ("timm", "torchvision")


def rows(entries: Iterable[tuple[str, Any, Any]]) -> list[Row]:
    """One sorted ``Row`` per registry entry (ops of ``OPTIONAL_LIBRARIES`` left out)."""
    out = []
    for kind, op, rule in entries:
        if str(getattr(op, "__module__", "")).split(".")[0] in OPTIONAL_LIBRARIES:
            continue
        cls = type(rule)
        out.append(
            Row(
                family(cls.__module__),
                cls.__name__,
                KIND_ORDER[kind],
                op_spelling(kind, op),
                kind,
                summary(cls),
                cls.__module__,
            )
        )
    return sorted(out)


# -- markdown ----------------------------------------------------------------------------


def cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|")


def anchor(title: str) -> str:
    """The anchor GitHub gives a heading."""
    kept = "".join(c for c in title.lower() if c.isalnum() or c in " -_")
    return kept.replace(" ", "-")


def header(table: list[Row]) -> list[str]:
    """The explanation above the tables: columns, forms, refusals, families."""
    unknown = set(FORMS) ^ set(FORM_LINES)
    if unknown:
        raise RuntimeError(f"FORM_LINES and the vocabulary's FORMS disagree on {sorted(unknown)}")
    counts: dict[str, int] = {}
    for row in table:
        counts[row.family] = counts.get(row.family, 0) + 1
    return [
        f"<!-- generated by tools/support_matrix.py; do not edit: run `{COMMAND}` -->",
        "",
        "# Supported ops",
        "",
        f"lemon_fx has a rule for {len(table)} ops, grouped below by rule family (the module of",
        "`passes/rules/` the rule lives in), and, when timm or torchvision is installed, for",
        "their stochastic depth (`DropPath`, `StochasticDepth`, `stochastic_depth`: pass-through",
        "in `elementwise`). Columns:",
        "",
        "- **Op**: how the op appears in a traced graph. `nn.X` is a module class (matched",
        "  along its MRO, so subclasses use the same rule); `torch.x`, `F.x`",
        "  (`torch.nn.functional`), `operator.x` and builtins are functions; `Tensor.x` is a",
        "  method, matched by name; `torch.ops.ns.x` is a custom op (`torch.library`) of a",
        "  library lemon_fx does not import, matched by its qualified name `ns::x`.",
        "- **Kind**: the torch.fx node op: "
        + ", ".join(f"`{k}` = `{v}`" for k, v in KIND_NODE.items())
        + ".",
        "- **Rule**: the rule class; its docstring states the maths and what it refuses.",
        "- **Summary**: the first line of that docstring.",
        "",
        "A grown axis of width `S -> T` (`k = T // S`, `r = T % S`) holds each activation `x`",
        "in one of LEMON's forms; summaries name the forms an op is exact in:",
        "",
        *[f"- **{form}**: {FORM_LINES[form]}" for form in FORMS],
        "",
        "**Ops not listed here have no rule: they are refused (`UnsupportedOpError`, naming",
        "the node and the op) whenever an axis they touch would grow, never assumed",
        "elementwise.** To support your own module or function, register a rule: see",
        "[Your own layers](../README.md#your-own-layers) in the README.",
        "",
        "Families: "
        + ", ".join(f"[{name}](#{anchor(name)}) ({n})" for name, n in sorted(counts.items()))
        + ".",
    ]


def family_section(name: str, table: list[Row]) -> list[str]:
    """The heading and table of one rule family."""
    modules = ", ".join(f"`{m}`" for m in sorted({row.rule_module for row in table}))
    lines = [
        "",
        f"## {name}",
        "",
        f"Rules from {modules}.",
        "",
        "| Op | Kind | Rule | Summary |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| `{cell(r.op)}` | {r.kind} | `{r.rule}` | {cell(r.summary)} |" for r in table]
    return lines


SWEEP = REPO / "docs" / "bench" / "zoo_sweep.json"
SWEEP_COMMAND = "python tools/zoo_sweep.py --json docs/bench/zoo_sweep.json"
PLAN_TITLES = {"width2": "width 2x", "width1.5": "width 1.5x", "depth2": "depth 2x",
               "width2+depth2": "width 2x + depth 2x"}


def _outcome(text: str) -> str:
    """A sweep outcome in a table cell: "lossless", or the error and its cause, short."""
    if text == "lossless":
        return "lossless"
    text = text.removeprefix("refused: ")
    error, _, reason = text.partition(": ")
    reason = re.sub(r"^\[[^\]]*\] ", "", reason)
    if len(reason) > 90:
        reason = reason[:87].rstrip() + "..."
    return f"{error}: {reason}" if reason else error


def model_families_section(sweep: dict) -> list[str]:
    """``## Model families``: each real family of the last zoo sweep with its outcome
    under the four plans, and the lossless share per plan."""
    summary = sweep.get("_summary", {})
    families = sorted(k for k in sweep if not k.startswith("_"))
    plans = list(PLAN_TITLES)
    lines = [
        "",
        "## Model families",
        "",
        f"The real timm, torchvision and transformers classes at small sizes (random "
        f"weights, every parameter moved off its init, float64), grown under four plans "
        f"and compared with the source on fresh inputs; `{SWEEP_COMMAND}` measured this "
        f"table (lemon_fx {summary.get('lemon_fx', '?')}), and `tests/test_real_zoo.py` "
        "checks a selection of it in CI. A refusal is the typed error grow raises before "
        "building anything, with its cause.",
        "",
        "| plan | lossless | of | share |",
        "| --- | --- | --- | --- |",
    ]
    for plan in plans:
        counts = summary.get("plans", {}).get(plan, {})
        if counts:
            lines.append(f"| {PLAN_TITLES[plan]} | {counts['lossless']} | "
                         f"{counts['families']} | {counts['share']:.0%} |")
    lines += ["", "| family | " + " | ".join(PLAN_TITLES[p] for p in plans) + " |",
              "| --- |" + " --- |" * len(plans)]
    for family in families:
        cells = [cell(_outcome(sweep[family].get(plan, "-"))) for plan in plans]
        lines.append(f"| `{family}` | " + " | ".join(cells) + " |")
    return lines


def render(table: list[Row], sweep: dict | None = None) -> str:
    """The whole of ``docs/support.md`` for the given rows (and the zoo sweep's
    outcomes, when there is one)."""
    lines = header(table)
    if sweep:
        lines += ["", "Which real model families grow under which plan, and why the others "
                  "are refused: [Model families](#model-families)."]
    for name in sorted({row.family for row in table}):
        lines += family_section(name, [row for row in table if row.family == name])
    if sweep:
        lines += model_families_section(sweep)
    return "\n".join(lines) + "\n"


def generate() -> str:
    """``docs/support.md`` as the built-in rules give it now, with the families of the
    last zoo sweep (``docs/bench/zoo_sweep.json``) when it exists."""
    sweep = json.loads(SWEEP.read_text(encoding="utf-8")) if SWEEP.exists() else None
    return render(rows(builtin_registry().entries()), sweep)


# -- command line ------------------------------------------------------------------------


def check(path: Path = OUTPUT) -> int:
    """0 when ``path`` holds the generated text, else 1 with a one-line message."""
    current = path.read_text(encoding="utf-8") if path.exists() else None
    if current == generate():
        return 0
    print(f"{path.name} is stale or missing: run `{COMMAND}`", file=sys.stderr)
    return 1


def write(path: Path = OUTPUT) -> int:
    """Write the generated text to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = generate()
    path.write_text(text, encoding="utf-8", newline="\n")
    print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate docs/support.md from the registry.")
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 if docs/support.md is not what the registry gives now",
    )
    args = parser.parse_args(argv)
    return check() if args.check else write()


if __name__ == "__main__":
    sys.exit(main())

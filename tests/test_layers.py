"""The layout of DESIGN.md §2 as a test: floors that import only downward, no cycles.

Every import in ``lemon_fx/`` and ``passes/`` counts: module-level, inside functions, and
``importlib.import_module("...")`` / ``__import__("...")`` by string. Only imports under
``if TYPE_CHECKING:`` are exempt (they never run). Rules:

1. no import cycle among the project's modules;
2. no module imports a higher floor (same floor is fine when it makes no cycle);
3. no core module (``lemon_fx.*``) other than the composition module ``lemon_fx.api``
   imports ``passes``;
4. ``verification`` sits beside the flow: only the api, the package root, the hub and the
   CLI import it.

The checker works on source text, so its own tests below feed it small made-up packages
to show that each rule can fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# (module prefix, floor); the longest matching prefix wins
FLOORS: tuple[tuple[str, int], ...] = (
    ("lemon_fx.errors", 0),
    ("lemon_fx.plan", 0),
    ("lemon_fx.axes", 0),
    ("lemon_fx.tracing", 1),
    ("lemon_fx.analysis", 2),
    ("lemon_fx.resolution", 3),
    ("lemon_fx.recipe", 4),
    ("passes", 5),
    ("lemon_fx.verification", 6),
    ("lemon_fx.api", 7),
    ("lemon_fx.training", 8),
    ("lemon_fx.hub", 8),
    ("lemon_fx", 9),  # the package root: public names only
    ("lemon_fx.cli", 10),
)
COMPOSITION = "lemon_fx.api"
VERIFICATION_IMPORTERS = ("lemon_fx.api", "lemon_fx.hub", "lemon_fx.cli")


def floor_of(module: str) -> int:
    best = None
    for prefix, floor in FLOORS:
        if (module == prefix or module.startswith(prefix + ".")) and (
                best is None or len(prefix) > len(best[0])):
            best = (prefix, floor)
    if best is None:
        raise AssertionError(f"{module} is on no floor: add it to FLOORS (and DESIGN.md)")
    return best[1]


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def project_sources(root: Path = ROOT) -> dict[str, str]:
    """``{module name: source}`` of every module under lemon_fx/ and passes/."""
    sources = {}
    for package in ("lemon_fx", "passes"):
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            sources[".".join(parts)] = path.read_text()
    return sources


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.AST, module: str, is_package: bool,
                    known: set[str]) -> list[tuple[str, int]]:
    """(imported module name, line) for every import that runs, resolved to absolute.
    ``from a import b`` is an import of ``a.b`` when that is a known module, else of ``a``.
    """
    found: list[tuple[str, int]] = []
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.append((child if child in known else base, node.lineno))
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and node.args:
                if isinstance(node.args[0], ast.Constant) and isinstance(
                        node.args[0].value, str):
                    found.append((node.args[0].value, node.lineno))
                else:
                    dynamic.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child)

    dynamic: list[int] = []
    visit(tree)
    if dynamic:
        # an import by a computed name: every project module named in the file's strings
        # (a tuple of rule modules looped over) counts as imported
        found.extend((n.value, dynamic[0]) for n in ast.walk(tree)
                     if isinstance(n, ast.Constant) and n.value in known)
    return found


def import_graph(sources: dict[str, str]) -> dict[str, dict[str, int]]:
    """``{module: {imported project module: first line}}``."""
    known = set(sources)
    graph: dict[str, dict[str, int]] = {}
    for module, text in sources.items():
        is_package = any(other.startswith(module + ".") for other in sources)
        edges: dict[str, int] = {}
        for name, line in _imported_names(ast.parse(text), module, is_package, known):
            if name in known and name != module:
                edges.setdefault(name, line)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def violations(sources: dict[str, str]) -> list[str]:
    graph = import_graph(sources)
    out = [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    for module, edges in sorted(graph.items()):
        for target, line in sorted(edges.items()):
            # a package's __init__ importing its own children is how packages work
            if _within(target, module):
                continue
            where = f"{module} (line {line}) imports {target}"
            if floor_of(target) > floor_of(module):
                out.append(f"{where}: floor {floor_of(target)} above {floor_of(module)}")
            if _within(module, "lemon_fx") and _within(target, "passes") and \
                    module != COMPOSITION:
                out.append(f"{where}: only {COMPOSITION} may import passes")
            if _within(target, "lemon_fx.verification") and not _within(
                    module, "lemon_fx.verification") and module != "lemon_fx" and not any(
                    _within(module, m) for m in VERIFICATION_IMPORTERS):
                out.append(f"{where}: verification is imported by the api and CLI only")
    return out


def test_the_project_keeps_its_floors() -> None:
    sources = project_sources()
    assert "lemon_fx.api" in sources and "passes.rules" in sources
    assert violations(sources) == []


def test_every_module_is_on_a_floor() -> None:
    for module in project_sources():
        floor_of(module)


# -- the checker itself: each rule can fail ------------------------------------------------


def test_a_cycle_is_found_also_through_a_function_level_import() -> None:
    sources = {
        "lemon_fx": "",
        "lemon_fx.analysis": "",
        "lemon_fx.analysis.a": "from lemon_fx.analysis import b\n",
        "lemon_fx.analysis.b": "def f():\n    import lemon_fx.analysis.a\n",
    }
    assert violations(sources) == [
        "import cycle: lemon_fx.analysis.a <-> lemon_fx.analysis.b"]


def test_an_importlib_string_import_of_a_higher_floor_is_found() -> None:
    sources = {
        "lemon_fx": "",
        "lemon_fx.analysis": "",
        "lemon_fx.analysis.registry": (
            "import importlib\n"
            "def load():\n    return importlib.import_module('passes.rules.linear')\n"),
        "passes": "",
        "passes.rules": "",
        "passes.rules.linear": "",
    }
    found = violations(sources)
    assert any("lemon_fx.analysis.registry (line 3) imports passes.rules.linear: floor 5 "
               "above 2" in v for v in found), found
    assert any("only lemon_fx.api may import passes" in v for v in found), found


def test_an_import_by_a_computed_name_counts_every_module_the_file_names() -> None:
    sources = {
        "lemon_fx": "",
        "lemon_fx.analysis": "",
        "lemon_fx.analysis.registry": (
            "import importlib\n_RULES = ('passes.rules.linear',)\n"
            "def load():\n    for name in _RULES:\n        importlib.import_module(name)\n"),
        "passes": "",
        "passes.rules": "",
        "passes.rules.linear": "from lemon_fx.analysis.registry import Registry\n",
    }
    found = violations(sources)
    assert "import cycle: lemon_fx.analysis.registry <-> passes.rules.linear" in found, found


def test_only_type_checking_imports_are_exempt() -> None:
    sources = {
        "lemon_fx": "",
        "lemon_fx.analysis": "",
        "lemon_fx.analysis.rule": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from lemon_fx.resolution.rewrite import NodeRewrite\n"
            "else:\n    from lemon_fx.resolution import rewrite\n"),
        "lemon_fx.resolution": "",
        "lemon_fx.resolution.rewrite": "",
    }
    assert violations(sources) == [
        "lemon_fx.analysis.rule (line 5) imports lemon_fx.resolution.rewrite: "
        "floor 3 above 2"]


def test_verification_is_imported_by_the_api_and_cli_only() -> None:
    sources = {
        "lemon_fx": "",
        "lemon_fx.verification": "",
        "lemon_fx.verification.compare": "",
        "lemon_fx.training": "",
        "lemon_fx.training.loop": "from lemon_fx.verification.compare import x\n",
        "lemon_fx.api": "from lemon_fx.verification.compare import x\n",
    }
    found = violations(sources)
    assert len(found) == 1 and "lemon_fx.training.loop" in found[0], found


def test_a_module_outside_every_floor_is_reported() -> None:
    with pytest.raises(AssertionError, match="is on no floor"):
        floor_of("elsewhere.module")

"""docs/support.md is generated from the rule registry by tools/support_matrix.py."""

import importlib.util
import operator
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parent.parent
COMMAND = "python tools/support_matrix.py"


def load_tool():
    """tools/ is not a package: import the script from its path."""
    spec = importlib.util.spec_from_file_location(
        "support_matrix", REPO / "tools/support_matrix.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


tool = load_tool()


def test_docs_support_md_is_up_to_date():
    path = REPO / "docs" / "support.md"
    assert path.exists(), f"docs/support.md is missing: run `{COMMAND}`"
    assert path.read_text(encoding="utf-8") == tool.generate(), (
        f"docs/support.md is stale (the rule registry changed): run `{COMMAND}`"
    )


def _ops_text() -> str:
    """The generated text without the zoo sweep's families (their outcomes quote reasons
    in tables of their own)."""
    return tool.render(tool.rows(tool.builtin_registry().entries()))


def test_every_registered_op_is_listed():
    text = _ops_text()
    entries = [(kind, op, rule) for kind, op, rule in tool.builtin_registry().entries()
               if str(getattr(op, "__module__", "")).split(".")[0]
               not in tool.OPTIONAL_LIBRARIES]  # named in the header, not the tables
    assert text.count("\n| `") == len(entries)  # one table row per registered op
    for kind, op, rule in entries:
        row = f"| `{tool.op_spelling(kind, op)}` | {kind} | `{type(rule).__name__}` |"
        assert row in text, f"{kind} {op} has no row"
        if kind == "method":
            assert f"| `Tensor.{op}` | method |" in text
        elif kind == "custom op":  # keyed by "namespace::name"
            assert f"| `torch.ops.{op.replace('::', '.')}` | custom op |" in text
        else:
            assert op.__name__ in tool.op_spelling(kind, op)


def test_names_are_readable_and_address_free():
    assert tool.op_spelling("module", nn.Linear) == "nn.Linear"
    assert tool.op_spelling("function", torch._C._nn.linear) == "F.linear"
    assert tool.op_spelling("function", F.relu) == "F.relu"
    assert tool.op_spelling("function", torch.relu) == "torch.relu"
    assert tool.op_spelling("function", torch.add) == "torch.add"
    assert tool.op_spelling("function", torch.split) == "torch.split"
    assert tool.op_spelling("function", operator.add) == "operator.add"
    assert tool.op_spelling("function", getattr) == "getattr"
    assert tool.op_spelling("function", torch.ops.aten.add.Tensor) == "torch.ops.aten.add.Tensor"
    assert tool.op_spelling("method", "view") == "Tensor.view"

    class Local(nn.Module):
        pass

    assert tool.op_spelling("module", Local) == (
        "test_support_matrix.test_names_are_readable_and_address_free.<locals>.Local"
    )
    text = _ops_text()
    assert "0x" not in text and " at " not in text and "built-in" not in text


def test_output_ignores_rules_registered_at_run_time():
    """User rules (tests register some in the default registry) never reach the docs."""
    import lemon_fx
    from passes.rules import default_registry

    class Scale(nn.Module):
        pass

    before = tool.generate()
    lemon_fx.register(Scale)(type("ScaleRule", (lemon_fx.Rule,), {}))
    try:
        assert any(op is Scale for _, op, _ in default_registry().entries())
        assert tool.generate() == before
    finally:
        default_registry()._modules.pop(Scale)  # other tests check every registered rule


def test_check_fails_on_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "support.md"
    stale.write_text("old\n", encoding="utf-8")
    assert tool.check(stale) == 1
    assert COMMAND in capsys.readouterr().err
    stale.write_text(tool.generate(), encoding="utf-8")
    assert tool.check(stale) == 0


def test_the_model_families_of_the_sweep_are_listed():
    sweep = {"a.family": {"width2": "lossless", "width1.5": "refused: PlanError: [x] why",
                          "depth2": "lossless", "width2+depth2": "lossless"},
             "_summary": {"lemon_fx": "abc", "plans": {"width2": {
                 "lossless": 1, "families": 1, "share": 1.0}}}}
    text = tool.render(tool.rows(tool.builtin_registry().entries()), sweep)
    assert "## Model families" in text and "(#model-families)" in text
    assert "| `a.family` | lossless | PlanError: why | lossless | lossless |" in text
    assert "| width 2x | 1 | 1 | 100% |" in text

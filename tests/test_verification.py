"""lemon_fx.verify: the torch check, the onnxruntime check, and what they never touch.

The "grown" models here are widened by hand (hidden units duplicated, their outgoing
weights split unequally), so the tests do not depend on the growth passes: a pair that is
lossless in exact arithmetic must verify, and one perturbed weight must be caught and named.
"""

from __future__ import annotations

import copy
import json
import pathlib

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lemon_fx.verification.onnx_export
from lemon_fx.errors import VerificationError
from lemon_fx.verification.verify import VerificationReport, flatten_outputs, verify


class MLP(nn.Module):
    def __init__(self, d_in: int = 6, hidden: int = 8, d_out: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SDPABlock(nn.Module):
    """Pre-LN causal self-attention with F.scaled_dot_product_attention."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm(x)).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.proj(y.transpose(1, 2).reshape(b, t, c))


class TokenClassifier(nn.Module):
    """int64 ids through an embedding: integer inputs must stay integers."""

    def __init__(self, vocab: int = 11, dim: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


class TwoInputsTupleOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x) + self.b(y), self.a(x) * 2


class DictOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.fc(x), "hidden": x * 3}


class InPlaceInput(nn.Module):
    """Writes into its input: verify must hand each model a fresh copy."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2.0)
        return self.fc(x)


def widened_mlp(small: MLP, factor: int = 2, seed: int = 0) -> MLP:
    """Duplicate every hidden unit ``factor`` times; split fc2's columns unequally."""
    hidden = small.fc1.out_features
    dtype = small.fc1.weight.dtype
    big = MLP(small.fc1.in_features, hidden * factor, small.fc2.out_features).to(dtype)
    index = torch.arange(hidden * factor) % hidden
    gen = torch.Generator().manual_seed(seed)
    shares = torch.rand(factor, hidden, generator=gen, dtype=dtype) + 0.1
    shares = (shares / shares.sum(0)).reshape(-1)
    with torch.no_grad():
        big.fc1.weight.copy_(small.fc1.weight[index])
        big.fc1.bias.copy_(small.fc1.bias[index])
        big.fc2.weight.copy_(small.fc2.weight[:, index] * shares)
        big.fc2.bias.copy_(small.fc2.bias)
    return big


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_identical_models_verify_with_zero_error() -> None:
    model = MLP()
    report = verify(model, copy.deepcopy(model), (torch.randn(5, 6),))
    assert isinstance(report, VerificationReport)
    assert report.ok
    assert report.dtype == "float64"
    assert report.max_abs_error == 0.0
    assert report.max_rel_error == 0.0
    assert [o.name for o in report.outputs] == ["output"]
    assert report.onnx_outputs is None


def test_widened_mlp_is_lossless_in_float64() -> None:
    small = MLP().double()
    report = verify(small, widened_mlp(small, factor=3), torch.randn(7, 6))
    assert report.ok
    assert (report.rtol, report.atol) == (1e-10, 1e-10)
    assert report.max_rel_error <= 1e-13
    assert report.outputs[0].shape == (7, 3)


def test_float32_weights_get_float32_tolerance_in_the_float64_check() -> None:
    """Split float32 weights are rounded: ~1e-8 in float64 is a correct growth, not a bug."""
    small = MLP()
    report = verify(small, widened_mlp(small, factor=3), torch.randn(7, 6))
    assert report.ok
    assert report.dtype == "float64"
    assert (report.rtol, report.atol) == (1e-5, 1e-6)
    assert report.max_rel_error <= 1e-6


def test_float32_check_uses_float32_tolerance() -> None:
    small = MLP()
    report = verify(small, widened_mlp(small), (torch.randn(7, 6),), dtype=torch.float32)
    assert report.ok
    assert report.dtype == "float32"
    assert (report.rtol, report.atol) == (1e-5, 1e-6)
    assert report.max_rel_error <= 1e-5


def test_perturbed_weight_raises_and_names_the_output() -> None:
    small = MLP().double()
    big = widened_mlp(small)
    with torch.no_grad():
        big.fc2.weight[1, 3] += 1e-6
    with pytest.raises(VerificationError) as caught:
        verify(small, big, (torch.randn(5, 6),))
    text = str(caught.value)
    assert "output (shape [5, 3])" in text
    assert "max abs error" in text and "max rel error" in text
    assert "rtol=1e-10" in text and "atol=1e-10" in text
    assert "lossless" in text
    report = caught.value.report
    assert not report.ok
    assert report.max_abs_error > 1e-8


def test_only_the_failing_output_is_named() -> None:
    model = TwoInputsTupleOutput()
    grown = copy.deepcopy(model)
    with torch.no_grad():
        grown.b.bias[0] += 1e-3
    with pytest.raises(VerificationError) as caught:
        verify(model, grown, (torch.randn(2, 4), torch.randn(2, 4)))
    problems = caught.value.problems
    assert len(problems) == 1
    assert problems[0].reason.startswith("output[0] ")


def test_attention_embedding_tuple_and_dict_models_verify() -> None:
    cases = [
        (SDPABlock(), (torch.randn(2, 5, 16),)),
        (TokenClassifier(), (torch.randint(0, 11, (2, 7)),)),
        (TwoInputsTupleOutput(), (torch.randn(3, 4), torch.randn(3, 4))),
        (DictOutput(), (torch.randn(3, 4),)),
    ]
    for model, inputs in cases:
        report = verify(model, copy.deepcopy(model), inputs)
        assert report.ok, str(report)
        assert report.max_abs_error <= 1e-14


def test_graph_module_from_symbolic_trace_matches_its_source() -> None:
    model = SDPABlock()
    gm = torch.fx.symbolic_trace(model)
    report = verify(model, gm, (torch.randn(2, 6, 16),))
    assert report.ok
    assert report.max_abs_error <= 1e-14


def test_output_names_follow_the_structure() -> None:
    pair = TwoInputsTupleOutput()
    tuple_report = verify(pair, pair, (torch.randn(1, 4), torch.randn(1, 4)))
    assert [o.name for o in tuple_report.outputs] == ["output[0]", "output[1]"]
    model = DictOutput()
    dict_report = verify(model, model, torch.randn(2, 4))
    assert [o.name for o in dict_report.outputs] == ["output['logits']", "output['hidden']"]


def test_flatten_outputs_handles_nesting_none_and_to_tuple() -> None:
    class WithToTuple:
        def to_tuple(self) -> tuple[torch.Tensor, None]:
            return (torch.zeros(1), None)

    t = torch.ones(2)
    names = [n for n, _ in flatten_outputs((t, {"a": [t, None], "b": WithToTuple()}))]
    assert names == ["output[0]", "output[1]['a'][0]", "output[1]['b'][0]"]


def test_keyword_inputs_are_passed_to_both_models() -> None:
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            return self.fc(x) * mask

    model = Masked()
    report = verify(
        model, copy.deepcopy(model), (torch.randn(2, 4),), example_kwargs={"mask": torch.ones(2, 4)}
    )
    assert report.ok


def test_structure_difference_is_a_failure() -> None:
    class First(nn.Module):
        def __init__(self, inner: TwoInputsTupleOutput) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.inner(x, y)[0]

    model = TwoInputsTupleOutput()
    with pytest.raises(VerificationError, match="output structure differs"):
        verify(model, First(model), (torch.randn(2, 4), torch.randn(2, 4)))


def test_shape_difference_is_a_failure() -> None:
    with pytest.raises(VerificationError, match=r"shape differs: source \(5, 3\), grown \(5, 4\)"):
        verify(MLP(d_out=3), MLP(d_out=4), (torch.randn(5, 6),))


def test_grown_model_that_crashes_is_a_verification_error() -> None:
    with pytest.raises(VerificationError, match="the grown model failed to run") as caught:
        verify(MLP(d_in=6), MLP(d_in=7), (torch.randn(5, 6),))
    assert "lossless" in str(caught.value)


def test_inputs_and_modules_are_not_mutated() -> None:
    source = MLP().train()
    grown = widened_mlp(source).train()
    source_state = {k: v.clone() for k, v in source.state_dict().items()}
    grown_state = {k: v.clone() for k, v in grown.state_dict().items()}
    x = torch.randn(4, 6)
    x_before = x.clone()

    verify(source, grown, (x,), onnx=True)

    assert x.dtype == torch.float32
    torch.testing.assert_close(x, x_before, rtol=0.0, atol=0.0)
    for module, state in ((source, source_state), (grown, grown_state)):
        assert module.training
        for key, value in module.state_dict().items():
            assert value.dtype == torch.float32
            torch.testing.assert_close(value, state[key], rtol=0.0, atol=0.0)


def test_each_model_gets_a_fresh_copy_of_the_inputs() -> None:
    model = InPlaceInput()
    x = torch.randn(3, 4)
    x_before = x.clone()
    report = verify(model, copy.deepcopy(model), (x,))
    assert report.ok
    torch.testing.assert_close(x, x_before, rtol=0.0, atol=0.0)


def test_integer_inputs_stay_integers() -> None:
    model = TokenClassifier()
    ids = torch.randint(0, 11, (2, 5))
    report = verify(model, copy.deepcopy(model), (ids,), onnx=True)
    assert ids.dtype == torch.int64
    assert report.ok


def test_onnx_true_checks_in_onnxruntime_against_the_source() -> None:
    small = MLP()
    report = verify(small, widened_mlp(small), (torch.randn(5, 6),), onnx=True)
    assert report.ok
    assert report.onnx_outputs is not None and len(report.onnx_outputs) == 1
    assert report.onnx_path is None  # a temporary file, removed afterwards
    assert report.onnx_max_rel_error is not None and report.onnx_max_rel_error <= 1e-5
    assert (report.onnx_rtol, report.onnx_atol) == (1e-5, 1e-6)


def test_onnx_path_writes_a_checked_file(tmp_path: pathlib.Path) -> None:
    model = SDPABlock()
    target = tmp_path / "big.onnx"
    report = verify(model, torch.fx.symbolic_trace(model), (torch.randn(2, 5, 16),), onnx=target)
    assert report.ok
    assert report.onnx_path == target
    onnx.checker.check_model(str(target), full_check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx"]


def test_onnx_check_with_tuple_outputs_and_two_inputs(tmp_path: pathlib.Path) -> None:
    model = TwoInputsTupleOutput()
    report = verify(
        model,
        copy.deepcopy(model),
        (torch.randn(3, 4), torch.randn(3, 4)),
        onnx=str(tmp_path / "two.onnx"),
    )
    assert report.onnx_outputs is not None
    assert [o.name for o in report.onnx_outputs] == ["output[0]", "output[1]"]
    assert all(o.passed for o in report.onnx_outputs)


def test_onnx_mismatch_is_a_verification_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """An exported file that disagrees with the source must fail the ONNX check."""
    real_export = lemon_fx.verification.onnx_export.export_onnx

    def export_perturbed(module: nn.Module, *args: object, **kwargs: object) -> pathlib.Path:
        broken = copy.deepcopy(module)
        with torch.no_grad():
            broken.fc2.bias.add_(0.5)
        return real_export(broken, *args, **kwargs)

    monkeypatch.setattr(lemon_fx.verification.onnx_export, "export_onnx", export_perturbed)
    small = MLP()
    with pytest.raises(VerificationError, match="onnxruntime check in float32") as caught:
        verify(small, widened_mlp(small), (torch.randn(5, 6),), onnx=True)
    assert "output (shape [5, 3])" in str(caught.value)
    assert caught.value.report.onnx_max_abs_error >= 0.4


def test_export_failure_is_a_verification_error() -> None:
    class Eigen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            return torch.linalg.eigh(h @ h.T)[0]

    model = Eigen()
    with pytest.raises(VerificationError, match="ONNX export failed") as caught:
        verify(model, copy.deepcopy(model), (torch.randn(3, 3),), onnx=True)
    text = str(caught.value)
    assert "eigh" in text
    assert "opset" in text


def test_report_renders_and_serializes() -> None:
    model = TwoInputsTupleOutput()
    report = verify(model, copy.deepcopy(model), (torch.randn(3, 4), torch.randn(3, 4)), onnx=True)
    text = str(report)
    assert "verification: ok" in text
    assert "output[1]" in text and "onnxruntime" in text
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["ok"] is True
    assert data["outputs"][0]["shape"] == [3, 5]
    assert len(data["onnx_outputs"]) == 2


def test_failed_report_serializes_infinite_errors() -> None:
    with pytest.raises(VerificationError) as caught:
        verify(MLP(d_out=3), MLP(d_out=4), (torch.randn(5, 6),))
    data = caught.value.report.to_dict()
    assert data["ok"] is False
    assert data["outputs"][0]["max_abs_error"] == "inf"
    json.dumps(data, allow_nan=False)

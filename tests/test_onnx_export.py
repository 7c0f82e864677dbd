"""lemon_fx.export_onnx: a self-contained, checked, float32 file that onnxruntime runs.

Each export is compared with the module's own float32 torch output; the file must pass
``onnx.checker`` with ``full_check=True`` and stand alone (no external data file).
"""

from __future__ import annotations

import copy
import pathlib
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from cnn_zoo import ResNet, randomize_norms
from torch import nn

import lemon_fx
import lemon_fx.verification.onnx_export as onnx_export
from lemon_fx.errors import VerificationError
from lemon_fx.verification.onnx_export import export_onnx, onnx_input_feed


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.norm = nn.LayerNorm(12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.norm(self.fc1(x))))


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


class MHABlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


class TokenClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


class TwoInputsTupleOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x) + self.b(y), self.a(x) * 2


class Eigen(nn.Module):
    """torch.linalg.eigh has no ONNX translation in either exporter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigh(x @ x.T)[0]


def run_onnx(path: pathlib.Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})


def torch_outputs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model.eval()(*inputs)
    return list(out) if isinstance(out, tuple) else [out]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# Each model with example inputs; the same cases are exported with a fixed and a dynamic batch.
EXPORT_CASES = pytest.mark.parametrize(
    ("model", "inputs"),
    [
        (MLP(), (torch.randn(4, 6),)),
        (SDPABlock(), (torch.randn(2, 5, 16),)),
        (MHABlock(), (torch.randn(2, 5, 16),)),
        (TokenClassifier(), (torch.randint(0, 11, (2, 7)),)),
        (torch.fx.symbolic_trace(SDPABlock()), (torch.randn(2, 5, 16),)),
        (TwoInputsTupleOutput(), (torch.randn(3, 4), torch.randn(3, 4))),
    ],
    ids=["mlp", "sdpa", "mha", "embedding_int64", "graph_module", "two_inputs_tuple"],
)


@EXPORT_CASES
def test_export_matches_torch_in_onnxruntime(
    tmp_path: pathlib.Path, model: nn.Module, inputs: tuple[torch.Tensor, ...]
) -> None:
    path = export_onnx(model, inputs, tmp_path / "model.onnx")
    assert path == tmp_path / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    results = run_onnx(path, onnx_input_feed(inputs))
    expected = torch_outputs(copy.deepcopy(model), inputs)
    assert len(results) == len(expected)
    for got, want in zip(results, expected, strict=True):
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-6)


def test_file_is_self_contained_with_named_inputs_and_outputs(tmp_path: pathlib.Path) -> None:
    path = export_onnx(
        TwoInputsTupleOutput(), (torch.randn(3, 4), torch.randn(3, 4)), tmp_path / "two.onnx"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.onnx"]
    model = onnx.load(str(path), load_external_data=False)
    assert all(not t.external_data for t in model.graph.initializer)
    assert [i.name for i in model.graph.input] == ["input_0", "input_1"]
    assert [o.name for o in model.graph.output] == ["output_0", "output_1"]


def test_integer_input_keeps_int64(tmp_path: pathlib.Path) -> None:
    ids = torch.randint(0, 11, (2, 7))
    path = export_onnx(TokenClassifier(), ids, tmp_path / "ids.onnx")
    graph_input = onnx.load(str(path)).graph.input[0]
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert onnx_input_feed(ids)["input_0"].dtype == np.int64


def test_keyword_inputs_are_named_by_keyword(tmp_path: pathlib.Path) -> None:
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            return self.fc(x) * mask

    model, x, mask = Masked(), torch.randn(2, 4), torch.rand(2, 4)
    path = export_onnx(model, (x,), tmp_path / "kw.onnx", example_kwargs={"mask": mask})
    feed = onnx_input_feed((x,), {"mask": mask})
    assert sorted(feed) == ["input_0", "mask"]
    (got,) = run_onnx(path, feed)
    with torch.no_grad():
        want = model(x, mask=mask)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-6)


def test_module_and_inputs_are_not_mutated(tmp_path: pathlib.Path) -> None:
    model = MLP().double().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 6, dtype=torch.float64)
    x_before = x.clone()

    path = export_onnx(model, (x,), tmp_path / "mlp.onnx")

    assert model.training
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float64
        torch.testing.assert_close(value, state[key], rtol=0.0, atol=0.0)
    assert x.dtype == torch.float64
    torch.testing.assert_close(x, x_before, rtol=0.0, atol=0.0)
    # The file is float32 whatever the module's dtype.
    graph_input = onnx.load(str(path)).graph.input[0]
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_opset_is_honoured(tmp_path: pathlib.Path) -> None:
    path = export_onnx(MLP(), (torch.randn(2, 6),), tmp_path / "opset.onnx", opset=18)
    model = onnx.load(str(path))
    default_domain = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    assert default_domain == [18]


def test_export_is_quiet(tmp_path: pathlib.Path, capfd: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_onnx(MHABlock(), (torch.randn(2, 5, 16),), tmp_path / "quiet.onnx")
    assert [str(w.message) for w in caught] == []
    out, err = capfd.readouterr()
    assert out == ""
    assert err == ""


def test_export_failure_names_every_exporter_reason(tmp_path: pathlib.Path) -> None:
    with pytest.raises(VerificationError, match="ONNX export failed") as caught:
        export_onnx(Eigen(), (torch.randn(3, 3),), tmp_path / "eigh.onnx")
    text = str(caught.value)
    assert "TorchScript (dynamo=False) exporter failed" in text
    assert "eigh" in text
    assert "fix: try another opset" in text
    assert not (tmp_path / "eigh.onnx").exists()


@pytest.fixture()
def torchscript_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch.export-based exporter refuses every model: only TorchScript is left."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("torch.export refused this model")

    monkeypatch.setattr(onnx_export, "_export_dynamo", refuse)


def test_falls_back_to_torchscript_when_torch_export_fails(
    tmp_path: pathlib.Path, torchscript_only: None
) -> None:
    model, x = MLP(), torch.randn(3, 6)
    path = export_onnx(model, (x,), tmp_path / "fallback.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    (got,) = run_onnx(path, onnx_input_feed(x))
    torch.testing.assert_close(
        torch.from_numpy(got), torch_outputs(model, (x,))[0], rtol=1e-5, atol=1e-6
    )


# --- dynamic batch ---------------------------------------------------------------------------


def batch_dims(path: pathlib.Path) -> tuple[list[object], list[object]]:
    """Dimension 0 of each graph input and output: a name (``"batch"``) or a fixed size."""
    graph = onnx.load(str(path)).graph

    def first(value: onnx.ValueInfoProto) -> object:
        dims = value.type.tensor_type.shape.dim
        if not dims:
            return None
        return dims[0].dim_param or dims[0].dim_value

    return [first(v) for v in graph.input], [first(v) for v in graph.output]


def rows(inputs: tuple[torch.Tensor, ...], size: int) -> tuple[torch.Tensor, ...]:
    """``size`` rows drawn from each input's own rows, reversed: other values, other order."""
    index = torch.arange(size).flip(0) % inputs[0].shape[0]
    return tuple(t.index_select(0, index) for t in inputs)


def refused_dynamic_export(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], path: pathlib.Path
) -> str:
    """The text of the error a dynamic-batch export raises; no file may be left behind."""
    with pytest.raises(VerificationError) as caught:
        export_onnx(model, inputs, path, dynamic_batch=True)
    assert not path.exists()
    return str(caught.value)


@EXPORT_CASES
def test_dynamic_batch_file_runs_at_other_batch_sizes(
    tmp_path: pathlib.Path, model: nn.Module, inputs: tuple[torch.Tensor, ...]
) -> None:
    path = export_onnx(model, inputs, tmp_path / "dyn.onnx", dynamic_batch=True)
    onnx.checker.check_model(str(path), full_check=True)
    in_dims, out_dims = batch_dims(path)
    assert set(in_dims) == {"batch"} and set(out_dims) == {"batch"}
    for size in (1, 7):  # neither is the size the module was exported at
        other = rows(inputs, size)
        results = run_onnx(path, onnx_input_feed(other))
        expected = torch_outputs(copy.deepcopy(model), other)
        for got, want in zip(results, expected, strict=True):
            assert got.shape[0] == size
            torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-6)


def test_default_export_keeps_the_example_batch(tmp_path: pathlib.Path) -> None:
    path = export_onnx(MLP(), (torch.randn(4, 6),), tmp_path / "fixed.onnx")
    assert batch_dims(path) == ([4], [4])


def test_dynamic_batch_of_a_grown_model(tmp_path: pathlib.Path) -> None:
    source = randomize_norms(ResNet()).eval()
    x = torch.randn(2, 3, 16, 16)
    big = lemon_fx.grow(lemon_fx.trace(source, (x,)), lemon_fx.Plan(width=1.5, depth={"layer1": 4}))
    path = export_onnx(big, (x,), tmp_path / "resnet.onnx", dynamic_batch=True)
    fresh = torch.randn(5, 3, 16, 16)
    (got,) = run_onnx(path, onnx_input_feed(fresh))
    with torch.no_grad():
        want = source(fresh)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-5)


def test_only_outputs_that_follow_the_batch_are_dynamic(tmp_path: pathlib.Path) -> None:
    class LossAndLogits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            logits = self.fc(x)
            # a scalar, the batch, and a per-class summary whose size 3 equals the batch
            return logits.square().mean(), logits, logits.sum(0)

    x = torch.randn(3, 4)
    path = export_onnx(LossAndLogits(), (x,), tmp_path / "mixed.onnx", dynamic_batch=True)
    assert batch_dims(path) == (["batch"], [None, "batch", 3])
    results = run_onnx(path, onnx_input_feed(rows((x,), 5)))
    assert [r.shape for r in results] == [(), (5, 3), (3,)]


def test_a_model_that_fixes_its_batch_is_refused_before_export(tmp_path: pathlib.Path) -> None:
    class FixedBatch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x).reshape(4, 2, 3).sum(-1)

    text = refused_dynamic_export(FixedBatch(), (torch.randn(4, 6),), tmp_path / "fixed.onnx")
    assert text.startswith("cannot export with a dynamic batch")
    assert "the model itself fails at batch 1 (the example's is 4)" in text
    assert "read the size from the input (x.shape[0])" in text


class LoopOverBatch(nn.Module):
    """Runs at any batch size in torch, but a tracer unrolls the loop at the example's."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.fc(x[i]) * (i + 1) for i in range(x.shape[0])])


def test_a_file_that_only_runs_at_the_example_batch_is_refused(
    tmp_path: pathlib.Path, torchscript_only: None
) -> None:
    # Without the check this exports "successfully": the TorchScript tracer writes a file
    # that declares a dynamic batch and fails, or answers wrongly, at any other batch.
    text = refused_dynamic_export(LoopOverBatch(), (torch.randn(3, 6),), tmp_path / "loop.onnx")
    assert text.startswith("ONNX export failed")
    assert "TorchScript (dynamo=False) exporter failed: BatchMismatch:" in text
    assert "at batch 1" in text
    assert "holds the example's batch size as a constant" in text
    # The same model exports at its fixed batch.
    path = export_onnx(LoopOverBatch(), (torch.randn(3, 6),), tmp_path / "loop.onnx")
    assert batch_dims(path) == ([3], [3])


def test_inputs_that_disagree_on_the_batch_are_refused(tmp_path: pathlib.Path) -> None:
    class Two(nn.Module):
        def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            return x + bias

    text = refused_dynamic_export(Two(), (torch.randn(3, 5), torch.randn(5)), tmp_path / "t.onnx")
    assert text.startswith("cannot export with a dynamic batch")
    assert "the inputs disagree on dimension 0 (input_0: 3, input_1: 5)" in text


def test_external_data_is_written_and_checked_as_it_lies_on_disk(tmp_path: pathlib.Path
                                                                  ) -> None:
    # the path a model past protobuf's 2 GiB takes, forced at a small size
    torch.manual_seed(0)
    small = MLP().eval()
    gm = lemon_fx.trace(small, (torch.randn(2, 6),))
    big = lemon_fx.grow(gm, lemon_fx.Plan(width=2.0))
    x = torch.randn(3, 6)
    path = export_onnx(big, (x,), tmp_path / "big.onnx", external_data=True)
    data = tmp_path / "big.onnx.data"
    assert data.exists() and data.stat().st_size > 0
    proto = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, onnx_input_feed((x,), {}))
    np.testing.assert_allclose(got, small(x).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_a_broken_external_data_file_fails_the_check(tmp_path: pathlib.Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = onnx_export._save

    def save_then_corrupt(exported, path, external):
        wrote = real_save(exported, path, external)
        data = path.with_name(path.name + ".data")
        raw = bytearray(data.read_bytes())
        raw[:64] = bytes(64)  # zero the first weights
        data.write_bytes(bytes(raw))
        return wrote

    monkeypatch.setattr(onnx_export, "_save", save_then_corrupt)
    torch.manual_seed(0)
    with pytest.raises(VerificationError, match="external data does not match"):
        export_onnx(MLP().eval(), (torch.randn(2, 6),), tmp_path / "m.onnx", external_data=True)


def test_the_same_model_gives_the_same_onnx_file(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(0)
    gm = lemon_fx.trace(MLP().eval(), (torch.randn(2, 6),))
    files = []
    for i in range(2):
        big = lemon_fx.grow(gm, lemon_fx.Plan(width=2.0, seed=1))
        files.append(export_onnx(big, (torch.randn(2, 6),), tmp_path / f"{i}.onnx").read_bytes())
    assert files[0] == files[1]

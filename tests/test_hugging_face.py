"""Hugging Face transformers models, built from small configs with random weights (nothing
is downloaded), traced through the torch.export frontend and grown in width and depth.

LLaMA and Qwen2 compute their RMSNorm in float32 even in a float64 model (Hugging Face
casts there), so their checks are float32-accurate; GPT-2 and BERT are checked at 1e-10.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import lemon_fx
from lemon_fx import NotLosslessError, Plan

transformers = pytest.importorskip("transformers")  # a test extra: installed by .ci/run

VOCAB = 64


def _llama(scale: int = 1, layers: int = 2):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32 * scale, intermediate_size=64 * scale,
        num_hidden_layers=layers, num_attention_heads=4 * scale,
        num_key_value_heads=2 * scale, head_dim=8, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


def _qwen2(scale: int = 1, layers: int = 2):
    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32 * scale, intermediate_size=64 * scale,
        num_hidden_layers=layers, num_attention_heads=4 * scale,
        num_key_value_heads=2 * scale, max_position_embeddings=32)
    return transformers.Qwen2ForCausalLM(config)


def _gpt2(scale: int = 1, layers: int = 2):
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32 * scale, n_layer=layers,
                                     n_head=4 * scale, n_positions=32, bos_token_id=0,
                                     eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _bert(scale: int = 1, layers: int = 2):
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32 * scale,
                                     num_hidden_layers=layers, num_attention_heads=4 * scale,
                                     intermediate_size=64 * scale, max_position_embeddings=32)
    return transformers.BertForMaskedLM(config)


FAMILIES = {"llama": (_llama, 1e-6), "qwen2": (_qwen2, 1e-6), "gpt2": (_gpt2, 1e-10),
            "bert": (_bert, 1e-10)}
POST_LN = {"bert"}
STACKS = {"llama": "model.layers", "qwen2": "model.layers", "gpt2": "transformer.h",
          "bert": "bert.encoder.layer"}


def _logits(output):
    if isinstance(output, dict):
        return output["logits"]
    return output[0] if isinstance(output, (tuple, list)) else output.logits


def _traced(name: str, dtype: torch.dtype = torch.float64):
    build, tol = FAMILIES[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build().to(dtype).eval()
        gm = lemon_fx.trace(model, (torch.randint(0, VOCAB, (2, 6)),))
    return model, gm, tol


def _check(model, big, tol):
    ids = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = _logits(model(ids))
        got = _logits(big(ids))
    torch.testing.assert_close(got, want, rtol=0, atol=tol * (1 + want.abs().max().item()))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_traced_through_torch_export(name):
    model, gm, tol = _traced(name)
    assert gm.meta["lemon_fx.frontend"] == "torch.export"
    assert list(gm.state_dict()) == list(model.state_dict())
    report = lemon_fx.inspect(gm)
    assert [(s.name, s.count) for s in report.stacks] == [(STACKS[name], 2)]
    assert {"residual", "ffn"} <= {g.role for g in report.groups}


@pytest.mark.parametrize("width", [2.0, 3.0])  # Post-LN: whole multiples
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_width(name, width):
    model, gm, tol = _traced(name)
    if name in POST_LN and width == 1.5:
        with pytest.raises(NotLosslessError, match="whole multiple"):
            lemon_fx.grow(gm, Plan(width=width))
        return
    _check(model, lemon_fx.grow(gm, Plan(width=width)), tol)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_width_and_depth(name):
    model, gm, tol = _traced(name)
    big = lemon_fx.grow(gm, Plan(width=2.0, depth=2.0, allow_inexact=name in POST_LN))
    assert [(s.name, s.count) for s in lemon_fx.inspect(big).stacks] == [(STACKS[name], 4)]
    _check(model, big, tol if name not in POST_LN else 1e-9)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_grown_state_dict_loads_into_the_bigger_config(name):
    """2x width (eps unchanged), 2x depth: the same class with the doubled config."""
    model, gm, tol = _traced(name)
    big = lemon_fx.grow(gm, Plan(width=2.0, depth=2.0, allow_inexact=name in POST_LN))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        target = FAMILIES[name][0](scale=2, layers=4).double().eval()
    target.load_state_dict(big.state_dict(), strict=True)
    _check(model, target, tol if name not in POST_LN else 1e-9)


def test_gpt2_tied_head_stays_tied_with_the_1_over_k_rule():
    model, gm, tol = _traced("gpt2")
    big = lemon_fx.grow(gm, Plan(width=1.5))
    assert big.get_parameter("lm_head.weight") is big.get_parameter("transformer.wte.weight")
    _check(model, big, tol)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_through_onnxruntime(name):
    """Traced in float32: an export graph keeps the casts of the dtype it was traced in."""
    model, gm, tol = _traced(name, torch.float32)
    big = lemon_fx.grow(gm, Plan(width=2.0, depth=3))
    ids = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(2))
    report = lemon_fx.verify(gm, big, (ids,), onnx=True, rtol=1e-6, atol=1e-6)
    assert report.ok and report.onnx_max_rel_error <= 1e-5


# --- a vision CNN: Hugging Face ResNet (BatchNorm, in-place residual add, through torch.export)


def _resnet(layer_type: str, scale: float = 1, depths=(2, 1)):
    config = transformers.ResNetConfig(
        num_channels=3, embedding_size=int(8 * scale), hidden_sizes=[int(8 * scale),
        int(16 * scale)], depths=list(depths), layer_type=layer_type, num_labels=5)
    return transformers.ResNetForImageClassification(config)


def _traced_cnn(build):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build().double().eval()
    with torch.no_grad():  # trained-looking statistics: the rule must carry all four tensors
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = lemon_fx.trace(model, (torch.randn(2, 3, 32, 32, dtype=torch.float64),))
    return model, gm


def _traced_resnet(layer_type: str):
    return _traced_cnn(lambda: _resnet(layer_type))


def _check_images(model, big, tol=1e-10):
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = _logits(model(x))
        got = _logits(big(x))
    torch.testing.assert_close(got, want, rtol=0, atol=tol * (1 + want.abs().max().item()))


@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_resnet_width_and_depth(layer_type):
    model, gm = _traced_resnet(layer_type)
    assert gm.meta["lemon_fx.frontend"] == "torch.export"
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert {"aten.batch_norm.default", "aten.add_.Tensor"} <= targets  # the ATen spellings
    stage = "resnet.encoder.stages.0.layers"
    big = lemon_fx.grow(gm, Plan(width=1.5, depth={stage: 4}))  # 1.5x: not a multiple
    _check_images(model, big)
    counts = {s.name: s.count for s in lemon_fx.inspect(big).stacks}
    assert counts[stage] == 4
    # LEMON for ResNets: a new block's branch ends in a BatchNorm with gamma = beta = 0
    last_norm = {"basic": "layer.1", "bottleneck": "layer.2"}[layer_type]
    for index in (1, 3):
        gamma = big.get_parameter(f"{stage}.{index}.{last_norm}.normalization.weight")
        assert torch.count_nonzero(gamma) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        target = _resnet(layer_type, scale=1.5, depths=(4, 1)).double().eval()
    target.load_state_dict(big.state_dict(), strict=True)
    _check_images(model, target)


def test_resnet_through_onnxruntime():
    model, gm = _traced_resnet("basic")
    big = lemon_fx.grow(gm, Plan(width=2.0))
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    report = lemon_fx.verify(gm, big, (x,), onnx=True)
    assert report.ok and report.max_abs_error <= 1e-10


def test_phi3_with_an_empty_rotary_remainder_grows_in_depth():
    """Full rotary makes ``q[..., rotary_dim:]`` an empty axis; it crashed the form solver
    (integer modulo by zero) for every plan, depth-only too."""
    config = transformers.Phi3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.Phi3ForCausalLM(config).double().eval()
        gm = lemon_fx.trace(model, (torch.randint(0, VOCAB, (2, 6)),))
    _check(model, lemon_fx.grow(gm, Plan(depth=2.0)), 1e-10)
    # the slices of q/k pick from a head's dims, which a bare width keeps: it grows
    _check(model, lemon_fx.grow(gm, Plan(width=2.0)), 1e-10)
    with pytest.raises(lemon_fx.LemonError, match="picked by position"):
        lemon_fx.grow(gm, Plan(width={"@head_dim": 2.0}))  # refused, not a crash


def test_a_base_model_says_its_returned_hidden_width_stays():
    """BertModel returns its residual stream, so a bare width cannot grow it: the growth
    report says so instead of silently growing only the heads and FFNs."""
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=32)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = transformers.BertModel(config).double().eval()
        gm = lemon_fx.trace(base, (torch.randint(0, VOCAB, (2, 6)),))
    big = lemon_fx.grow(gm, Plan(width=2.0))
    (note,) = lemon_fx.growth_report(big).notes
    assert note.startswith("width 32 is kept at its size: it is the model's hidden width")
    _, gm_mlm, _ = _traced("bert")
    assert lemon_fx.growth_report(lemon_fx.grow(gm_mlm, Plan(width=2.0))).notes == []


VISION_CNNS = {
    # ReLU6 (aten.hardtanh), in-place dropout, depthwise convs
    "mobilenet_v2": lambda: transformers.MobileNetV2ForImageClassification(
        transformers.MobileNetV2Config(num_channels=3, image_size=32, depth_multiplier=0.25,
                                       num_labels=5)),
    # "same" padding with F.pad, squeeze-excitation, SiLU
    "efficientnet": lambda: transformers.EfficientNetForImageClassification(
        transformers.EfficientNetConfig(num_channels=3, image_size=32, width_coefficient=0.25,
                                        depth_coefficient=0.25, hidden_dim=320, num_labels=5)),
}


@pytest.mark.parametrize("width", [2.0, 3.0])  # Post-LN: whole multiples
@pytest.mark.parametrize("name", sorted(VISION_CNNS))
def test_vision_cnns_grow_in_width(name, width):
    model, gm = _traced_cnn(VISION_CNNS[name])
    big = lemon_fx.grow(gm, Plan(width=width))
    assert sum(p.numel() for p in big.parameters()) > sum(p.numel() for p in model.parameters())
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = _logits(model(x))
    assert want.abs().max() > 1e-3  # a check of numbers, not of zeros
    _check_images(model, big)


def _trained_looking_family(family: str):
    """A family's float64 model with every parameter moved off its init, and its tolerance."""
    build, tolerance = FAMILIES[family]
    torch.manual_seed(0)
    model = build().double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, tolerance


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_the_usual_causal_lm_call_traces_and_grows(family: str) -> None:
    # model(ids, attention_mask=mask, use_cache=False): keywords that skip arguments, one
    # of them no tensor; before, "keyword inputs leave a gap in forward"
    model, tolerance = _trained_looking_family(family)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.long)
    gm = lemon_fx.trace(model, (ids,), example_kwargs={"attention_mask": mask,
                                                       "use_cache": False})
    big = lemon_fx.grow(gm, Plan(width=2.0))
    fresh = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    report = lemon_fx.verify(gm, big, (fresh,), example_kwargs={"attention_mask": mask},
                             rtol=tolerance, atol=tolerance)
    assert report.ok


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_a_grown_export_graph_returns_the_models_own_output(family: str) -> None:
    model, tolerance = _trained_looking_family(family)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    kwargs = {"use_cache": False} if family == "llama" else {}
    gm = lemon_fx.trace(model, (ids,), example_kwargs=kwargs)
    big = lemon_fx.grow(gm, Plan(width=2.0))
    fresh = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(fresh, **kwargs), big(fresh, **kwargs)
    assert type(got) is type(want) and list(got.keys()) == list(want.keys())
    # the original model object, not its trace, is the reference
    assert lemon_fx.verify(model, big, (fresh,), example_kwargs=kwargs, rtol=tolerance,
                           atol=tolerance).ok


@pytest.mark.parametrize("width", [2.0, 3.0])  # Post-LN: whole multiples
def test_a_bare_bert_grows_its_hidden_width_with_grow_outputs(width: float) -> None:
    def config(scale: float) -> object:
        return transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=int(32 * scale), num_hidden_layers=2,
            num_attention_heads=int(4 * scale), intermediate_size=int(64 * scale),
            max_position_embeddings=32)

    torch.manual_seed(0)
    model = transformers.BertModel(config(1), add_pooling_layer=False).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    gm = lemon_fx.trace(model, (ids,))
    kept = lemon_fx.grow(gm, Plan(width=width))  # the default keeps the returned width
    assert kept(ids).last_hidden_state.shape[-1] == 32
    big = lemon_fx.grow(gm, Plan(width=width, grow_outputs=True))
    assert any("its first 32 entries are the source's" in n
               for n in lemon_fx.growth_report(big).notes)
    fresh = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    assert lemon_fx.verify(model, big, (fresh,)).ok  # compares the first 32 entries
    bigger = transformers.BertModel(config(width), add_pooling_layer=False).double().eval()
    bigger.load_state_dict(big.state_dict(), strict=True)
    with torch.no_grad():
        got = bigger(fresh).last_hidden_state
        want = model(fresh).last_hidden_state
    assert got.shape[-1] == int(32 * width)
    torch.testing.assert_close(got[..., :32], want, rtol=0, atol=1e-10)


def test_an_output_whose_first_entries_would_move_is_refused() -> None:
    class CatOut(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 6), torch.nn.Linear(4, 3)

        def forward(self, x):  # the first part grows: the second part's entries move
            return torch.cat([torch.relu(self.a(x)), self.b(x)], -1)

    gm = lemon_fx.trace(CatOut().double(), (torch.randn(2, 4, dtype=torch.float64),))
    with pytest.raises(NotLosslessError, match="first 9 entries would not be the source"):
        lemon_fx.grow(gm, Plan(width=2.0, grow_outputs=True))

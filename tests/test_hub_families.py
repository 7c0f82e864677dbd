"""grow_pretrained on more Hugging Face families: Mistral, Qwen3, GPT-NeoX, OPT, Gemma, a bare
BertModel, ViT (classifier and bare). Real transformers classes from tiny configs (hidden 32,
2 layers, vocab 64, 32 positions), random weights, nothing downloaded.

Every case goes save_pretrained -> grow_pretrained -> from_pretrained and is then checked
here, independently of grow_pretrained's own check: the grown config.json sizes, the class
it names, the outputs on fresh inputs (float32 tolerance) and, for causal LMs, greedy
generate() with the KV cache."""

from __future__ import annotations

import json

import pytest
import torch

import lemon_fx
from lemon_fx import LemonError, Plan, PlanError

transformers = pytest.importorskip("transformers")

VOCAB = 64
HIDDEN = 32
FFN = 64
TOL = {"atol": 1e-4, "rtol": 1e-4}


def _saved(build, folder):
    """A model whose every parameter is off its init (norm weights, biases: a misplaced
    entry is invisible at init), saved with save_pretrained."""
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32}))
    return model


def _ids(batch, length, seed):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _pixels(seed):
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _grown_config(out):
    return json.loads((out / "config.json").read_text())


# ---------------------------------------------------------------------------------------------
# causal LMs


def _mistral():
    return transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32))


def _qwen3():
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32))


def _neox():
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=32))


def _opt():
    return transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=FFN, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=32))


def _gemma(tied=True):
    return transformers.GemmaForCausalLM(transformers.GemmaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
        tie_word_embeddings=tied))


def _mixtral():
    """Mixture of experts through transformers' default experts (grouped_mm)."""
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
        num_local_experts=4, num_experts_per_tok=2))


def _qwen2_moe():
    """Experts sized by moe_intermediate_size, a shared expert by its own field."""
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=FFN,
        shared_expert_intermediate_size=2 * FFN))


# family -> (builder, the config's name for the FFN width, key/value heads grown from 2 to 4)
CAUSAL = {
    "mixtral": (_mixtral, "intermediate_size", True),
    "qwen2_moe": (_qwen2_moe, "moe_intermediate_size", True),
    "mistral": (_mistral, "intermediate_size", True),
    "qwen3": (_qwen3, "intermediate_size", True),
    "gpt_neox": (_neox, "intermediate_size", False),
    "opt": (_opt, "ffn_dim", False),
}

CAUSAL_CASES = []
for _family in sorted(CAUSAL):
    for _depth in (None, 2.0):
        CAUSAL_CASES.append(pytest.param(
            _family, _depth,
            id=f"{_family}-width2" + ("-depth2" if _depth else "")))


def _check_causal_folder(model, out, report, ffn_name, kv_grows, layers):
    """The grown folder ``out`` against the source ``model``: config sizes, class, logits on
    fresh ids, greedy tokens with the KV cache."""
    config = _grown_config(out)
    assert config["architectures"] == [type(model).__name__]
    assert config["hidden_size"] == 2 * HIDDEN
    assert config[ffn_name] == 2 * FFN
    assert config["num_attention_heads"] == 8
    if kv_grows:
        assert config["num_key_value_heads"] == 4
        assert config.get("head_dim", HIDDEN // 4) == 8  # Qwen2-MoE derives it
    assert config["num_hidden_layers"] == layers
    for name, (_, grown) in report.config.items():  # the report states what was written
        assert config[name] == grown
    assert report.generate_equal is True
    assert report.max_abs_error < 1e-4

    grown = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(grown) is type(model)
    assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in model.parameters())
    ids = _ids(2, 10, seed=11)  # not the inputs grow_pretrained checked on
    with torch.no_grad():
        torch.testing.assert_close(grown(ids).logits, model(ids).logits, **TOL)
        prompt = _ids(1, 5, seed=12)
        mask = torch.ones_like(prompt)
        kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=True,
                      pad_token_id=0)
        want = model.generate(prompt, **kwargs)
        got = grown.generate(prompt, **kwargs)
    assert want.shape == (1, 11)
    assert torch.equal(got, want)


@pytest.mark.parametrize(("family", "depth"), CAUSAL_CASES)
def test_a_causal_lm_folder_grows_and_reloads_exactly(tmp_path, family, depth):
    build, ffn_name, kv_grows = CAUSAL[family]
    model = _saved(build, tmp_path / "small")
    report = lemon_fx.grow_pretrained(tmp_path / "small", Plan(width=2.0, depth=depth),
                                      tmp_path / "big")
    _check_causal_folder(model, tmp_path / "big", report, ffn_name, kv_grows,
                         layers=4 if depth else 2)


@pytest.mark.parametrize("family", ["gpt_neox"])
def test_a_causal_lm_object_grows_and_reloads_exactly(tmp_path, family):
    """The model-object path does not read the checkpoint's key names: GPT-NeoX grows there,
    which places its folder failure in the reading of the source checkpoint."""
    build, ffn_name, kv_grows = CAUSAL[family]
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    report = lemon_fx.grow_pretrained(model, Plan(width=2.0), tmp_path / "big")
    _check_causal_folder(model, tmp_path / "big", report, ffn_name, kv_grows, layers=2)


# ---------------------------------------------------------------------------------------------
# Gemma: RMSNorm is x * (1 + w), the head is tied to the embedding, the embedding is scaled by
# sqrt(hidden_size)


@pytest.mark.parametrize("depth", [None, 2.0], ids=["width2", "width2-depth2"])
def test_a_tied_gemma_is_refused_before_anything_is_written(tmp_path, depth):
    # the graph grows (the tied head's 1/k goes on the final norm's 1 + w), but a config
    # with a larger hidden_size would scale the embeddings by another sqrt(hidden_size)
    _saved(_gemma, tmp_path / "small")
    with pytest.raises(PlanError, match="cannot express") as err:
        lemon_fx.grow_pretrained(tmp_path / "small", Plan(width=2.0, depth=depth),
                                 tmp_path / "big")
    assert isinstance(err.value, LemonError) and "embed_scale" in str(err.value)
    assert not (tmp_path / "big").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["small"]  # no staging folder either


def test_an_untied_gemma_is_refused_for_its_scaled_embedding(tmp_path):
    # GemmaTextScaledWordEmbedding multiplies by sqrt(hidden_size), computed from the config:
    # a model built from the grown config would scale by sqrt(64), the source by sqrt(32)
    _saved(lambda: _gemma(tied=False), tmp_path / "small")
    with pytest.raises(PlanError, match="cannot express") as err:
        lemon_fx.grow_pretrained(tmp_path / "small", Plan(width=2.0), tmp_path / "big")
    assert "embed_scale" in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == ["small"]


def test_an_untied_gemma_grows_where_the_residual_keeps_its_width(tmp_path):
    model = _saved(lambda: _gemma(tied=False), tmp_path / "small")
    report = lemon_fx.grow_pretrained(tmp_path / "small", Plan(width={"@ffn": 2.0}, depth=2.0),
                                      tmp_path / "big")
    config = _grown_config(tmp_path / "big")
    assert config["hidden_size"] == HIDDEN and config["num_hidden_layers"] == 4
    assert report.generate_equal is True
    _ = model


# ---------------------------------------------------------------------------------------------
# encoders: a bare BertModel, ViT classifier, a bare ViTModel


def _bert():
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=32))


def _vit_config(**kw):
    return transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=HIDDEN,
                                  intermediate_size=FFN, num_hidden_layers=2,
                                  num_attention_heads=4, **kw)


def _vit_classifier():
    return transformers.ViTForImageClassification(_vit_config(num_labels=5))


def _vit_model():
    return transformers.ViTModel(_vit_config())




def _check_encoder_config(out, cls, layers):
    config = _grown_config(out)
    assert config["architectures"] == [cls.__name__]
    assert config["hidden_size"] == 2 * HIDDEN
    assert config["intermediate_size"] == 2 * FFN
    assert config["num_attention_heads"] == 8
    assert config["num_hidden_layers"] == layers


def _assert_leading(got, want):
    """The first S entries of the grown output's last axis are the source's output."""
    assert got.shape[:-1] == want.shape[:-1] and got.shape[-1] == 2 * want.shape[-1]
    torch.testing.assert_close(got[..., :want.shape[-1]], want, **TOL)


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_a_bare_model_grows_its_outputs(tmp_path, family):
    build, cls, inputs = {"bert": (_bert, transformers.BertModel, lambda: _ids(2, 10, seed=11)),
                          "vit": (_vit_model, transformers.ViTModel, lambda: _pixels(seed=11))
                          }[family]
    model = _saved(build, tmp_path / "small")
    report = lemon_fx.grow_pretrained(tmp_path / "small", Plan(width=2.0, grow_outputs=True),
                                      tmp_path / "big")
    _check_encoder_config(tmp_path / "big", cls, layers=2)
    assert report.generate_equal is None
    grown = transformers.AutoModel.from_pretrained(tmp_path / "big").eval()
    assert type(grown) is cls
    x = inputs()
    with torch.no_grad():
        want, got = model(x), grown(x)
    _assert_leading(got.last_hidden_state, want.last_hidden_state)
    _assert_leading(got.pooler_output, want.pooler_output)


@pytest.mark.parametrize("depth", [None, 2.0], ids=["width2", "width2-depth2"])
def test_a_vit_classifier_folder_grows_and_reloads_exactly(tmp_path, depth):
    model = _saved(_vit_classifier, tmp_path / "small")
    report = lemon_fx.grow_pretrained(tmp_path / "small", Plan(width=2.0, depth=depth),
                                      tmp_path / "big")
    _check_encoder_config(tmp_path / "big", transformers.ViTForImageClassification,
                          layers=4 if depth else 2)
    assert report.generate_equal is None and report.max_abs_error < 1e-4
    grown = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "big")
    grown.eval()
    assert type(grown) is transformers.ViTForImageClassification
    pixels = _pixels(seed=11)
    with torch.no_grad():
        torch.testing.assert_close(grown(pixels).logits, model(pixels).logits, **TOL)


def test_a_vit_classifier_object_grows_and_reloads_exactly(tmp_path):
    """Contrast to the folder case above: with the model object (real weights, no meta
    device) the same growth traces, writes and reloads exactly."""
    torch.manual_seed(0)
    model = _vit_classifier().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    report = lemon_fx.grow_pretrained(model, Plan(width=2.0, depth=2.0), tmp_path / "big")
    _check_encoder_config(tmp_path / "big", transformers.ViTForImageClassification, layers=4)
    assert report.generate_equal is None and report.max_abs_error < 1e-4
    grown = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "big")
    grown.eval()
    pixels = _pixels(seed=11)
    with torch.no_grad():
        torch.testing.assert_close(grown(pixels).logits, model(pixels).logits, **TOL)



"""grow_pretrained: save_pretrained -> grow_pretrained -> from_pretrained -> same outputs, same
greedy tokens; real transformers classes from small configs, nothing downloaded."""

from __future__ import annotations

import json

import pytest
import torch

import lemon_fx
from lemon_fx import Plan, PlanError, VerificationError

transformers = pytest.importorskip("transformers")

VOCAB = 64


def _llama(scale=1):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32 * scale, intermediate_size=64 * scale,
        num_hidden_layers=2, num_attention_heads=4 * scale, num_key_value_heads=2 * scale,
        head_dim=8, max_position_embeddings=32))


def _gpt2(scale=1):
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32 * scale, n_layer=2, n_head=4 * scale, n_positions=32,
        bos_token_id=0, eos_token_id=0))


def _qwen2(scale=1):
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32 * scale, intermediate_size=64 * scale,
        num_hidden_layers=2, num_attention_heads=4 * scale, num_key_value_heads=2 * scale,
        max_position_embeddings=32))


def _bert(scale=1):
    return transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32 * scale, num_hidden_layers=2,
        num_attention_heads=4 * scale, intermediate_size=64 * scale,
        max_position_embeddings=32))


FAMILIES = {"llama": _llama, "gpt2": _gpt2, "qwen2": _qwen2, "bert": _bert}


def _saved(build, folder):
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():  # trained-looking: norms and biases off their init
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32}))
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_grown_folder_reloads_with_from_pretrained_and_computes_the_same(tmp_path, family):
    model = _saved(FAMILIES[family], tmp_path / "small")
    plan = Plan(width=2.0, depth=2.0, allow_inexact=family == "bert")
    report = lemon_fx.grow_pretrained(tmp_path / "small", plan, tmp_path / "big")
    out = tmp_path / "big"
    assert (out / "config.json").exists() and (out / "README.md").exists()
    assert (out / "tokenizer_config.json").exists()  # carried over
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.num_hidden_layers == 4 and config.hidden_size == 64
    assert config.num_attention_heads == 8
    bigger = transformers.AutoModelForMaskedLM if family == "bert" else \
        transformers.AutoModelForCausalLM
    grown = bigger.from_pretrained(out).eval()
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(grown(ids).logits, model(ids).logits, rtol=1e-4,
                                   atol=1e-5)
    assert report.generate_equal is (None if family == "bert" else True)
    assert "lemon_fx" in (out / "README.md").read_text()


def test_a_tied_head_stays_tied(tmp_path):
    _saved(_gpt2, tmp_path / "small")
    lemon_fx.grow_pretrained(tmp_path / "small", Plan(width=2.0), tmp_path / "big")
    grown = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "big")
    assert grown.lm_head.weight is grown.transformer.wte.weight


def test_a_plan_the_config_cannot_express_writes_nothing(tmp_path):
    _saved(_llama, tmp_path / "small")
    plan = Plan(width={"model.layers.0.mlp.ffn": 128})  # one layer wider than the other
    with pytest.raises(PlanError, match="different sizes"):
        lemon_fx.grow_pretrained(tmp_path / "small", plan, tmp_path / "big")
    assert not (tmp_path / "big").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["small"]


def test_a_failed_check_leaves_no_folder(tmp_path, monkeypatch):
    import lemon_fx.hub.hugging_face as hub

    _saved(_llama, tmp_path / "small")

    def fail(*args):
        raise VerificationError("the grown folder differs")

    monkeypatch.setattr(hub, "_check", fail)
    with pytest.raises(VerificationError):
        lemon_fx.grow_pretrained(tmp_path / "small", Plan(width=2.0), tmp_path / "big")
    assert [p.name for p in tmp_path.iterdir()] == ["small"]


def test_a_model_object_grows_too(tmp_path):
    torch.manual_seed(0)
    model = _qwen2().eval()
    report = lemon_fx.grow_pretrained(model, Plan(width=2.0), tmp_path / "big")
    assert report.config["hidden_size"] == (32, 64)
    assert report.generate_equal


def test_a_non_multiple_width_writes_the_norms_scaled_eps(tmp_path):
    # at 1.5x the RMSNorm's eps becomes alpha * eps in the graph; the config must say so,
    # or the reloaded model normalizes with another eps
    model = _saved(_llama, tmp_path / "small")
    growth = lemon_fx.grow_pretrained(tmp_path / "small", Plan(width=1.5), tmp_path / "big")
    config = json.loads((tmp_path / "big" / "config.json").read_text())
    assert config["hidden_size"] == 48
    assert config["rms_norm_eps"] == pytest.approx(model.config.rms_norm_eps * 32 / 48)
    assert growth.config["rms_norm_eps"][0] == model.config.rms_norm_eps
    grown = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "big").eval()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(grown(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)

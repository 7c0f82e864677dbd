"""A grown state_dict loads strictly into the model's own class built at the grown config,
and that model computes the source's function (float64, fresh inputs, weights off their
init). timm BEiT: constants fx lifts out of forward stay out of the state_dict, and its fused
bias ``cat(q_bias, k_bias, v_bias)`` viewed as ``[3, H, Dh]`` grows with the attention.
GPT-Neo: a bare width keeps the value head size (``att @ v``'s last axis) as it keeps
q's and k's head_dim, so the doubled config's v_proj fits."""

from __future__ import annotations

import pytest
import torch

import lemon_fx
from lemon_fx import Plan

CONFIG = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5)


def _beit(**changes):
    timm = pytest.importorskip("timm")
    return timm.create_model("beit_base_patch16_224", pretrained=False,
                             **dict(CONFIG, **changes)).double().eval()


@pytest.mark.parametrize(("plan", "grown"), [
    (Plan(depth=2.0), dict(depth=4)),
    (Plan(width=2.0), dict(embed_dim=128, num_heads=4)),
    (Plan(width=2.0, depth=2.0), dict(embed_dim=128, num_heads=4, depth=4)),
], ids=["depth", "width", "width+depth"])
def test_a_grown_beit_loads_strictly_into_beit(plan, grown):
    torch.manual_seed(0)
    source = _beit()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.02 * torch.randn_like(p))
    gm = lemon_fx.trace(source, (torch.randn(1, 3, 32, 32, dtype=torch.float64),))
    assert not [k for k in gm.state_dict() if k not in source.state_dict()]
    big = lemon_fx.grow(gm, plan)
    target = _beit(**grown)
    target.load_state_dict(big.state_dict(), strict=True)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=1e-10, atol=1e-10)
    assert sum(p.numel() for p in target.parameters()) > 1.5 * sum(
        p.numel() for p in source.parameters())


def test_a_bare_width_keeps_the_value_head_size():
    transformers = pytest.importorskip("transformers")
    config = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                  attention_types=[[["global", "local"], 1]], max_position_embeddings=32,
                  window_size=8, eos_token_id=0, bos_token_id=0)
    torch.manual_seed(0)
    source = transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(**config)).double().eval()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.02 * torch.randn_like(p))
    gm = lemon_fx.trace(source, (torch.randint(0, 64, (1, 6)),), {"use_cache": False})
    big = lemon_fx.grow(gm, Plan(width=2.0))
    target = transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(
        **dict(config, hidden_size=64, num_heads=8))).double().eval()
    target.load_state_dict(big.state_dict(), strict=True)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(target(ids).logits, source(ids).logits, rtol=1e-10,
                                   atol=1e-10)


def test_a_bare_width_that_keeps_the_hidden_width_says_so_and_grow_outputs_grows_it():
    # BART returns encoder_last_hidden_state: d_model is an output width
    transformers = pytest.importorskip("transformers")
    config = dict(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                  decoder_ffn_dim=64, max_position_embeddings=32)
    torch.manual_seed(0)
    source = transformers.BartForConditionalGeneration(
        transformers.BartConfig(**config)).double().eval()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ids = torch.randint(3, 64, (1, 6))
    gm = lemon_fx.trace(source, (ids,), {"decoder_input_ids": ids, "use_cache": False})
    with pytest.warns(UserWarning, match=r"width 32 is kept at its size.*grow_outputs=True"):
        kept = lemon_fx.grow(gm, Plan(width=2.0))
    assert any("width 32 is kept" in n for n in lemon_fx.growth_report(kept).notes)
    big = lemon_fx.grow(gm, Plan(width=2.0, grow_outputs=True))
    target = transformers.BartForConditionalGeneration(transformers.BartConfig(**dict(
        config, d_model=64, encoder_attention_heads=8, decoder_attention_heads=8,
        encoder_ffn_dim=128, decoder_ffn_dim=128))).double().eval()
    target.load_state_dict(big.state_dict(), strict=True)
    x = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(target(x, decoder_input_ids=x).logits,
                                   source(x, decoder_input_ids=x).logits, rtol=1e-10,
                                   atol=1e-10)

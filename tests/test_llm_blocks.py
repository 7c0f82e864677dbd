"""Modern LLM blocks: decomposed RMSNorm, grouped-query attention, rotary embeddings,
q/k/v biases and a tied LM head, in one LLaMA/Qwen2-like model written the way Hugging
Face writes it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lemon_fx
from lemon_fx import Plan


class DecomposedRMSNorm(nn.Module):
    """Hugging Face LLaMA's RMSNorm, optionally without its float32 round trip."""

    def __init__(self, dim: int, eps: float, upcast: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)
        self.variance_epsilon = eps
        self.upcast = upcast

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        if self.upcast:
            hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(x, n_rep: int):
    """Hugging Face's repeat_kv: expand + reshape."""
    B, H, T, D = x.shape
    if n_rep == 1:
        return x
    x = x[:, :, None, :, :].expand(B, H, n_rep, T, D)
    return x.reshape(B, H * n_rep, T, D)


class Attention(nn.Module):
    def __init__(self, dim, heads, kv_heads, qkv_bias, gqa_spelling):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=False)
        self.gqa_spelling = gqa_spelling
        inv_freq = 1.0 / (10000 ** (torch.arange(0, self.head_dim, 2).double() / self.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        t = torch.arange(T, device=x.device, dtype=self.inv_freq.dtype)
        freqs = torch.outer(t, self.inv_freq) if False else t[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.heads // self.kv_heads
        if self.gqa_spelling == "enable_gqa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=rep > 1)
        else:
            if self.gqa_spelling == "repeat_kv":
                k, v = repeat_kv(k, rep), repeat_kv(v, rep)
            elif rep > 1:
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class DecoderLayer(nn.Module):
    def __init__(self, dim, heads, kv_heads, qkv_bias, gqa_spelling, upcast):
        super().__init__()
        self.input_layernorm = DecomposedRMSNorm(dim, 1e-2, upcast)
        self.self_attn = Attention(dim, heads, kv_heads, qkv_bias, gqa_spelling)
        self.post_attention_layernorm = DecomposedRMSNorm(dim, 1e-2, upcast)
        self.gate_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.up_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.down_proj = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class LlamaLike(nn.Module):
    def __init__(self, dim=32, heads=4, kv_heads=2, depth=2, vocab=40, qkv_bias=False,
                 gqa_spelling="repeat_kv", tied=False, upcast=False):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, kv_heads, qkv_bias, gqa_spelling,
                                                 upcast) for _ in range(depth))
        self.norm = DecomposedRMSNorm(dim, 1e-2, upcast)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


VARIANTS = {
    "llama (repeat_kv)": dict(),
    "qwen2 (q/k/v bias)": dict(qkv_bias=True),
    "repeat_interleave": dict(gqa_spelling="repeat_interleave"),
    "enable_gqa": dict(gqa_spelling="enable_gqa"),
    "multi-head (no GQA)": dict(kv_heads=4),
    "tied embeddings": dict(tied=True),
}


def _traced(**config):
    torch.manual_seed(0)
    model = LlamaLike(**config).double().eval()
    gm = lemon_fx.trace(model, (torch.randint(0, 40, (2, 6)),))
    return model, gm


def _check(model, big, atol=1e-10):
    ids = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(1))
    want = model(ids)
    torch.testing.assert_close(big(ids), want, rtol=0, atol=atol * (1 + want.abs().max().item()))


@pytest.mark.parametrize("plan", [Plan(width=2.0), Plan(width=1.5, seed=1),
                                  Plan(width={"@residual": 40, "@ffn": 1.25, "@kv_heads": 3,
                                              "@heads": 5}),
                                  Plan(width=2.0, depth=2.0)],
                         ids=["2x", "1.5x", "40 wide", "2x wide and deep"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_llm_variants_grow_losslessly(variant, plan):
    model, gm = _traced(**VARIANTS[variant])
    big = lemon_fx.grow(gm, plan)
    _check(model, big)


def test_rmsnorm_is_found_and_its_eps_and_weight_rescaled():
    model, gm = _traced()
    report = lemon_fx.inspect(gm)
    roles = {g.role for g in report.groups}
    assert roles >= {"residual", "ffn", "head_dim"} and roles & {"heads", "kv_heads"}
    assert report.group("residual").form == "zero"
    big = lemon_fx.grow(gm, Plan(width=1.5))
    alpha = 32 / 48
    assert f"{1e-2 * alpha!r}" in big.code
    torch.testing.assert_close(big.norm.weight[:32], model.norm.weight * alpha**0.5, rtol=0,
                               atol=1e-15)


def test_kv_heads_grow_in_step_with_query_heads():
    model, gm = _traced()
    big = lemon_fx.grow(gm, Plan(width=2.0))
    attn = big.get_submodule("layers.0.self_attn")
    assert attn.q_proj.out_features == 64 and attn.k_proj.out_features == 32


def test_float32_round_trip_inside_the_norm():
    torch.manual_seed(0)
    model = LlamaLike(upcast=True).eval()
    gm = lemon_fx.trace(model, (torch.randint(0, 40, (2, 6)),))
    big = lemon_fx.grow(gm, Plan(width=1.5))
    ids = torch.randint(0, 40, (3, 9))
    torch.testing.assert_close(big(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_rmsnorm_without_weight_refuses_non_multiples():
    class NoWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.out = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = self.inp(x)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
            return self.out(h)

    gm = lemon_fx.trace(NoWeight().double(), (torch.randn(3, 4, dtype=torch.float64),))
    lemon_fx.grow(gm, Plan(width=2.0))
    with pytest.raises(lemon_fx.NotLosslessError, match="nowhere to put the factor eta"):
        lemon_fx.grow(gm, Plan(width=1.5))

"""Grown models load strictly into the bigger config of their own class.

The contract promises that a grown state_dict keeps the source's key names, with new blocks
numbered in place, so ``TargetClass(bigger config).load_state_dict(big.state_dict())`` works
with ``strict=True`` for the usual naming schemes: timm (``blocks.N``), Hugging Face
(``model.layers.N``) and torchvision (``encoder.layers.encoder_layer_N``). These tests build
the bigger model fresh, load the grown weights into it, and check it computes what the grown
GraphModule computes (and so what the source computes).

Widths here are whole multiples (2x). At a non-multiple width lemon_fx rescales each
LayerNorm/RMSNorm eps by the width ratio to stay exact, and a class built fresh from a bigger
config would keep its configured eps, so its outputs would differ by O(eps); that is a
property of the fresh class, not of the state_dict, and is left out of these tests.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import GPT, ViT

import lemon_fx
from lemon_fx import Plan

BATCH = 2
SEQ_LEN = 8
VOCAB = 50


# --------------------------------------------------------------------------------------------
# Hugging Face style: model.layers.N, RMSNorm, SwiGLU, separate bias-free q/k/v/o
# --------------------------------------------------------------------------------------------


class LlamaAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        shape = (B, T, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class LlamaMLP(nn.Module):
    def __init__(self, dim: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, intermediate, bias=False)
        self.up_proj = nn.Linear(dim, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, intermediate: int, eps: float) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(dim, eps=eps)
        self.self_attn = LlamaAttention(dim, num_heads)
        self.post_attention_layernorm = nn.RMSNorm(dim, eps=eps)
        self.mlp = LlamaMLP(dim, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, vocab_size: int, dim: int, depth: int, num_heads: int,
                 intermediate: int, eps: float) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(
            [LlamaDecoderLayer(dim, num_heads, intermediate, eps) for _ in range(depth)]
        )
        self.norm = nn.RMSNorm(dim, eps=eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """Hugging Face layout: ``model.embed_tokens``, ``model.layers.N``, ``model.norm``, and an
    untied ``lm_head`` outside ``model``."""

    def __init__(self, vocab_size: int = VOCAB, dim: int = 32, depth: int = 3,
                 num_heads: int = 4, intermediate: int = 64, eps: float = 1e-6) -> None:
        super().__init__()
        self.model = LlamaModel(vocab_size, dim, depth, num_heads, intermediate, eps)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model(input_ids))


# --------------------------------------------------------------------------------------------
# torchvision style: encoder.layers.encoder_layer_N, nn.MultiheadAttention, Pre-LN
# --------------------------------------------------------------------------------------------


class EncoderBlock(nn.Module):
    def __init__(self, num_heads: int, hidden_dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(hidden_dim, num_heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, hidden_dim)
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(input)
        x = self.self_attention(x, x, x, need_weights=False)[0]
        x = x + input
        y = self.mlp(self.ln_2(x))
        return x + y


class Encoder(nn.Module):
    def __init__(self, seq_length: int, num_layers: int, num_heads: int, hidden_dim: int,
                 mlp_dim: int) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.randn(1, seq_length, hidden_dim) * 0.02)
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(num_heads, hidden_dim, mlp_dim))
            for i in range(num_layers)
        ))
        self.ln = nn.LayerNorm(hidden_dim, eps=1e-6)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(input + self.pos_embedding))


class TorchvisionViT(nn.Module):
    """torchvision ``VisionTransformer`` layout: ``conv_proj``, ``class_token``,
    ``encoder.pos_embedding``, ``encoder.layers.encoder_layer_N``, ``encoder.ln``,
    ``heads.head``."""

    def __init__(self, image_size: int = 16, patch_size: int = 4, hidden_dim: int = 32,
                 num_layers: int = 3, num_heads: int = 4, mlp_dim: int = 64,
                 num_classes: int = 10) -> None:
        super().__init__()
        seq_length = (image_size // patch_size) ** 2 + 1
        self.conv_proj = nn.Conv2d(3, hidden_dim, kernel_size=patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.randn(1, 1, hidden_dim) * 0.02)
        self.encoder = Encoder(seq_length, num_layers, num_heads, hidden_dim, mlp_dim)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(hidden_dim, num_classes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        x = self.encoder(x)
        return self.heads(x[:, 0])


# --------------------------------------------------------------------------------------------
# Families: how to build a config scaled in width and depth, and how to draw inputs
# --------------------------------------------------------------------------------------------


def _ids(gen: torch.Generator) -> tuple:
    return (torch.randint(0, VOCAB, (BATCH, SEQ_LEN), generator=gen, dtype=torch.int64),)


def _images(gen: torch.Generator) -> tuple:
    return (torch.randn(BATCH, 3, 16, 16, generator=gen, dtype=torch.float64),)


@dataclass(frozen=True)
class Family:
    stack: str  # the stack name inspect reports, e.g. "model.layers"
    block_key: str  # state_dict prefix of block i, with {i}
    build: object  # build(width_multiple: int, depth: int) -> nn.Module
    inputs: object  # inputs(gen) -> tuple


FAMILIES = {
    "timm_vit": Family(
        "blocks", "blocks.{i}.",
        lambda w, d: ViT(dim=32 * w, depth=d, num_heads=4 * w, mlp_ratio=2.0),
        _images,
    ),
    "timm_gpt": Family(
        "blocks", "blocks.{i}.",
        lambda w, d: GPT(dim=32 * w, depth=d, num_heads=4 * w, mlp_ratio=2.0),
        _ids,
    ),
    "hf_llama": Family(
        "model.layers", "model.layers.{i}.",
        lambda w, d: LlamaForCausalLM(dim=32 * w, depth=d, num_heads=4 * w,
                                      intermediate=64 * w),
        _ids,
    ),
    "torchvision_vit": Family(
        "encoder.layers", "encoder.layers.encoder_layer_{i}.",
        lambda w, d: TorchvisionViT(hidden_dim=32 * w, num_layers=d, num_heads=4 * w,
                                    mlp_dim=64 * w),
        _images,
    ),
}

SOURCE_DEPTH = 3

# (id, width multiple or None, target depth, placement)
GROWTHS = [
    ("depth-interleave", None, 5, "interleave"),
    ("depth-stack", None, 5, "stack"),
    ("depth-explicit", None, 5, [0, 0, 1, 2, 2]),
    ("depth-2x-interleave", None, 6, "interleave"),
    ("width", 2, SOURCE_DEPTH, "interleave"),
    ("width-depth-interleave", 2, 6, "interleave"),
    ("width-depth-stack", 2, 5, "stack"),
    ("width-depth-explicit", 2, 5, [0, 0, 1, 2, 2]),
]


def _source(family: Family) -> tuple[nn.Module, torch.fx.GraphModule]:
    torch.manual_seed(0)
    model = family.build(1, SOURCE_DEPTH).double().eval()
    gm = lemon_fx.trace(model, family.inputs(torch.Generator().manual_seed(0)))
    return model, gm


@pytest.mark.parametrize("family_name", sorted(FAMILIES))
def test_inspect_names_the_stack(family_name):
    family = FAMILIES[family_name]
    _, gm = _source(family)
    stacks = {s.name: s for s in lemon_fx.inspect(gm).stacks}
    assert family.stack in stacks
    assert stacks[family.stack].count == SOURCE_DEPTH
    assert stacks[family.stack].kind == "pre_ln"


@pytest.mark.parametrize(("growth", "width", "depth", "placement"), GROWTHS,
                         ids=[g[0] for g in GROWTHS])
@pytest.mark.parametrize("family_name", sorted(FAMILIES))
def test_grown_state_dict_loads_strictly_into_the_bigger_config(
    family_name, growth, width, depth, placement
):
    family = FAMILIES[family_name]
    model, gm = _source(family)
    plan = Plan(
        width=None if width is None else float(width),
        depth=None if depth == SOURCE_DEPTH else {family.stack: depth},
        placement=placement,
        seed=3,
    )
    big = lemon_fx.grow(gm, plan)

    target = family.build(width or 1, depth).double().eval()
    target.load_state_dict(big.state_dict(), strict=True)
    assert target.state_dict().keys() == big.state_dict().keys()
    for i in range(depth):
        assert any(k.startswith(family.block_key.format(i=i)) for k in target.state_dict())

    fresh = family.inputs(torch.Generator().manual_seed(11))
    with torch.no_grad():
        want = big(*fresh)
        got = target(*fresh)
        source = model(*fresh)
    scale = 1 + want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10 * scale)
    torch.testing.assert_close(want, source, rtol=0, atol=1e-10 * scale)


# --------------------------------------------------------------------------------------------
# The paper's configuration: ViT-S/16 (6 layers) -> ViT-B/16 (12 layers)
# --------------------------------------------------------------------------------------------


def test_paper_vit_small_6_layers_grows_into_vit_base():
    config = dict(img_size=224, patch_size=16, mlp_ratio=4, num_classes=10)
    torch.manual_seed(0)
    small = ViT(dim=384, depth=6, num_heads=6, **config).eval()
    example = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    gm = lemon_fx.trace(small, (example,))
    big = lemon_fx.grow(gm, Plan(width=2.0, depth={"blocks": 12}, seed=0))

    base = ViT(dim=768, depth=12, num_heads=12, **config).eval()
    n_big = sum(p.numel() for p in big.parameters())
    n_base = sum(p.numel() for p in base.parameters())
    assert n_big == n_base
    base.load_state_dict(big.state_dict(), strict=True)

    fresh = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        want = small(fresh)
        got = big(fresh)
        loaded = base(fresh)
    # float32: relative to the largest output, as the contract states (~1e-6 expected)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())
    torch.testing.assert_close(loaded, got, rtol=0, atol=1e-5 * got.abs().max().item())


# --------------------------------------------------------------------------------------------
# The growth report maps each new block to its source
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("depth", "placement", "expected"), [
    (2, "interleave", [(1, 0), (3, 1)]),
    (2, "stack", [(2, 0), (3, 1)]),
    (3, [0, 0, 1, 2, 2], [(1, 0), (4, 2)]),
], ids=["interleave", "stack", "explicit"])
def test_report_maps_new_blocks_to_their_sources(depth, placement, expected):
    torch.manual_seed(0)
    model = GPT(depth=depth).double().eval()
    gm = lemon_fx.trace(model, _ids(torch.Generator().manual_seed(0)))
    target = len(placement) if isinstance(placement, list) else 2 * depth
    big = lemon_fx.grow(gm, Plan(depth={"blocks": target}, placement=placement))
    new = lemon_fx.growth_report(big).new_blocks
    assert [(b.position, b.source) for b in new] == expected
    assert [b.stack for b in new] == ["blocks", "blocks"]
    assert [b.name for b in new] == [f"blocks.{p}" for p, _ in expected]


def test_report_names_new_blocks_in_a_nested_hugging_face_stack():
    torch.manual_seed(0)
    model = LlamaForCausalLM(depth=2).double().eval()
    gm = lemon_fx.trace(model, _ids(torch.Generator().manual_seed(0)))
    big = lemon_fx.grow(gm, Plan(depth={"model.layers": 4}, placement="interleave"))
    new = lemon_fx.growth_report(big).new_blocks
    assert [(b.stack, b.position, b.source, b.name) for b in new] == [
        ("model.layers", 1, 0, "model.layers.1"),
        ("model.layers", 3, 1, "model.layers.3"),
    ]


def test_report_names_new_blocks_in_a_torchvision_stack():
    torch.manual_seed(0)
    model = TorchvisionViT(num_layers=2).double().eval()
    gm = lemon_fx.trace(model, _images(torch.Generator().manual_seed(0)))
    big = lemon_fx.grow(gm, Plan(depth={"encoder.layers": 4}, placement="stack"))
    new = lemon_fx.growth_report(big).new_blocks
    assert [(b.stack, b.position, b.source, b.name) for b in new] == [
        ("encoder.layers", 2, 0, "encoder.layers.encoder_layer_2"),
        ("encoder.layers", 3, 1, "encoder.layers.encoder_layer_3"),
    ]


def test_report_text_names_source_blocks_with_the_containers_naming():
    m = TorchvisionViT(num_layers=3)
    gm = lemon_fx.trace(m, (torch.randn(2, 3, 16, 16),))
    big = lemon_fx.grow(gm, Plan(depth={"encoder.layers": 5}, placement=[0, 0, 1, 2, 2]))
    text = str(lemon_fx.growth_report(big))
    assert "encoder.layers.encoder_layer_1 <- copy of encoder.layers.encoder_layer_0" in text

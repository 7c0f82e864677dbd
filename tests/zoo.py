"""A zoo of small custom architectures that the tests grow.

Each class is plain PyTorch (``torch.nn`` and ``torch.nn.functional``), traceable with
``torch.fx.symbolic_trace``, and written the way real model families write it: parameter names
follow timm (``blocks.N.attn.qkv``, ``blocks.N.mlp.fc1``, ``norm1``), Hugging Face Llama/BERT
(``layers.N.self_attn.q_proj``) or GPT-J (``ln_1``, ``fc_in``), and blocks live in an
``nn.ModuleList`` or ``nn.Sequential`` named ``blocks`` or ``layers``.

The models differ in how they handle shapes, because that is what the library must follow
through the graph: sizes read from ``x.shape`` and divided by module constants, fused and
separate q/k/v, ``chunk``/``split``/``unbind``/indexing, ``view``/``reshape``/``permute``,
``flatten``/``unflatten``, transposed token mixing, class tokens and positional parameters
sliced to the sequence length, causal masks from buffers, padding masks as inputs.

Construction is deterministic given ``torch.manual_seed``; every constructor takes keyword
config so a bigger instance of the same family can be built. ``ZOO`` at the bottom maps a name
to a builder with a small default config and a function that draws fresh example inputs
(float64 floats, int64 ids) from a ``torch.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BATCH = 2
SEQ_LEN = 8
VOCAB = 50
IMAGE = 16
NUM_CLASSES = 10


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


class Mlp(nn.Module):
    """timm ``Mlp``: ``fc2(act(fc1(x)))``."""

    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class FusedSdpaAttention(nn.Module):
    """timm ``Attention``: fused qkv, reshape/permute head split, unbind, SDPA."""

    def __init__(self, dim: int, num_heads: int, causal: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


# --------------------------------------------------------------------------------------------
# 1. Residual MLP
# --------------------------------------------------------------------------------------------


class ResidualMLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class ResidualMLP(nn.Module):
    """Residual stream without attention: input Linear, Pre-LN MLP blocks, output Linear.

    Stresses: the plainest residual group (a Linear producer, LayerNorm readers, a Linear
    consumer) and an ffn group per block.
    """

    def __init__(
        self,
        in_features: int = 12,
        dim: int = 32,
        depth: int = 2,
        mlp_ratio: float = 2.0,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.stem = nn.Linear(in_features, dim)
        self.blocks = nn.ModuleList([ResidualMLPBlock(dim, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


# --------------------------------------------------------------------------------------------
# 2. GPT (Pre-LN, SDPA causal)
# --------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """nanoGPT attention with separate q/k/v projections and causal SDPA."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)
        k = self.k(x).view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)
        v = self.v(x).view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y)


class GPTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, num_heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Pre-LN decoder: token embedding, learned positions sliced to T, causal SDPA, LM head.

    Stresses: ``C // num_heads`` head split from ``x.shape``, a positional ``nn.Parameter``
    sliced with ``[:, :T]``, an embedding table as the residual producer, an untied LM head.
    """

    def __init__(
        self,
        vocab_size: int = VOCAB,
        block_size: int = 16,
        dim: int = 32,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Parameter(torch.randn(1, block_size, dim) * 0.02)
        self.blocks = nn.ModuleList([GPTBlock(dim, num_heads, hidden) for _ in range(depth)])
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        x = self.tok_emb(idx) + self.pos_emb[:, :T]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


# --------------------------------------------------------------------------------------------
# 3. Attention written out by hand
# --------------------------------------------------------------------------------------------


class ManualCausalAttention(nn.Module):
    """minGPT attention: explicit scores, buffer mask, softmax, weighted sum."""

    def __init__(self, dim: int, num_heads: int, block_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)
        self.register_buffer("mask", torch.tril(torch.ones(block_size, block_size)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        # A buffer is a real tensor under symbolic_trace (only parameters become get_attr
        # proxies), and a real tensor cannot be sliced by a proxy T: ``self.mask[:T, :T]``
        # raises TypeError. ``narrow`` takes T as an argument, so it traces.
        mask = self.mask.narrow(0, 0, T).narrow(1, 0, T)
        att = att.masked_fill(mask == 0, float("-inf"))
        att = att.softmax(dim=-1)
        y = att @ v
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.c_proj(y)


class ManualAttentionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int, block_size: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = ManualCausalAttention(dim, num_heads, block_size)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ManualAttentionTransformer(nn.Module):
    """Decoder whose attention is matmul/scale/mask/softmax/matmul, not SDPA.

    Stresses: ``1/sqrt(head_dim)`` as a Python constant baked into the graph, a
    ``torch.tril`` buffer cut to [T, T] (``narrow``, the traceable ``[:T, :T]``) and used in
    ``masked_fill``, a softmax over the key
    axis (not a grown axis), ``split(C)`` of a fused qkv, ``transpose(1, 2).reshape(B, T, C)``.
    """

    def __init__(
        self,
        vocab_size: int = VOCAB,
        block_size: int = 16,
        dim: int = 32,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.wte = nn.Embedding(vocab_size, dim)
        self.wpe = nn.Embedding(block_size, dim)
        self.blocks = nn.ModuleList(
            [ManualAttentionBlock(dim, num_heads, hidden, block_size) for _ in range(depth)]
        )
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


# --------------------------------------------------------------------------------------------
# 4. ViT (class token, linear patch embedding)
# --------------------------------------------------------------------------------------------


class ViTBlock(nn.Module):
    """timm ``Block`` without layer scale."""

    def __init__(self, dim: int, num_heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = FusedSdpaAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision transformer on [B, 3, 16, 16] images with a Linear patch embedding.

    Stresses: patchify by ``view``/``permute``/``reshape`` of the image, a class token
    ``nn.Parameter`` expanded with ``expand(B, -1, -1)`` and concatenated along tokens, a
    positional parameter added, pooling on ``x[:, 0]``.
    """

    def __init__(
        self,
        img_size: int = IMAGE,
        patch_size: int = 4,
        in_chans: int = 3,
        dim: int = 32,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        num_patches = (img_size // patch_size) ** 2
        self.patch_size = patch_size
        self.patch_embed = nn.Linear(in_chans * patch_size * patch_size, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(dim, num_heads, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p = self.patch_size
        x = x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        x = x.reshape(B, (H // p) * (W // p), C * p * p)
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        x = x + self.pos_embed
        x = self.blocks(x)
        x = self.norm(x)
        return self.head(x[:, 0])


# --------------------------------------------------------------------------------------------
# 5. nn.MultiheadAttention
# --------------------------------------------------------------------------------------------


class MHABlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class MHATransformer(nn.Module):
    """Pre-LN encoder built on ``nn.MultiheadAttention`` (a leaf module for fx).

    Stresses: a packed ``in_proj_weight``/``in_proj_bias`` plus ``out_proj``, ``embed_dim``
    and ``num_heads`` attributes, a tuple output indexed with ``[0]``.
    """

    def __init__(
        self,
        in_features: int = 16,
        dim: int = 32,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.embed = nn.Linear(in_features, dim)
        self.blocks = nn.ModuleList([MHABlock(dim, num_heads, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


# --------------------------------------------------------------------------------------------
# 6. BERT-style Post-LN encoder with a padding mask
# --------------------------------------------------------------------------------------------


class BertEmbeddings(nn.Module):
    def __init__(self, vocab_size: int, max_position: int, dim: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, dim)
        self.position_embeddings = nn.Embedding(max_position, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.output = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        head_dim = C // self.num_heads
        q = self.query(x).view(B, T, self.num_heads, head_dim).transpose(1, 2)
        k = self.key(x).view(B, T, self.num_heads, head_dim).transpose(1, 2)
        v = self.value(x).view(B, T, self.num_heads, head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.output(y)


class PostLNLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int) -> None:
        super().__init__()
        self.attn = BertSelfAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim, eps=1e-12)
        self.mlp = Mlp(dim, hidden)
        self.norm2 = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, mask))
        return self.norm2(x + self.mlp(x))


class PostLNEncoder(nn.Module):
    """BERT-style Post-LN encoder: ``x = norm(x + branch(x))`` with a padding mask input.

    Stresses: Post-LN residuals (only whole-multiple widths are lossless), position ids from
    ``torch.arange(T, device=...)``, an embedding LayerNorm, a second graph input (a [B, T]
    0/1 mask turned into a [B, 1, 1, T] additive mask) fed to every layer.
    """

    def __init__(
        self,
        vocab_size: int = VOCAB,
        max_position: int = 16,
        dim: int = 32,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.embeddings = BertEmbeddings(vocab_size, max_position, dim)
        self.layers = nn.ModuleList([PostLNLayer(dim, num_heads, hidden) for _ in range(depth)])
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = (1.0 - attention_mask)[:, None, None, :] * -1e9
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return self.classifier(x[:, 0])


# --------------------------------------------------------------------------------------------
# 7-9. Three ways to produce q, k, v
# --------------------------------------------------------------------------------------------


class ChunkAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q = q.reshape(B, T, self.num_heads, -1).transpose(1, 2)
        k = k.reshape(B, T, self.num_heads, -1).transpose(1, 2)
        v = v.reshape(B, T, self.num_heads, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class ChunkBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ChunkAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FusedQKVChunk(nn.Module):
    """Fused ``qkv`` Linear cut with ``chunk(3, dim=-1)``, heads split with ``-1`` sizes.

    Stresses: a chunk of a fused producer (each third is a separate group), inferred ``-1``
    head dim in ``reshape(B, T, H, -1)`` and ``reshape(B, T, -1)`` on the way back.
    """

    def __init__(
        self,
        in_features: int = 16,
        dim: int = 32,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.embed = nn.Linear(in_features, dim)
        self.blocks = nn.ModuleList([ChunkBlock(dim, num_heads, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class ReshapeAttention(nn.Module):
    """timm ``Attention``; ``unbind=False`` picks q, k, v by ``qkv[0], qkv[1], qkv[2]``."""

    def __init__(self, dim: int, num_heads: int, unbind: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.unbind = unbind
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.unbind:
            q, k, v = qkv.unbind(0)
        else:
            q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * self.scale
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class ReshapeBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int, unbind: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ReshapeAttention(dim, num_heads, unbind)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FusedQKVReshape(nn.Module):
    """timm fused qkv: ``reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4)`` then unbind/index.

    Stresses: the 3 and the head axis interleaved inside one reshape of a fused producer,
    a 5-d permute, ``unbind(0)`` (default) or integer indexing (``unbind=False``), and
    ``q * head_dim**-0.5`` as a baked-in scale.
    """

    def __init__(
        self,
        in_features: int = 16,
        dim: int = 32,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        num_classes: int = NUM_CLASSES,
        unbind: bool = True,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.embed = nn.Linear(in_features, dim)
        self.blocks = nn.Sequential(
            *[ReshapeBlock(dim, num_heads, hidden, unbind) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.embed(x))
        return self.head(self.norm(x))


class SeparateAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=True)
        self.k_proj = nn.Linear(dim, dim, bias=True)
        self.v_proj = nn.Linear(dim, dim, bias=True)
        self.out_proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=False)
        y = y.transpose(1, 2).contiguous().view(B, T, self.num_heads * self.head_dim)
        return self.out_proj(y)


class SeparateBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SeparateAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SeparateQKV(nn.Module):
    """Separate biased q/k/v Linears, ``view``/``transpose`` head split, non-causal SDPA.

    Stresses: three producers that must grow heads identically, ``num_heads * head_dim`` as
    the merged width, ``contiguous().view`` on the way back.
    """

    def __init__(
        self,
        in_features: int = 16,
        dim: int = 32,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.embed = nn.Linear(in_features, dim)
        self.blocks = nn.ModuleList([SeparateBlock(dim, num_heads, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


# --------------------------------------------------------------------------------------------
# 10. SwiGLU, RMSNorm, no biases (Llama-style; optional grouped-query attention)
# --------------------------------------------------------------------------------------------


class LlamaAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:  # a module constant, so fx traces one branch (as HF ``repeat_kv`` does)
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(y)


class SwiGLUMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, hidden: int) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(dim, eps=1e-6)
        self.self_attn = LlamaAttention(dim, num_heads, num_kv_heads)
        self.post_attention_layernorm = nn.RMSNorm(dim, eps=1e-6)
        self.mlp = SwiGLUMlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class SwiGLUTransformer(nn.Module):
    """Llama-style decoder: RMSNorm, bias-free projections, ``down(silu(gate(x)) * up(x))``.

    Stresses: a gated product of two producers in one ffn group, RMSNorm (zero form) on the
    residual stream, no biases anywhere; with ``num_kv_heads < num_heads`` grouped-query
    attention via ``repeat_interleave`` (a kv_heads group distinct from heads).
    """

    def __init__(
        self,
        vocab_size: int = VOCAB,
        dim: int = 32,
        depth: int = 2,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        hidden_dim: int = 64,
    ) -> None:
        super().__init__()
        kv = num_heads if num_kv_heads is None else num_kv_heads
        self.embed_tokens = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(
            [LlamaLayer(dim, num_heads, kv, hidden_dim) for _ in range(depth)]
        )
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


# --------------------------------------------------------------------------------------------
# 11. MLP-Mixer
# --------------------------------------------------------------------------------------------


class MixerBlock(nn.Module):
    def __init__(self, dim: int, num_tokens: int, token_hidden: int, channel_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mlp_tokens = Mlp(num_tokens, token_hidden)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp_channels = Mlp(dim, channel_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.norm2(x))


class MLPMixer(nn.Module):
    """MLP-Mixer on [B, P, in_features] patches: token mixing on the transposed axes.

    Stresses: Linears applied over the token axis (the residual axis is a batch axis there,
    not a feature axis), transposes in and out of the token MLP, mean over tokens.
    """

    def __init__(
        self,
        num_tokens: int = SEQ_LEN,
        in_features: int = 12,
        dim: int = 32,
        depth: int = 2,
        token_hidden: int = 16,
        mlp_ratio: float = 2.0,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        channel_hidden = int(dim * mlp_ratio)
        self.stem = nn.Linear(in_features, dim)
        self.blocks = nn.Sequential(
            *[MixerBlock(dim, num_tokens, token_hidden, channel_hidden) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        x = self.norm(x)
        return self.head(x.mean(dim=1))


# --------------------------------------------------------------------------------------------
# 12. Extra shape handling: layer scale + conv patches, parallel block, split/flatten
# --------------------------------------------------------------------------------------------


class LayerScale(nn.Module):
    """timm ``LayerScale``: per-channel learnable ``gamma * x``."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class LayerScaleBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int, init_values: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = FusedSdpaAttention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden)
        self.ls2 = LayerScale(dim, init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """timm ``PatchEmbed``: strided Conv2d, then ``flatten(2).transpose(1, 2)``."""

    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class LayerScaleViT(nn.Module):
    """CaiT/DeiT-III style ViT: layer scale on both branches, conv patches, mean pooling.

    Stresses: a per-channel ``nn.Parameter`` multiplying a branch (a residual-width vector
    that is neither a norm nor a Linear), a Conv2d producer whose channel axis becomes the
    residual axis after ``flatten(2).transpose(1, 2)``, global average pooling over tokens.
    """

    def __init__(
        self,
        img_size: int = IMAGE,
        patch_size: int = 4,
        in_chans: int = 3,
        dim: int = 32,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        init_values: float = 0.1,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        num_patches = (img_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(patch_size, in_chans, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches, dim) * 0.02)
        self.blocks = nn.Sequential(
            *[LayerScaleBlock(dim, num_heads, hidden, init_values) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        x = self.blocks(x)
        x = self.norm(x)
        return self.head(x.mean(dim=1))


class ParallelAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
        k = self.k_proj(x).view(B, T, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
        v = self.v_proj(x).view(B, T, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.permute(0, 2, 1, 3).reshape(B, T, C))


class ParallelMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(dim, hidden)
        self.fc_out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x), approximate="tanh"))


class ParallelBlock(nn.Module):
    """GPT-J block: one LayerNorm read by both branches, ``x + attn(h) + mlp(h)``."""

    def __init__(self, dim: int, num_heads: int, hidden: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = ParallelAttention(dim, num_heads)
        self.mlp = ParallelMlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        return x + self.attn(h) + self.mlp(h)


class ParallelBlockTransformer(nn.Module):
    """GPT-J style decoder with parallel attention and MLP branches.

    Stresses: one norm output consumed by two branches, a three-way residual sum, head split
    via ``permute(0, 2, 1, 3)`` instead of ``transpose``, bias-free attention, tanh-GELU.
    """

    def __init__(
        self,
        vocab_size: int = VOCAB,
        dim: int = 32,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.wte = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList([ParallelBlock(dim, num_heads, hidden) for _ in range(depth)])
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class SplitAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = torch.split(self.qkv(x), [self.dim, self.dim, self.dim], dim=-1)
        q = q.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        k = k.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        v = v.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(torch.flatten(y.transpose(1, 2), start_dim=2))


class GEGLUMlp(nn.Module):
    """One Linear producing both halves, cut with ``split`` by sizes: ``a * gelu(b)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc1(x).split([self.hidden, self.hidden], dim=-1)
        return self.fc2(a * F.gelu(b))


class SplitFlattenBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SplitAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = GEGLUMlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SplitFlattenTransformer(nn.Module):
    """Decoder that never calls view/reshape: split by sizes, unflatten, flatten.

    Stresses: ``torch.split`` with a list of module-constant sizes (fused qkv and a fused
    GEGLU input), ``unflatten(-1, (H, Dh))`` to split heads, ``torch.flatten(start_dim=2)``
    to merge them.
    """

    def __init__(
        self,
        vocab_size: int = VOCAB,
        dim: int = 32,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.embed = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(
            [SplitFlattenBlock(dim, num_heads, hidden) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooEntry:
    """A zoo model: how to build it and how to draw inputs for it."""

    name: str
    build: Callable[..., nn.Module]  # build(**overrides) -> model with the default small config
    example_inputs: Callable[[torch.Generator], tuple]  # fresh inputs from a generator
    post_ln: bool = False  # Post-LN models only grow exactly at whole multiples


def _features(n_tokens: int, n_features: int) -> Callable[[torch.Generator], tuple]:
    def draw(gen: torch.Generator) -> tuple:
        x = torch.randn(BATCH, n_tokens, n_features, generator=gen, dtype=torch.float64)
        return (x,)

    return draw


def _ids(vocab: int = VOCAB, seq_len: int = SEQ_LEN) -> Callable[[torch.Generator], tuple]:
    def draw(gen: torch.Generator) -> tuple:
        return (torch.randint(0, vocab, (BATCH, seq_len), generator=gen, dtype=torch.int64),)

    return draw


def _images(gen: torch.Generator) -> tuple:
    return (torch.randn(BATCH, 3, IMAGE, IMAGE, generator=gen, dtype=torch.float64),)


def _ids_and_padding_mask(gen: torch.Generator) -> tuple:
    ids = torch.randint(0, VOCAB, (BATCH, SEQ_LEN), generator=gen, dtype=torch.int64)
    mask = (torch.rand(BATCH, SEQ_LEN, generator=gen, dtype=torch.float64) < 0.75).double()
    mask[:, 0] = 1.0  # every row keeps its first token, so no query sees only padding
    return ids, mask


def _entry(
    name: str,
    cls: Callable[..., nn.Module],
    example_inputs: Callable[[torch.Generator], tuple],
    post_ln: bool = False,
    **defaults: object,
) -> ZooEntry:
    def build(**overrides: object) -> nn.Module:
        return cls(**{**defaults, **overrides})

    return ZooEntry(name, build, example_inputs, post_ln)


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        _entry("residual_mlp", ResidualMLP, _features(SEQ_LEN, 12)),
        _entry("gpt", GPT, _ids()),
        _entry("manual_attention", ManualAttentionTransformer, _ids()),
        _entry("vit", ViT, _images),
        _entry("mha", MHATransformer, _features(SEQ_LEN, 16)),
        _entry("post_ln_encoder", PostLNEncoder, _ids_and_padding_mask, post_ln=True),
        _entry("fused_qkv_chunk", FusedQKVChunk, _features(SEQ_LEN, 16)),
        _entry("fused_qkv_reshape", FusedQKVReshape, _features(SEQ_LEN, 16)),
        _entry("fused_qkv_index", FusedQKVReshape, _features(SEQ_LEN, 16), unbind=False),
        _entry("separate_qkv", SeparateQKV, _features(SEQ_LEN, 16)),
        _entry("swiglu", SwiGLUTransformer, _ids()),
        _entry("swiglu_gqa", SwiGLUTransformer, _ids(), num_kv_heads=2),
        _entry("mlp_mixer", MLPMixer, _features(SEQ_LEN, 12)),
        _entry("layer_scale_vit", LayerScaleViT, _images),
        _entry("parallel_block", ParallelBlockTransformer, _ids()),
        _entry("split_flatten", SplitFlattenTransformer, _ids()),
    ]
}

"""The built-in demo: grow a small GPT-style transformer and check it with onnxruntime.

``lemon-fx demo`` runs ``run_demo``: build a Pre-LN transformer with random weights,
trace it, grow it (width 1.5x by default: a non-multiple width, LEMON's hardest case),
verify the grown model against the source in float64 on fresh inputs, export it to ONNX,
check it with ``onnx.checker`` and run it in onnxruntime against the source's outputs,
and print the groups and parameter counts before and after.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TextIO

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TinyGPT", "run_demo"]


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, causal: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)
        k = k.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)
        v = v.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, causal: bool = True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, num_heads, causal)
        self.ln_2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, mlp_ratio * dim)
        self.proj = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.proj(F.gelu(self.fc(self.ln_2(x))))


class TinyGPT(nn.Module):
    """A GPT-2-shaped Pre-LN transformer: token + learned position embeddings, causal SDPA.

    ``vocab``: the predicted token ids (the head's outputs); ``dim``: the residual width;
    ``depth``: the number of blocks (``blocks``, a ``ModuleList``); ``num_heads``: heads
    per attention (``head_dim = dim // num_heads``); ``mlp_ratio``: the MLP's hidden
    width over ``dim``; ``max_len``: the longest sequence (the position table's length).
    ``causal=False`` makes it an encoder (the MLM miniature of ``tools/bench_training.py``);
    ``input_vocab`` (default ``vocab``) counts input ids beyond the predicted ones, e.g. a
    mask token; ``position_std`` is the position table's init scale.
    """

    def __init__(self, vocab: int = 256, dim: int = 64, depth: int = 2, num_heads: int = 4,
                 mlp_ratio: int = 4, max_len: int = 64, causal: bool = True,
                 input_vocab: int | None = None, position_std: float = 0.02):
        super().__init__()
        self.wte = nn.Embedding(input_vocab or vocab, dim)
        self.wpe = nn.Parameter(torch.randn(1, max_len, dim) * position_std)
        self.blocks = nn.ModuleList(_Block(dim, num_heads, mlp_ratio, causal)
                                    for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, T]`` (``T <= max_len``) -> logits ``[B, T, vocab]``."""
        T = idx.size(1)
        x = self.wte(idx) + self.wpe[:, :T]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _sizes_table(before, after) -> list[str]:
    sizes_after = {g.name: g.size for g in after.groups}
    rows = [("group", "role", "form", "before", "after")]
    for g in before.groups:
        rows.append((g.name, g.role, g.form, str(g.size), str(sizes_after.get(g.name, "?"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def run_demo(width: float = 1.5, seed: int = 0, out: str | Path | None = None,
             stream: TextIO | None = None) -> int:
    """Run the demo and print to ``stream``; returns a process exit code."""
    import sys

    import lemon_fx

    stream = stream or sys.stdout
    say = lambda text="": print(text, file=stream, flush=True)  # noqa: E731
    torch.manual_seed(seed)
    model = TinyGPT().eval()
    trace_ids = torch.randint(0, 256, (2, 16))
    gm = lemon_fx.trace(model, (trace_ids,))
    before = lemon_fx.inspect(gm)
    say(f"source: TinyGPT, {before.parameters:,} parameters")
    plan = lemon_fx.Plan(width=width, seed=seed)
    big = lemon_fx.grow(gm, plan)
    after = lemon_fx.inspect(big)
    say(f"grown:  width x{width}, {after.parameters:,} parameters "
        f"({after.parameters / before.parameters:.2f}x)")
    say()
    for line in _sizes_table(before, after):
        say(line)
    say()
    fresh = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(seed + 1))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(out) if out is not None else Path(tmp) / "grown.onnx"
        report = lemon_fx.verify(gm, big, (fresh,), onnx=str(path))
        say(str(report))
        say()
        where = f"written to {path}" if out is not None else "exported to a temporary file"
        say(f"ONNX model {where}; checked by onnx.checker and onnxruntime.")
    return 0 if report.ok else 1

"""The cleanup pass: drop what the rewrites left unused, then check and recompile."""

from __future__ import annotations

import torch.fx

from passes.result import PassResult

__all__ = ["cleanup"]


def cleanup(gm: torch.fx.GraphModule) -> PassResult:
    """Dead shape arithmetic goes (a literal replaced ``C // num_heads``); lint; recompile."""
    modified = gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, modified, ["eliminated dead code"] if modified else [])

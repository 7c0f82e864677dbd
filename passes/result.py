"""What every pass returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx

__all__ = ["PassResult"]


@dataclass
class PassResult:
    graph_module: torch.fx.GraphModule
    modified: bool
    rewrites: list[str] = field(default_factory=list)

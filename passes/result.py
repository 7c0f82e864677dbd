"""What every pass returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx

__all__ = ["PassResult"]


@dataclass
class PassResult:
    """What a pass returns: ``graph_module``, the module it worked on (changed in place,
    linted and recompiled); ``modified``, whether it changed anything; ``rewrites``, one
    readable line per change (``grew blocks.0.fc.weight: (256, 64) -> (512, 128)``)."""

    graph_module: torch.fx.GraphModule
    modified: bool
    rewrites: list[str] = field(default_factory=list)

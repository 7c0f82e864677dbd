"""How the zoo tests trace a zoo model and check a grown one against it."""

from __future__ import annotations

import torch
from zoo import ZOO, ZooEntry

import lemon_fx

# their residual stream only grows by whole multiples: Post-LN, a nonlinearity across
# channels (Mixer's token mixing)
WHOLE_MULTIPLE_STREAM = {"post_ln_encoder", "mlp_mixer"}


def traced(name: str) -> tuple[ZooEntry, torch.nn.Module, torch.fx.GraphModule]:
    """The zoo model in float64 eval mode and its trace on generator-0 inputs."""
    entry = ZOO[name]
    torch.manual_seed(0)
    model = entry.build().double().eval()
    gm = lemon_fx.trace(model, entry.example_inputs(torch.Generator().manual_seed(0)))
    return entry, model, gm


def assert_lossless(model, big, entry: ZooEntry, seed: int = 1, atol: float = 1e-10) -> None:
    """``big`` equals ``model`` on fresh inputs (not the tracing ones), relative to scale."""
    fresh = entry.example_inputs(torch.Generator().manual_seed(seed))
    want = model(*fresh)
    torch.testing.assert_close(big(*fresh), want, rtol=0,
                               atol=atol * (1 + want.abs().max().item()))

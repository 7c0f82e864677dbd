"""A leaf: checkpoints in, checkpoints out. ``grow_pretrained`` grows a Hugging Face model
folder (or ``PreTrainedModel``) into a folder its own loader reads (``hugging_face``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lemon_fx.errors import PlanError, Problem
from lemon_fx.hub.hugging_face import PretrainedGrowth, grow_hugging_face

__all__ = ["PretrainedGrowth", "grow_pretrained"]


def grow_pretrained(source: Any, plan: Any, out_dir: str | Path, example_inputs: Any = None,
                    model_args: dict[str, Any] | None = None) -> PretrainedGrowth:
    """Grow ``source`` with ``plan`` into ``out_dir`` in the ecosystem's own format, reload
    it with the library's loader and check it against the source (see
    ``lemon_fx.hub.hugging_face``). ``source``: a Hugging Face model folder (config.json)
    or a ``transformers.PreTrainedModel``. Raises ``VerificationError`` (and leaves no
    folder) when the reloaded model differs."""
    if type(source).__module__.startswith("timm") or model_args is not None:
        raise PlanError("grow_pretrained does not write timm folders yet", [Problem(
            reason="only Hugging Face model folders and PreTrainedModel objects are grown "
            "into folders so far", node="source",
            fix="grow the timm model with lemon_fx.grow and save its state_dict")])
    return grow_hugging_face(source, plan, out_dir, example_inputs)

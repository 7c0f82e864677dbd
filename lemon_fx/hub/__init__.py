"""A leaf: checkpoints in, checkpoints out. ``grow_pretrained`` grows a Hugging Face model
folder (or ``PreTrainedModel``) into a folder its own loader reads (``hugging_face``), and a
timm model into a folder ``timm.create_model("local-dir:...")`` rebuilds
(``timm_folder``); ``folder`` holds what both share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lemon_fx.hub.folder import PretrainedGrowth
from lemon_fx.hub.hugging_face import grow_hugging_face
from lemon_fx.hub.timm_folder import grow_timm, is_timm_folder, is_timm_model

__all__ = ["PretrainedGrowth", "grow_pretrained"]


def grow_pretrained(source: Any, plan: Any, out_dir: str | Path, example_inputs: Any = None,
                    model_args: dict[str, Any] | None = None) -> PretrainedGrowth:
    """Grow ``source`` with ``plan`` into ``out_dir`` in the ecosystem's own format, reload
    it with the library's loader and check it against the source on fresh inputs.

    ``source``: a Hugging Face model folder (config.json) or ``PreTrainedModel``
    (``lemon_fx.hub.hugging_face``); a timm model or a folder timm wrote
    (``lemon_fx.hub.timm_folder``; ``model_args``: the arguments it was created with, where
    timm did not record them). Raises ``VerificationError`` (and leaves no folder) when
    the reloaded model differs, ``PlanError`` before writing anything when the format
    cannot express the plan."""
    is_folder = isinstance(source, (str, Path))
    if (is_folder and is_timm_folder(Path(source))) or is_timm_model(source) or \
            model_args is not None:
        return grow_timm(source, plan, out_dir, example_inputs, model_args)
    return grow_hugging_face(source, plan, out_dir, example_inputs)

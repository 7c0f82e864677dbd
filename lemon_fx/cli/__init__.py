"""A leaf: the ``lemon-fx`` command (``main``), loading targets and checkpoints
(``targets``) and the demo (``demo``)."""

from lemon_fx.cli.main import main

__all__ = ["main"]

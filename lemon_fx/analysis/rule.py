"""The ``Rule`` base class: how one op couples axes and how it is rewritten.

A rule has two halves, always in this order:

``analyze(node, ctx)``
    states facts, changes nothing: which axes of inputs, outputs and parameters are the
    same dim, how a reshape factors an axis, which LEMON form an axis needs, which
    parameter axes are expanded (fan-out) or split (fan-in), and which growth it cannot do.
``rewrite(node, ctx)``
    runs only after every node of the graph said yes to the resolved plan; it rewrites
    the node's literals and its module's attributes (``in_features``, ``num_heads``...).
    Parameters are transformed centrally from the claims made in ``analyze``.

The docstring of every rule states its maths and what it refuses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.fx

if TYPE_CHECKING:
    from lemon_fx.analysis.width import NodeAnalysis, WidthAnalysis
    from lemon_fx.resolution.rewrite import NodeRewrite

__all__ = ["Rule"]


class Rule:
    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        raise NotImplementedError

    def rewrite(self, node: torch.fx.Node, ctx: NodeRewrite) -> None:
        """Rewrite literals and module attributes; most elementwise rules need nothing."""

    def rewrites_size_args(self, node: torch.fx.Node) -> bool:
        """Whether ``node``'s size arguments (``view(b, t, c)``, ``expand(...)``) are
        rewritten to the grown sizes, so a size read from a tensor may feed them."""
        return False

    def finalize(self, analysis: WidthAnalysis) -> None:
        """Called once after every node was analyzed: for facts that span several nodes
        (a weight tied between an embedding and the LM head)."""

    @property
    def name(self) -> str:
        return type(self).__name__

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

Depth growth asks the rules too (``lemon_fx.analysis.stacks``), through seven questions
whose defaults all say "no": ``branch_end`` (can this node end a residual branch by
writing zero?), ``stream_norm_params`` (is it a feature norm on the stream, and where are
its gamma and beta?), ``passes_value``, ``passes_zero`` and ``zero_factors`` (does the
walk along the stream or a branch go on through it, and where?), ``residual_operands``
(is it ``x + alpha * y``?) and ``idempotent`` (is ``f(f(y)) = f(y)``, so that
``f(x + 0) = x`` when ``x = f(...)``?). A user's module that ends a residual branch is taught
once, in its rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch.fx

if TYPE_CHECKING:
    from lemon_fx.analysis.width import NodeAnalysis, WidthAnalysis
    from lemon_fx.resolution.rewrite import NodeRewrite

__all__ = ["BranchEnd", "BranchEndKind", "Rule", "argument", "parameter_name"]

BranchEndKind = Literal["layer", "norm", "scale"]


@dataclass
class BranchEnd:
    """The layer that ends a residual branch, and the parameters that make it write zero.

    Depth growth gives these parameters, in every new block, values that make the branch
    write exactly zero, so that the new block ``x + F(x)`` is the identity.

    Fields:

    - ``node``: the fx node of the layer (for ``nn.MultiheadAttention``, its
      ``call_module`` node, whose first output the branch reads).
    - ``weight``: the qualified name (in the traced model) of the parameter to zero.
    - ``bias``: the qualified name of the bias added after it, or None when there is none.
    - ``kind``: ``"layer"``: the output is linear in ``weight`` plus ``bias``
      (``y = h W^T + b``: Linear, Conv, an attention's output projection, GPT-2's
      ``addmm``); the new block gets LEMON's cancelling weight ``W_c`` with
      ``W_c E = 0`` for the expansion ``E`` of the axis the layer's claim splits (its
      fan-in), and bias 0 (``net2net``: weight 0). ``"norm"``: a per-channel affine
      ``y = gamma * n(x) + beta`` (a BatchNorm ending a ResNet branch) gets
      ``gamma = beta = 0``. ``"scale"``: a product with a per-channel parameter (layer
      scale ``gamma * h``) gets ``gamma = 0``; depth growth uses it only when no layer
      with weights ends the branch deeper in (PoolFormer's pooling mixer has none), since
      a zero scale stops the gradient of everything before it in the new branch.
    """

    node: torch.fx.Node
    weight: str
    bias: str | None
    kind: BranchEndKind = "layer"


def argument(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    """``node``'s argument at position ``index``, else its keyword ``name``, else
    ``default``: how depth questions read an op's arguments without an analysis context."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def parameter_name(value: Any) -> str | None:
    """The qualified name a ``get_attr`` node reads (a parameter of the model), else None
    (a tensor computed at run time, a number, None)."""
    if isinstance(value, torch.fx.Node) and value.op == "get_attr":
        return str(value.target)
    return None


class Rule:
    """How one op (a module class, a function, a ``Tensor`` method) takes part in growth.

    Subclass it and implement ``analyze`` (required); override the other methods where
    the op needs them: ``rewrite`` for literals and module attributes, and the depth
    questions (``branch_end``, ``stream_norm_params``, ``passes_value``, ``passes_zero``,
    ``zero_factors``,
    ``residual_operands``, ``idempotent``), whose defaults say "no". Register the rule
    with ``lemon_fx.register(op)``; one instance serves every op it is registered for,
    so an instance's answers may depend on ``node.target``.

    ``root`` in the depth questions is the module the graph belongs to (the traced
    ``GraphModule``): ``root.get_submodule(node.target)`` is a ``call_module`` node's
    module, and the qualified names they return are names in ``root``.
    """

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        """State facts about ``node``, change nothing: unify and factor the dims of its
        inputs, outputs and parameters (``ctx.unify``, ``ctx.factor``), the forms each axis
        needs (``ctx.same_form``, ``ctx.require_form``), how each parameter axis grows
        (``ctx.claim`` with ``AxisUse("expand"|"split", slot)``), and what growth is refused
        (``ctx.forbid_growth``, ``ctx.fix``). Required: the base raises
        NotImplementedError."""
        raise NotImplementedError

    def rewrite(self, node: torch.fx.Node, ctx: NodeRewrite) -> None:
        """Rewrite literals and module attributes; most elementwise rules need nothing.

        Runs only after every node of the graph accepted the resolved plan: set grown
        sizes (``ctx.set_attr("in_features", ...)``, ``ctx.set_arg(...)``), or refuse
        with ``ctx.refuse(reason, fix)``. Parameters are grown centrally from the claims
        ``analyze`` made, not here."""

    def rewrites_size_args(self, node: torch.fx.Node) -> bool:
        """Whether ``node``'s size arguments (``view(b, t, c)``, ``expand(...)``) are
        rewritten to the grown sizes, so a size read from a tensor may feed them."""
        return False

    def finalize(self, analysis: WidthAnalysis) -> None:
        """Called once after every node was analyzed: for facts that span several nodes
        (a weight tied between an embedding and the LM head)."""

    def branch_end(self, node: torch.fx.Node, root: torch.nn.Module) -> BranchEnd | None:
        """If ``node`` can end a residual branch by writing exactly zero, the
        ``BranchEnd`` saying which parameters to set; else None (the default).

        Answer for a layer whose output is linear in a parameter (``h W^T + b``: kind
        ``"layer"``) or a per-channel affine norm (``gamma * n(x) + beta``: kind
        ``"norm"``), and only when those parameters are ``nn.Parameter``s of ``root``
        (not tensors computed at run time). For an op that returns a tuple, the branch
        reads its first item (``out, weights = attention(...)``): answer for that item.
        """
        return None

    def stream_norm_params(self, node: torch.fx.Node, root: torch.nn.Module
                           ) -> tuple[str | None, str | None] | None:
        """If ``node`` is a feature norm over the residual stream (LayerNorm, RMSNorm),
        the qualified names ``(gamma, beta)`` of its affine parameters (None for one it
        does not have); else None (the default).

        A norm on the stream makes a block Post-LN (``norm(x + F(x))``): depth growth
        sets these to ``gamma = 1, beta = 0`` in the block before a new block and moves
        their values to the new block. A norm inside a branch makes a block Pre-LN.
        """
        return None

    def passes_value(self, node: torch.fx.Node, root: torch.nn.Module
                     ) -> torch.fx.Node | None:
        """If ``node`` hands its input on with the same values (Dropout in eval mode,
        Identity, a dtype cast, ``contiguous``, a view/reshape/transpose that the block
        undoes), that input node; else None (the default).

        Depth growth walks a block's stream from its output back to its input through
        such nodes (and residual adds and norms).
        """
        return None

    def passes_zero(self, node: torch.fx.Node, root: torch.nn.Module
                    ) -> torch.fx.Node | None:
        """If ``node``'s output is zero whenever the returned input node is zero, that
        input (the walk from a residual add back to the layer ending the branch goes on
        there); else None.

        The default is ``passes_value``: an op that hands its input on passes zero. Rules
        add ops that are linear in one input: a product with a constant or a parameter
        (layer scale), a division of the branch by one (but not ``c / branch``).
        """
        return self.passes_value(node, root)

    def zero_factors(self, node: torch.fx.Node, root: torch.nn.Module
                     ) -> tuple[torch.fx.Node, ...]:
        """Inputs each of which alone makes the output zero when it is zero (the factors of
        a product of two unrelated activations: a mixture of experts' ``expert(x) *
        routing_weight``); the walk back from a residual add tries them in order and
        follows the first that reaches a layer ending the branch. Asked only where
        ``passes_zero`` answers None; the default is ``()``."""
        return ()

    def residual_operands(self, node: torch.fx.Node, root: torch.nn.Module
                          ) -> tuple[Any, Any, Any] | None:
        """If ``node`` computes ``first + alpha * second``, the triple
        ``(first, second, alpha)`` (``alpha`` is 1 for a plain add); else None (the
        default).

        Such a node may be a residual add: one operand the stream, the other a branch.
        A zero branch leaves the stream only when ``alpha`` scales the branch, so depth
        growth refuses a stream in ``second`` with ``alpha != 1``.
        """
        return None

    def idempotent(self, node: torch.fx.Node, root: torch.nn.Module) -> torch.fx.Node | None:
        """If ``node`` computes an idempotent ``f`` (``f(f(y)) = f(y)``: ReLU), its input
        node; else None (the default).

        A ResNet block ``relu(x + F(x))`` whose input ``x`` is itself a ReLU's output is
        the identity when ``F = 0``: such an op may close a block's stream.
        """
        return None

    @property
    def name(self) -> str:
        """The rule's name in messages and the support table: its class name."""
        return type(self).__name__

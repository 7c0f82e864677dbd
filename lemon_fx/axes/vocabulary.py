"""The words the analysis speaks in, as typed constants: forms, roles and hints.

**Forms** say how an activation of width ``S`` lives in the grown model (width ``T``,
``k = T // S``, ``r = T % S``; see ``axes.expansion``):

- ``CIRC``: entry ``i`` is ``x[i % S]`` (any op that is blind to order and duplicates);
- ``AVG``: ``k`` tiles of ``x``, then ``r`` entries ``mean(x)`` (keeps the mean: LayerNorm);
- ``ZERO``: ``k`` tiles of ``x``, then ``r`` zeros (keeps sums of squares: RMSNorm).

For whole multiples (``r = 0``) all three are plain tiling.

**Roles** name what a width group is for; a plan selects them as ``"@role"``.

**Hints** are what rules say about an axis while analysing (``ctx.hint``); the groups
turn hints into roles (a ``NORM`` hint on a stream makes it ``residual``, ``KV`` makes
heads ``kv_heads``).
"""

from __future__ import annotations

from typing import Literal

__all__ = [
    "ANY_FORM", "AVG", "CIRC", "CIRC_OR_AVG", "CIRC_OR_ZERO", "FORMS", "HINTS", "ONLY_CIRC",
    "ROLES", "ZERO", "Form", "Hint", "Role",
]

Form = Literal["circ", "avg", "zero"]
CIRC: Form = "circ"
AVG: Form = "avg"
ZERO: Form = "zero"
# in order of preference: a free axis takes the first form its ops allow
FORMS: tuple[Form, ...] = (CIRC, AVG, ZERO)
ANY_FORM: frozenset[Form] = frozenset(FORMS)
ONLY_CIRC: frozenset[Form] = frozenset({CIRC})
CIRC_OR_ZERO: frozenset[Form] = frozenset({CIRC, ZERO})
CIRC_OR_AVG: frozenset[Form] = frozenset({CIRC, AVG})

Role = Literal["residual", "ffn", "heads", "kv_heads", "head_dim", "channels", "hidden"]
RESIDUAL: Role = "residual"
FFN: Role = "ffn"
HEADS: Role = "heads"
KV_HEADS: Role = "kv_heads"
HEAD_DIM: Role = "head_dim"
CHANNELS: Role = "channels"
HIDDEN: Role = "hidden"
ROLES: tuple[Role, ...] = (RESIDUAL, FFN, HEADS, KV_HEADS, HEAD_DIM, CHANNELS, HIDDEN)

Hint = Literal["norm", "kv", "channels", "heads", "head_dim", "nonlinear", "residual_add"]
NORM_HINT: Hint = "norm"            # a norm normalizes over this axis
KV_HINT: Hint = "kv"                # key/value heads (grouped-query attention)
CHANNELS_HINT: Hint = "channels"    # a conv's channel axis
HEADS_HINT: Hint = "heads"          # attention heads
HEAD_DIM_HINT: Hint = "head_dim"    # the per-head axis
NONLINEAR_HINT: Hint = "nonlinear"  # an activation's hidden axis (an ffn)
RESIDUAL_ADD_HINT: Hint = "residual_add"  # a residual add's stream
HINTS: tuple[Hint, ...] = (NORM_HINT, KV_HINT, CHANNELS_HINT, HEADS_HINT, HEAD_DIM_HINT,
                           NONLINEAR_HINT, RESIDUAL_ADD_HINT)
__all__ += ["RESIDUAL", "FFN", "HEADS", "KV_HEADS", "HEAD_DIM", "CHANNELS", "HIDDEN",
            "NORM_HINT", "KV_HINT", "CHANNELS_HINT", "HEADS_HINT", "HEAD_DIM_HINT",
            "NONLINEAR_HINT", "RESIDUAL_ADD_HINT"]

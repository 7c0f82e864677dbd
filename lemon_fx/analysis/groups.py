"""Width groups: the growable leaves of the analysis, named, with a role and a form.

A group is one class of coupled leaves that is not tied to a model input or output and
that a *layer* grows: some rule (Linear, Embedding, a norm, attention...) claims a
parameter axis on it. Axes that only free parameters carry (the length of a position
table, the number of learned queries) are not widths.
Its name is the longest common module prefix of the parameters on it plus its role,
e.g. ``blocks.3.mlp.ffn``; the model-wide residual stream is just ``residual``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from lemon_fx.analysis.width import ROLE_ORDER, WidthAnalysis, group_name_candidates
from lemon_fx.axes.vocabulary import (
    CHANNELS,
    CHANNELS_HINT,
    CIRC,
    FFN,
    FORMS,
    HEAD_DIM,
    HEAD_DIM_HINT,
    HEADS,
    HEADS_HINT,
    HIDDEN,
    KV_HEADS,
    KV_HINT,
    NONLINEAR_HINT,
    NORM_HINT,
    RESIDUAL,
    RESIDUAL_ADD_HINT,
    Hint,
    Role,
)
from lemon_fx.errors import Problem

__all__ = ["HeldWidth", "WidthGroup", "build_groups", "held_note"]


@dataclass
class WidthGroup:
    """One width a plan can change: a class of coupled axes that grow together.

    ``name``
        Readable and unique: the longest common module prefix of the parameters on it
        plus its role (``blocks.3.mlp.ffn``; the model-wide stream is ``residual``), with
        ``_0``, ``_1``... where two groups would share a name. Plan globs match it.
    ``size``
        Its size in the source model, in its own unit: heads for ``heads``/``kv_heads``,
        groups for the channels of a grouped convolution or GroupNorm, else entries.
    ``role``
        What it is for, selected in a plan as ``"@role"``: ``"residual"``, ``"ffn"``,
        ``"heads"``, ``"kv_heads"``, ``"head_dim"``, ``"channels"`` or ``"hidden"`` (see
        ``lemon_fx.axes.vocabulary``).
    ``members``
        The parameter axes on it, as ``"qualified.name[axis]"``.
    ``form``
        The LEMON form its activations take at a non-multiple width: ``"circ"``,
        ``"avg"`` or ``"zero"`` (the most common preferred form of its value axes), or
        ``"conflict"`` when some op's needs leave no form, so only whole multiples
        (2x, 3x, ...) are exact.
    ``leaf``
        Its leaf in the analysis' ``DimTable`` (an id for the resolution; not shown).
    ``blocked_by``
        ``"node (op): reason"`` for every op that refuses any growth of it; a plan that
        grows it raises.
    ``whole_multiples_only``
        The same for ops that allow growth by whole multiples only.
    """

    name: str
    size: int
    role: str
    members: list[str]
    form: str
    leaf: int = field(repr=False, default=-1)
    blocked_by: list[str] = field(default_factory=list)
    whole_multiples_only: list[str] = field(default_factory=list)


@dataclass
class HeldWidth:
    """Layer widths the analysis had to keep at their size (never grown), and why.

    Not the model's own boundaries (vocabulary, input channels): axes that an op couples
    in a way the dims table cannot express, e.g. a grouped convolution reading a channel
    concatenation. Listed so that a plan growing "everything" does not skip them silently.
    ``members`` are the parameter axes, as in ``WidthGroup``.
    """

    members: list[str]
    problem: Problem


def held_note(held: HeldWidth) -> str:
    p = held.problem
    return (f"kept at their size: {', '.join(held.members)} ({p.op} at '{p.node}' "
            f"{p.reason}; fix: {p.fix})")


def _held_widths(analysis: WidthAnalysis, owned: set[int]) -> list[HeldWidth]:
    table = analysis.dims
    by_op: dict[tuple, tuple[set[int], Problem]] = {}
    for dim, problem in analysis.mixed:
        leaves = {table.find(leaf) for leaf in table.leaves(dim) if leaf in owned}
        if leaves:
            key = (problem.node, problem.reason)
            by_op.setdefault(key, (set(), problem))[0].update(leaves)
    held = []
    for roots, problem in by_op.values():
        members = [f"{name}[{axis}]" for name, dims in analysis.param_dims.items()
                   for axis, d in enumerate(dims)
                   if any(table.find(leaf) in roots for leaf in table.leaves(d))]
        held.append(HeldWidth(members, problem))
    return held


def returned_width_notes(analysis: WidthAnalysis) -> list[str]:
    """Stream widths kept at their size, and why: a normalized width (what a bare
    ``Plan(width=k)`` would be expected to grow) that an op or an output fixes.

    A base model (``BertModel``, ``ViTModel``, BART's ``encoder_last_hidden_state``)
    returns its residual stream: that width is fixed by the output, so a bare width grows
    the heads and FFNs around it, and nothing else would tell the user that the hidden
    size stayed. ``grow`` also warns with these when the plan's width is a bare number."""
    table = analysis.dims
    # a width a norm normalizes over is a feature width (a residual add's hint marks the
    # sequence axis too)
    streams = {leaf for d, roles in analysis.hints.items() if NORM_HINT in roles
               for leaf in table.leaves(d)}
    notes = {}
    for leaf, reason in table.fixed_leaves().items():
        if leaf not in streams or table.size(leaf) <= 1 or _not_a_width(reason):
            continue
        if "of model output" in reason:
            notes[reason] = (f"width {table.size(leaf)} is kept at its size: it is the "
                             f"model's hidden width and {reason} returns it; grow a model "
                             "with Plan(grow_outputs=True) (the first entries stay the source's "
                             "output) or grow a model with a head on top (e.g. ...ForMaskedLM)")
        else:
            notes[reason] = (f"width {table.size(leaf)} (a normalized stream) is "
                             f"kept at its size: {reason} needs it; the rest grows around it "
                             "(lemon_fx.inspect(gm) shows which widths a plan can change)")
    return sorted(notes.values())


def _not_a_width(reason: str) -> bool:
    """A fixed axis that is no feature width: a sequence, a batch, a vocabulary."""
    return any(word in reason for word in ("model input", "vocabulary", "created by",
                                           "broadcast by"))


def _role(hints: set[Hint]) -> Role:
    if HEADS_HINT in hints:
        return KV_HEADS if KV_HINT in hints else HEADS
    if HEAD_DIM_HINT in hints:
        return HEAD_DIM
    if NORM_HINT in hints:  # a stream normalized over its features (LayerNorm, RMSNorm)
        return RESIDUAL
    if CHANNELS_HINT in hints:
        return CHANNELS
    if NONLINEAR_HINT in hints:
        return FFN
    if RESIDUAL_ADD_HINT in hints:
        return RESIDUAL
    return HIDDEN


def build_groups(analysis: WidthAnalysis) -> list[WidthGroup]:
    table = analysis.dims
    fixed = table.fixed_leaves()
    owned: set[int] = set()
    for name, claims in analysis.claims.items():
        for claim in claims:
            if claim.default:
                continue
            for axis, use in enumerate(claim.axes):
                if use is not None:
                    owned.update(table.leaves(analysis.param_dims[name][axis]))
    members: dict[int, list[str]] = {}
    for name, dims in analysis.param_dims.items():
        for axis, d in enumerate(dims):
            for leaf in table.leaves(d):
                if leaf not in fixed:
                    members.setdefault(leaf, []).append(f"{name}[{axis}]")
    hints: dict[int, set[str]] = {}
    for d, roles in analysis.hints.items():
        for leaf in table.leaves(d):
            hints.setdefault(leaf, set()).update(roles)
    for part, whole in analysis.picked_parts:  # a width sliced into a head's dims
        if any(HEAD_DIM_HINT in hints.get(leaf, ()) for leaf in table.leaves(part)):
            for leaf in table.leaves(whole):
                hints.setdefault(leaf, set()).add(HEAD_DIM_HINT)
    slot_forms: dict[int, Counter] = {}
    for slot in analysis.form_parent:
        value, axis = slot
        allowed, _ = analysis.allowed_forms(slot)
        form = next((f for f in FORMS if f in allowed), "conflict")
        for leaf in table.leaves(analysis.value_dims[value][axis]):
            slot_forms.setdefault(leaf, Counter())[form] += 1
    groups = []
    for leaf, params in members.items():
        if leaf not in owned:
            continue
        role = _role(hints.get(leaf, set()))
        prefix = group_name_candidates([p.split("[")[0] for p in params])
        name = f"{prefix}.{role}" if prefix else role
        counts = slot_forms.get(leaf, Counter({CIRC: 1}))
        form = "conflict" if "conflict" in counts else counts.most_common(1)[0][0]
        blocked, whole = [], []
        for b in analysis.blockers:
            if leaf in table.leaves(b.dim):
                text = f"{b.problem.node} ({b.problem.op}): {b.problem.reason}"
                (whole if b.whole_multiples_ok else blocked).append(text)
        groups.append(
            WidthGroup(name, table.size(leaf), role, params, form, leaf,
                       sorted(set(blocked)), sorted(set(whole)))
        )
    _make_names_unique(groups)
    order = {r: i for i, r in enumerate(ROLE_ORDER)}
    groups.sort(key=lambda g: (g.name.count("."), order.get(g.role, 99), g.name))
    analysis.groups = groups
    analysis.held = _held_widths(analysis, owned)
    return groups


def _make_names_unique(groups: list[WidthGroup]) -> None:
    seen = Counter(g.name for g in groups)
    index: Counter = Counter()
    for g in sorted(groups, key=lambda g: min(g.members)):
        if seen[g.name] > 1:
            index[g.name] += 1
            g.name = f"{g.name}_{index[g.name] - 1}"

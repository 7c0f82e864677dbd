"""The error types of lemon_fx.

Every failure a user can cause is a ``LemonError`` subclass raised *before* anything is
built. An error carries one ``Problem`` per offending node, so that one exception lists
every problem at once, each naming the node, the op, the source line, why, and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "LemonError",
    "NotLosslessError",
    "PlanError",
    "Problem",
    "TraceError",
    "UnsupportedOpError",
    "VerificationError",
    "first_line",
]


def first_line(exc: BaseException) -> str:
    """``"TypeName: first line of the message"``, or the type alone for an empty message
    (a user's ``raise ValueError()`` must not turn into an IndexError while reporting)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


@dataclass(frozen=True)
class Problem:
    """One reason a model cannot be grown as asked.

    ``reason`` says why, ``fix`` what to do about it. ``node`` is the fx node name (or a
    group / plan field name when no node applies), ``op`` a readable spelling of the
    operation, ``source`` the user's source line when the tracer recorded one.
    """

    reason: str
    fix: str
    node: str | None = None
    op: str | None = None
    source: str | None = None

    def render(self) -> str:
        """``node '...' op ...: reason``, then ``at SOURCE`` and ``fix: ...`` lines."""
        head = []
        if self.node is not None:
            head.append(f"node '{self.node}'")
        if self.op is not None:
            head.append(f"op {self.op}")
        lines = [" ".join(head) + ": " + self.reason if head else self.reason]
        if self.source:
            lines.append(f"    at {self.source}")
        lines.append(f"    fix: {self.fix}")
        return "\n".join(lines)


# a merged problem names this many nodes, then counts the rest
NAMED_NODES = 3


def merge_repeated(problems: list[Problem] | tuple[Problem, ...]) -> tuple[Problem, ...]:
    """One problem per distinct cause: problems with the same reason, fix and op at
    several nodes become one that names the first ``NAMED_NODES`` nodes and counts the
    rest (the first one's source line stays)."""
    groups: dict[tuple, list[Problem]] = {}
    for p in problems:
        groups.setdefault((p.reason, p.fix, p.op), []).append(p)
    merged = []
    for same in groups.values():
        nodes = list(dict.fromkeys(p.node for p in same if p.node is not None))
        if len(nodes) <= 1:
            merged.append(same[0])
            continue
        named = ", ".join(f"'{n}'" for n in nodes[:NAMED_NODES])
        more = f" and {len(nodes) - NAMED_NODES} more" if len(nodes) > NAMED_NODES else ""
        first = same[0]
        merged.append(Problem(reason=f"{first.reason} (at {len(nodes)} nodes: {named}{more})",
                              fix=first.fix, node=None, op=first.op, source=first.source))
    return tuple(merged)


class LemonError(Exception):
    """Base class of every error lemon_fx raises for a user's model or plan.

    ``message`` is the summary line; ``problems`` the ``Problem`` of every distinct cause
    (one exception lists them all; the same cause at several nodes is one problem naming
    the first few); ``details`` every problem at every node, as the analysis found them
    (``lemon-fx --debug`` prints them); ``str(error)`` renders the message and each
    problem, numbered. Catch ``LemonError`` to catch every refusal: it is raised before anything is
    built, and the source model is never modified.
    """

    def __init__(self, message: str, problems: list[Problem] | tuple[Problem, ...] = (),
                 details: list[Problem] | tuple[Problem, ...] | None = None):
        self.details: tuple[Problem, ...] = tuple(problems if details is None else details)
        self.problems: tuple[Problem, ...] = merge_repeated(problems)
        self.message = message
        super().__init__(self._render())

    def _render(self) -> str:
        if not self.problems:
            return self.message
        count = len(self.problems)
        body = "\n".join(f"  {i + 1}. {p.render()}" for i, p in enumerate(self.problems))
        noun = "problem" if count == 1 else "problems"
        return f"{self.message} ({count} {noun}):\n{body}"


class PlanError(LemonError):
    """The plan is wrong in itself or for this model.

    Raised by ``Plan(...)``, ``Plan.from_dict``/``from_file`` (an invalid field, an
    unknown field, an unreadable plan file) and by ``grow`` when the plan does not fit the
    model: an unknown role or a selector that matches no group or stack, a plan that grows
    nothing, shrinking, a size constraint it breaks (``nn.MultiheadAttention``'s
    ``embed_dim``), a placement that does not fit a stack, nested stacks grown together,
    or a grown model beyond the size limits (a multiplier taken for a size). ``grow`` also
    raises it for something that is not a plan.
    """


class UnsupportedOpError(LemonError):
    """A growth the plan asks for passes through an op lemon_fx cannot grow.

    Raised by ``grow`` when a growing axis reaches an op without a rule (register one
    with ``lemon_fx.register``), or an op whose rule refuses that growth outright (a
    weight computed at run time, ``softmax`` without ``dim``), or when a depth plan grows
    a stack that cannot take new blocks. When some problems are unsupported ops and
    others have no exact answer, all are listed in this one error.
    """


class NotLosslessError(LemonError):
    """A rule exists, but this case has no exact answer.

    Raised by ``grow``: an op that needs a growing axis to keep its size (a ``softmax``
    or ``sum`` over it, ``head_dim``, slicing by position), LEMON forms that conflict at a
    non-multiple width (a LayerNorm's avg input against a product's circ/zero), a
    parameter shared by ops that need it grown differently, a rewrite a rule cannot make
    (a size computed from tensor shapes, a norm without an affine weight at a
    non-multiple width), or new blocks in a Post-LN stack without
    ``Plan(allow_inexact=True)``.
    """


class TraceError(LemonError):
    """The model could not be traced into a graph, or the graph carries no shapes.

    Raised by ``lemon_fx.trace`` (neither ``torch.fx.symbolic_trace`` nor ``torch.export``
    could trace it, the traced graph fails on the example inputs, ``example_kwargs`` do
    not follow ``forward``'s signature, not an ``nn.Module``, an unknown ``frontend``), by
    ``inspect`` for a GraphModule without shape metadata, and by ``grow`` for something
    that is not a GraphModule, one without shape metadata and no ``example_inputs``, or
    one that fails on the given ``example_inputs``.
    """


class VerificationError(LemonError):
    """The grown model does not compute the source model's function within tolerance.

    Raised by ``lemon_fx.verify`` (the torch or onnxruntime check fails, a model fails to
    run, the exported ONNX file is invalid or does not run), by ``export_onnx`` when the
    export fails, and by ``grow``'s own check on the example inputs before it returns.
    When ``verify``'s comparison fails, the error carries its ``VerificationReport`` as
    ``.report``.
    """

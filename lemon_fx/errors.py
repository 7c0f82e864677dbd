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

    ``node`` is the fx node name (or a group / plan field name when no node applies),
    ``op`` a readable spelling of the operation, ``source`` the user's source line when
    the tracer recorded one.
    """

    reason: str
    fix: str
    node: str | None = None
    op: str | None = None
    source: str | None = None

    def render(self) -> str:
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


class LemonError(Exception):
    """Base class of every error lemon_fx raises for a user's model or plan."""

    def __init__(self, message: str, problems: list[Problem] | tuple[Problem, ...] = ()):
        self.problems: tuple[Problem, ...] = tuple(problems)
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
    """The plan is wrong for this model: unknown selector, shrinking, heads that do not fit."""


class UnsupportedOpError(LemonError):
    """A grown axis passes through an op that has no rule."""


class NotLosslessError(LemonError):
    """A rule exists, but this case has no exact answer (e.g. Post-LN at a non-multiple width)."""


class TraceError(LemonError):
    """The model could not be traced into a graph."""


class VerificationError(LemonError):
    """The grown model does not compute the source model's function within tolerance."""

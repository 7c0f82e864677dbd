"""Depth resolution: from ``Plan.depth`` and ``placement`` to a block order per stack.

The order of a grown stack lists, for each position, the index of the source block it
comes from. The first occurrence of a source is the source block itself (its weights kept);
every later occurrence is a new block, built from the (widened) source with its residual
branches set to write zero. Blocks the analysis keeps (a stage's downsampling block, a
plain conv) appear once: copies go to the others. A bare depth leaves a stack with nothing
to copy as it is when another stack grows (``kept_depth_notes`` tells the user), and
refuses it when no stack can grow. ``placement``:

- ``"interleave"`` (LEMON): each copy right after its source. With ``N`` new blocks over
  ``L`` sources, every source gets ``N // L`` copies and the last ``N % L`` sources one
  more (for targets under ``2L`` the first ``2L - T`` sources get none, as in LEMON).
  Blocks whose graphs alternate by position (Swin's plain and shifted windows: a period
  of 2) are interleaved by whole periods, ``[0, 1, 0', 1']``, so a class that builds them
  by position loads the grown weights into blocks of the same kind;
- ``"stack"``: the copies on top, sources taken in order (StackBERT);
- a list of source indices, one per position: any order in which the sources themselves
  keep their order.
"""

from __future__ import annotations

from dataclasses import dataclass

from lemon_fx.analysis.stacks import BlockStack
from lemon_fx.errors import NotLosslessError, PlanError, Problem, UnsupportedOpError
from lemon_fx.plan import Plan
from lemon_fx.tracing.graph_facts import op_name, source_line

__all__ = ["StackGrowth", "interleave_order", "kept_depth_notes", "periodic_interleave_order",
           "resolve_depth", "stack_order"]


@dataclass
class StackGrowth:
    """How one block stack grows: ``stack`` (the source ``BlockStack``) and ``order``, the
    source block index of each position of the grown stack (the first occurrence of a
    source is that block itself, every later one a new block copied from it; e.g.
    ``[0, 0, 1, 1]`` for LEMON's interleaving of two blocks into four)."""

    stack: BlockStack
    order: list[int]

    @property
    def new_positions(self) -> list[int]:
        """The positions of ``order`` that hold new blocks (not a source's first use)."""
        seen: set[int] = set()
        new = []
        for position, source in enumerate(self.order):
            if source in seen:
                new.append(position)
            seen.add(source)
        return new


def _check_copyable(count: int, target: int, copyable: list[int]) -> None:
    if target > count and not copyable:
        raise PlanError("no block can be copied", [Problem(
            reason=f"growing {count} blocks to {target} needs a block to copy, and none "
            "may be copied", node="depth", fix="keep the depth of this stack")])


def interleave_order(count: int, target: int, copyable: list[int] | None = None) -> list[int]:
    copyable = list(range(count)) if copyable is None else copyable
    _check_copyable(count, target, copyable)
    extra, n = target - count, len(copyable)
    copies = {c: extra // n + (1 if j >= n - extra % n else 0) for j, c in enumerate(copyable)}
    order = []
    for i in range(count):
        order += [i] * (1 + copies.get(i, 0))
    return order


def periodic_interleave_order(count: int, target: int, copyable: list[int],
                              period: int) -> list[int] | None:
    """LEMON's interleaving by whole periods, for blocks whose kind alternates by position
    (Swin: plain, shifted, plain, shifted): each period of ``period`` blocks is followed by
    its copies, so every block keeps a position of its kind (``[0, 1, 0', 1']``); None
    when the new blocks are no whole number of periods."""
    extra = target - count
    if period < 2 or extra % period or len(copyable) % period:
        return None
    units = [copyable[i:i + period] for i in range(0, len(copyable), period)]
    uses = interleave_order(len(units), len(units) + extra // period)
    unit_of = {block: j for j, unit in enumerate(units) for block in unit}
    order = []
    for i in range(count):
        if i not in unit_of:
            order.append(i)  # a kept block
        elif units[unit_of[i]][0] == i:  # the unit itself, then its copies
            order += units[unit_of[i]] * uses.count(unit_of[i])
    return order


def stack_order(count: int, target: int, copyable: list[int] | None = None) -> list[int]:
    copyable = list(range(count)) if copyable is None else copyable
    _check_copyable(count, target, copyable)
    return list(range(count)) + [copyable[j % len(copyable)] for j in range(target - count)]


def _blocked(stack: BlockStack) -> Problem:
    """Why ``stack`` cannot grow in depth, at the node that stops it when there is one."""
    node = stack.problem_node
    return Problem(reason=f"stack {stack.name!r} cannot grow in depth: {stack.problem}",
                   node=node.name if node is not None else stack.name,
                   op=op_name(node) if node is not None else stack.kind,
                   source=source_line(node) if node is not None else None,
                   fix="keep its depth, or " + (stack.fix or "restructure the block so every "
                                                "residual branch ends in a Linear/Conv layer"))


# Far beyond any trained model: a plan asking for more is a typo, and building its order
# alone would run for minutes.
MAX_BLOCKS = 10_000


def _target(stack: BlockStack, value: float | int, bare: bool) -> int:
    if bare or isinstance(value, float):
        return int(round(stack.count * float(value)))
    return int(value)


def _explicit(stack: BlockStack, order: tuple[int, ...]) -> list[Problem]:
    firsts = [s for i, s in enumerate(order) if s not in order[:i]]
    where = f"placement for '{stack.name}'"
    if any(not isinstance(s, int) or not 0 <= s < stack.count for s in order):
        return [Problem(reason=f"{where} names a block outside 0..{stack.count - 1}",
                        node="placement", fix="use source block indices")]
    if firsts != list(range(stack.count)):
        return [Problem(reason=f"{where} does not keep every source block once, in order "
                        f"(first occurrences: {firsts})", node="placement",
                        fix="list each source index at least once, the first occurrences "
                        "in increasing order, e.g. [0, 0, 1, 1]")]
    return []


def _is_container(stack: BlockStack, stacks: list[BlockStack]) -> bool:
    """Whether a bare depth grows the stacks inside ``stack`` instead of ``stack`` itself:
    it cannot grow (ConvNeXt's ``stages``: each stage starts by downsampling) and holds
    stacks, or it holds a stack that can grow (timm's MobileNetV3 ``blocks``, whose stages
    of equal-shape residual blocks could be copied whole: scaling each stage's block count
    is what the family's own depth multiplier does)."""
    inner = [s for s in stacks if s.name.startswith(stack.name + ".")]
    return bool(inner) and (stack.problem is not None or any(not s.problem for s in inner))


def _unclosed_relus(stack: BlockStack, order: list[int]) -> list[Problem]:
    """A copy of a block ``relu(x + F(x))`` is the identity only on a stream that is
    itself a ReLU's output: the block before each such copy must end in one too (always
    so when copies follow their source; not after a kept block without one)."""
    problems = []
    seen: set[int] = set()
    for position, source in enumerate(order):
        if source in seen and stack.blocks[source].spine_relu:
            before = stack.blocks[order[position - 1]]
            if not before.spine_relu:
                problems.append(Problem(
                    reason=f"a copy of block {stack.blocks[source].path} (which ends in "
                    f"relu(x + F(x))) would follow block {before.path}, whose output is no "
                    "ReLU's, so relu(x) would not be x", node="placement",
                    fix="place each copy after its source (placement='interleave')"))
                break
        seen.add(source)
    return problems


def kept_depth_notes(stacks: list[BlockStack], growths: list[StackGrowth],
                     plan: Plan) -> tuple[list[str], list[str]]:
    """What a depth growth left as it was, as two lists of notes: the stacks a bare depth
    could not grow (every block changes the stream's shape or is no residual block: the
    user asked for every stack, so ``grow`` warns), and, in each grown stack, the kept
    blocks other than a first downsampling block."""
    if plan.depth is None:
        return [], []
    grown = {g.stack.name for g in growths}
    left, notes = [], []
    if not isinstance(plan.depth, dict):
        names = [f"'{s.name}'" for s in stacks if s.nothing_to_copy
                 and s.name not in grown and not _is_container(s, stacks)]
        if names:
            left.append(f"{'stacks' if len(names) > 1 else 'stack'} {', '.join(names)} keep "
                        "their depth: no block of theirs can be copied as an identity (each "
                        "changes the stream's shape or is no residual block)")
    for growth in growths:
        kept = [growth.stack.blocks[i].path for i in growth.stack.kept if i > 0]
        if kept:
            notes.append(f"stack '{growth.stack.name}' grows by copying its residual blocks; "
                         f"{', '.join(kept)} change the stream's shape or are no residual "
                         "blocks, and are kept as they are")
    return left, notes


def resolve_depth(stacks: list[BlockStack], plan: Plan) -> list[StackGrowth]:
    if plan.depth is None:
        return []
    by_name = {s.name: s for s in stacks}
    names = ", ".join(by_name) or "(none)"
    problems: list[Problem] = []
    wanted: dict[str, int] = {}
    if isinstance(plan.depth, dict):
        for name, value in plan.depth.items():
            if name not in by_name:
                problems.append(Problem(reason=f"no block stack named {name!r}",
                                        node=f"depth[{name!r}]",
                                        fix=f"use a stack name; the stacks are: {names}"))
                continue
            wanted[name] = _target(by_name[name], value, bare=False)
    else:
        if not stacks:
            problems.append(Problem(reason="the model has no block stack", node="depth",
                                    fix="leave depth out, or put the blocks in an "
                                    "nn.ModuleList / nn.Sequential"))
        wanted = {s.name: _target(s, plan.depth, bare=True) for s in stacks
                  if not _is_container(s, stacks)}
        # a stack with nothing to copy (a stage of one downsampling block) stays as it is
        # when another stack grows (``kept_depth_notes`` says so); alone, it is refused
        if any(not by_name[n].problem for n in wanted):
            wanted = {n: t for n, t in wanted.items() if not by_name[n].nothing_to_copy}
    growths = []
    blocked: list[Problem] = []
    inexact: list[Problem] = []
    for name, target in wanted.items():
        stack = by_name[name]
        if target < stack.count:
            problems.append(Problem(reason=f"stack {name!r} would shrink from {stack.count} to "
                                    f"{target} blocks", node=f"depth[{name!r}]",
                                    fix="lemon_fx only grows: use a target >= the current "
                                    "count"))
            continue
        if target == stack.count:
            continue
        if target > MAX_BLOCKS:
            problems.append(Problem(
                reason=f"stack {name!r} would grow from {stack.count} to {target} blocks",
                node=f"depth[{name!r}]", fix=f"check the plan's numbers: lemon_fx builds at "
                f"most {MAX_BLOCKS} blocks per stack (a multiplier, not a count?)"))
            continue
        if isinstance(plan.placement, tuple):
            if len(plan.placement) != target:
                problems.append(Problem(
                    reason=f"placement lists {len(plan.placement)} blocks but stack {name!r} "
                    f"grows to {target}", node="placement", fix="give one source index per "
                    "position of the grown stack"))
                continue
            problems += _explicit(stack, plan.placement)
            order = list(plan.placement)
        if stack.problem:  # before any order: a blocked stack may have no copyable block
            blocked.append(_blocked(stack))
            continue
        if plan.placement == "stack":
            order = stack_order(stack.count, target, stack.copyable)
        elif not isinstance(plan.placement, tuple):
            order = (periodic_interleave_order(stack.count, target, stack.copyable,
                                               stack.period)
                     or interleave_order(stack.count, target, stack.copyable))
        not_copyable = sorted({s for p, s in enumerate(order) if s in order[:p]}
                              - set(stack.copyable))
        if not_copyable:
            problems.append(Problem(
                reason=f"block(s) {not_copyable} of {name!r} cannot be copied (they change "
                "the shape of the stream or are no residual blocks)", node="placement",
                fix=f"copy only blocks {stack.copyable}"))
            continue
        problems += _unclosed_relus(stack, order)
        if stack.kind == "post_ln" and not plan.allow_inexact:
            inexact.append(Problem(
                reason=f"stack {name!r} is Post-LN: LEMON's new blocks (identity norm on "
                "the source, zero branches) are exact only up to the norms' eps",
                node=name, op="post_ln",
                fix="pass Plan(allow_inexact=True) to accept an error of order eps (the "
                "report states the measured error)"))
            continue
        growths.append(StackGrowth(stack, order))
    grown_names = [g.stack.name for g in growths]
    for outer in grown_names:
        for inner in grown_names:
            if inner.startswith(outer + "."):
                # copies of an outer block would have to copy its inner stack as grown,
                # and the inner growth is planned on the source's blocks only
                problems.append(Problem(
                    reason=f"stacks {outer!r} and {inner!r} are nested, and this plan grows "
                    "both", node=f"depth[{inner!r}]",
                    fix=f"grow one level per plan: depth={{{outer!r}: ...}}, or the inner "
                    "stacks only; grow the result again for the other level"))
    if problems:
        raise PlanError("the depth plan does not fit this model", problems)
    if blocked and not isinstance(plan.depth, dict):
        # a bare depth reaches every stack; say which ones a mapping could still grow
        growable = {g.stack.name: len(g.order) for g in growths}
        hint = (f"depth={growable!r} grows only the stacks that can" if growable
                else "no stack of this model can grow in depth")
        blocked = [Problem(reason=p.reason, node=p.node, op=p.op, source=p.source,
                           fix=f"{p.fix}; {hint}") for p in blocked]
    if blocked:
        raise UnsupportedOpError("some stacks cannot grow in depth", blocked + inexact)
    if inexact:
        raise NotLosslessError("this depth growth has no exact answer", inexact)
    return growths

"""``Plan``: what to grow, by how much, and how. Plain data; resolution is elsewhere.

``width``  a bare number scales every growable group except ``head_dim``; a mapping takes
           selectors (``"@residual"``, ``"@ffn"``, ``"@heads"``, ``"@kv_heads"``,
           ``"@head_dim"``, ``"@channels"``, ``"@hidden"``, or a glob over group names such
           as ``"blocks.3.*"``) to targets: an int is an absolute size (heads counted in
           heads), a float a multiplier. Later entries override earlier ones.
``depth``  a bare number scales every block stack (a stack of stages that cannot grow
           itself, ConvNeXt's ``stages``, is a container: the stacks inside it grow); a
           mapping takes stack names to a target count (int) or a multiplier (float).
``placement``  ``"interleave"`` (LEMON: 1, 1', 2, 2', ...) or ``"stack"`` (copies on top),
           or an explicit list of source indices.
``method`` ``"lemon"`` (unequal splits, cancelling new blocks) or ``"net2net"`` (equal
           splits, zeroed new blocks), the baseline users compare against.
``seed``   the only source of randomness: same seed, identical weights.
``noise_scale``  a multiplier of LEMON's noise bound (split fan-in columns, cancelling new
           blocks): 1.0, the default, draws at the layer's own weight scale; smaller keeps
           the copies closer together, 0 makes them equal (and new blocks zero). The
           function is exact at any scale; only how fast copies diverge changes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lemon_fx.errors import PlanError, Problem, first_line

__all__ = ["Plan", "METHODS", "PLACEMENTS"]

METHODS = ("lemon", "net2net")
PLACEMENTS = ("interleave", "stack")
Target = int | float


def _check_target(where: str, value: Any) -> list[Problem]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return [Problem(reason=f"{where} is {value!r}, not a number",
                        fix="use an int (absolute size) or a float (multiplier)", node=where)]
    if value <= 0:
        return [Problem(reason=f"{where} is {value}, not positive",
                        fix="use a size or multiplier greater than zero", node=where)]
    return []


@dataclass(frozen=True)
class Plan:
    """What to grow, by how much, and how: plain, frozen data, checked when it is made.

    ``width``
        ``None`` (the default) keeps every width. A bare number (int or float) is a
        multiplier of every growable width group except ``head_dim``
        (``Plan(width=2.0)``; sizes are rounded to the nearest int). A mapping takes
        selectors to targets: a role (``"@residual"``, ``"@ffn"``, ``"@heads"``,
        ``"@kv_heads"``, ``"@head_dim"``, ``"@channels"``, ``"@hidden"``) or a glob over
        the group names that ``lemon_fx.inspect`` lists (``"blocks.3.*"``); an int target
        is an absolute size, a float a multiplier. Heads are counted in heads, grouped
        channels in groups. Later entries override earlier ones. A role the model lacks
        is skipped; a glob that matches nothing, an unknown role, or a mapping that grows
        nothing raises ``PlanError``.
    ``depth``
        ``None`` (the default) keeps every stack. A bare number is a multiplier of every
        block stack; a mapping takes stack names (the qualified name of the
        ``ModuleList``/``Sequential``: ``"blocks"``, ``"layer2"``, ``"model.layers"``) to
        a target block count (int) or a multiplier (float). Shrinking raises ``PlanError``.
    ``placement``
        Where the new blocks go: ``"interleave"`` (the default, LEMON: 1, 1', 2, 2', ...),
        ``"stack"`` (the copies on top, sources taken in order), or an explicit list of
        source block indices, one per position of the grown stack (each source at least
        once, first occurrences in increasing order, e.g. ``[0, 0, 1, 1]``); one placement
        serves every stack the plan grows. Stored as a tuple.
    ``method``
        ``"lemon"`` (the default: unequal fan-in splits with noise; new blocks whose
        branch-ending layers get cancelling random weights) or ``"net2net"`` (equal
        splits; those weights zero), the baseline users compare against.
    ``seed``
        An int, the only source of randomness: the same plan and seed give identical
        weights.
    ``allow_inexact``
        ``False`` (the default) refuses growth that is exact only up to the norms' eps
        (new blocks in a Post-LN stack) with ``NotLosslessError``; ``True`` accepts it,
        and ``grow``'s report then states the error measured on the example inputs.
    ``noise_scale``
        A number ``>= 0`` multiplying LEMON's noise bound (split fan-in columns,
        cancelling new blocks): 1.0, the default, draws at the layer's own weight scale;
        smaller keeps the copies closer together; 0 makes them equal (and new blocks'
        cancelling weights zero). The function is exact at any scale.
    ``grow_outputs``
        ``False`` (the default) keeps every model output at its size; ``True`` lets a
        grown width reach the outputs (a base model returning its hidden states:
        ``BertModel``, ``ViTModel``). The first ``S`` entries of each grown output axis
        are then the source's output exactly, ``verify`` compares those, and the growth
        report names each grown output. An output axis whose first entries would not be
        the source's (a concatenation whose first part grows) is refused.
    ``extra``
        Free-form data carried along with the plan; it takes no part in growth, in
        equality or in ``repr``, and ``from_dict``/``to_dict`` leave it out.

    Raises ``PlanError`` listing every invalid field at once (a non-numeric or
    non-positive target, an unknown method or placement, a non-int seed, a negative
    noise scale). ``Plan.from_file``/``Plan.from_dict`` read one from YAML, JSON or a
    dict; ``to_dict()`` writes it back.
    """

    width: Target | Mapping[str, Target] | None = None
    depth: Target | Mapping[str, Target] | None = None
    placement: str | tuple[int, ...] = "interleave"
    method: str = "lemon"
    seed: int = 0
    allow_inexact: bool = False
    noise_scale: float = 1.0
    grow_outputs: bool = False
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        problems: list[Problem] = []
        if isinstance(self.width, Mapping):
            object.__setattr__(self, "width", dict(self.width))
            for sel, target in self.width.items():
                if not isinstance(sel, str) or not sel:
                    problems.append(Problem(reason=f"width selector {sel!r} is not a string",
                                            fix="use '@role' or a glob over group names",
                                            node="width"))
                problems += _check_target(f"width[{sel!r}]", target)
        elif self.width is not None:
            problems += _check_target("width", self.width)
        if isinstance(self.depth, Mapping):
            object.__setattr__(self, "depth", dict(self.depth))
            for sel, target in self.depth.items():
                problems += _check_target(f"depth[{sel!r}]", target)
        elif self.depth is not None:
            problems += _check_target("depth", self.depth)
        if self.method not in METHODS:
            problems.append(Problem(reason=f"method {self.method!r} is unknown",
                                    fix=f"use one of {METHODS}", node="method"))
        if isinstance(self.placement, str):
            if self.placement not in PLACEMENTS:
                problems.append(Problem(reason=f"placement {self.placement!r} is unknown",
                                        fix=f"use one of {PLACEMENTS} or a list of source "
                                        "indices", node="placement"))
        elif isinstance(self.placement, (list, tuple)) and all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.placement):
            object.__setattr__(self, "placement", tuple(self.placement))
        else:  # a mapping, a number, None: it used to be taken as "interleave", silently
            problems.append(Problem(reason=f"placement {self.placement!r} is neither "
                                    f"{' nor '.join(map(repr, PLACEMENTS))} nor a list of "
                                    "source block indices", node="placement",
                                    fix="use 'interleave', 'stack' or a list such as "
                                    "[0, 0, 1, 1]; one placement serves every stack"))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            problems.append(Problem(reason=f"seed {self.seed!r} is not an int",
                                    fix="use an integer seed", node="seed"))
        if isinstance(self.noise_scale, bool) or not isinstance(self.noise_scale, (int, float)) \
                or not self.noise_scale >= 0:
            problems.append(Problem(reason=f"noise_scale {self.noise_scale!r} is not a number "
                                    ">= 0", fix="use 1.0 (LEMON's scale) or another "
                                    "non-negative number", node="noise_scale"))
        if not isinstance(self.grow_outputs, bool):
            problems.append(Problem(reason=f"grow_outputs {self.grow_outputs!r} is not a bool",
                                    fix="use true or false", node="grow_outputs"))
        if problems:
            raise PlanError("the plan is invalid", problems)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """A plan from a mapping of its fields (what ``to_dict`` and plan files hold);
        ``PlanError`` names every unknown field, and the fields are checked as in
        ``Plan(...)``."""
        known = {f.name for f in fields(cls)} - {"extra"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(
                "the plan has unknown fields",
                [Problem(reason=f"unknown field {k!r}", fix=f"use only {sorted(known)}",
                         node=k) for k in unknown],
            )
        return cls(**dict(data))

    @classmethod
    def from_file(cls, path: str | Path) -> Plan:
        """Read a plan from YAML (``.yaml``/``.yml``) or JSON (any other suffix): a mapping
        of Plan fields, e.g. ``width: 2.0``. ``PlanError`` for a missing file, a syntax
        error (with its line), a file that holds no mapping, or an invalid field."""
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"no plan file {path}",
                            [Problem(reason=f"no plan file {path}", source=str(path),
                                     fix="check the path of the plan file")])
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else getattr(exc, "lineno", None)
            raise PlanError(
                f"cannot read plan file {path}",
                [Problem(reason=first_line(exc),
                         source=f"{path}:{line}" if line else str(path),
                         fix="fix the syntax at that line")],
            ) from exc
        if not isinstance(data, Mapping):
            raise PlanError(f"plan file {path} must hold a mapping of Plan fields",
                            [Problem(reason=f"found {type(data).__name__}",
                                     fix="write e.g. 'width: 2.0'", source=str(path))])
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON/YAML data (``placement`` as a list, ``extra`` left
        out): ``Plan.from_dict(plan.to_dict()) == plan``."""
        data = asdict(self)
        data.pop("extra")
        if isinstance(data["placement"], tuple):
            data["placement"] = list(data["placement"])
        return data

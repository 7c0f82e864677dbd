"""``grow_pretrained`` for timm: a timm model in, a folder that
``timm.create_model("local-dir:" + out_dir, pretrained=True)`` rebuilds out, checked by
rebuilding it so.

timm has no config class: a model is its architecture's name and the keyword arguments its
class was built with. The grown arguments come from what the analysis resolved and are
checked against the class, not trusted:

- the source's construction arguments are captured as timm builds the architecture again
  on the meta device (the caller's ``model_args`` over the architecture's own defaults:
  ``convnext_atto`` passes ``dims`` and ``depths`` that the user never wrote), and the
  class' defaults for the rest (ResNet's ``channels`` and ``stem_width``);
- an int entry (or an entry of an int list) equal to a grown width group's size becomes
  that group's grown size; one equal to a grown block stack's length (a list: the grown
  stacks' lengths in model order) becomes its grown length; ``mlp_ratio`` follows the FFN
  and residual widths. An argument named like a depth (``depth``, ``depths``, ``layers``,
  ...) is only ever a depth, any other only ever a width (``depth=2`` beside
  ``num_heads=2``);
- the class is built on the meta device with the rewritten arguments, and its state_dict
  must have exactly the recipe's names and shapes. A value can equal a grown size by
  chance (ResNet's ``base_width`` 64 beside its 64 stem channels), so when it does not,
  the fewest rewrites (one, then two) are taken back until it does; the reload check
  then proves the function. When nothing matches (a width timm builds
  from a number the analysis does not see, a size two groups share), nothing is written:
  PlanError names the first tensor that differs, and ``model_args`` with the grown sizes
  is the fix.

A non-multiple width over a norm needs the norm's eps scaled (see
``hub.folder.norm_eps_scale``), which timm's arguments cannot say: refused.

The folder holds ``config.json`` (``architecture``, ``num_classes``, ``num_features``,
``pretrained_cfg``, ``model_args`` with every argument the caller gave and every one that
grew) and one ``model.safetensors`` (timm's loader reads one file), made one tensor at a
time by the recipe. It is written beside ``out_dir`` and renamed at the end.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lemon_fx.api import plan_in_detail, trace, warn_what_a_bare_plan_left
from lemon_fx.axes.vocabulary import FFN, RESIDUAL
from lemon_fx.errors import PlanError, Problem, first_line
from lemon_fx.hub.folder import (
    PretrainedGrowth,
    check_reloaded,
    model_card,
    norm_eps_scale,
    staged_folder,
)
from lemon_fx.plan import Plan
from lemon_fx.recipe.safetensors_io import write_sharded

__all__ = ["grow_timm", "is_timm_folder", "is_timm_model"]

DEPTH_NAMES = frozenset({"depth", "depths", "layers", "num_layers", "num_blocks", "blocks",
                         "block_count", "n_layers"})
# arguments that are no sizes, whatever their value
_NOT_SIZES = frozenset({"num_classes", "in_chans", "img_size", "patch_size", "input_size",
                        "output_stride", "pretrained_strict"})


def is_timm_model(source: Any) -> bool:
    return type(source).__module__.startswith("timm.") and hasattr(source, "pretrained_cfg")


def is_timm_folder(folder: Path) -> bool:
    """A folder whose config.json is timm's (``architecture``, no ``model_type``)."""
    config = folder / "config.json"
    if not config.is_file():
        return False
    data = json.loads(config.read_text())
    return "architecture" in data and "model_type" not in data


def _timm():
    try:
        import timm
    except ImportError as exc:
        raise PlanError("timm is not installed", [Problem(
            reason=str(exc), node="source", fix="pip install timm")]) from exc
    return timm


def _given_args(model: torch.nn.Module) -> dict[str, Any]:
    """The arguments the model was created with, as timm records them."""
    try:
        from timm.models._input import get_model_args
    except ImportError:  # older timm: what create_model kept
        return dict(getattr(model, "_model_args", {}) or {})
    return dict(get_model_args(model))


@contextlib.contextmanager
def _recording_init(cls: type) -> Iterator[dict[str, Any]]:
    """While inside, the first ``cls(...)`` call's keyword arguments land in the dict."""
    seen: dict[str, Any] = {}
    original = cls.__init__

    def recording(self, *args, **kwargs):
        if not seen:
            seen.update(kwargs)
        original(self, *args, **kwargs)

    cls.__init__ = recording
    try:
        yield seen
    finally:
        cls.__init__ = original


def _construction_args(architecture: str, cls: type, given: dict[str, Any]) -> dict[str, Any]:
    """Every keyword argument ``cls`` receives when timm builds ``architecture`` with
    ``given`` (built on the meta device: nothing is allocated)."""
    timm = _timm()
    with _recording_init(cls) as seen, torch.device("meta"):
        timm.create_model(architecture, pretrained=False, **given)
    # and the defaults of those it does not pass (ResNet's ``channels``, ``stem_width``)
    defaults = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty and name not in seen}
    return {**defaults, **seen}


def _width_map(planned: Any) -> dict[int, int]:
    """Source size -> grown size of every width group that grows (sizes shared by groups
    that grow differently are left out: the shape check then names the problem)."""
    targets: dict[int, set[int]] = {}
    for group in planned.analysis.groups:
        targets.setdefault(group.size, set()).add(planned.resolution.target(group.leaf))
    return {size: next(iter(t)) for size, t in targets.items()
            if len(t) == 1 and next(iter(t)) != size}


def _role_ratio(planned: Any, role: str) -> float | None:
    ratios = {planned.resolution.target(g.leaf) / g.size for g in planned.analysis.groups
              if g.role == role}
    return ratios.pop() if len(ratios) == 1 else None


def _stage_lengths(planned: Any, model: torch.nn.Module) -> list[tuple[int, int]]:
    """``(length, grown length)`` of each block stack of the grown stacks' kind, in model
    order: the stacks named like a grown one with other numbers (``layer1`` .. ``layer4``,
    ``stages.0.blocks`` .. ``stages.3.blocks``), those the plan leaves keeping their length.
    A per-stage depth list such as ResNet's ``layers`` lists exactly these."""
    grown = {g.stack.name: len(g.order) for g in planned.growths}
    # the name with every number free: "stages.0.blocks" -> r"stages\.\d+\.blocks"
    patterns = {re.sub(r"\d+", r"\\d+", re.escape(name)) for name in grown}
    stages = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Sequential, torch.nn.ModuleList)) and \
                any(re.fullmatch(p, name) for p in patterns):
            stages.append((len(module), grown.get(name, len(module))))
    return stages


def _rewrite(key: str, value: Any, widths: dict[int, int], stages: list[tuple[int, int]],
             mlp_ratio: float | None) -> Any:
    """The grown value of one construction argument (``value`` itself if none)."""
    if key in _NOT_SIZES or isinstance(value, bool):
        return value
    depth_named = key in DEPTH_NAMES
    if isinstance(value, int):
        if depth_named:  # never a width, even when its value is one (depth 2, 2 heads)
            return stages[0][1] if len(stages) == 1 and value == stages[0][0] else value
        return widths.get(value, value)
    if isinstance(value, float) and key == "mlp_ratio" and mlp_ratio is not None:
        return value * mlp_ratio
    if isinstance(value, (list, tuple)) and value and \
            all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        if depth_named:
            if list(value) == [length for length, _ in stages]:
                return type(value)(grown for _, grown in stages)
            return value
        return type(value)(widths.get(v, v) for v in value)
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _shape_mismatch(timm: Any, architecture: str, args: dict[str, Any],
                    wanted: dict[str, tuple[int, ...]]) -> tuple[float, Problem] | None:
    """None when ``architecture`` built with ``args`` (on the meta device) has exactly the
    names and shapes ``wanted``, else how many tensors differ and the problem."""
    fix = ("pass model_args with the grown sizes, or a plan that grows only what the "
           "architecture's arguments name")
    try:
        with torch.device("meta"):
            target = timm.create_model(architecture, pretrained=False, **args)
    except Exception as exc:
        return math.inf, Problem(reason=f"create_model(**{args}) raised "
                                 f"{type(exc).__name__}: {first_line(exc)}",
                                 node="model_args", fix=fix)
    built = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    if built == wanted:
        return None
    differs = sorted(set(built) ^ set(wanted)) or sorted(
        k for k in wanted if built[k] != wanted[k])
    first = differs[0]
    return len(differs), Problem(
        reason=f"built with {args}, {first} is {built.get(first, 'missing')} where the grown "
        f"model has {wanted.get(first, 'missing')} ({len(differs)} tensors differ)",
        node=first, fix=fix)


def _grown_args(architecture: str, source: torch.nn.Module, planned: Any,
                given: dict[str, Any]) -> tuple[dict[str, Any], dict[str, tuple[Any, Any]]]:
    """``model_args`` for the grown model, checked by building it on the meta device."""
    timm = _timm()
    if norm_eps_scale(planned) != 1.0:
        raise PlanError(f"{architecture}'s model_args cannot hold the grown norms' eps", [
            Problem(reason="a normalized width grows by a non-multiple, so its norms need "
                    "eps scaled by k*S/T, and timm builds its norms with a fixed eps",
                    node="eps", fix="grow the normalized widths by a whole multiple (2x, 3x), "
                    "or grow with lemon_fx.grow and keep the GraphModule")])
    full = _construction_args(architecture, type(source), given)
    widths = _width_map(planned)
    ffn, residual = _role_ratio(planned, FFN), _role_ratio(planned, RESIDUAL)
    mlp_ratio = ffn / residual if ffn and residual else None
    stages = _stage_lengths(planned, source)
    changes = {}
    for key, value in full.items():
        grown = _rewrite(key, value, widths, stages, mlp_ratio)
        if grown != value:
            changes[key] = (value, grown)
    wanted = {k: tuple(s) for k, (s, _) in planned.recipe.shapes.items()}
    # a value can equal a grown size by chance (ResNet's base_width 64 and its 64 stem
    # channels): the fewest changes taken back that give the recipe's shapes win
    keys = list(changes)
    attempts = [()] + [(k,) for k in keys] + list(itertools.combinations(keys, 2))
    failures = []
    for kept_back in attempts:
        kept = {k: v for k, v in changes.items() if k not in kept_back}
        args = {k: _jsonable(v) for k, v in given.items()}
        args.update({k: _jsonable(b) for k, (_, b) in kept.items()})
        failure = _shape_mismatch(timm, architecture, args, wanted)
        if failure is None:
            changes = kept
            break
        failures.append(failure)
    else:  # the attempt that came closest says the most
        closest = min(failures, key=lambda f: f[0])[1]
        raise PlanError(f"the grown sizes cannot be written as {architecture}'s model_args",
                        [closest])
    return args, {k: (_jsonable(a), _jsonable(b)) for k, (a, b) in changes.items()}


def _example_inputs(model: torch.nn.Module, given: dict[str, Any], *, batch: int = 1,
                    seed: int = 0) -> tuple[torch.Tensor]:
    """An image batch of the size the model takes (its ``img_size``, else its config's)."""
    channels, height, width = model.pretrained_cfg.get("input_size", (3, 224, 224))
    size = given.get("img_size")
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else tuple(size)
    channels = given.get("in_chans", channels)
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, channels, height, width, generator=generator),)


def _config(source: torch.nn.Module, architecture: str, args: dict[str, Any],
            target: torch.nn.Module) -> dict[str, Any]:
    from timm.models._hub import filter_pretrained_cfg

    pretrained_cfg = filter_pretrained_cfg(
        {k: v for k, v in source.pretrained_cfg.items() if k != "state_dict"},
        remove_source=True, remove_null=True)
    pretrained_cfg["architecture"] = architecture
    return {"architecture": architecture,
            "num_classes": getattr(target, "num_classes", pretrained_cfg.get("num_classes")),
            "num_features": getattr(target, "num_features", None),
            "pretrained_cfg": {k: _jsonable(v) for k, v in pretrained_cfg.items()},
            "model_args": args}


def grow_timm(source: Any, plan: Any, out_dir: str | Path, example_inputs: Any = None,
              model_args: dict[str, Any] | None = None) -> PretrainedGrowth:
    """Grow a timm model (or a folder timm wrote with ``local-dir`` in mind) into
    ``out_dir``. ``model_args``: the arguments the model was created with, where timm did
    not record them."""
    timm = _timm()
    plan = plan if isinstance(plan, Plan) else Plan.from_dict(plan)
    name = None
    if isinstance(source, (str, Path)):
        name = str(source)
        source = timm.create_model(f"local-dir:{source}", pretrained=True)
    if not is_timm_model(source):
        raise PlanError("the source is no timm model", [Problem(
            reason=f"got {type(source).__name__}", node="source",
            fix="pass a model made by timm.create_model")])
    source.eval()
    architecture = source.pretrained_cfg.get("architecture")
    name = name or architecture
    given = dict(model_args) if model_args is not None else _given_args(source)
    inputs = (example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)) \
        if example_inputs is not None else _example_inputs(source, given)
    gm = trace(source, inputs)
    planned = plan_in_detail(gm, plan)
    warn_what_a_bare_plan_left(planned, plan, stacklevel=3)
    args, changes = _grown_args(architecture, source, planned, given)
    recipe = planned.recipe
    state = gm.state_dict()
    total = sum(math.prod(s) * torch.empty((), dtype=d).element_size()
                for s, d in recipe.shapes.values())
    with staged_folder(out_dir) as staging:
        with torch.device("meta"):
            target = timm.create_model(architecture, pretrained=False, **args)
        (staging / "config.json").write_text(
            json.dumps(_config(source, architecture, args, target), indent=2) + "\n")
        made = ((n, recipe.make(n, state[r.source], read=state.__getitem__))
                for n, r in recipe.tensors.items())
        write_sharded(made, recipe.shapes, recipe.aliases, staging, total + 1, progress=False)
        reloaded = timm.create_model(f"local-dir:{staging}", pretrained=True).eval()
        fresh = _example_inputs(source, given, batch=2, seed=1)
        with torch.no_grad():
            want, got = source(*fresh), reloaded(*fresh)
        error = check_reloaded(want, got, "timm.create_model")
        growth = PretrainedGrowth(Path(out_dir), plan, changes, error, None,
                                  loader="timm.create_model")
        (staging / "README.md").write_text(model_card(name, plan, growth))
    return growth

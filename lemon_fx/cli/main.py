"""The ``lemon-fx`` command line: inspect, grow, verify and export from files and plans.

Every verb loads ``TARGET`` (``file.py:factory`` or ``package.module:factory``), optionally a
checkpoint, and draws example inputs from ``--input SPEC`` (``2x3x224x224``,
``2x128:int64:50000``). Tracing uses inputs from seed 0; verification uses fresh ones
(seed 1). A user mistake prints one line on stderr and exits 2 (``--debug`` shows the
traceback); a model that fails verification exits 1.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["main"]

EXAMPLES = {
    "inspect": "lemon-fx inspect models.py:build --input 2x3x32x32\n"
               "  lemon-fx inspect my_pkg.models:gpt --input 2x64:int64:50000 --json",
    "grow": "lemon-fx grow models.py:build --plan plan.yaml --input 2x3x32x32 --out grown/\n"
            "  lemon-fx grow models.py:gpt --plan plan.json --input 2x64:int64:50000 "
            "--out grown/ --onnx --checkpoint small.safetensors",
    "verify": "lemon-fx verify models.py:build --plan plan.yaml --input 2x3x32x32 --onnx",
    "export": "lemon-fx export models.py:build --input 2x3x32x32 --out model.onnx\n"
              "  lemon-fx export models.py:build --plan plan.yaml --input 2x3x32x32 "
              "--out grown.onnx --dynamic-batch",
    "demo": "lemon-fx demo\n  lemon-fx demo --width 2.0 --out grown.onnx",
}


class _Say:
    """Progress on stderr for steps that take over a second; silent with --quiet/--json."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    @contextmanager
    def step(self, what: str):
        start = time.perf_counter()
        yield
        took = time.perf_counter() - start
        if not self.quiet and took > 1.0:
            print(f"lemon-fx: {what} ({took:.1f} s)", file=sys.stderr, flush=True)


def _verb(verbs, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = verbs.add_parser(name, help=help_text, description=help_text,
                              epilog="examples:\n  " + EXAMPLES[name],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _model_args(parser: argparse.ArgumentParser, plan: str | None) -> None:
    parser.add_argument("target", metavar="TARGET",
                        help="file.py:factory or package.module:factory, or a Hugging Face "
                        "model folder (config.json: inspect and grow)")
    parser.add_argument("--input", metavar="SPEC", action="append",
                        help="SHAPE[:DTYPE[:HIGH]] per forward argument, e.g. 2x3x224x224 "
                        "or 2x128:int64:50000; repeat for several arguments")
    parser.add_argument("--checkpoint", metavar="FILE_OR_FOLDER",
                        help="a .safetensors or .pt state_dict, or a folder of safetensors "
                        "shards with model.safetensors.index.json, loaded into the model first")
    if plan == "required":
        parser.add_argument("--plan", metavar="PLAN", required=True,
                            help="YAML or JSON file with Plan fields (width, depth, placement, "
                            "method, seed, allow_inexact)")
    elif plan == "optional":
        parser.add_argument("--plan", metavar="PLAN", help="grow with this plan first")


def _dynamic_batch_arg(parser: argparse.ArgumentParser, when: str) -> None:
    parser.add_argument("--dynamic-batch", action="store_true",
                        help=f"{when}let the ONNX file take any batch size (dimension 0 of "
                        "every input), checked in onnxruntime at batch 1, the example's "
                        "and one more")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lemon-fx",
        description="Grow a trained small PyTorch model into a larger one losslessly.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    p = _verb(verbs, "inspect", "print the width groups and block stacks of a model")
    _model_args(p, None)
    p = _verb(verbs, "grow", "grow a model with a plan; write model.safetensors, report.json, "
              "report.md (and model.onnx) to DIR")
    _model_args(p, "required")
    p.add_argument("--out", metavar="DIR", required=True, help="output folder")
    p.add_argument("--onnx", action="store_true",
                   help="also export model.onnx, checked by onnx.checker and onnxruntime")
    _dynamic_batch_arg(p, "with --onnx: ")
    p.add_argument("--dtype", choices=("float32", "float64", "bfloat16"), default="float32",
                   help="dtype of the saved grown weights (default float32)")
    p.add_argument("--stream", action="store_true",
                   help="grow --checkpoint (a .safetensors file or a folder of shards) on "
                   "disk without loading it: the model is built on the meta device, planned "
                   "without weights, and the recipe writes sharded safetensors one tensor at "
                   "a time (no check: run lemon-fx verify on a machine that fits the model)")
    p.add_argument("--recipe", metavar="FILE", help="also write the growth recipe (JSON)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="with --stream: the largest shard (default 5GB)")
    p = _verb(verbs, "verify", "grow in memory and check the result against the source "
              "(float64, and onnxruntime with --onnx)")
    _model_args(p, "required")
    p.add_argument("--onnx", action="store_true", help="also check through onnxruntime")
    p = _verb(verbs, "export", "export a model (grown with --plan, or as it is) to ONNX")
    _model_args(p, "optional")
    p.add_argument("--out", metavar="FILE", required=True, help="the .onnx file to write")
    _dynamic_batch_arg(p, "")
    p = _verb(verbs, "demo", "grow a built-in small transformer, export it to ONNX, check it "
              "with onnxruntime, print groups and parameter counts before and after")
    p.add_argument("--width", type=float, default=1.5, help="width multiplier (default 1.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo and the growth")
    p.add_argument("--out", default=None, help="where to write the grown ONNX model")
    return parser


def _load(args, say: _Say):
    import lemon_fx
    from lemon_fx.cli.targets import load_checkpoint, load_target, make_inputs

    _needs_input(args)
    with say.step("loading the model"):
        model = load_target(args.target)
        if args.checkpoint:
            load_checkpoint(model, args.checkpoint)
        model.eval()
    inputs = make_inputs(args.input, seed=0)
    fresh = make_inputs(args.input, seed=1)
    with say.step("tracing"):
        gm = lemon_fx.trace(model, inputs)
    return model, gm, fresh


def _plan(args):
    import lemon_fx

    return lemon_fx.Plan.from_file(args.plan)


def _grow(gm, plan, say: _Say):
    import lemon_fx

    with say.step("growing"):
        return lemon_fx.grow(gm, plan)


def _growth_report(gm, big, plan, verification) -> dict[str, Any]:
    import lemon_fx

    before, after = lemon_fx.inspect(gm), lemon_fx.inspect(big)
    growth = lemon_fx.growth_report(big)
    sizes = {g.name: g.size for g in after.groups}
    return {
        "plan": plan.to_dict(),
        "parameters": {"before": before.parameters, "after": after.parameters},
        "groups": [{"name": g.name, "role": g.role, "form": g.form, "before": g.size,
                    "after": sizes.get(g.name)} for g in before.groups],
        "stacks": {"before": [vars_of(s) for s in before.stacks],
                   "after": [vars_of(s) for s in after.stacks]},
        "new_blocks": [{"name": b.name, "source": b.source_name} for b in growth.new_blocks],
        "notes": list(growth.notes),
        "measured_error": growth.measured_error,
        "verification": {**verification.to_dict(),
                         "onnx_max_abs_error": verification.onnx_max_abs_error,
                         "onnx_max_rel_error": verification.onnx_max_rel_error},
    }


def vars_of(stack) -> dict[str, Any]:
    return {"name": stack.name, "count": stack.count, "kind": stack.kind}


def _markdown(report: dict[str, Any], target: str) -> str:
    p = report["parameters"]
    lines = [f"# lemon-fx growth of `{target}`", "",
             f"Parameters: {p['before']:,} -> {p['after']:,} "
             f"({p['after'] / max(p['before'], 1):.2f}x)", "",
             f"Plan: `{json.dumps(report['plan'])}`", "",
             "| group | role | form | before | after |", "|---|---|---|---|---|"]
    lines += [f"| {g['name']} | {g['role']} | {g['form']} | {g['before']} | {g['after']} |"
              for g in report["groups"]]
    if report["new_blocks"]:
        lines += ["", "New blocks (each a copy of its source with cancelling branches):", ""]
        lines += [f"- `{b['name']}` <- `{b['source']}`" for b in report["new_blocks"]]
    v = report["verification"]
    lines += ["", "Verification against the source on fresh inputs:", "",
              f"- torch ({v.get('dtype')}): max abs error {v.get('max_abs_error')}, "
              f"max rel error {v.get('max_rel_error')}"]
    if v.get("onnx_outputs"):
        lines.append(f"- onnxruntime (float32): max abs error {v.get('onnx_max_abs_error')}, "
                     f"max rel error {v.get('onnx_max_rel_error')}")
        if v.get("onnx_dynamic_batch"):
            lines.append("- model.onnx takes any batch size (checked in onnxruntime at batch "
                         "1, the example's and one more)")
    lines += [f"- note: {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def _save_state(big, path: Path, dtype: str) -> None:
    import torch
    from safetensors.torch import save_file

    target = {"float32": torch.float32, "float64": torch.float64,
              "bfloat16": torch.bfloat16}[dtype]
    # every key stored on its own (tied weights too), so load_state_dict(strict=True) works
    state = {k: v.detach().to(target if v.is_floating_point() else v.dtype).contiguous().clone()
             for k, v in big.state_dict().items()}
    save_file(state, str(path))


def _grow_streamed(args, plan, out: Path, say: _Say) -> int:
    """grow --stream: plan on a weightless model, grow the checkpoint on disk."""
    import torch

    import lemon_fx
    from lemon_fx.cli.targets import TargetError, load_target, make_inputs

    if not args.checkpoint:
        raise TargetError("--stream without --checkpoint", [lemon_fx.Problem(
            reason="--stream grows a checkpoint on disk, and none was given",
            fix="add --checkpoint model.safetensors (or a folder of shards)")])
    if args.onnx:
        raise TargetError("--stream with --onnx", [lemon_fx.Problem(
            reason="a streamed growth never holds the model in memory, so it cannot be "
            "exported", fix="drop --onnx, or grow without --stream")])
    with say.step("building the model on the meta device"), torch.device("meta"):
        model = load_target(args.target)
    with say.step("tracing and planning without weights"):
        gm = lemon_fx.trace(model.eval(), make_inputs(args.input, seed=0))
        recipe = lemon_fx.plan_growth(gm, plan)
    if args.dtype != "float32":
        target = getattr(torch, args.dtype)
        recipe = lemon_fx.GrowthRecipe(
            {name: type(r)(r.source, r.shape, target if r.dtype.is_floating_point else r.dtype,
                           r.steps) for name, r in recipe.tensors.items()},
            recipe.aliases, recipe.seed, recipe.noise_scale)
    if args.recipe:
        recipe.save(args.recipe)
    with say.step("growing the checkpoint on disk"):
        recipe.apply_safetensors(args.checkpoint, out, args.max_shard_size,
                                 progress=not (args.quiet or args.json))
    report = {"plan": plan.to_dict(), "streamed": True, "source": str(args.checkpoint),
              "tensors": len(recipe.shapes),
              "parameters": sum(math.prod(s) for s, _ in recipe.shapes.values()),
              "verification": None}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    elif not args.quiet:
        print(f"grew {args.checkpoint} into {out} ({report['parameters']:,} parameters, "
              "not checked: lemon-fx verify checks a grown model that fits in memory)")
    return 0


def _hugging_face_folder(args) -> Path | None:
    folder = Path(args.target)
    if not (folder.is_dir() and (folder / "config.json").exists()):
        return None
    from lemon_fx.hub.timm_folder import is_timm_folder

    return None if is_timm_folder(folder) else folder


def _pretrained_source(args, say: _Say) -> Any:
    """What ``grow_pretrained`` takes from the command line: a model folder (Hugging Face
    or timm), or ``timm:NAME`` built (and ``--checkpoint`` loaded); None otherwise."""
    folder = Path(args.target)
    if folder.is_dir() and (folder / "config.json").exists():
        return folder
    if not args.target.startswith("timm:"):
        return None
    from lemon_fx.cli.targets import load_checkpoint, load_target

    with say.step("building the timm model"):
        model = load_target(args.target)
        if args.checkpoint:
            load_checkpoint(model, args.checkpoint)
    return model.eval()


def _needs_input(args) -> None:
    if not args.input:
        from lemon_fx.cli.targets import TargetError
        from lemon_fx.errors import Problem

        raise TargetError("--input is missing", [Problem(
            reason=f"{args.target} is a factory, and its inputs are not known",
            fix="add --input SHAPE[:DTYPE[:HIGH]] for each forward argument")])


def _trace_hugging_face(folder: Path, say: _Say):
    """A Hugging Face folder's model on the meta device, traced on inputs its config
    implies: nothing is loaded."""
    import torch
    import transformers

    import lemon_fx
    from lemon_fx.hub.hugging_face import example_inputs_for, model_class

    config = transformers.AutoConfig.from_pretrained(folder)
    with say.step("building the model on the meta device"), torch.device("meta"):
        model = model_class(config)(config).eval()
    args, kwargs = example_inputs_for(model, config)
    with say.step("tracing"):
        return lemon_fx.trace(model, args, kwargs)


def _cmd_inspect(args, say: _Say) -> int:
    import lemon_fx

    folder = _hugging_face_folder(args)
    if folder is not None:
        report = lemon_fx.inspect(_trace_hugging_face(folder, say))
        print(json.dumps(report.to_dict(), indent=2) if args.json else report)
        return 0
    _, gm, _ = _load(args, say)
    report = lemon_fx.inspect(gm)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0


def _cmd_grow(args, say: _Say) -> int:
    import lemon_fx

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        from lemon_fx.cli.targets import TargetError

        raise TargetError(f"--out {out} is a file", [lemon_fx.Problem(
            reason=f"--out {out} is a file, not a folder", fix="name a folder")])
    if args.dynamic_batch and not args.onnx:
        from lemon_fx.cli.targets import TargetError

        raise TargetError("--dynamic-batch without --onnx", [lemon_fx.Problem(
            reason="--dynamic-batch shapes the ONNX file, and without --onnx none is written",
            fix="add --onnx")])
    plan = _plan(args)
    pretrained = None if args.stream else _pretrained_source(args, say)
    if pretrained is not None:
        from lemon_fx.cli.targets import make_inputs

        inputs = make_inputs(args.input, seed=0) if args.input else None
        with say.step("growing the model into a folder its library reloads, and checking it"):
            growth = lemon_fx.grow_pretrained(pretrained, plan, out, example_inputs=inputs)
        if not args.quiet:
            print(growth)
        return 0
    _needs_input(args)
    if args.stream:
        return _grow_streamed(args, plan, out, say)
    model, gm, fresh = _load(args, say)
    big = _grow(gm, plan, say)
    if args.recipe:
        with say.step("writing the recipe"):
            lemon_fx.plan_growth(gm, plan).save(args.recipe)
    with tempfile.TemporaryDirectory(prefix=".lemon-fx-", dir=out.parent if out.parent.exists()
                                     else None) as tmp:
        staging = Path(tmp)
        with say.step("verifying" + (" and exporting ONNX" if args.onnx else "")):
            verification = lemon_fx.verify(gm, big, fresh,
                                           onnx=str(staging / "model.onnx") if args.onnx
                                           else False)
        if args.dynamic_batch:  # the checked fixed-batch file, re-exported for any batch
            with say.step("exporting ONNX with a dynamic batch"):
                lemon_fx.export_onnx(big, fresh, staging / "model.onnx", dynamic_batch=True)
        report = _growth_report(gm, big, plan, verification)
        if args.onnx:
            report["verification"]["onnx_path"] = str(out / "model.onnx")
            report["verification"]["onnx_dynamic_batch"] = bool(args.dynamic_batch)
        _save_state(big, staging / "model.safetensors", args.dtype)
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (staging / "report.md").write_text(_markdown(report, args.target))
        out.mkdir(parents=True, exist_ok=True)
        for file in sorted(staging.iterdir()):  # only now does DIR change
            shutil.move(str(file), str(out / file.name))
    if args.json:
        print(json.dumps(report, indent=2))
    elif not args.quiet:
        print(_markdown(report, args.target))
        print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
    return 0


def _cmd_verify(args, say: _Say) -> int:
    import lemon_fx

    plan = _plan(args)
    model, gm, fresh = _load(args, say)
    big = _grow(gm, plan, say)
    with say.step("verifying"):
        report = lemon_fx.verify(gm, big, fresh, onnx=bool(args.onnx))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0


def _cmd_export(args, say: _Say) -> int:
    import lemon_fx

    model, gm, fresh = _load(args, say)
    module = _grow(gm, _plan(args), say) if args.plan else gm
    with say.step("exporting ONNX"):
        path = lemon_fx.export_onnx(module, fresh, args.out, dynamic_batch=args.dynamic_batch)
    if args.json:
        print(json.dumps({"onnx": str(path)}))
    elif not args.quiet:
        print(f"wrote {path}")
    return 0


def _cmd_demo(args, say: _Say) -> int:
    from lemon_fx.cli.demo import run_demo

    return run_demo(width=args.width, seed=args.seed, out=args.out)


COMMANDS = {"inspect": _cmd_inspect, "grow": _cmd_grow, "verify": _cmd_verify,
            "export": _cmd_export, "demo": _cmd_demo}


def _one_line(exc: BaseException) -> str:
    from lemon_fx.errors import LemonError, first_line

    if isinstance(exc, LemonError):
        problems = exc.problems
        if len(problems) == 1:
            p = problems[0]
            where = f" ({p.node})" if p.node and p.node not in p.reason else ""
            at = f" at {p.source}" if p.source else ""
            head = "" if exc.message in p.reason else f"{exc.message}: "
            return f"{head}{p.reason}{where}{at}; fix: {p.fix}"
        return f"{exc.message} ({len(problems)} problems; --debug lists them): " \
               f"{problems[0].reason}; fix: {problems[0].fix}" if problems else exc.message
    text = first_line(exc)
    if isinstance(exc, OSError):
        return (f"{text}; fix: give --out a path that can be written (grow: a folder, "
                "export: a file whose folder exists)")
    return text


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    say = _Say(quiet=getattr(args, "quiet", False) or getattr(args, "json", False))
    from lemon_fx.errors import LemonError, VerificationError

    try:
        return COMMANDS[args.verb](args, say)
    except VerificationError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"lemon-fx: verification failed: {_one_line(exc)}", file=sys.stderr)
        return 1
    except (LemonError, OSError) as exc:
        if getattr(args, "debug", False):
            for i, problem in enumerate(getattr(exc, "details", ()), 1):  # every node
                print(f"  {i}. {problem.render()}", file=sys.stderr)
            raise
        print(f"lemon-fx: error: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

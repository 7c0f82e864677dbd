"""The ``lemon-fx`` command line."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lemon-fx",
        description="Grow a trained small PyTorch model into a larger one losslessly.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    verbs = parser.add_subparsers(dest="verb", required=True)
    demo = verbs.add_parser(
        "demo",
        help="grow a built-in small transformer, export it to ONNX and check it",
        description="Grow a built-in GPT-style transformer, verify it in float64 and with "
        "onnxruntime, and print the groups and parameter counts before and after.",
        epilog="examples:\n  lemon-fx demo\n  lemon-fx demo --width 2.0 --out grown.onnx",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--width", type=float, default=1.5, help="width multiplier (default 1.5)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the demo and the growth")
    demo.add_argument("--out", default=None, help="where to write the grown ONNX model")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from lemon_fx.errors import LemonError

    try:
        if args.verb == "demo":
            from lemon_fx.demo import run_demo

            return run_demo(width=args.width, seed=args.seed, out=args.out)
    except LemonError as exc:
        if args.debug:
            raise
        print(f"lemon-fx: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

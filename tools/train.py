"""Train a byte-level language model with LEMON's schedule (``lemon_fx.training.train``).

    python tools/train.py --demo --steps 50 --out runs/demo
    torchrun --nproc_per_node=2 tools/train.py --demo --steps 50 --out runs/ddp
    torchrun --nproc_per_node=2 tools/train.py --demo --parallel fsdp --out runs/fsdp
    python tools/train.py --model models.py:gpt --checkpoint small.safetensors \\
        --width 2 --depth 2 --data corpus.txt --steps 2000 --lr 3e-3 --out runs/grown
    python tools/train.py --model models.py:gpt --checkpoint small.safetensors \\
        --width 2 --data corpus.txt --steps 2000 --schedule wsd --lr 3e-3 --warmup 0 \\
        --cooldown 400 --out runs/grown-wsd

``--demo`` trains ``lemon_fx.cli.demo.TinyGPT`` on the bytes of a few Python standard library
files (on every machine, read in a fixed order). ``--model FILE.py:FACTORY`` trains your
model instead: it maps ``(batch, context)`` int64 bytes to ``(batch, context, vocab >= 256)``
logits. ``--width``/``--depth`` grow the model with lemon_fx first (after ``--checkpoint``
is loaded), which is the point: train the grown model with the same peak rate as from
scratch and a shorter ``--steps``. Running again with the same ``--out`` resumes.
``--batch`` is the global batch; under torchrun each rank takes an equal slice of it, and
``--parallel fsdp`` shards the model's weights, gradients and optimizer state across the
ranks (FSDP2) with sharded checkpoints, for a model too large for one device.

``--schedule wsd`` is warmup, constant, then a ``(1 - sqrt)`` cooldown over the last
``--cooldown`` steps, the shape for growing a source still in its stable phase: continue
at the source's rate (``--lr`` at it, ``--warmup 0``), or ramp from it to a higher peak
(``--start-lr`` the source's rate, ``--warmup`` the ramp). ``--start-step`` enters the
schedule part-way, to continue the schedule a source was trained with.
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F

from lemon_fx.training.loop import TrainConfig, train

# present in every CPython 3.10+ source tree; read in this order
DEMO_MODULES = ["argparse", "ast", "csv", "dataclasses", "functools", "inspect",
                "json/decoder", "pathlib", "random", "textwrap"]


def demo_text() -> bytes:
    """The demo corpus: the bytes of ``DEMO_MODULES`` from this Python's stdlib folder."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return b"".join((root / f"{name}.py").read_bytes() for name in DEMO_MODULES)


def byte_batches(tokens: torch.Tensor, batch: int, context: int, seed: int):
    """``step -> (inputs, targets)``: random windows, from a generator seeded by the step.

    A function of the step alone, so every rank draws the same global batch and a resumed
    run the same batches as an uninterrupted one.
    """
    def get(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, len(tokens) - context - 1, (batch,), generator=generator)
        window = torch.stack([tokens[s:s + context + 1] for s in starts.tolist()])
        return window[:, :-1], window[:, 1:]
    return get


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def build_model(args) -> torch.nn.Module:
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    if args.demo:
        from lemon_fx.cli.demo import TinyGPT

        model = TinyGPT(vocab=256, dim=64, depth=2, num_heads=4, max_len=args.context)
    else:
        from lemon_fx.cli.targets import load_checkpoint, load_target

        model = load_target(args.model)
        if args.checkpoint:
            load_checkpoint(model, args.checkpoint)
    if args.width or args.depth:
        import lemon_fx

        example = torch.randint(0, 256, (2, args.context))
        gm = lemon_fx.trace(model.eval(), (example,))
        model = lemon_fx.grow(gm, lemon_fx.Plan(width=args.width, depth=args.depth,
                                                seed=args.seed))
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--demo", action="store_true", help="train lemon_fx's TinyGPT")
    source.add_argument("--model", metavar="FILE.py:FACTORY", help="the model to train")
    parser.add_argument("--checkpoint", help="weights for --model (.safetensors or .pt)")
    parser.add_argument("--width", type=float, default=None, help="grow widths by this first")
    parser.add_argument("--depth", type=float, default=None, help="grow depth by this first")
    parser.add_argument("--data", nargs="+", metavar="FILE",
                        help="text files, read as bytes (default with --demo: stdlib files)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=None, help="default: --steps / 10")
    parser.add_argument("--floor", type=float, default=0.1, help="final lr / peak")
    parser.add_argument("--schedule", choices=["cosine", "wsd"], default="cosine",
                        help="LEMON's warmup + cosine, or warmup-stable-decay")
    parser.add_argument("--cooldown", type=int, default=None,
                        help="wsd: the (1 - sqrt) cooldown's steps (default: --steps / 5)")
    parser.add_argument("--start-step", type=int, default=0,
                        help="enter the schedule at this step (continue a source's)")
    parser.add_argument("--start-lr", type=float, default=None,
                        help="the rate the warmup ramps from (a source's last rate)")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    parser.add_argument("--batch", type=int, default=16, help="global batch size")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for logs and checkpoints")
    parser.add_argument("--no-resume", action="store_true", help="ignore checkpoints in --out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp",
                        help="under torchrun: replicate the model (ddp) or shard it (fsdp)")
    parser.add_argument("--progress", action="store_true", default=None,
                        help="show the progress bar even when stderr is not a terminal")
    args = parser.parse_args(argv)

    if args.data:
        text = b"".join(Path(p).read_bytes() for p in args.data)
    elif args.demo:
        text = demo_text()
    else:
        parser.error("--model needs --data")
    tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    cut = int(len(tokens) * 0.9)
    if cut - args.context < 2 or len(tokens) - cut - args.context < 2:
        parser.error(f"--data has {len(tokens)} bytes, too few for --context {args.context}")
    train_batches = byte_batches(tokens[:cut], args.batch, args.context, args.seed)
    val_get = byte_batches(tokens[cut:], args.batch, args.context, args.seed + 1)
    val = [val_get(i) for i in range(args.eval_batches)]

    def evaluate(model: torch.nn.Module) -> float:
        device = next(model.parameters()).device
        return sum(float(lm_loss(model(x.to(device)), y.to(device))) for x, y in val) / len(val)

    warmup = args.warmup if args.warmup is not None else args.steps // 10
    cooldown = args.cooldown if args.cooldown is not None else (
        (args.start_step + args.steps) // 5 if args.schedule == "wsd" else 0)
    try:
        config = TrainConfig(peak_lr=args.lr, total_steps=args.steps, warmup_steps=warmup,
                             floor=args.floor, weight_decay=args.weight_decay,
                             grad_clip=args.clip or None, eval_every=args.eval_every,
                             checkpoint_every=args.checkpoint_every, out_dir=args.out,
                             seed=args.seed, device=args.device, progress=args.progress,
                             schedule=args.schedule, cooldown_steps=cooldown,
                             start_step=args.start_step, start_lr=args.start_lr,
                             parallel=args.parallel)
    except ValueError as exc:
        parser.error(str(exc))
    model = build_model(args)
    result = train(model, train_batches, lm_loss, config, eval_fn=evaluate,
                   resume=not args.no_resume)
    if int(os.environ.get("RANK", "0")) == 0:
        if not result.losses:
            print(f"nothing to do: already at step {result.end_step}")
            return 0
        final = f", eval {result.evals[-1][1]:.4f}" if result.evals else ""
        print(f"steps {result.start_step}->{result.end_step}: train loss "
              f"{result.losses[0]:.4f} -> {result.losses[-1]:.4f}{final} "
              f"({result.seconds:.1f} s)" + (f"; {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train a model with LEMON's schedule: ``python tools/train.py --demo`` or under torchrun.

    python tools/train.py --demo --steps 50 --out runs/demo
    torchrun --nproc_per_node=2 tools/train.py --demo --steps 50 --out runs/ddp

``--demo`` grows lemon_fx's TinyGPT 2x wide and deep and trains it on byte-level text of
Python's standard library (the corpus of tools/bench_training.py); ``--grow`` off trains
the small model itself. The loop is ``lemon_fx.training.train``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import lemon_fx
from lemon_fx.demo import TinyGPT
from lemon_fx.training import TrainConfig, train

sys.path.insert(0, str(Path(__file__).parent))
from bench_training import Config, batches, corpus  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", required=True,
                        help="train the built-in demo model (the only model source so far)")
    parser.add_argument("--no-grow", action="store_true", help="train the small model as is")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", default=None, help="folder for logs and checkpoints")
    parser.add_argument("--checkpoint-every", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = Config(context=64, batch=16)
    train_tokens, val = corpus()
    torch.manual_seed(0)
    model = TinyGPT(vocab=256, dim=64, depth=2, num_heads=4, max_len=cfg.context)
    if not args.no_grow:
        gm = lemon_fx.trace(model.eval(), (torch.randint(0, 256, (2, cfg.context)),))
        model = lemon_fx.grow(gm, lemon_fx.Plan(width=2.0, depth=2.0))
    stream = batches(train_tokens, cfg, seed=0)
    fixed = [next(stream) for _ in range(args.steps)]  # the same global batches on every rank

    def loss_fn(logits, targets):
        return F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1))

    result = train(model, lambda step: fixed[step], loss_fn,
                   TrainConfig(peak_lr=args.lr, total_steps=args.steps,
                               warmup_steps=args.warmup, out_dir=args.out,
                               checkpoint_every=args.checkpoint_every, progress=True))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f} "
              f"({len(result.losses)} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

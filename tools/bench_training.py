"""A miniature of LEMON's experiment: how much compute does growing save?

Byte-level language modelling on the source text of Python's standard library (present on
every machine; a fixed list of modules, a fixed split). A small Pre-LN GPT is trained to a
plateau, grown 2x wide and 2x deep, and trained with LEMON's schedule; the same target
model is trained from scratch. Runs, all on the same data and step budget:

- ``scratch``: the target from scratch, warmup + cosine over N steps -> final val loss L*;
- ``lemon``: LEMON growth, same peak rate, cosine compressed into a shorter budget;
- ``lemon_full_schedule``: LEMON growth with the from-scratch schedule;
- ``net2net``: equal splits, zeroed new blocks, LEMON's schedule;
- ``random_new``: the grown shapes with every weight growth created drawn at random
  (the function is not preserved), LEMON's schedule.

Saving = 1 - (steps a run needs to reach L*) / N; "with source" also counts the small
model's own training FLOPs (6 x parameters x tokens per step, the usual estimate).

    python tools/bench_training.py --quick          # smoke check, about a minute
    python tools/bench_training.py --out bench_results
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

import lemon_fx
from lemon_fx.demo import TinyGPT

# modules present in every CPython 3.10+; sorted, read as bytes
MODULES = sorted(["argparse", "ast", "bisect", "calendar", "codecs", "collections/__init__",
                  "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
                  "difflib", "enum", "fractions", "functools", "heapq", "inspect",
                  "ipaddress", "json/decoder", "json/encoder", "logging/__init__", "operator",
                  "pathlib", "pickle", "pprint", "random", "shlex", "shutil", "statistics",
                  "string", "subprocess", "tempfile", "textwrap", "threading", "tokenize",
                  "traceback", "typing", "uuid", "warnings", "zipfile"])


@dataclass
class Config:
    context: int = 64
    batch: int = 16
    source_dim: int = 64
    source_depth: int = 2
    heads: int = 4
    source_steps: int = 1500
    steps: int = 1200  # N: the from-scratch budget of the target
    lemon_fraction: float = 0.5  # LEMON's compressed decay, as a fraction of N
    warmup: int = 60
    peak_lrs: tuple[float, ...] = (1e-3, 2e-3, 4e-3)
    eval_every: int = 50
    eval_batches: int = 8
    seed: int = 0


QUICK = Config(context=32, batch=8, source_dim=32, source_steps=150, steps=120, warmup=10,
               peak_lrs=(3e-3,), eval_every=20, eval_batches=2)


def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """The bytes of the fixed module list: the first 90% train, the rest validation."""
    root = Path(sysconfig.get_paths()["stdlib"])
    data = b"".join((root / f"{name}.py").read_bytes() for name in MODULES)
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    cut = int(len(tokens) * 0.9)
    return tokens[:cut], tokens[cut:]


def batches(tokens: torch.Tensor, cfg: Config, seed: int):
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(tokens) - cfg.context - 1, (cfg.batch,),
                               generator=generator)
        window = torch.stack([tokens[s: s + cfg.context + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


def val_loss(model, val: torch.Tensor, cfg: Config) -> float:
    model.eval()
    stream = batches(val, cfg, seed=12345)
    with torch.no_grad():
        losses = [F.cross_entropy(_logits(model(x)).reshape(-1, 256), y.reshape(-1)).item()
                  for x, y, in (next(stream) for _ in range(cfg.eval_batches))]
    model.train()
    return sum(losses) / len(losses)


def _logits(output):
    return output[0] if isinstance(output, tuple) else output


def train(model, train_tokens, val, cfg: Config, steps: int, decay_steps: int, peak: float,
          seed: int) -> list[tuple[int, float]]:
    """AdamW + LEMON's schedule; returns (step, val loss) every eval_every steps."""
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak, weight_decay=0.01)
    schedule = lemon_fx.LemonSchedule(optimizer, cfg.warmup, decay_steps, floor=0.0)
    stream = batches(train_tokens, cfg, seed)
    curve = [(0, val_loss(model, val, cfg))]
    for step in range(1, steps + 1):
        x, y = next(stream)
        loss = F.cross_entropy(_logits(model(x)).reshape(-1, 256), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step <= decay_steps:
            schedule.step()
        if step % cfg.eval_every == 0 or step == steps:
            curve.append((step, val_loss(model, val, cfg)))
    return curve


def randomized_new_weights(big: torch.nn.Module, target: torch.nn.Module) -> torch.nn.Module:
    """The grown model with every entry growth created replaced by a fresh init value."""
    fresh = dict(target.state_dict())
    state = big.state_dict()
    for name, value in state.items():
        init = fresh[name].to(value.dtype)
        keep = init.clone()
        source_slices = tuple(slice(0, s // 2) for s in value.shape)  # originals come first
        keep[source_slices] = value[source_slices]
        state[name] = keep
    big.load_state_dict(state)
    return big


def steps_to_reach(curve: list[tuple[int, float]], goal: float) -> int | None:
    for step, loss in curve:
        if loss <= goal:
            return step
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--out", default="bench_results", help="folder for JSON and PNG")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, help="N, the from-scratch budget")
    parser.add_argument("--peaks", type=float, nargs="+", help="peak rates to sweep")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else Config()
    if args.steps:
        cfg = replace(cfg, steps=args.steps)
    if args.peaks:
        cfg = replace(cfg, peak_lrs=tuple(args.peaks))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    train_tokens, val = corpus()

    def build(dim, depth):
        torch.manual_seed(cfg.seed)
        return TinyGPT(vocab=256, dim=dim, depth=depth, num_heads=cfg.heads * dim
                       // cfg.source_dim, max_len=cfg.context)

    small = build(cfg.source_dim, cfg.source_depth)
    source_curve = train(small, train_tokens, val, cfg, cfg.source_steps, cfg.source_steps,
                         max(cfg.peak_lrs), seed=1)
    params = {"source": sum(p.numel() for p in small.parameters())}
    gm = lemon_fx.trace(small.eval(), (torch.randint(0, 256, (2, cfg.context)),))
    target_dim, target_depth = 2 * cfg.source_dim, 2 * cfg.source_depth
    params["target"] = sum(p.numel() for p in build(target_dim, target_depth).parameters())
    tokens_per_step = cfg.batch * cfg.context

    def flops(run_params: int, steps: int) -> float:
        return 6.0 * run_params * tokens_per_step * steps

    runs: dict[str, list[tuple[int, float]]] = {}
    sweep = {}
    for peak in cfg.peak_lrs:  # tune the from-scratch peak rate
        sweep[peak] = train(build(target_dim, target_depth), train_tokens, val, cfg, cfg.steps,
                            cfg.steps, peak, seed=2)
    peak = min(sweep, key=lambda p: sweep[p][-1][1])
    runs["scratch"] = sweep[peak]
    goal = runs["scratch"][-1][1]
    short = max(int(cfg.steps * cfg.lemon_fraction), cfg.warmup + 1)

    def grown(method: str) -> torch.nn.Module:
        return lemon_fx.grow(gm, lemon_fx.Plan(width=2.0, depth=2.0, method=method, seed=3))

    runs["lemon"] = train(grown("lemon"), train_tokens, val, cfg, cfg.steps, short, peak, 2)
    runs["lemon_full_schedule"] = train(grown("lemon"), train_tokens, val, cfg, cfg.steps,
                                        cfg.steps, peak, 2)
    runs["net2net"] = train(grown("net2net"), train_tokens, val, cfg, cfg.steps, short, peak, 2)
    runs["random_new"] = train(randomized_new_weights(grown("lemon"),
                                                      build(target_dim, target_depth)),
                               train_tokens, val, cfg, cfg.steps, short, peak, 2)
    source_flops = flops(params["source"], cfg.source_steps)
    scratch_flops = flops(params["target"], cfg.steps)
    results = {}
    for name, curve in runs.items():
        reached = steps_to_reach(curve, goal)
        spent = flops(params["target"], reached) if reached is not None else None
        results[name] = {
            "steps_to_reach_scratch_loss": reached,
            "final_val_loss": curve[-1][1],
            "saving": None if reached is None else 1 - reached / cfg.steps,
            "saving_with_source": None if spent is None
            else 1 - (spent + source_flops) / scratch_flops,
            "curve": [{"step": s, "flops": flops(params["target"], s), "val_loss": v}
                      for s, v in curve],
        }
    report = {
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None
                                                          else sys.argv[1:])),
        "config": asdict(cfg), "parameters": params, "peak_lr": peak,
        "peak_sweep": {str(k): v[-1][1] for k, v in sweep.items()},
        "scratch_final_loss": goal, "source_final_loss": source_curve[-1][1],
        "lemon_decay_steps": short, "runs": results, "wall_seconds": time.time() - started,
        "threads": args.threads, "flops_formula": "6 * parameters * tokens per step",
    }
    (out / "bench_training.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, out / "bench_training.png")
    print(f"{'run':22s} {'steps to L*':>12s} {'saving':>8s} {'with source':>12s} "
          f"{'final loss':>10s}")
    for name, r in results.items():
        steps = r["steps_to_reach_scratch_loss"]
        fmt = (lambda v: "   -" if v is None else f"{100 * v:6.1f}%")
        print(f"{name:22s} {str(steps):>12s} {fmt(r['saving']):>8s} "
              f"{fmt(r['saving_with_source']):>12s} {r['final_val_loss']:10.4f}")
    print(f"L* = {goal:.4f} (from scratch, {cfg.steps} steps, peak {peak}); "
          f"{report['wall_seconds']:.0f} s; {out / 'bench_training.json'}")
    return 0


def _plot(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, run in report["runs"].items():
        curve = run["curve"]
        ax.plot([c["flops"] for c in curve], [c["val_loss"] for c in curve], label=name)
    ax.axhline(report["scratch_final_loss"], color="gray", linestyle=":", label="L*")
    ax.set_xlabel("training FLOPs of the target (6 N D)")
    ax.set_ylabel("validation loss (nats / byte)")
    ax.set_ylim(top=math.ceil(report["source_final_loss"] + 1))
    ax.legend()
    ax.set_title("LEMON growth vs training from scratch (stdlib bytes)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())

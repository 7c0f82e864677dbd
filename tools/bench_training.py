"""A miniature of LEMON's experiment: how much compute does growing a trained model save?

Data: the source text of Python's standard library (present on every machine), read as
bytes from a fixed, sorted list of modules that every CPython 3.10+ ships; the first 90% of
the bytes train, the last 10% validate. Two tasks of different kinds, measured the same way:

- ``lm``: byte-level causal language modelling with a Pre-LN GPT (``lemon_fx.cli.demo.TinyGPT``);
- ``mlm``: masked-byte modelling with a Pre-LN encoder (``TinyGPT(causal=False)``):
  15% of the positions are replaced by a mask token (id 256), the loss is the cross-entropy
  on those positions only.

A small source (width 64, 2 blocks, 4 heads) is trained with the target's recipe and budget
(``source_steps = N``, warmup + cosine to zero, so its loss has flattened at the end: the
paper's sources get their full standard budget too), traced and grown with
``lemon_fx.grow(gm, Plan(width=2.0, depth=2.0))`` to the target (width 128, 4 blocks,
8 heads). Runs, all on the same batches (one seeded stream) and the same validation set:

- ``scratch``: the target built directly from its class, AdamW with warmup + cosine over
  ``N`` steps, the peak rate tuned by a sweep; its final validation loss is ``L*``;
- ``lemon``: LEMON growth, fresh optimizer, the warmup repeated, the *same* peak rate, the
  cosine compressed into ``f * N`` steps (``LemonSchedule``); the steps it needs to reach
  ``L*`` give the saving ``1 - steps / N``;
- ``lemon_full_schedule``: LEMON growth trained with the from-scratch schedule;
- ``net2net``: equal splits and zeroed new blocks (``method="net2net"``), LEMON's schedule;
- ``random_new``: the target's shapes with the source's weights in their original entries
  (source blocks at their interleaved positions, the original rows/columns/heads of every
  grown axis) and every other entry drawn from the target's fresh initialisation: the
  function is not preserved. LEMON's schedule;
- ``llama_pro``: LEMON growth, only the new capacity trains (``train_only_new``: inherited
  tensors frozen, inherited entries of width-grown tensors masked), fresh AdamW, LEMON's
  schedule (LLaMA-Pro's block expansion);
- ``lemon_state`` (new, TRAINING.md 5.4 + 5.1): LEMON growth with the source's AdamW state
  grown through the growth map (``grow_optimizer_state`` into ``GrowthAwareAdamW``, its
  per-entry rates, clipping by the source's gradient norm); no warmup: annealed, the
  compressed cosine from the grown peak; mid, the source's constant rate;
- ``lemon_asym`` (new, TRAINING.md 5.2 + 5.4): LEMON growth, ``growth_param_groups``:
  inherited capacity at a low rate (annealed: ``--inherited-scale`` x scratch's peak,
  default 0.5) or the source's running rate (mid), no warmup; new capacity (new blocks, new
  copies; ``--asym-width modes``: the copy sets' differences) re-warmed over ``--rewarm``
  steps (250) to ``--new-peak-scale`` x scratch's peak (1.0); the grown AdamW state laid
  onto these groups (``grow_optimizer_state(..., like=)``), new blocks fresh.

Baselines: ``lemon``, ``net2net``, ``random_new``, ``llama_pro``; new recipes:
``lemon_state``, ``lemon_asym``. The table at the end ranks the grown runs by saving and
says whether the best new recipe reaches ``L*`` in fewer steps than every baseline.

Each grown run (all but ``lemon_full_schedule``) is trained for every compressed decay
fraction ``f`` in ``--fractions`` and reported at its best ``f`` (the fewest steps to
``L*``), just as ``scratch`` is reported at its best peak rate; every run is in the JSON.

Scenarios (``--scenario``):

- ``annealed`` (default): the paper's setup above, every schedule warmup + cosine to 0;
- ``mid``: growth mid-training (G_stack, SPARKLING). The source trains ``--growth-step G``
  steps (default ``--source-steps``; ``--quick``: 60) in WSD's stable phase (warmup, then
  its constant peak, no cooldown) and is grown there. Every run is WSD: warmup, constant,
  one ``(1 - sqrt)`` cooldown over the last ``--cooldown-fraction`` (20%) of its own
  steps (``f * N`` for the grown runs). Scratch: the target from scratch under WSD, the
  same warmup, peak tuned by the same sweep. ``lemon``, ``net2net``, ``random_new``,
  ``llama_pro``, ``lemon_full_schedule`` keep LEMON's meaning (fresh AdamW re-warmed to
  scratch's peak); ``lemon_state`` and ``lemon_asym``'s inherited capacity continue at the
  source's constant rate without a re-warm. The source's cost is ``G`` steps of the small
  model.

FLOPs: ``6 * parameters * tokens`` per training step (parameters include the embeddings;
tokens = batch x context); the saving "with source" adds the small model's own training
FLOPs (same formula) to the grown run's.

    python tools/bench_training.py --quick               # smoke check, both tasks, < 1 min
    python tools/bench_training.py --quick --scenario mid --task lm
    python tools/bench_training.py --task mlm --fractions 0.25 0.375 0.5 --out bench_results
    # a knob on the grown runs only, reusing the scratch sweep of an earlier report:
    python tools/bench_training.py --methods lemon --grown-peak-scale 2 \
        --reuse-scratch bench_results/bench_training.json --out bench_results/peak_x2

    # README's two scenarios, every baseline and both new recipes (about 2 h each on one
    # core; docs/bench/bench_training.json and bench_training_mid.json):
    python tools/bench_training.py --task lm --threads 1 --out bench_results/recipes
    python tools/bench_training.py --task lm --threads 1 --scenario mid \
        --out bench_results/recipes

    # the paper's shapes (6 x 384 -> 12 x 768, head_dim 64) on a GPU; the report names it:
    python tools/bench_training.py --task lm --device cuda --source-dim 384 \
        --source-depth 6 --heads 6 --out bench_results/gpu
    # README's table of a report:
    python tools/bench_training.py --markdown docs/bench/bench_training_mid.json

Writes ``bench_training.json`` / ``.png`` (``lm``) and ``bench_training_mlm.json`` / ``.png``
(``mlm``) in ``--out``, ``bench_training_mid.json`` / ``bench_training_mlm_mid.json`` (and
``.png``) for ``--scenario mid``; the plot needs matplotlib (``pip install matplotlib``).
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
from torch import nn

import lemon_fx
from lemon_fx.cli.demo import TinyGPT
from lemon_fx.resolution.depth import interleave_order, stack_order
from lemon_fx.training import (
    GrowthAwareAdamW,
    grow_optimizer_state,
    growth_param_groups,
    lemon_lr_factor,
    train_only_new,
    wsd_lr_factor,
)

# Modules present in every CPython 3.10+ (pure Python, stable names); read in sorted order.
MODULES = sorted(["argparse", "ast", "bisect", "calendar", "codecs", "collections/__init__",
                  "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
                  "difflib", "enum", "fractions", "functools", "heapq", "inspect",
                  "ipaddress", "json/decoder", "json/encoder", "logging/__init__", "operator",
                  "pathlib", "pickle", "pprint", "random", "shlex", "shutil", "statistics",
                  "string", "subprocess", "tempfile", "textwrap", "threading", "tokenize",
                  "traceback", "typing", "uuid", "warnings", "zipfile"])
MASK = 256  # the MLM mask token; bytes are 0..255
RUNS = ("scratch", "lemon", "lemon_full_schedule", "net2net", "random_new", "llama_pro",
        "lemon_state", "lemon_asym")
# the runs trained at every decay fraction (all but scratch and lemon_full_schedule)
GROWN = ("lemon", "net2net", "random_new", "llama_pro", "lemon_state", "lemon_asym")
BASELINES = ("lemon", "net2net", "random_new", "llama_pro")  # the recipes of other tools
NEW_RECIPES = ("lemon_state", "lemon_asym")  # TRAINING.md section 5, items 1, 2 and 4
SCENARIOS = ("annealed", "mid")


@dataclass
class Config:
    task: str = "lm"
    context: int = 64
    batch: int = 16
    source_dim: int = 64
    source_depth: int = 2
    heads: int = 4  # of the source; head_dim is kept, so the target has twice as many
    source_steps: int = 3000  # the paper's setup: the source gets the target's budget
    source_peak: float = 3e-3
    steps: int = 3000  # N: the from-scratch budget of the target
    warmup: int = 100
    peak_lrs: tuple[float, ...] = (1e-3, 2e-3, 4e-3)
    fractions: tuple[float, ...] = (0.5, 0.625, 0.75)  # compressed decay lengths, x N
    placement: str = "interleave"
    methods: tuple[str, ...] = RUNS[1:]  # the grown runs to train (scratch always counts)
    grown_peak_scale: float = 1.0  # grown runs' peak / scratch's tuned peak (LEMON: 1)
    noise_scale: float = 1.0  # Plan.noise_scale of the grown runs (LEMON: 1)
    grown_warmup: int | None = None  # the grown runs' warmup (None: the same as scratch's)
    scenario: str = "annealed"  # annealed: the paper's setup; mid: growth mid-training (WSD)
    growth_step: int | None = None  # mid: the source's stable-phase steps (None: source_steps)
    cooldown_fraction: float = 0.2  # mid: the (1 - sqrt) cooldown, a fraction of each budget
    rewarm: int = 250  # lemon_asym: the new capacity's warmup steps
    new_peak_scale: float = 1.0  # lemon_asym: the new capacity's peak / scratch's tuned peak
    inherited_scale: float | None = None  # lemon_asym's inherited rate (None: see below)
    asym_width: str = "copies"  # lemon_asym: growth_param_groups(width=...)
    weight_decay: float = 0.01
    eval_every: int = 50
    val_windows: int = 256
    mask_prob: float = 0.15
    seed: int = 0
    device: str = "cpu"  # where every model trains; batches are drawn on the CPU either way


QUICK = Config(context=32, batch=8, source_dim=32, source_steps=200, steps=120, warmup=10,
               peak_lrs=(3e-3,), fractions=(0.5,), eval_every=20, val_windows=32, rewarm=15,
               growth_step=60)


# ----------------------------------------------------------------------------- data


def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """The bytes of the fixed module list: the first 90% train, the rest validation."""
    root = Path(sysconfig.get_paths()["stdlib"])
    data = b"".join((root / f"{name}.py").read_bytes() for name in MODULES)
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    cut = int(len(tokens) * 0.9)
    return tokens[:cut], tokens[cut:]


def _windows(tokens: torch.Tensor, count: int, length: int, generator) -> torch.Tensor:
    starts = torch.randint(0, len(tokens) - length, (count,), generator=generator)
    return torch.stack([tokens[s: s + length] for s in starts.tolist()])


def _mask(window: torch.Tensor, prob: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """MLM: replace ``prob`` of the positions by MASK; targets -100 (ignored) elsewhere."""
    masked = torch.rand(window.shape, generator=generator) < prob
    masked[:, 0] |= ~masked.any(dim=1)  # at least one target per row
    x = torch.where(masked, torch.full_like(window, MASK), window)
    return x, torch.where(masked, window, torch.full_like(window, -100))


def make_batch(tokens: torch.Tensor, cfg: Config, count: int, generator):
    if cfg.task == "lm":
        window = _windows(tokens, count, cfg.context + 1, generator)
        return window[:, :-1], window[:, 1:]
    return _mask(_windows(tokens, count, cfg.context, generator), cfg.mask_prob, generator)


def batches(tokens: torch.Tensor, cfg: Config, seed: int):
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield make_batch(tokens, cfg, cfg.batch, generator)


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                           ignore_index=-100)


# ---------------------------------------------------------------------------- models


def build(cfg: Config, dim: int, depth: int, seed: int) -> nn.Module:
    """The task's model at ``dim`` x ``depth``, initialised on the CPU from ``seed`` (the
    same weights on every device), then moved to ``cfg.device``."""
    torch.manual_seed(seed)
    heads = cfg.heads * dim // cfg.source_dim
    if cfg.task == "lm":
        return TinyGPT(vocab=256, dim=dim, depth=depth, num_heads=heads,
                       max_len=cfg.context).to(cfg.device)
    # Positions at unit scale, not GPT's 0.02: a masked byte has no bigram shortcut, all its
    # signal comes through attention to its neighbours, which needs positions attention can
    # tell apart. At 0.02 the 64x2 source sat on the unigram plateau (3.06 nats after 3000
    # steps; unigram 3.22), at 1.0 it reached 2.29.
    return TinyGPT(vocab=256, dim=dim, depth=depth, num_heads=heads, max_len=cfg.context,
                   causal=False, input_vocab=MASK + 1, position_std=1.0).to(cfg.device)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def random_new_weights(source: nn.Module, target: nn.Module, order: list[int]) -> nn.Module:
    """``target`` (freshly initialised) with the source's weights pasted into their entries.

    ``order[i]`` is the source block of target block ``i``; its first occurrence is the
    source block itself, later ones (the new blocks) stay entirely at init. In a grown axis
    the originals are the first entries (LEMON appends new units after the originals), per
    chunk for the fused q/k/v rows. Everything else keeps the fresh init: the function is
    not preserved, the source's knowledge is.
    """
    src = source.state_dict()
    state = target.state_dict()
    first = {}
    for position, block in enumerate(order):
        first.setdefault(block, position)
    where = {f"blocks.{position}.": f"blocks.{block}." for block, position in first.items()}
    for name, value in state.items():
        source_name = name
        if name.startswith("blocks."):
            prefix = ".".join(name.split(".")[:2]) + "."
            if prefix not in where:
                continue  # a new block: all fresh
            source_name = where[prefix] + name[len(prefix):]
        old = src[source_name]
        chunks = 3 if name.endswith(("qkv.weight", "qkv.bias")) else 1
        index = []
        for axis, (new_size, old_size) in enumerate(zip(value.shape, old.shape)):
            if axis == 0 and chunks == 3:
                index.append(torch.cat([torch.arange(old_size // 3, device=value.device)
                                        + c * (new_size // 3) for c in range(3)]))
            else:
                index.append(torch.arange(old_size, device=value.device))
        grid = torch.meshgrid(*index, indexing="ij")
        value[grid] = old.to(value.dtype)
    target.load_state_dict(state)
    return target


# -------------------------------------------------------------------------- training


@torch.no_grad()
def evaluate(model: nn.Module, val: tuple[torch.Tensor, torch.Tensor], chunk: int = 64) -> float:
    """Mean loss per target on the fixed validation set (eval mode)."""
    was_training = model.training
    model.eval()
    x, y = val
    total, count = 0.0, 0
    for i in range(0, len(x), chunk):
        logits = model(x[i: i + chunk])
        yy = y[i: i + chunk].reshape(-1)
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), yy, ignore_index=-100,
                                 reduction="sum").item()
        count += int((yy != -100).sum())
    model.train(was_training)
    return total / count


def adamw_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """Weight decay on matrices only (``dim >= 2``), as every run here uses."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": cfg.weight_decay},
            {"params": other, "weight_decay": 0.0}]


def cooldown(cfg: Config, steps: int) -> int:
    """The (1 - sqrt) cooldown of a WSD run of ``steps`` steps."""
    return int(round(cfg.cooldown_fraction * steps))


def schedule_factor(cfg: Config, steps: int, warmup: int, stable: bool = False):
    """The rate factor (``step -> multiple of the peak``) of a run of ``steps`` steps:
    ``annealed``: warmup + cosine to 0 (``lemon_lr_factor``); ``mid``: warmup + constant +
    a (1 - sqrt) cooldown over ``cooldown_fraction`` of the steps (``wsd_lr_factor``), or no
    cooldown at all (``stable``: the source's stable phase)."""
    warmup = min(warmup, steps)
    if cfg.scenario == "annealed":
        return lambda t: lemon_lr_factor(t, warmup, steps, 0.0)
    cool = 0 if stable else min(cooldown(cfg, steps), steps - warmup)
    return lambda t: wsd_lr_factor(t, warmup, steps, cool, 0.0)


@dataclass
class Setup:
    """What a run trains with: the optimizer (its groups' ``lr`` are the peaks), one rate
    factor per param group, and how gradients are clipped."""

    optimizer: torch.optim.Optimizer
    factors: list
    clip_by_source_norm: bool = False  # GrowthAwareAdamW.clip_grad_norm_ (source's norm)
    note: str = ""


def fresh_setup(model: nn.Module, cfg: Config, steps: int, peak: float,
                warmup: int | None = None, stable: bool = False) -> Setup:
    """A fresh AdamW over ``adamw_groups`` and the scenario's schedule (``warmup``:
    ``cfg.warmup`` unless given)."""
    optimizer = torch.optim.AdamW(adamw_groups(model, cfg), lr=peak)
    factor = schedule_factor(cfg, steps, cfg.warmup if warmup is None else warmup, stable)
    return Setup(optimizer, [factor] * len(optimizer.param_groups), note=f"peak {peak:g}")


def train(model: nn.Module, train_tokens, val, cfg: Config, steps: int, setup: Setup,
          seed: int, label: str = "") -> list[tuple[int, float]]:
    """``steps`` steps of ``setup``'s optimizer and rates, clip 1.0, on the one seeded batch
    stream every run shares.

    Returns ``(step, val loss)`` every ``eval_every`` steps and at the end (step 0: before
    any training).
    """
    torch.manual_seed(seed)
    model.train()
    optimizer = setup.optimizer
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, setup.factors)
    params = [p for p in model.parameters() if p.requires_grad]
    stream = batches(train_tokens, cfg, seed=cfg.seed + 1000)  # the same batches for all
    curve = [(0, evaluate(model, val))]
    started = time.time()
    for step in range(1, steps + 1):
        x, y = (t.to(cfg.device) for t in next(stream))
        loss = loss_fn(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if setup.clip_by_source_norm:
            optimizer.clip_grad_norm_(1.0)
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % cfg.eval_every == 0 or step == steps:
            curve.append((step, evaluate(model, val)))
    print(f"  {label:34s} {steps:5d} steps  {setup.note}  val {curve[0][1]:.4f} -> "
          f"{curve[-1][1]:.4f} (best {min(v for _, v in curve):.4f})  "
          f"{time.time() - started:.0f} s", flush=True)
    return curve


def steps_to_reach(curve: list[tuple[int, float]], goal: float) -> int | None:
    for step, loss in curve:
        if loss <= goal:
            return step
    return None


# ------------------------------------------------------------------------------ main


# fields that only change the source or the grown runs: a scratch sweep can be reused
GROWN_ONLY = {"fractions", "placement", "grown_peak_scale", "methods", "noise_scale",
              "source_steps", "source_peak", "grown_warmup", "growth_step", "rewarm",
              "new_peak_scale", "inherited_scale", "asym_width"}
# fields that reports written before they existed ran with these values
LEGACY = {"scenario": "annealed", "cooldown_fraction": Config.cooldown_fraction,
          "device": "cpu"}


def reusable_scratch(path: Path, cfg: Config) -> dict:
    """An earlier report whose scratch sweep ran with this exact config (but the grown-only
    fields), so that a sweep over decay lengths or peak scales need not retrain it."""
    report = json.loads(path.read_text())
    if "scratch_sweep_curves" not in report:  # older reports kept the chosen peak's curve
        report["scratch_sweep_curves"] = {
            str(report["peak_lr"]): report["runs"]["scratch"]["curve"]}
    mine = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
    theirs = {**LEGACY, **report["config"]}
    if theirs["scenario"] == "annealed":  # no cooldown there: its length changes nothing
        theirs["cooldown_fraction"] = mine["cooldown_fraction"]
    differ = sorted(k for k in mine if k not in GROWN_ONLY and theirs.get(k) != mine[k])
    if differ:
        raise SystemExit(f"{path}: its scratch runs used another config ({', '.join(differ)} "
                         "differ): pass the same --steps/--peaks/... or rerun scratch")
    return report


def device_name(device: str) -> str:
    """What the runs trained on, as a report records it: ``cpu`` or the GPU's name."""
    if torch.device(device).type == "cuda":
        return f"{device}: {torch.cuda.get_device_name(torch.device(device))}"
    return device


def run_task(cfg: Config, out: Path, command: str, threads: int,
             reuse: dict | None = None) -> dict:
    started = time.time()
    train_tokens, val_tokens = corpus()
    val = tuple(t.to(cfg.device) for t in make_batch(
        val_tokens, cfg, cfg.val_windows, torch.Generator().manual_seed(12345)))
    suffix = ("" if cfg.task == "lm" else f"_{cfg.task}") + \
        ("_mid" if cfg.scenario == "mid" else "")
    print(f"[{cfg.task}, {cfg.scenario}] {len(train_tokens):,} train bytes, "
          f"{len(val_tokens):,} val bytes; {cfg.val_windows} val windows of {cfg.context}",
          flush=True)

    sd, sdepth = cfg.source_dim, cfg.source_depth
    td, tdepth = 2 * sd, 2 * sdepth
    mid = cfg.scenario == "mid"
    # annealed: the source's full budget, cosine to 0; mid: G steps of WSD's stable phase
    source_train_steps = (cfg.growth_step or cfg.source_steps) if mid else cfg.source_steps
    small = build(cfg, sd, sdepth, cfg.seed)
    source_setup = fresh_setup(small, cfg, source_train_steps, cfg.source_peak, stable=mid)
    source_curve = train(small, train_tokens, val, cfg, source_train_steps, source_setup,
                         seed=cfg.seed + 1, label=f"source {sd}x{sdepth}")
    source_optimizer = source_setup.optimizer
    # the rate the source's next step would have taken: 0 annealed, its constant rate mid
    source_last_lr = float(source_optimizer.param_groups[0]["lr"])
    small.eval()
    source_loss = evaluate(small, val)
    params = {"source": count_parameters(small),
              "target": count_parameters(build(cfg, td, tdepth, cfg.seed))}
    example = make_batch(train_tokens, cfg, 2, torch.Generator().manual_seed(7))[0].to(
        cfg.device)
    gm = lemon_fx.trace(small, (example,))

    def plan(method: str) -> lemon_fx.Plan:
        return lemon_fx.Plan(width=2.0, depth=2.0, method=method, seed=cfg.seed + 3,
                             placement=cfg.placement, noise_scale=cfg.noise_scale)

    def grown(method: str) -> nn.Module:
        return lemon_fx.grow(gm, plan(method))

    recipe = lemon_fx.plan_growth(gm, plan("lemon"))  # what grown("lemon") did, per tensor
    order = (interleave_order if cfg.placement == "interleave" else stack_order)(sdepth, tdepth)

    tokens_per_step = cfg.batch * cfg.context

    def flops(run_params: int, steps: float) -> float:
        return 6.0 * run_params * tokens_per_step * steps

    # 1. from scratch, peak rate tuned (or taken from an earlier run of the same config)
    if reuse is not None:
        sweep = {float(k): [(c["step"], c["val_loss"]) for c in curve]
                 for k, curve in reuse["scratch_sweep_curves"].items()}
        print(f"  scratch: reused from an earlier run ({reuse['command']})", flush=True)
    else:
        sweep = {}
        for peak in cfg.peak_lrs:
            model = build(cfg, td, tdepth, cfg.seed + 2)
            sweep[peak] = train(model, train_tokens, val, cfg, cfg.steps,
                                fresh_setup(model, cfg, cfg.steps, peak), seed=cfg.seed + 2,
                                label=f"scratch peak {peak:g}")
    peak = min(sweep, key=lambda p: sweep[p][-1][1])
    goal = sweep[peak][-1][1]
    print(f"  L* = {goal:.4f} (peak {peak:g}); source {source_loss:.4f} "
          f"(next rate {source_last_lr:g})", flush=True)

    # 2. grown runs at every compressed decay length; LEMON with the full schedule
    grown_peak = peak * cfg.grown_peak_scale
    grown_warmup = cfg.warmup if cfg.grown_warmup is None else cfg.grown_warmup
    # inherited capacity's rate in the state-carrying runs: mid, the source's own constant
    # rate (no re-warm); annealed (the source ended at rate 0), lemon_state takes the grown
    # peak, lemon_asym a low multiple of scratch's peak
    inherited_scale = cfg.inherited_scale if cfg.inherited_scale is not None \
        else (1.0 if mid else 0.5)
    state_lr = source_last_lr if mid else grown_peak
    asym_inherited_lr = inherited_scale * (source_last_lr if mid else peak)
    asym_new_lr = cfg.new_peak_scale * peak

    def with_grown_state(model: nn.Module, optimizer: GrowthAwareAdamW) -> None:
        """The source's AdamW state (moments, steps, per-entry rate scales) laid onto
        ``optimizer``'s groups; new blocks stay fresh (their own step 0)."""
        optimizer.load_state_dict(grow_optimizer_state(recipe, small, source_optimizer,
                                                       model, like=optimizer))

    def setup(method: str, steps: int) -> tuple[nn.Module, Setup]:
        if method == "random_new":
            model = random_new_weights(small, build(cfg, td, tdepth, cfg.seed + 2), order)
            return model, fresh_setup(model, cfg, steps, grown_peak, grown_warmup)
        if method in ("lemon", "net2net"):
            model = grown(method)
            return model, fresh_setup(model, cfg, steps, grown_peak, grown_warmup)
        model = grown("lemon")
        if method == "llama_pro":  # only the new capacity trains, fresh AdamW
            only_new = train_only_new(recipe, model)
            optimizer = torch.optim.AdamW(only_new.param_groups(cfg.weight_decay),
                                          lr=grown_peak)
            factor = schedule_factor(cfg, steps, grown_warmup)
            return model, Setup(optimizer, [factor] * len(optimizer.param_groups),
                                note=f"peak {grown_peak:g}, new only")
        if method == "lemon_state":  # the grown AdamW state, no warmup
            optimizer = GrowthAwareAdamW(adamw_groups(model, cfg), lr=state_lr)
            with_grown_state(model, optimizer)
            factor = schedule_factor(cfg, steps, 0)
            return model, Setup(optimizer, [factor] * len(optimizer.param_groups), True,
                                note=f"rate {state_lr:g}, grown state")
        if method == "lemon_asym":  # inherited low/continuing, new re-warmed; grown state
            groups = growth_param_groups(recipe, model, lr=asym_inherited_lr,
                                         new_lr=asym_new_lr, weight_decay=cfg.weight_decay,
                                         width=cfg.asym_width)
            optimizer = groups.optimizer()
            with_grown_state(model, optimizer)
            rewarm = min(cfg.rewarm, steps - (cooldown(cfg, steps) if mid else 1))
            factors = groups.lr_lambdas(inherited=schedule_factor(cfg, steps, 0),
                                        new=schedule_factor(cfg, steps, rewarm))
            return model, Setup(optimizer, factors, True,
                                note=f"inherited {asym_inherited_lr:g}, new "
                                     f"{asym_new_lr:g} after {rewarm}, grown state")
        raise ValueError(method)

    fraction_runs: dict[str, dict[str, list]] = {m: {} for m in GROWN if m in cfg.methods}
    for fraction in cfg.fractions:
        budget = max(int(round(cfg.steps * fraction)), grown_warmup + 1)
        for method in fraction_runs:
            model, how = setup(method, budget)
            fraction_runs[method][str(fraction)] = train(
                model, train_tokens, val, cfg, budget, how, seed=cfg.seed + 2,
                label=f"{method} f={fraction:g}")
    full = None
    if "lemon_full_schedule" in cfg.methods:
        model = grown("lemon")
        full = train(model, train_tokens, val, cfg, cfg.steps,
                     fresh_setup(model, cfg, cfg.steps, grown_peak, grown_warmup),
                     seed=cfg.seed + 2, label="lemon_full_schedule")

    def best(method: str) -> tuple[str, list]:
        def key(item):
            reached = steps_to_reach(item[1], goal)
            return (reached is None, reached if reached is not None else -0.0,
                    item[1][-1][1])
        return min(fraction_runs[method].items(), key=key)

    curves: dict[str, tuple[list, float | None]] = {"scratch": (sweep[peak], 1.0)}
    for method in fraction_runs:
        fraction, curve = best(method)
        curves[method] = (curve, float(fraction))
    if full is not None:
        curves["lemon_full_schedule"] = (full, 1.0)

    source_flops = flops(params["source"], source_train_steps)
    scratch_flops = flops(params["target"], cfg.steps)

    def summary(curve, fraction) -> dict:
        reached = steps_to_reach(curve, goal)
        return {
            "decay_fraction": fraction,
            "decay_steps": curve[-1][0],
            "steps_to_reach_scratch_loss": reached,
            "final_val_loss": curve[-1][1],
            "best_val_loss": min(v for _, v in curve),
            "saving": None if reached is None else 1 - reached / cfg.steps,
            "saving_with_source": None if reached is None
            else 1 - (flops(params["target"], reached) + source_flops) / scratch_flops,
            "curve": [{"step": s, "flops": flops(params["target"], s), "val_loss": v}
                      for s, v in curve],
        }

    runs = {name: summary(*curves[name]) for name in RUNS if name in curves}
    runs["scratch"]["steps_to_reach_scratch_loss"] = cfg.steps  # L* is its final loss
    runs["scratch"]["saving"] = 0.0
    runs["scratch"]["saving_with_source"] = 0.0
    runs["scratch"]["peak_lr"] = peak
    report = {
        "command": command,
        "task": cfg.task,
        "config": asdict(cfg),
        "modules": MODULES,
        "data": {"train_bytes": len(train_tokens), "val_bytes": len(val_tokens),
                 "split": "first 90% of the concatenated bytes train, last 10% validate"},
        "parameters": params,
        "flops_formula": "6 * parameters * tokens per step (tokens = batch * context)",
        "source_flops": source_flops,
        "scratch_flops": scratch_flops,
        "peak_lr": peak,
        "grown_peak_lr": grown_peak,
        "scenario": cfg.scenario,
        "source_train_steps": source_train_steps,
        "source_last_lr": source_last_lr,
        "rates": {"lemon_state": state_lr, "lemon_asym_inherited": asym_inherited_lr,
                  "lemon_asym_new": asym_new_lr},
        "peak_sweep": {str(k): v[-1][1] for k, v in sweep.items()},
        "scratch_sweep_curves": {str(k): [{"step": st, "val_loss": v} for st, v in curve]
                                 for k, curve in sweep.items()},
        "scratch_final_loss": goal,
        "source_final_loss": source_loss,
        "source_curve": [{"step": s, "val_loss": v} for s, v in source_curve],
        "runs": runs,
        "fraction_sweep": {m: {f: summary(c, float(f)) for f, c in fraction_runs[m].items()}
                           for m in fraction_runs},
        "lemon_beats_every_baseline": _beats(runs),
        **_ranking(runs),
        "wall_seconds": time.time() - started,
        "threads": threads,
        "device": device_name(cfg.device),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    (out / f"bench_training{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, out / f"bench_training{suffix}.png")
    _table(report)
    return report


def _steps(run: dict) -> float:
    s = run["steps_to_reach_scratch_loss"]
    return math.inf if s is None else s


def _beats(runs: dict) -> bool | None:
    """LEMON reaches L* in fewer steps than every other grown run of the paper's comparison
    (lemon_full_schedule, net2net, random_new; unreached counts as N+); None when one of
    them is missing (``--methods`` left it out)."""
    others = ("lemon_full_schedule", "net2net", "random_new")
    if not {"lemon", *others} <= set(runs):
        return None
    return all(_steps(runs["lemon"]) < _steps(runs[other]) for other in others)


def _ranking(runs: dict) -> dict:
    """The grown runs ranked by saving (the fewest steps to L*, then the lowest final
    loss), the best of the new recipes (``NEW_RECIPES``), and whether it reaches L* in
    fewer steps than every baseline (``BASELINES``; None when a baseline or every new
    recipe was left out)."""
    ranked = sorted((name for name in runs if name != "scratch"),
                    key=lambda name: (_steps(runs[name]), runs[name]["final_val_loss"]))
    new = [name for name in ranked if name in NEW_RECIPES]
    best = new[0] if new else None
    beats = None
    if best is not None and set(BASELINES) <= set(runs):
        beats = all(_steps(runs[best]) < _steps(runs[b]) for b in BASELINES)
    return {"ranking": ranked, "best_new_recipe": best,
            "best_new_recipe_beats_every_baseline": beats}


def _table(report: dict) -> None:
    fmt = (lambda v: "     -" if v is None else f"{100 * v:5.1f}%")
    runs = report["runs"]
    print(f"\n[{report['task']}, {report.get('scenario', 'annealed')}] {'run':20s} "
          f"{'decay':>6s} {'steps to L*':>11s} {'saving':>7s} {'w/ source':>9s} "
          f"{'final loss':>10s}")
    for name in ["scratch"] + report["ranking"]:  # by saving, best first
        r = runs[name]
        steps = r["steps_to_reach_scratch_loss"]
        reached = "not reached" if steps is None else steps
        kind = " (new)" if name in NEW_RECIPES else " (base)" if name in BASELINES else ""
        print(f"     {name + kind:20s} {r['decay_steps']:6d} {reached:>11} "
              f"{fmt(r['saving']):>7s} {fmt(r['saving_with_source']):>9s} "
              f"{r['final_val_loss']:10.4f}")
    print(f"     L* = {report['scratch_final_loss']:.4f} (scratch, {report['config']['steps']} "
          f"steps, peak {report['peak_lr']:g}); source {report['source_final_loss']:.4f} "
          f"after {report['source_train_steps']} steps; LEMON beats every baseline: "
          f"{report['lemon_beats_every_baseline']}; best new recipe "
          f"{report['best_new_recipe']} beats every baseline ({', '.join(BASELINES)}): "
          f"{report['best_new_recipe_beats_every_baseline']}; "
          f"{report['wall_seconds']:.0f} s\n", flush=True)


ROW_NAMES = {
    "lemon": "LEMON",
    "lemon_full_schedule": "LEMON, from-scratch schedule",
    "net2net": "net2net (equal splits, zero blocks)",
    "random_new": "random new weights",
    "llama_pro": "LLaMA-Pro (only new capacity trains)",
    "lemon_state": "new: grown AdamW state",
    "lemon_asym": "new: asymmetric rates, grown state",
}


def markdown_table(report: dict) -> str:
    """README's table of one report: scratch, then the grown runs best first, the best
    run's saving in bold; every figure as the JSON has it (tests check README against
    the committed JSON)."""
    def pct(value: float | None) -> str:
        return "-" if value is None else "0%" if value == 0 else f"{100 * value:.1f}%"

    runs = report["runs"]
    task = "byte-level LM (GPT)" if report["task"] == "lm" else "masked-byte MLM (encoder)"
    when = "grown mid-training" if report.get("scenario") == "mid" else "annealed source"
    peaks = "/".join(f"{float(p):g}" for p in report["peak_sweep"])
    lines = [f"| {task}, {when}, `L*` = {report['scratch_final_loss']:.4f} | decay steps "
             "| steps to `L*` | saving | with source | final loss |",
             "|---|---:|---:|---:|---:|---:|"]
    ranking = report.get("ranking") or _ranking(runs)["ranking"]  # older reports: none
    best = ranking[0] if ranking else None
    for name in ["scratch"] + ranking:
        r = runs[name]
        label = f"scratch (peak {report['peak_lr']:g} of {peaks})" if name == "scratch" \
            else ROW_NAMES.get(name, name)
        steps = r["steps_to_reach_scratch_loss"]
        saving = pct(r["saving"])
        if name == best and r["saving"] is not None:
            saving = f"**{saving}**"
        lines.append(f"| {label} | {r['decay_steps']} | "
                     f"{'not reached' if steps is None else steps} | {saving} | "
                     f"{pct(r['saving_with_source'])} | {r['final_val_loss']:.4f} |")
    return "\n".join(lines) + "\n"


def _plot(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, run in report["runs"].items():
        curve = run["curve"]
        label = name if name in ("scratch", "lemon_full_schedule") else \
            f"{name} (decay {run['decay_steps']} steps)"
        bold = name in ("lemon", report["best_new_recipe"])
        line, = ax.plot([c["flops"] for c in curve], [c["val_loss"] for c in curve],
                        label=label, linewidth=2 if bold else 1.2)
        if bold:
            ax.plot([c["flops"] + report["source_flops"] for c in curve],
                    [c["val_loss"] for c in curve], color=line.get_color(), linestyle="--",
                    linewidth=1, label=f"{name}, counting the source's training")
    ax.axhline(report["scratch_final_loss"], color="gray", linestyle=":", label="L* (scratch)")
    ax.set_xlabel("training FLOPs of the target (6 x parameters x tokens)")
    ax.set_ylabel("validation loss (nats per predicted byte)")
    top = max(report["source_final_loss"], report["scratch_final_loss"]) + 0.6
    bottom = min(min(c["val_loss"] for c in r["curve"]) for r in report["runs"].values())
    ax.set_ylim(bottom - 0.05, top)
    ax.legend(fontsize=8)
    task = "byte LM" if report["task"] == "lm" else "masked-byte MLM"
    when = "grown mid-training (WSD)" if report["scenario"] == "mid" else "annealed source"
    ax.set_title(f"LEMON growth vs from scratch, {when}: {task} on stdlib source "
                 f"({report['parameters']['source']:,} -> {report['parameters']['target']:,} "
                 f"params)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# the flags that replace a Config field when given: flag -> (field, argparse keywords)
CONFIG_FLAGS = {
    "--device": ("device", dict(help="where the models train: cpu (default), cuda, "
                                "cuda:1, ...; batches and initial weights are the same on "
                                "every one")),
    "--source-dim": ("source_dim", dict(type=int, help="the source's width (64; the "
                                        "target's is twice it)")),
    "--source-depth": ("source_depth", dict(type=int, help="the source's blocks (2; the "
                                            "target has twice as many)")),
    "--heads": ("heads", dict(type=int, help="the source's heads (4; head_dim = width / "
                              "heads is kept)")),
    "--context": ("context", dict(type=int, help="bytes per training window (64)")),
    "--batch": ("batch", dict(type=int, help="windows per step (16)")),
    "--steps": ("steps", dict(type=int, help="N, the from-scratch budget")),
    "--source-steps": ("source_steps", dict(type=int, help="the source's training steps")),
    "--peaks": ("peak_lrs", dict(type=float, nargs="+", help="peak rates to sweep")),
    "--fractions": ("fractions", dict(type=float, nargs="+", help="compressed decay "
                                      "lengths for the grown runs, as fractions of N")),
    "--placement": ("placement", dict(choices=("interleave", "stack"))),
    "--methods": ("methods", dict(nargs="+", choices=RUNS[1:], help="the grown runs to "
                                  "train (default: all seven)")),
    "--scenario": ("scenario", dict(choices=SCENARIOS, help="annealed (default: the "
                                    "paper's setup, source trained to the end of its "
                                    "cosine) or mid (growth mid-training: the source in "
                                    "WSD's stable phase, every run WSD with one cooldown)")),
    "--growth-step": ("growth_step", dict(type=int, metavar="G", help="mid: the source's "
                                          "steps at its constant rate before growth "
                                          "(default: --source-steps)")),
    "--cooldown-fraction": ("cooldown_fraction", dict(type=float, help="mid: the (1 - "
                                                      "sqrt) cooldown as a fraction of "
                                                      "each run's steps (default 0.2)")),
    "--rewarm": ("rewarm", dict(type=int, help="lemon_asym: warmup steps of the new "
                                "capacity (default 250; --quick 15)")),
    "--new-peak-scale": ("new_peak_scale", dict(type=float, help="lemon_asym: the new "
                                                "capacity's peak as a multiple of "
                                                "scratch's tuned peak (default 1.0)")),
    "--inherited-scale": ("inherited_scale", dict(type=float, help="lemon_asym: the "
                                                  "inherited capacity's rate, a multiple "
                                                  "of scratch's tuned peak (annealed, "
                                                  "default 0.5) or of the source's "
                                                  "constant rate (mid, default 1.0)")),
    "--asym-width": ("asym_width", dict(choices=("copies", "modes"), help="lemon_asym, "
                                        "width-grown tensors: the new copies take the new "
                                        "rate (copies, SPARKLING's; default) or each copy "
                                        "set's differences do, its mean keeping the "
                                        "inherited rate (modes)")),
    "--grown-warmup": ("grown_warmup", dict(type=int, help="warmup steps of the grown "
                                            "runs (default: scratch's)")),
    "--noise-scale": ("noise_scale", dict(type=float, help="Plan.noise_scale of the grown "
                                          "runs (LEMON's: 1.0)")),
    "--grown-peak-scale": ("grown_peak_scale", dict(type=float, help="peak rate of the "
                                                    "grown runs as a multiple of "
                                                    "scratch's tuned peak (LEMON's "
                                                    "recipe: 1.0, the default)")),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", type=Path, metavar="JSON", nargs="+",
                        help="print README's table of earlier reports and exit (no training)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny smoke run (both tasks unless --task is given)")
    parser.add_argument("--task", choices=("lm", "mlm", "all"),
                        help="lm (default), mlm, or all; --quick defaults to all")
    parser.add_argument("--out", default="bench_results", help="folder for JSON and PNG")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reuse-scratch", type=Path, metavar="JSON",
                        help="take the scratch sweep (and L*) from an earlier report of the "
                             "same config instead of training it again")
    for flag, (field, keywords) in CONFIG_FLAGS.items():
        parser.add_argument(flag, dest=field, **keywords)
    args = parser.parse_args(argv)
    if args.markdown:
        for path in args.markdown:
            print(markdown_table(json.loads(path.read_text())))
        return 0
    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else Config()
    for field, _ in CONFIG_FLAGS.values():
        value = getattr(args, field)
        if value is not None:
            cfg = replace(cfg, **{field: tuple(value) if isinstance(value, list) else value})
    task = args.task or ("all" if args.quick else "lm")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", "tools/bench_training.py"]
                       + list(argv if argv is not None else sys.argv[1:]))
    tasks = ("lm", "mlm") if task == "all" else (task,)
    if args.reuse_scratch and len(tasks) > 1:
        parser.error("--reuse-scratch needs a single --task")
    for name in tasks:
        task_cfg = replace(cfg, task=name)
        reuse = reusable_scratch(args.reuse_scratch, task_cfg) if args.reuse_scratch else None
        run_task(task_cfg, out, command, args.threads, reuse)
    return 0


if __name__ == "__main__":
    sys.exit(main())

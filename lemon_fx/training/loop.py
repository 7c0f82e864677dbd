"""Training a grown model (or any model) with LEMON's schedule, on one process or many.

LEMON trains the grown model with a fresh optimizer, the warmup repeated, the same peak rate
as from scratch and the cosine decay compressed into a shorter budget (``LEMON.md``,
"Training after growth"). :func:`train` is that loop, with what a real run needs:

- AdamW, weight decay on matrices (``dim >= 2``) only: decaying biases and norm gains pulls
  them towards zero for no regularisation benefit, and growth relies on those being exact;
- gradient clipping (``clip_grad_norm_``) and :class:`lemon_fx.LemonSchedule`, or
  warmup-stable-decay (:class:`~lemon_fx.training.schedule.WSDSchedule`,
  ``schedule="wsd"``), entered part-way or ramped from a source's rate to continue the
  source's schedule at the growth point (``start_step``, ``start_lr``);
- evaluation every ``eval_every`` steps and at the end, in ``eval()`` mode under ``no_grad``;
- checkpoints in ``out_dir/checkpoint-STEP/`` (safetensors, no pickle; sharded with
  ``torch.distributed.checkpoint`` under FSDP) and resume from the latest one, reproducing
  the uninterrupted run exactly (see *Randomness*);
- ``log.csv`` (a row per step, appended as it goes, so a crash keeps it) and ``log.json``;
- a one-line progress bar on stderr (rank 0; when stderr is a terminal or when asked);
- CUDA when present (``device="auto"``).

**Data parallel.** Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is initialised
from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``; gloo on CPU, nccl on CUDA) and the model wrapped in
``DistributedDataParallel``. ``batches`` gives the same *global* batch on every rank; each
rank trains on its own contiguous slice (:func:`shard`), so with ``W`` ranks and a global
batch of ``B`` rows each rank sees ``B / W`` rows. DDP averages the ranks' gradients, and
when ``loss_fn`` is a mean over the rows (the usual ``reduction="mean"``) the average of
``W`` equal-sized slice means is the mean over the global batch: the update is the
single-process update on the global batch, whatever the number of ranks. That is why ``B``
must be a multiple of ``W`` (unequal slices would weight rows unequally), and why a loss that
averages over a data-dependent count (e.g. tokens with ``ignore_index``) is only
approximately world-size independent. Only rank 0 writes logs and checkpoints; resuming
reads ``out_dir`` on every rank, so ranks must share that folder (one machine, or a shared
file system). A process group that :func:`train` created is destroyed when it returns.

**Fully sharded** (``parallel="fsdp"``, for models whose weights, gradients and AdamW
moments do not fit on one device). Under ``torchrun`` the model is sharded with FSDP2's
``fully_shard``: each repeated block (:func:`fsdp_blocks`) on its own, then the root, so
that only one block's full weights are gathered at a time; every parameter becomes a
``DTensor`` holding a dim-0 slice per rank, and the optimizer is built on those slices, so
its moments are sharded too. The data and the arithmetic are those of DDP: each rank
trains on its slice of the global batch and the reduce-scatter averages the gradients, so
the update is again the single-process update on the global batch. The model is moved to
the device block by block as it is sharded, never whole. Checkpoints are sharded: every
rank writes its own slices with ``torch.distributed.checkpoint`` (``dcp.save`` of
``get_state_dict(model, optimizer)``, keyed by parameter name, so they load at any world
size), and a resume loads them back with ``set_state_dict``. Unlike the safetensors
checkpoints these hold a pickle (DCP's ``.metadata``): load only checkpoints you wrote.
``eval_fn`` gets the sharded model, whose forward gathers weights from every rank, so it
must run the same forwards on every rank (it does: it runs on every rank). After
:func:`train` returns, the parameters are still ``DTensor`` slices; to use the model in
the same process, create the process group yourself before calling :func:`train` (it then
leaves the group alive), or read the last checkpoint. With ``WORLD_SIZE`` 1 both
``parallel`` values train the plain model.

**Randomness.** Before each step the global RNG is seeded from ``(seed, step)`` (so that a
``batches`` callable drawing from it gives the same global batch on every rank), then from
``(seed, step, rank)`` for the forward pass (dropout differs between ranks). Because every
step's randomness is derived from its number, a resumed run needs no saved RNG state to
repeat the uninterrupted one bit for bit.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from lemon_fx.training.schedule import LemonSchedule, WSDSchedule, _check_schedule

__all__ = ["TrainConfig", "TrainResult", "build_optimizer", "build_schedule", "fsdp_blocks",
           "latest_checkpoint", "shard", "train"]

Batch = tuple[Any, torch.Tensor]
LOG_FIELDS = ["step", "lr", "train_loss", "eval_loss", "grad_norm", "tokens_per_s",
              "elapsed_s"]


Schedule = Literal["cosine", "wsd"]
Parallel = Literal["ddp", "fsdp"]


@dataclass
class TrainConfig:
    """What one training run does; stored in ``log.json`` so a run can be told apart later.

    ``peak_lr`` is the rate after warmup: for a grown model, LEMON uses the *same* peak as
    training the large model from scratch, and a ``total_steps`` shorter than from scratch
    (the compressed decay). ``total_steps``: optimizer steps of the whole run (the
    schedule's length); ``warmup_steps``: the linear warmup at its start (``0 <=
    warmup_steps <= total_steps``). ``floor`` is the final rate as a fraction of the peak
    (see ``LemonSchedule``). ``weight_decay`` and ``betas``: AdamW's, the decay applied
    to parameters with ``dim >= 2`` only. ``grad_clip``: the maximal gradient norm;
    ``None`` turns clipping off. ``eval_every=0`` evaluates only at the end;
    ``checkpoint_every=0`` checkpoints only at the end (with ``out_dir`` set).
    ``out_dir``: where ``log.csv``, ``log.json`` and the ``checkpoint-STEP/`` folders go
    (None: nothing is written, and a run cannot resume). ``seed``: seeds torch's random
    numbers at every step (dropout masks), so a resumed run draws what an uninterrupted
    one would. ``progress``: ``None`` shows the bar when stderr is a terminal.
    ``device``: ``"auto"`` is ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.

    The schedule (:func:`build_schedule`; ``lemon_fx.training.schedule`` says why):

    - ``schedule``: ``"cosine"`` (LEMON's warmup + cosine to ``floor``, the default) or
      ``"wsd"`` (warmup, constant at ``peak_lr``, then a ``(1 - sqrt)`` cooldown to
      ``floor``).
    - ``cooldown_steps``: ``"wsd"`` only, the cooldown at the end (``0``: none, the rate
      stays at the peak); the warmup and the cooldown must fit in the schedule.
    - ``start_step``: the run enters its schedule at this step, as if that many steps of it
      were already done; the schedule is then ``start_step + total_steps`` long, warmup
      and cooldown placed on that timeline. For a grown model: the source's schedule
      continued from the growth step (LEMON's ``--offset-steps``).
    - ``start_lr``: the rate just before the first step (for a grown model: the source's
      last rate); the warmup ramps from it to ``peak_lr`` instead of from 0, in
      ``warmup_steps`` equal increments. It needs a warmup still ahead
      (``start_step < warmup_steps``), since otherwise it would be ignored; to continue at
      the source's rate ``r`` without a ramp, set ``peak_lr=r`` and ``warmup_steps=0``.

    ``parallel``: ``"ddp"`` (the default: every rank holds the whole model, gradients
    averaged by ``DistributedDataParallel``) or ``"fsdp"`` (FSDP2's ``fully_shard``:
    weights, gradients and optimizer state sharded across ranks, sharded checkpoints; see
    the module docstring). Both apply under ``torchrun`` with ``WORLD_SIZE > 1`` only.

    Invalid values raise ``ValueError``.
    """

    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    floor: float = 0.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    eval_every: int = 0
    checkpoint_every: int = 0
    out_dir: str | Path | None = None
    seed: int = 0
    device: str = "auto"
    progress: bool | None = None
    schedule: Schedule = "cosine"
    cooldown_steps: int = 0
    start_step: int = 0
    start_lr: float | None = None
    parallel: Parallel = "ddp"

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if not self.peak_lr > 0:
            raise ValueError(f"peak_lr must be > 0, got {self.peak_lr}")
        for name in ("total_steps", "start_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} counts optimizer steps: an int, got {value!r}")
        if self.total_steps <= 0:
            raise ValueError(f"need 0 <= warmup_steps ({self.warmup_steps}) <= total_steps "
                             f"({self.total_steps}) and total_steps > 0")
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"schedule is 'cosine' or 'wsd', got {self.schedule!r}")
        if self.schedule == "cosine" and self.cooldown_steps != 0:
            raise ValueError(f"cooldown_steps ({self.cooldown_steps}) is the cooldown of "
                             "schedule='wsd'; the cosine decays over the whole run")
        if self.start_lr is not None:
            if not (math.isfinite(self.start_lr) and self.start_lr > 0):
                raise ValueError(f"start_lr must be a finite rate > 0 or None, "
                                 f"got {self.start_lr}")
            if self.start_step >= self.warmup_steps:
                raise ValueError(f"start_lr ({self.start_lr}) is where the warmup ramps "
                                 f"from, but no warmup is ahead (warmup_steps "
                                 f"{self.warmup_steps}, start_step {self.start_step}); to "
                                 "continue at the source's rate set peak_lr to it and "
                                 "warmup_steps=0")
        # on the schedule's own timeline, start_step + total_steps long (the same as
        # total_steps for a run that starts its schedule at step 0)
        _check_schedule(self.warmup_steps, self.start_step + self.total_steps, self.floor,
                        cooldown_steps=self.cooldown_steps, start_factor=self._start_factor,
                        start_step=self.start_step)
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.eval_every < 0 or self.checkpoint_every < 0:
            raise ValueError("eval_every and checkpoint_every must be >= 0 (0: at the end)")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel is 'ddp' or 'fsdp', got {self.parallel!r}")

    @property
    def _start_factor(self) -> float:
        return 0.0 if self.start_lr is None else self.start_lr / self.peak_lr


@dataclass
class TrainResult:
    """What :func:`train` did in this call (a resumed call starts at ``start_step``).

    ``losses``: the training loss of each step of this call, averaged over the global
    batch; ``evals``: ``(step, eval loss)`` for each evaluation; ``start_step``: steps
    already done when the call began (from a checkpoint); ``end_step``: steps done when it
    returned (``total_steps`` unless the data ran out); ``checkpoint``: the last
    checkpoint written (rank 0 only, every rank under FSDP, where every rank writes its
    slices; None without ``out_dir``); ``seconds``: the call's wall time.
    """

    losses: list[float] = field(default_factory=list)  # per step, mean over the global batch
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, eval loss)
    start_step: int = 0  # steps already done when this call began (from a checkpoint)
    end_step: int = 0  # steps done when it returned (total_steps unless the data ran out)
    checkpoint: Path | None = None  # the last checkpoint written (rank 0; all under FSDP)
    seconds: float = 0.0


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW at the peak rate; weight decay on parameters with ``dim >= 2`` only.

    Biases, norm gains and other vectors get none: decaying them regularises nothing useful
    and drags LayerNorm gains towards zero.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2],
               "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.peak_lr,
                             betas=config.betas)


def build_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig) -> LambdaLR:
    """The schedule ``config`` asks for, on ``optimizer`` (whose ``lr`` is the peak).

    ``schedule="cosine"``: :class:`LemonSchedule`; ``"wsd"``: :class:`WSDSchedule`. Both
    span ``start_step + total_steps`` steps and are entered at ``start_step``, their warmup
    ramping from ``start_lr / peak_lr`` (0 without ``start_lr``); with the defaults this is
    LEMON's warmup + cosine over ``total_steps``.
    """
    length = config.start_step + config.total_steps
    if config.schedule == "wsd":
        return WSDSchedule(optimizer, config.warmup_steps, length, config.cooldown_steps,
                           config.floor, start_factor=config._start_factor,
                           start_step=config.start_step)
    return LemonSchedule(optimizer, config.warmup_steps, length, config.floor,
                         start_factor=config._start_factor, start_step=config.start_step)


def fsdp_blocks(model: nn.Module) -> list[list[nn.Module]]:
    """The units :func:`train` shards one by one under ``parallel="fsdp"``, before the root.

    Sharding per block is what makes FSDP save memory: a unit's full weights exist only
    while it runs, so the peak is one block's weights plus every block's slices. The blocks
    are the children of the *stack*: of the modules whose children are named ``0, 1, ...,
    n-1`` (``n >= 2``; an ``nn.ModuleList`` or ``nn.Sequential``, and also the plain
    containers that ``torch.fx`` builds when it copies one into a ``GraphModule``, as a
    grown model is) and are all of one class, the one holding the most parameters. The
    one-class condition is what tells repeated blocks from a pipeline such as
    ``Sequential(embedding, blocks, head)``, which would otherwise always win, holding
    everything. Each unit is a list of the modules to shard together: the block itself in
    an eager model, whose forward runs the block. In a ``GraphModule`` (the model, or a
    module above the stack) a block's container is never called (the graph calls its
    leaves), and FSDP gathers a unit's weights in the forward hook of a module of the
    unit, so there the unit is the leaves the graph calls inside the block, grouped
    (FSDP2's ``fully_shard([...])``). Blocks without parameters are skipped, and so is a block that
    shares a parameter or a module with anything outside it (tied weights): those stay with
    the root, whose unit gathers everything not in a block. ``[]`` when the model has no
    stack: then the root is the only unit.
    """
    def children_of(module: nn.Module) -> list[tuple[str, nn.Module]]:
        # _modules, not named_children(), which skips a module met twice (a shared block)
        return [(n, c) for n, c in module._modules.items() if c is not None]

    names = {id(m): name for name, m in model.named_modules()}
    stack, stack_size = None, 0
    for module in model.modules():
        children = children_of(module)
        if len(children) < 2 or [n for n, _ in children] != [str(i) for i in
                                                             range(len(children))]:
            continue
        if len({type(child) for _, child in children}) > 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > stack_size:  # strictly larger: the outer of two equal stacks wins
            stack, stack_size = module, size
    if stack is None:
        return []
    base = names[id(stack)]
    # the graph that calls the blocks' modules: the nearest GraphModule above the stack
    # (the model itself, or a grown model wrapped in an eager one), its targets made full
    called = None
    parts = base.split(".") if base else []
    for depth in range(len(parts), -1, -1):
        owner = model.get_submodule(".".join(parts[:depth]))
        if isinstance(owner, torch.fx.GraphModule):
            prefix = "".join(f"{part}." for part in parts[:depth])
            called = list(dict.fromkeys(prefix + node.target for node in owner.graph.nodes
                                        if node.op == "call_module"))
            break
    units: list[list[nn.Module]] = []
    for name, block in children_of(stack):
        path = f"{base}.{name}" if base else name
        if called is None or path in called:
            units.append([block])
        else:
            units.append([model.get_submodule(t) for t in called if t.startswith(path + ".")])
    # which unit each module and parameter lies in; a module or parameter in two units, or
    # a parameter also held by a module outside its unit, disqualifies the units involved
    inside: dict[int, set[int]] = {}
    for index, unit in enumerate(units):
        for member in unit:
            for module in member.modules():
                inside.setdefault(id(module), set()).add(index)
    shared: set[int] = {i for owners in inside.values() if len(owners) > 1 for i in owners}
    holders: dict[int, set[int]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            holders.setdefault(id(param), set()).add(id(module))
    for index, unit in enumerate(units):
        held = {id(m) for member in unit for m in member.modules()}
        for member in unit:
            if any(holders[id(p)] - held for p in member.parameters()):
                shared.add(index)
    return [unit for index, unit in enumerate(units) if index not in shared
            and any(next(m.parameters(), None) is not None for m in unit)]


def shard(batch: Any, rank: int, world: int) -> Any:
    """Rank ``rank``'s contiguous slice (dim 0) of every tensor in a global batch.

    Tensors may be nested in tuples, lists and dicts. The batch size must be a multiple of
    ``world``: DDP averages gradients with equal weight per rank, which equals the global-batch
    gradient only when the slices are equal.
    """
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0 or batch.shape[0] % world:
            raise ValueError(f"global batch of shape {tuple(batch.shape)} cannot be split "
                             f"evenly across {world} ranks; use a multiple of {world}")
        size = batch.shape[0] // world
        return batch[rank * size:(rank + 1) * size]
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard(b, rank, world) for b in batch)
    if isinstance(batch, dict):
        return {k: shard(v, rank, world) for k, v in batch.items()}
    return batch


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def _call(model: nn.Module, inputs: Any) -> Any:
    """``model(x)``, ``model(*x)`` for a tuple or list, ``model(**x)`` for a dict."""
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


def _count(targets: Any) -> int:
    """Targets in a global batch: tokens for a language model, samples for a classifier."""
    if isinstance(targets, torch.Tensor):
        return targets.numel()
    if isinstance(targets, (tuple, list)):
        return sum(_count(t) for t in targets)
    if isinstance(targets, dict):
        return sum(_count(t) for t in targets.values())
    return 0


def _seed(*parts: int) -> None:
    value = 0
    for part in parts:
        value = (value * 1_000_003 + part + 1) % (2**63)
    torch.manual_seed(value)


# -- distributed ---------------------------------------------------------------------------

def _device(config: TrainConfig) -> torch.device:
    if config.device != "auto":
        return torch.device(config.device)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} "
                               "CUDA devices; start fewer processes per node")
        return torch.device("cuda", local)
    return torch.device("cpu")


def _init_distributed(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world size, whether this call created the process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, False
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before nccl starts, so it binds the right GPU
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return dist.get_rank(), dist.get_world_size(), True


def _fully_shard(model: nn.Module, device: torch.device) -> None:
    """FSDP2 on ``model`` in place: each unit of :func:`fsdp_blocks`, then the root.

    A model that already holds an ``FSDPModule`` (the caller chose the units, a
    mixed-precision policy, ...) is taken as it is, its root sharded if it is not yet.
    ``fully_shard`` moves each unit's tensors to the mesh's device as it shards them, so
    the whole model is never on the device unsharded.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor

    if device.type == "cuda":
        torch.cuda.set_device(device)  # FSDP's CUDA mesh uses the current device
    sharded = [p for p in model.parameters() if isinstance(p, DTensor)]
    if sharded:  # the caller's units: the root joins their mesh
        mesh = sharded[0].device_mesh
    else:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for unit in fsdp_blocks(model):
            fully_shard(unit if len(unit) > 1 else unit[0], mesh=mesh)
    if not isinstance(model, FSDPModule):
        fully_shard(model, mesh=mesh)


# -- checkpoints ---------------------------------------------------------------------------

def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The complete ``checkpoint-STEP`` folder with the highest step in ``out_dir``, if any."""
    found = []
    for path in Path(out_dir).glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if step.isdigit() and (path / "trainer_state.json").is_file():
            found.append((int(step), path))
    return max(found)[1] if found else None


def _save_checkpoint(out: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                     schedule: LambdaLR, config: TrainConfig) -> Path:
    """Write ``checkpoint-STEP/`` atomically: staged in a temporary folder, then renamed.

    ``model.safetensors`` holds the model's state_dict (loadable by
    ``lemon_fx.cli.targets.load_checkpoint`` and ``lemon-fx --checkpoint``). The optimizer's
    tensors (Adam's moments and step counts) go to ``optimizer.safetensors`` as
    ``state.PARAM_INDEX.NAME``; its hyperparameters, the schedule and the step go to
    ``trainer_state.json``. Nothing is pickled, so loading a checkpoint cannot run code
    (``torch.load`` of a pickle can), and ``trainer_state.json`` written last marks the
    checkpoint complete.
    """
    from safetensors.torch import save_file

    final = out / f"checkpoint-{step}"
    staging = out / f".checkpoint-{step}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    # every key stored on its own (tied weights too), so load_state_dict(strict=True) works
    model_state = {k: v.detach().cpu().contiguous().clone()
                   for k, v in model.state_dict().items()}
    save_file(model_state, str(staging / "model.safetensors"), metadata={"step": str(step)})
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, state in opt["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars[f"{index}.{name}"] = value
    save_file(tensors, str(staging / "optimizer.safetensors"), metadata={"step": str(step)})
    trainer_state = {"step": step, "param_groups": opt["param_groups"],
                     "optimizer_scalars": scalars, "schedule": schedule.state_dict(),
                     "config": _jsonable(asdict(config))}
    (staging / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    return final


def _load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                     schedule: LambdaLR) -> int:
    from safetensors.torch import load_file

    if not (folder / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{folder} is not a complete checkpoint on this rank; under "
                                "DDP every rank must see out_dir (a shared folder)")
    if not (folder / "model.safetensors").is_file():
        raise ValueError(f"{folder} is a sharded checkpoint (parallel='fsdp'); resume it "
                         "with parallel='fsdp' under torchrun, or start a fresh out_dir")
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    trainer_state = json.loads((folder / "trainer_state.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, value in load_file(str(folder / "optimizer.safetensors")).items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in trainer_state["optimizer_scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in group.items()}
              for group in trainer_state["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    schedule.load_state_dict(trainer_state["schedule"])
    return int(trainer_state["step"])


def _save_sharded(out: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                  schedule: LambdaLR, config: TrainConfig, rank: int) -> Path:
    """Write a sharded ``checkpoint-STEP/`` with every rank (FSDP): staged, then renamed.

    ``dcp.save`` of ``{"model": ..., "optimizer": ...}`` from ``get_state_dict``: every rank
    writes its own slices (``__RANK_0.distcp``) and rank 0 the index (``.metadata``), all
    keyed by parameter name rather than position, so the checkpoint loads at another world
    size too. ``trainer_state.json`` (the step, the schedule, the config; written by rank 0
    once every rank's slices are on disk) marks it complete, as for the safetensors ones.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = out / f"checkpoint-{step}"
    staging = out / f".checkpoint-{step}.tmp"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()  # no rank writes into a folder rank 0 is still clearing
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=staging)
    # dcp.save returns on rank 0 after every rank's write and the metadata are done
    if rank == 0:
        trainer_state = {"step": step, "format": "torch.distributed.checkpoint",
                         "schedule": schedule.state_dict(),
                         "config": _jsonable(asdict(config))}
        (staging / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
    dist.barrier()  # the checkpoint is complete before any rank may look for it
    return final


def _load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                  schedule: LambdaLR) -> int:
    """Read a checkpoint of :func:`_save_sharded` into the sharded model and optimizer.

    ``get_state_dict`` gives the current (sharded) state as the template that says which
    slices this rank needs (for a fresh optimizer it first takes a step at rate 0 to create
    Adam's moments); ``dcp.load`` fills it in place and ``set_state_dict`` hands it back.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (folder / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{folder} is not a complete checkpoint on this rank; under "
                                "FSDP every rank must see out_dir (a shared folder)")
    if not (folder / ".metadata").is_file():
        raise ValueError(f"{folder} is a safetensors checkpoint (parallel='ddp' or one "
                         "process); parallel='fsdp' resumes from sharded checkpoints only: "
                         "resume it with parallel='ddp', or start a fresh out_dir")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    trainer_state = json.loads((folder / "trainer_state.json").read_text())
    schedule.load_state_dict(trainer_state["schedule"])
    return int(trainer_state["step"])


def _follow_schedule(optimizer: torch.optim.Optimizer, schedule: LambdaLR,
                     peaks: list[float]) -> None:
    """After a resume, set each group's rate from *this* call's schedule and peaks.

    The checkpoint's optimizer holds the rate its own schedule chose for the next step, and
    its schedule the old peaks; a run resumed with another schedule (more steps, a WSD
    stable phase extended, or a cooldown branched off it) would take its first step at the
    old rate. Recomputing ``peak * factor(step)`` is what ``LambdaLR.step`` computes, so an
    unchanged config resumes bit for bit as before.
    """
    schedule.base_lrs = list(peaks)
    rates = [peak * factor(schedule.last_epoch)
             for peak, factor in zip(peaks, schedule.lr_lambdas)]
    for group, peak, rate in zip(optimizer.param_groups, peaks, rates):
        group["initial_lr"], group["lr"] = peak, rate
    schedule._last_lr = rates  # what get_last_lr() reports


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# -- logs ----------------------------------------------------------------------------------

class _Log:
    """``log.csv`` appended and flushed per step; ``log.json`` rewritten at checkpoints.

    On resume the rows past the checkpoint's step (written before an interruption) are
    dropped, so the logs of a resumed run read like those of an uninterrupted one.
    """

    def __init__(self, out: Path, config: TrainConfig, keep_until: int):
        self.out, self.config = out, config
        self.rows: list[dict[str, Any]] = []
        csv_path = out / "log.csv"
        if keep_until > 0 and csv_path.is_file():
            with csv_path.open(newline="") as f:
                self.rows = [_parse_row(r) for r in csv.DictReader(f)
                             if int(r["step"]) <= keep_until]
        out.mkdir(parents=True, exist_ok=True)
        self.file = csv_path.open("w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=LOG_FIELDS)
        self.writer.writeheader()
        for row in self.rows:
            self.writer.writerow({k: "" if v is None else v for k, v in row.items()})
        self.file.flush()

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.writer.writerow({k: "" if v is None else v for k, v in row.items()})
        self.file.flush()

    def write_json(self) -> None:
        text = json.dumps({"config": _jsonable(asdict(self.config)), "steps": self.rows},
                          indent=1)
        tmp = self.out / "log.json.tmp"
        tmp.write_text(text + "\n")
        os.replace(tmp, self.out / "log.json")

    def close(self) -> None:
        self.write_json()
        self.file.close()


def _parse_row(row: dict[str, str]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for name in LOG_FIELDS:
        text = row.get(name, "")
        parsed[name] = None if text == "" else int(text) if name == "step" else float(text)
    return parsed


class _Progress:
    """``\\r``-rewritten status line: step, loss, rate, throughput, time left."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.width, self.shown = enabled, total, 0, 0.0

    def update(self, row: dict[str, Any], start_step: int) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.shown < 0.1 and row["step"] < self.total):
            return
        self.shown = now
        done = row["step"] - start_step
        eta = row["elapsed_s"] / max(done, 1) * (self.total - row["step"])
        text = (f"step {row['step']}/{self.total}  loss {row['train_loss']:.4f}  "
                f"lr {row['lr']:.2e}  {row['tokens_per_s']:,.0f} tok/s  "
                f"eta {int(eta) // 60}m{int(eta) % 60:02d}s")
        if row["eval_loss"] is not None:
            text += f"  eval {row['eval_loss']:.4f}"
        print("\r" + text.ljust(self.width), end="", file=sys.stderr, flush=True)
        self.width = len(text)

    def close(self) -> None:
        if self.enabled and self.width:
            print(file=sys.stderr, flush=True)


# -- the loop ------------------------------------------------------------------------------

def _batch_source(batches: Callable[[int], Batch] | Iterable[Batch],
                  start: int) -> Callable[[int], Batch | None]:
    """``step -> batch`` (``None`` when the data ran out); an iterable is advanced past the
    steps a resumed run already did, so it must yield the same sequence each time."""
    if callable(batches):
        return batches
    iterator: Iterator[Batch] = iter(batches)
    for _ in range(start):
        if next(iterator, None) is None:
            break
    return lambda step: next(iterator, None)


def train(model: nn.Module, batches: Callable[[int], Batch] | Iterable[Batch],
          loss_fn: Callable[[Any, Any], torch.Tensor], config: TrainConfig, *,
          eval_fn: Callable[[nn.Module], float] | None = None,
          resume: bool = True) -> TrainResult:
    """Train ``model`` in place for ``config.total_steps`` optimizer steps.

    ``batches`` is ``step -> (inputs, targets)`` (``step`` counts from 0) or an iterable of
    such pairs; the *global* batch, identical on every rank (see the module docstring).
    ``inputs`` is a tensor (``model(x)``), a tuple (``model(*x)``) or a dict
    (``model(**x)``). ``loss_fn(outputs, targets)`` must average over the batch.
    ``eval_fn(model)`` returns a float; it runs on every rank (so it may use collectives)
    with the unwrapped model (under FSDP the sharded one, whose forward is a collective) in
    ``eval()`` mode under ``no_grad``, and rank 0's value is logged. With ``resume`` and
    ``out_dir`` the run continues from the latest checkpoint there (``resume=False`` starts
    over and overwrites the logs, but leaves old checkpoints: use a fresh ``out_dir``). A
    non-finite loss raises ``FloatingPointError`` before the optimizer step, so the
    checkpoints stay clean.
    """
    started = time.perf_counter()
    device = _device(config)
    rank, world, owns_group = _init_distributed(device)
    try:
        result = _train(model, batches, loss_fn, config, eval_fn, resume, device, rank, world)
        if world > 1:
            dist.barrier()  # rank 0's last checkpoint is on disk before any rank returns
    finally:
        if owns_group:
            dist.destroy_process_group()
    result.seconds = time.perf_counter() - started
    return result


def _train(model, batches, loss_fn, config, eval_fn, resume, device, rank, world):
    fsdp = world > 1 and config.parallel == "fsdp"
    if fsdp:
        _fully_shard(model, device)  # before the optimizer, which must hold the slices
        model.train()
    else:
        model.to(device).train()
    optimizer = build_optimizer(model, config)
    schedule = build_schedule(optimizer, config)
    out = Path(config.out_dir) if config.out_dir is not None else None
    result = TrainResult()
    if out is not None and resume:
        found = latest_checkpoint(out) if rank == 0 else None
        if world > 1:  # every rank loads the checkpoint rank 0 chose
            box = [found]
            dist.broadcast_object_list(box, src=0)
            found = box[0]
        if found is not None:
            load = _load_sharded if fsdp else _load_checkpoint
            peaks = list(schedule.base_lrs)
            result.start_step = load(Path(found), model, optimizer, schedule)
            _follow_schedule(optimizer, schedule, peaks)
    result.end_step = result.start_step
    trained: nn.Module = model
    if world > 1 and not fsdp:
        trained = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint(step: int) -> None:
        """Every rank writes its slices under FSDP; otherwise rank 0 writes the model."""
        if fsdp:
            result.checkpoint = _save_sharded(out, step, model, optimizer, schedule, config,
                                              rank)
        elif rank == 0:
            result.checkpoint = _save_checkpoint(out, step, model, optimizer, schedule, config)

    log = _Log(out, config, result.start_step) if out is not None and rank == 0 else None
    show = config.progress if config.progress is not None else sys.stderr.isatty()
    progress = _Progress(rank == 0 and show, config.total_steps)
    next_batch = _batch_source(batches, result.start_step)
    targets_seen, loop_started = 0, time.perf_counter()
    try:
        for step in range(result.start_step, config.total_steps):
            _seed(config.seed, step)
            batch = next_batch(step)
            if batch is None:
                if rank == 0:
                    print(f"\nlemon_fx.train: data ran out after {step} steps",
                          file=sys.stderr)
                break
            inputs, targets = batch
            targets_seen += _count(targets)
            inputs = _to(shard(inputs, rank, world), device)
            targets = _to(shard(targets, rank, world), device)
            _seed(config.seed, step, rank)
            lr = optimizer.param_groups[0]["lr"]
            loss = loss_fn(_call(trained, inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP all-reduces the gradients here, FSDP reduce-scatters them
            global_loss = loss.detach().clone()
            if world > 1:
                dist.all_reduce(global_loss)
                global_loss /= world
            loss_value = float(global_loss)
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"training loss is {loss_value} at step {step + 1}")
            max_norm = config.grad_clip if config.grad_clip is not None else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor, already all-reduced
                grad_norm = grad_norm.full_tensor()
            grad_norm = float(grad_norm)
            optimizer.step()
            schedule.step()
            done = step + 1
            result.end_step = done
            result.losses.append(loss_value)
            eval_loss = None
            if eval_fn is not None and (done == config.total_steps or
                                        (config.eval_every and done % config.eval_every == 0)):
                eval_loss = _evaluate(model, eval_fn)
                result.evals.append((done, eval_loss))
            elapsed = time.perf_counter() - loop_started
            row = {"step": done, "lr": lr, "train_loss": loss_value, "eval_loss": eval_loss,
                   "grad_norm": grad_norm, "tokens_per_s": targets_seen / max(elapsed, 1e-9),
                   "elapsed_s": elapsed}
            progress.update(row, result.start_step)
            if log is not None:
                log.add(row)
            if out is not None and (done == config.total_steps or (
                    config.checkpoint_every and done % config.checkpoint_every == 0)):
                checkpoint(done)
                if log is not None:
                    log.write_json()
        if out is not None and result.start_step < result.end_step < config.total_steps:
            checkpoint(result.end_step)  # data ran out: keep what was done
    finally:
        progress.close()
        if log is not None:
            log.close()
    return result


def _evaluate(model: nn.Module, eval_fn: Callable[[nn.Module], float]) -> float:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return float(eval_fn(model))
    finally:
        model.train(was_training)

"""Fully sharded training (``TrainConfig(parallel="fsdp")``, FSDP2's ``fully_shard``).

``python -m torch.distributed.run`` starts 2 CPU processes (gloo) running this file as a
script, once for the whole module (a fixture): they train an eager model uninterrupted, and
a ``torch.fx`` copy of it (the form of a grown model, whose block containers are never
called) interrupted after a sharded checkpoint and resumed. Both must match one process
trained on the same global batches (float64, no dropout, so only the order of
floating-point additions differs), and the resumed run must repeat the uninterrupted one.
The final weights are read back from the sharded checkpoints in this process, which also
checks that those hold the whole model.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from test_training import _batches, _eval, _loss, _torchrun
from torch import nn
from torch.distributed.fsdp import FSDPModule

from lemon_fx.training.loop import TrainConfig, fsdp_blocks, latest_checkpoint, train

STEPS = 8
CLIP = 0.05  # small enough that clipping acts on most steps: the norm must span the shards


class _Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(self.norm(x)))


class _Net(nn.Module):
    """Three repeated blocks in a ModuleList between an input and an output layer; the
    output's 3 rows do not split evenly over 2 ranks (FSDP pads the last slice)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.blocks = nn.ModuleList(_Block(16) for _ in range(3))
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.out(x)


def _model(traced: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = _Net().double()
    return torch.fx.symbolic_trace(model) if traced else model




def _config(**kw) -> TrainConfig:
    kw = {"peak_lr": 1e-2, "total_steps": STEPS, "warmup_steps": 2, "floor": 0.1,
          "weight_decay": 0.1, "grad_clip": CLIP, "checkpoint_every": 3, "device": "cpu",
          "progress": False, "parallel": "fsdp", **kw}
    return TrainConfig(**kw)


class _Crash(Exception):
    pass


def _crash_at(at: int):
    def get(step: int):
        if step == at:
            raise _Crash
        return _batches(step)
    return get


def _units(model: nn.Module) -> list[str]:
    """The modules that fully_shard made FSDP modules (each unit's members, and the root)."""
    return [name for name, m in model.named_modules() if isinstance(m, FSDPModule)]


def _worker(out: Path) -> None:
    """One torchrun rank: the uninterrupted eager run, the interrupted and resumed fx run,
    and a sharded resume refused on a safetensors checkpoint."""
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    record: dict = {}
    # one group for the three runs (train() leaves a group it did not make): a second
    # init_process_group in the same torchrun process hangs in gloo's rendezvous
    torch.distributed.init_process_group("gloo")

    full = _model()
    result = train(full, _batches, _loss, _config(out_dir=out / "full"), eval_fn=_eval)
    record["full"] = {"losses": result.losses, "evals": result.evals,
                      "checkpoint": str(result.checkpoint), "units": _units(full),
                      # what this rank holds: a DTensor's local slice, not the whole tensor
                      "local": {n: (type(p).__name__, tuple(p.to_local().shape))
                                for n, p in full.named_parameters()}}

    with pytest.raises(_Crash):  # the 5th step fails after the step-3 checkpoint
        train(_model(traced=True), _crash_at(4), _loss, _config(out_dir=out / "run"))
    traced = _model(traced=True)
    resumed = train(traced, _batches, _loss, _config(out_dir=out / "run"), eval_fn=_eval)
    record["resumed"] = {"losses": resumed.losses, "evals": resumed.evals,
                         "start": resumed.start_step, "units": _units(traced)}

    try:  # a safetensors checkpoint (written by the test, one process) is refused
        train(_model(), _batches, _loss, _config(out_dir=out / "plain"))
    except ValueError as exc:
        record["refused"] = str(exc)
    torch.distributed.destroy_process_group()
    torch.save(record, out / f"rank{rank}.pt")


def _read_sharded(folder: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The full weights in a sharded checkpoint, read in this one process."""
    state = {k: torch.empty_like(v) for k, v in model.state_dict().items()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load({"model": state}, checkpoint_id=folder, no_dist=True)
    return state


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    single = _model()
    plain = train(single, _batches, _loss, _config(parallel="ddp", out_dir=out / "plain"),
                  eval_fn=_eval)
    _torchrun(str(Path(__file__).resolve()), str(out), timeout=170)
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    return out, single, plain, ranks


def test_two_sharded_cpu_processes_match_one_process_on_the_global_batch(runs):
    out, single, plain, ranks = runs
    full = [r["full"] for r in ranks]
    assert full[0]["losses"] == full[1]["losses"] and len(full[0]["losses"]) == STEPS
    # float64: two half-batch means averaged by the reduce-scatter vs one mean, and the norm
    # summed from slices; measured differences are ~1e-16, 1e-12 leaves room for Adam
    torch.testing.assert_close(torch.tensor(full[0]["losses"]), torch.tensor(plain.losses),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.tensor([e for _, e in full[0]["evals"]]),
                               torch.tensor([e for _, e in plain.evals]), rtol=0, atol=1e-12)
    weights = _read_sharded(out / "full" / "checkpoint-8", single)
    for name, value in single.state_dict().items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=1e-12, msg=name)

    # really sharded, block by block: each rank holds a dim-0 slice, the odd 3 rows 2 + 1
    assert full[0]["units"] == ["", "blocks.0", "blocks.1", "blocks.2"]
    for rank, record in enumerate(full):
        local = record["local"]
        assert all(kind == "DTensor" for kind, _ in local.values())
        assert local["blocks.0.fc.weight"][1] == (8, 16)
        assert local["inp.weight"][1] == (8, 6)
        assert local["out.weight"][1] == ((2, 16), (1, 16))[rank]
    # every rank wrote its slices; clipping acted on most steps
    folder = out / "full" / "checkpoint-8"
    assert latest_checkpoint(out / "full") == folder
    assert {p.name for p in folder.iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp",
                                                  "trainer_state.json"}
    assert all(Path(r["checkpoint"]) == folder for r in full)
    steps = json.loads((out / "full" / "log.json").read_text())["steps"]
    assert sum(r["grad_norm"] > CLIP for r in steps) >= STEPS // 2
    plain_steps = json.loads((out / "plain" / "log.json").read_text())["steps"]
    torch.testing.assert_close([r["grad_norm"] for r in steps],
                               [r["grad_norm"] for r in plain_steps], rtol=1e-10, atol=0)


def test_a_resumed_sharded_run_repeats_the_uninterrupted_one(runs):
    """The fx copy crashed in its 5th step (step 4 logged, the last checkpoint at step 3),
    then resumed with fresh weights: it must end where the uninterrupted eager run ended."""
    out, single, _, ranks = runs
    # the fx copy's units are each block's leaves, grouped
    assert ranks[0]["resumed"]["units"] == [""] + [f"blocks.{i}.{leaf}" for i in range(3)
                                                   for leaf in ("norm", "fc")]
    for record in ranks:
        assert record["resumed"]["start"] == 3
        assert record["resumed"]["losses"] == record["full"]["losses"][3:]
        assert record["resumed"]["evals"] == record["full"]["evals"]
    run, full = out / "run" / "checkpoint-8", out / "full" / "checkpoint-8"
    for name, value in _read_sharded(run, single).items():
        assert torch.equal(value, _read_sharded(full, single)[name]), name
    steps = json.loads((out / "run" / "log.json").read_text())["steps"]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))  # step 4 not twice
    assert [r["train_loss"] for r in steps] == ranks[0]["full"]["losses"]


def test_a_checkpoint_is_resumed_only_by_the_parallelism_that_wrote_it(runs):
    out, _, _, ranks = runs
    assert all("safetensors checkpoint" in r["refused"] for r in ranks)
    with pytest.raises(ValueError, match="sharded checkpoint"):
        train(_model(), _batches, _loss, _config(parallel="ddp", out_dir=out / "full"))


def test_the_demo_grows_then_trains_sharded_with_wsd_and_resumes(tmp_path):
    """tools/train.py under torchrun: TinyGPT grown to twice its width (a GraphModule, with
    tied-free embeddings, a position table on the root, attention), sharded, resumed."""
    out = tmp_path / "demo"
    args = [str(Path(__file__).resolve().parent.parent / "tools" / "train.py"), "--demo",
            "--width", "2", "--parallel", "fsdp", "--schedule", "wsd", "--warmup", "0",
            "--cooldown", "1", "--batch", "4", "--context", "16", "--eval-every", "2",
            "--eval-batches", "1", "--checkpoint-every", "2", "--out", str(out)]
    first = _torchrun(*args, "--steps", "2")
    assert "steps 0->2" in first.stdout
    assert (out / "checkpoint-2" / ".metadata").is_file()
    assert not (out / "checkpoint-2" / "model.safetensors").exists()
    second = _torchrun(*args, "--steps", "3")
    assert "steps 2->3" in second.stdout
    log = json.loads((out / "log.json").read_text())
    assert [r["step"] for r in log["steps"]] == [1, 2, 3]
    assert (log["config"]["parallel"], log["config"]["schedule"]) == ("fsdp", "wsd")
    assert [r["lr"] for r in log["steps"]] == [2e-3] * 3  # no warmup; the cooldown's first
    # step is still at the peak
    assert log["steps"][-1]["eval_loss"] < log["steps"][0]["train_loss"] + 1.0


# -- which units are sharded (one process) ----------------------------------------------------

def test_the_blocks_of_the_largest_stack_are_the_units():
    model = _model()
    assert fsdp_blocks(model) == [[b] for b in model.blocks]
    # in the fx copy the containers are never called: each unit is its block's leaves
    traced = _model(traced=True)
    assert [type(b).__name__ for b in traced.blocks.children()] == ["Module"] * 3
    assert fsdp_blocks(traced) == [[traced.get_submodule(f"blocks.{i}.norm"),
                                    traced.get_submodule(f"blocks.{i}.fc")] for i in range(3)]
    # a grown (fx) model inside an eager wrapper: the graph is found above the stack
    wrapper = nn.Sequential(traced)
    assert fsdp_blocks(wrapper) == fsdp_blocks(traced)
    # a pipeline of different layers is no stack, though it holds the most parameters
    seq = nn.Sequential(nn.Linear(2, 2), nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)]))
    assert fsdp_blocks(seq) == [[seq[1][0]], [seq[1][1]]]
    # of two stacks the larger wins: the blocks, not the small stack inside each block
    inner = [nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)) for _ in range(3)]
    nested = nn.ModuleList(nn.ModuleDict({"small": s, "fc": nn.Linear(8, 8)}) for s in inner)
    assert fsdp_blocks(nested) == [[b] for b in nested]
    # a stack of one is no stack; blocks without parameters are no units
    assert fsdp_blocks(nn.Sequential(nn.Linear(2, 2))) == []
    assert fsdp_blocks(nn.ModuleList([nn.Tanh(), nn.Tanh()])) == []


def test_blocks_that_share_weights_are_left_to_the_root():
    model = _model()
    model.blocks[2].fc.weight = model.blocks[1].fc.weight  # tied across two blocks
    assert fsdp_blocks(model) == [[model.blocks[0]]]
    shared = _model()
    shared.blocks[1] = shared.blocks[0]  # one module at two places
    assert fsdp_blocks(shared) == [[shared.blocks[2]]]


def test_an_unknown_parallelism_is_refused():
    with pytest.raises(ValueError, match="parallel is 'ddp' or 'fsdp'"):
        _config(parallel="zero")


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))

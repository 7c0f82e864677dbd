"""AdamW's state carried through a growth (lemon_fx/training/optimizer_state.py).

The definition: with equal splits, one AdamW step of the grown model, from the grown state,
is the source's step in function space (float64, outputs on fresh inputs equal to 1e-10),
and a fresh AdamW's is not. With LEMON's noisy splits the map holds entry by entry. Tied
embeddings and clipping by the global norm keep the equality; new blocks start fresh with
their own step counter.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lemon_fx
from lemon_fx import Plan
from lemon_fx.api import plan_in_detail
from lemon_fx.axes.expansion import LeafGrowth, embed, source_size, split_equal
from lemon_fx.cli.demo import TinyGPT
from lemon_fx.errors import PlanError
from lemon_fx.recipe.recipe import GrowthRecipe, Step, TensorRecipe
from lemon_fx.recipe.transforms import register_transform
from lemon_fx.training.optimizer_state import GrowthAwareAdamW, grow_optimizer_state
from lemon_fx.training.provenance import axis_provenance, provenance

LR, DECAY = 1e-2, 0.1


class MLP(nn.Module):
    """tanh MLP 6 -> 8 -> 8 -> 3: fc1 rows copied, fc2 both, fc3 columns split."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def mlp_inputs(seed: int) -> torch.Tensor:
    return torch.randn(16, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def mlp_loss(model: nn.Module, seed: int) -> torch.Tensor:
    x = mlp_inputs(seed)
    return ((model(x) - torch.sin(x[:, :3])) ** 2).mean()


def gpt(tied: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = TinyGPT(vocab=16, dim=8, depth=2, num_heads=2, mlp_ratio=2, max_len=8).double()
    if tied:
        model.head.weight = model.wte.weight
    return model


def gpt_inputs(seed: int) -> torch.Tensor:
    return torch.randint(0, 16, (4, 8), generator=torch.Generator().manual_seed(seed))


def gpt_loss(model: nn.Module, seed: int) -> torch.Tensor:
    return F.cross_entropy(model(gpt_inputs(seed)).reshape(-1, 16),
                           gpt_inputs(seed + 1).reshape(-1))


MODELS = {"mlp": (lambda: (torch.manual_seed(0), MLP().double())[1], mlp_inputs, mlp_loss),
          "tinygpt": (gpt, gpt_inputs, gpt_loss),
          "tied": (lambda: gpt(tied=True), gpt_inputs, gpt_loss)}


def trained(kind: str, steps: int = 5, optimizer=None):
    """A source model trained ``steps`` AdamW steps, and its optimizer."""
    make, _, loss = MODELS[kind]
    model = make()
    opt = (optimizer or (lambda m: torch.optim.AdamW(m.parameters(), lr=LR,
                                                     weight_decay=DECAY)))(model)
    for t in range(steps):
        opt.zero_grad()
        loss(model, t).backward()
        opt.step()
    return model, opt


def grown(kind: str, model: nn.Module, plan: Plan):
    gm = lemon_fx.trace(model, (MODELS[kind][1](0),))
    return plan_in_detail(gm, plan), lemon_fx.grow(gm, plan)


def step(kind: str, model: nn.Module, opt: torch.optim.Optimizer, clip=None) -> None:
    opt.zero_grad()
    MODELS[kind][2](model, 99).backward()
    if clip is not None:
        clip(model, opt)
    opt.step()


def distance(kind: str, a: nn.Module, b: nn.Module) -> float:
    """max |a(x) - b(x)| on inputs used neither for training nor for tracing."""
    x = MODELS[kind][1](1234)
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())


def continued(kind: str, plan: Plan, clip=None, **grow_kwargs):
    """(source after one more step, grown after one step from the grown state, grown
    after one step of a fresh AdamW, the planned growth, the grown state)."""
    model, opt = trained(kind)
    planned, big = grown(kind, model, plan)
    state = grow_optimizer_state(planned, model, opt, big, **grow_kwargs)
    fresh = copy.deepcopy(big)
    big_opt = GrowthAwareAdamW(big.parameters(), lr=LR, weight_decay=DECAY)
    big_opt.load_state_dict(state)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=LR, weight_decay=DECAY)
    step(kind, model, opt, clip and clip[0])
    step(kind, big, big_opt, clip and clip[1])
    step(kind, fresh, fresh_opt)
    return model, big, fresh, planned, state


# -- the optimizer itself --------------------------------------------------------------------
def test_growth_aware_adamw_without_scales_is_adamw_bit_for_bit():
    a, b = MODELS["mlp"][0](), MODELS["mlp"][0]()
    opt_a = torch.optim.AdamW(a.parameters(), lr=LR, weight_decay=DECAY, foreach=False)
    opt_b = GrowthAwareAdamW(b.parameters(), lr=LR, weight_decay=DECAY)
    for t in range(4):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            mlp_loss(model, t).backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
        assert torch.equal(opt_a.state[pa]["exp_avg_sq"], opt_b.state[pb]["exp_avg_sq"])
    # each loads the other's checkpoint
    opt_a.load_state_dict(opt_b.state_dict())
    opt_b.load_state_dict(opt_a.state_dict())


# -- (a) equal splits: the grown step is the source's -------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "tinygpt"])
def test_equal_split_growth_takes_the_sources_step(kind):
    model, big, fresh, _, _ = continued(kind, Plan(width=2.0, method="net2net"))
    assert distance(kind, model, big) < 1e-10
    # the test can fail: a fresh AdamW's first step is a different function
    assert distance(kind, model, fresh) > 1e-3


def test_growing_twice_composes_the_scales():
    """2x, then 2x again from the grown GrowthAwareAdamW: still the first source's step."""
    model, opt = trained("mlp")
    plan = Plan(width=2.0, method="net2net")
    planned, middle = grown("mlp", model, plan)
    middle_opt = GrowthAwareAdamW(middle.parameters(), lr=LR, weight_decay=DECAY)
    middle_opt.load_state_dict(grow_optimizer_state(planned, model, opt, middle))
    planned, big = grown("mlp", middle, plan)
    big_opt = GrowthAwareAdamW(big.parameters(), lr=LR, weight_decay=DECAY)
    big_opt.load_state_dict(grow_optimizer_state(planned, middle, middle_opt, big))
    assert bool((big_opt.state[big.fc3.weight]["lr_scale"] == 0.25).all())  # 1/2 * 1/2
    step("mlp", model, opt)
    step("mlp", big, big_opt)
    assert distance("mlp", model, big) < 1e-10


def test_the_rate_scales_are_what_makes_it_exact():
    """The mapped moments alone, in a stock AdamW (rate scales dropped), miss the
    source's step: lr / k_in on the split columns is needed (TRAINING.md 1.5)."""
    model, opt = trained("mlp")
    planned, big = grown("mlp", model, Plan(width=2.0, method="net2net"))
    state = grow_optimizer_state(planned, model, opt, big, target="adamw", allow_inexact=True)
    assert not any("lr_scale" in s or "eps_scale" in s for s in state["state"].values())
    stock = torch.optim.AdamW(big.parameters(), lr=LR, weight_decay=DECAY)
    stock.load_state_dict(state)
    step("mlp", model, opt)
    step("mlp", big, stock)
    assert distance("mlp", model, big) > 1e-4


def test_adamw_target_refuses_a_map_that_needs_rate_scales():
    model, opt = trained("mlp")
    planned, big = grown("mlp", model, Plan(width=2.0, method="net2net"))
    with pytest.raises(PlanError) as err:
        grow_optimizer_state(planned, model, opt, big, target="adamw")
    text = str(err.value)
    assert "fc2.weight" in text and "fc3.weight" in text and "fc1.weight" not in text
    assert "GrowthAwareAdamW" in text and "allow_inexact" in text


# -- (b) LEMON's noisy splits: the map entry by entry ----------------------------------------
def test_lemon_split_maps_moments_entry_by_entry():
    """Hidden 8 -> 12 (circ: units 0-3 have two copies, 4-7 one): rows of a unit with m
    copies get m/m_j, v/m_j^2; split columns copy m, v and take the rate 1/m_j."""
    model, opt = trained("mlp")
    planned, big = grown("mlp", model, Plan(width=1.5, seed=3))
    state = grow_optimizer_state(planned, model, opt, big)
    src = {n: opt.state[p] for n, p in model.named_parameters()}
    got = {n: state["state"][i] for i, (n, _) in enumerate(big.named_parameters())}
    j = torch.arange(12) % 8
    copies = torch.where(j < 4, 2.0, 1.0).double()
    m, v = src["fc1.weight"]["exp_avg"], src["fc1.weight"]["exp_avg_sq"]
    assert torch.allclose(got["fc1.weight"]["exp_avg"], m[j] / copies[:, None], rtol=1e-14)
    assert torch.allclose(got["fc1.weight"]["exp_avg_sq"], v[j] / copies[:, None] ** 2,
                          rtol=1e-14)
    m, v = src["fc2.weight"]["exp_avg"], src["fc2.weight"]["exp_avg_sq"]
    assert torch.allclose(got["fc2.weight"]["exp_avg"], m[j][:, j] / copies[:, None],
                          rtol=1e-14)
    assert torch.allclose(got["fc2.weight"]["exp_avg_sq"], v[j][:, j] / copies[:, None] ** 2,
                          rtol=1e-14)
    assert torch.allclose(got["fc2.weight"]["lr_scale"].expand(12, 12),
                          (1 / copies)[None, :].expand(12, 12))
    m, v = src["fc3.weight"]["exp_avg"], src["fc3.weight"]["exp_avg_sq"]
    assert torch.equal(got["fc3.weight"]["exp_avg"], m[:, j])
    assert torch.equal(got["fc3.weight"]["exp_avg_sq"], v[:, j])
    assert "eps_scale" not in got["fc3.weight"]  # a split column's share is 1
    assert torch.equal(got["fc3.bias"]["exp_avg"], src["fc3.bias"]["exp_avg"])
    assert all(torch.equal(s["step"], src["fc1.weight"]["step"])
               for s in got.values())
    # the test can fail: the plain copy (no share) is not the map
    assert not torch.allclose(got["fc1.weight"]["exp_avg"], src["fc1.weight"]["exp_avg"][j])


def test_lemon_split_step_stays_close_to_the_sources():
    """With noise the copies' gradients differ by the symmetry-breaking term, so the first
    step is close, not equal; a fresh AdamW is far off."""
    model, big, fresh, _, _ = continued("mlp", Plan(width=2.0, noise_scale=0.1))
    start, _ = trained("mlp")
    moved = distance("mlp", model, start)
    assert distance("mlp", model, big) < 0.01 * moved  # measured: 0.003
    assert distance("mlp", model, fresh) > 0.5 * moved  # measured: 1.2


def test_extras_are_seeded_never_zeroed_under_a_running_step():
    """At 1.5x the residual's avg extras and the norms' zero extras continue no source
    entry: m = 0, v their neighbour's (TRAINING.md 1.6), the step the source's."""
    model, opt = trained("tinygpt")
    planned, big = grown("tinygpt", model, Plan(width=1.5))
    state = grow_optimizer_state(planned, model, opt, big)
    table = provenance(planned)
    source_step = opt.state[model.wte.weight]["step"]
    extras_seen = 0
    for i, (name, _) in enumerate(big.named_parameters()):
        s = state["state"][i]
        assert torch.equal(s["step"], source_step)
        assert bool((s["exp_avg_sq"] > 0).all()), name
        extra = table[name].extra().expand(s["exp_avg"].shape)
        extras_seen += int(extra.sum())
        assert bool((s["exp_avg"][extra] == 0).all())
    assert extras_seen > 0
    # wte's extra column 8 + i seeds v from its neighbour, column i (a share of 1)
    v = state["state"][[n for n, _ in big.named_parameters()].index("wte.weight")]
    assert torch.equal(v["exp_avg_sq"][:, 8:], opt.state[model.wte.weight]["exp_avg_sq"][:, :4])


# -- (c) tied weights and clipping ------------------------------------------------------------
def test_tied_embedding_and_head_take_the_sources_step():
    model, big, fresh, planned, _ = continued("tied", Plan(width=2.0, method="net2net"))
    assert planned.recipe.aliases == {"head.weight": "wte.weight"}
    assert big.head.weight is big.wte.weight
    assert distance("tied", model, big) < 1e-10
    assert distance("tied", model, fresh) > 1e-3


def test_clipping_by_the_sources_norm_keeps_the_step():
    norms: dict[str, float] = {}

    def clip_source(model, opt):
        norms["source"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05))

    def clip_grown(model, opt):
        norms["grown"] = float(opt.clip_grad_norm_(0.05))

    def clip_grown_plainly(model, opt):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)

    plan = Plan(width=2.0, method="net2net")
    model, big, _, _, _ = continued("mlp", plan, clip=(clip_source, clip_grown))
    assert norms["source"] > 0.05  # the clip is active
    assert abs(norms["grown"] - norms["source"]) < 1e-12 * norms["source"]
    assert distance("mlp", model, big) < 1e-10
    # the test can fail: torch's clip of the grown model measures another norm
    model, big, _, _, _ = continued("mlp", plan, clip=(clip_source, clip_grown_plainly))
    assert distance("mlp", model, big) > 1e-6


# -- (d) new blocks ---------------------------------------------------------------------------
def test_new_blocks_start_fresh_with_their_own_step_counter():
    model, opt = trained("tinygpt")
    planned, big = grown("tinygpt", model, Plan(depth=2.0))
    state = grow_optimizer_state(planned, model, opt, big)
    # a bare recipe finds the same new blocks through their cancel steps
    assert grow_optimizer_state(planned.recipe, model, opt, big)["state"].keys() == \
        state["state"].keys()
    names = [n for n, _ in big.named_parameters()]
    new = {i for i, n in enumerate(names) if n.startswith(("blocks.1.", "blocks.3."))}
    assert new and not new & set(state["state"])
    big_opt = GrowthAwareAdamW(big.parameters(), lr=LR, weight_decay=DECAY)
    big_opt.load_state_dict(state)
    step("tinygpt", model, opt)
    step("tinygpt", big, big_opt)
    params = dict(big.named_parameters())
    for i, name in enumerate(names):
        want = 1.0 if i in new else 6.0
        assert float(big_opt.state[params[name]]["step"]) == want, name
    # the cancelling new blocks leave the old blocks' gradients as they were: their step
    # is the source's (blocks.0 -> blocks.0, blocks.1 -> blocks.2)
    source = dict(model.named_parameters())
    for grown_name, source_name in (("blocks.2.fc.weight", "blocks.1.fc.weight"),
                                    ("blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.weight"),
                                    ("head.weight", "head.weight")):
        assert torch.allclose(params[grown_name], source[source_name], atol=1e-13, rtol=0)


# -- naming the optimizer's entries --------------------------------------------------------
def decay_on_matrices(model):
    """build_optimizer's groups: weight decay on dim >= 2 only."""
    params = list(model.parameters())
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": DECAY},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def test_groups_mirror_the_sources_groups():
    model, opt = trained("mlp", optimizer=lambda m: torch.optim.AdamW(
        decay_on_matrices(m), lr=LR))
    planned, big = grown("mlp", model, Plan(width=2.0, method="net2net"))
    state = grow_optimizer_state(planned, model, opt, big)
    assert [g["weight_decay"] for g in state["param_groups"]] == [DECAY, 0.0]
    big_opt = GrowthAwareAdamW(decay_on_matrices(big), lr=LR)
    big_opt.load_state_dict(state)
    step("mlp", model, opt)
    step("mlp", big, big_opt)
    assert distance("mlp", model, big) < 1e-10
    # a state dict alone cannot say which of two groups' entries is which parameter
    with pytest.raises(PlanError, match="param_names"):
        grow_optimizer_state(planned, model, opt.state_dict(), big)
    # with the names in the optimizer's order it can
    names = [n for g in decay_on_matrices(model) for p in g["params"]
             for n, q in model.named_parameters() if q is p]
    by_names = grow_optimizer_state(planned, names, opt.state_dict(), big)
    assert torch.equal(by_names["state"][0]["exp_avg"],
                       grow_optimizer_state(planned, model, opt, big)["state"][0]["exp_avg"])


def test_a_state_dict_over_model_parameters_and_named_optimizers():
    model, opt = trained("mlp")
    planned, big = grown("mlp", model, Plan(width=2.0, method="net2net"))
    want = grow_optimizer_state(planned, model, opt, big)
    got = grow_optimizer_state(planned, model, opt.state_dict(), big)
    assert all(torch.equal(want["state"][i]["exp_avg"], got["state"][i]["exp_avg"])
               for i in want["state"])
    named = torch.optim.AdamW(list(model.named_parameters()), lr=LR)
    named.load_state_dict(opt.state_dict() | {"param_groups": named.state_dict()[
        "param_groups"]})
    out = grow_optimizer_state(planned, model, named.state_dict(), big)
    assert out["param_groups"][0]["param_names"] == [n for n, _ in big.named_parameters()]


def test_mistakes_are_plan_errors():
    model, opt = trained("mlp")
    planned, big = grown("mlp", model, Plan(width=2.0, method="net2net"))
    other = lemon_fx.grow(lemon_fx.trace(model, (mlp_inputs(0),)), Plan(width=3.0))
    with pytest.raises(PlanError, match="does not match the growth"):
        grow_optimizer_state(planned, model, opt, other)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mlp_loss(model, 0).backward()
    sgd.step()
    with pytest.raises(PlanError, match="not Adam's"):
        grow_optimizer_state(planned, model, sgd, big)
    with pytest.raises(PlanError, match="does not belong to the source model"):
        grow_optimizer_state(planned, MLP().double(), opt, big)
    with pytest.raises(PlanError, match="unknown optimizer target"):
        grow_optimizer_state(planned, model, opt, big, target="sgd")


# -- the provenance under the map ---------------------------------------------------------
@pytest.mark.parametrize("layout", [
    LeafGrowth(4, 6), LeafGrowth(4, 6, "avg"), LeafGrowth(4, 6, "zero"), LeafGrowth(3, 9),
    ("prod", [LeafGrowth(2, 3), LeafGrowth(4, 4)]),
    ("sum", [LeafGrowth(2, 3, "zero"), LeafGrowth(3, 6)]),
])
def test_axis_provenance_is_the_expansion(layout):
    t = torch.randn(source_size(layout), 5, dtype=torch.float64)
    for split, made in ((False, embed(t, 0, layout)), (True, split_equal(t, 0, layout))):
        a = axis_provenance(layout, split)
        keep = ~a.extra
        assert torch.allclose(made[keep], t[a.index[keep]] * a.scale[keep, None], rtol=1e-15)
        if split:
            assert bool((made[a.extra] == 0).all())


register_transform("test_optimizer_state.double", lambda s, g, layouts: 2 * g)
register_transform("test_optimizer_state.mix", lambda s, g, layouts: g + g.flip(0))


def test_transforms_are_probed_rescales_or_fresh():
    grow = Step("embed", axis=0, layout=LeafGrowth(4, 8))
    recipe = GrowthRecipe({
        name: TensorRecipe("w", (8,), torch.float64,
                           (grow, Step("transform", name=f"test_optimizer_state.{name}",
                                       layouts=(LeafGrowth(4, 8),))))
        for name in ("double", "mix")})
    table = provenance(recipe)
    assert table["double"].kind == "mapped"
    assert torch.equal(table["double"].coefficient(), torch.tensor([2.0], dtype=torch.float64))
    assert torch.equal(table["double"].share(), torch.tensor([0.25], dtype=torch.float64))
    assert table["mix"].kind == "fresh" and "not an entrywise rescale" in table["mix"].reason

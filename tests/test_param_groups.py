"""Inherited capacity against new (lemon_fx/training/param_groups.py): role-tagged groups
for asymmetric rates, per-entry rates for the new copies of width-grown tensors, the
copy-set modes, and LLaMA-Pro's train-only-new mode (inherited entries unchanged bit for
bit, new ones moved)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_optimizer_state import (
    DECAY,
    LR,
    MODELS,
    decay_on_matrices,
    distance,
    grown,
    step,
    trained,
)

from lemon_fx import Plan
from lemon_fx.errors import PlanError
from lemon_fx.training.optimizer_state import GrowthAwareAdamW, grow_optimizer_state
from lemon_fx.training.param_groups import growth_param_groups, train_only_new
from lemon_fx.training.provenance import provenance


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def steps(kind, model, opt, count=3):
    for _ in range(count):
        step(kind, model, opt)


def test_depth_growth_tags_new_blocks_and_schedules_roles_apart():
    model, _ = trained("tinygpt")
    planned, big = grown("tinygpt", model, Plan(depth=2.0))
    groups = growth_param_groups(planned, big, lr=1e-3, new_lr=3e-3, weight_decay=DECAY)
    assert groups.roles == ["inherited", "inherited", "new", "new"]
    assert not groups.entry_state  # whole tensors: a stock AdamW takes these groups
    names = {id(p): n for n, p in big.named_parameters()}
    for g in groups.groups:
        in_new = {names[id(p)].startswith(("blocks.1.", "blocks.3.")) for p in g["params"]}
        assert in_new == {g["role"] == "new"}
        assert all((p.dim() >= 2) == (g["weight_decay"] == DECAY) for p in g["params"])
    opt = torch.optim.AdamW(groups.groups)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, groups.lr_lambdas(inherited=lambda t: 1.0, new=lambda t: min(1.0, (t + 1) / 4)))
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3, 3e-3 / 4, 3e-3 / 4]
    opt.step()
    schedule.step()
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3, 3e-3 / 2, 3e-3 / 2]


def test_new_copies_take_the_new_rate_originals_keep_theirs():
    """Inherited rate 0, new rate > 0, decay on: after three steps every original entry of
    a width-grown tensor is unchanged bit for bit, every new copy has moved."""
    model, _ = trained("mlp")
    planned, big = grown("mlp", model, Plan(width=2.0))
    groups = growth_param_groups(planned, big, lr=0.0, new_lr=LR, weight_decay=DECAY)
    assert groups.roles == ["inherited", "inherited", "new", "new"]
    assert all(not g["params"] for g in groups.groups if g["role"] == "new")
    before = snapshot(big)
    steps("mlp", big, groups.optimizer())
    table = provenance(planned)
    for name, p in big.named_parameters():
        original = table[name].original().expand(p.shape)
        assert torch.equal(p[original], before[name][original]), name
        assert bool((p[~original] != before[name][~original]).all()), name
    # the test can fail: the same groups without the per-entry rates move nothing at all
    plain = copy.deepcopy(big)
    before = snapshot(plain)
    steps("mlp", plain, GrowthAwareAdamW(growth_param_groups(
        planned, plain, lr=0.0, new_lr=LR, weight_decay=DECAY, width="inherited").groups))
    assert all(torch.equal(p, before[n]) for n, p in plain.named_parameters())


def test_equal_rates_are_the_plain_step():
    model, _ = trained("mlp")
    planned, big = grown("mlp", model, Plan(width=1.5))
    plain = copy.deepcopy(big)
    for width in ("copies", "modes"):
        a, b = copy.deepcopy(big), copy.deepcopy(plain)
        steps("mlp", a, growth_param_groups(planned, a, lr=LR, weight_decay=DECAY,
                                            width=width).optimizer())
        steps("mlp", b, GrowthAwareAdamW(growth_param_groups(
            planned, b, lr=LR, weight_decay=DECAY, width="inherited").groups))
        for (n, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.allclose(p, q, rtol=0, atol=1e-15), (width, n)


def test_modes_move_the_copy_sets_mean_at_the_inherited_rate():
    """width="modes": each copy set's mean (the inherited function's direction) moves at
    the inherited rate, its differences (symmetry breaking) at the new rate."""
    model, _ = trained("mlp")
    planned, big = grown("mlp", model, Plan(width=2.0))
    weight = big.fc1.weight  # rows of unit j at j and j + 8
    mean = lambda w: (w[:8] + w[8:]) / 2  # noqa: E731
    difference = lambda w: w[:8] - w[8:]  # noqa: E731
    frozen_mean = copy.deepcopy(big)
    before = frozen_mean.fc1.weight.detach().clone()
    steps("mlp", frozen_mean, growth_param_groups(
        planned, frozen_mean, lr=0.0, new_lr=LR, width="modes").optimizer(), count=1)
    after = frozen_mean.fc1.weight.detach()
    assert torch.allclose(mean(after), mean(before), rtol=0, atol=1e-15)
    assert bool((difference(after) != difference(before)).all())
    frozen_difference = copy.deepcopy(big)
    steps("mlp", frozen_difference, growth_param_groups(
        planned, frozen_difference, lr=LR, new_lr=0.0, width="modes").optimizer(), count=1)
    after = frozen_difference.fc1.weight.detach()
    assert torch.allclose(difference(after), difference(before), rtol=0, atol=1e-15)
    assert bool((mean(after) != mean(before)).all())
    # the test can fail: by copies, the original rows stay and the difference moves
    by_copies = copy.deepcopy(big)
    steps("mlp", by_copies, growth_param_groups(
        planned, by_copies, lr=0.0, new_lr=LR, width="copies").optimizer(), count=1)
    assert not torch.allclose(mean(by_copies.fc1.weight.detach()), mean(before))
    assert weight is big.fc1.weight


def test_role_groups_take_the_grown_state():
    """``like=``: the grown state laid out on the role groups; with equal rates the grown
    step is still the source's, and the per-entry rates stay installed."""
    model, opt = trained("mlp", optimizer=lambda m: torch.optim.AdamW(decay_on_matrices(m),
                                                                      lr=LR))
    planned, big = grown("mlp", model, Plan(width=2.0, method="net2net"))
    groups = growth_param_groups(planned, big, lr=LR, weight_decay=DECAY)
    big_opt = groups.optimizer()
    big_opt.load_state_dict(grow_optimizer_state(planned, model, opt, big, like=big_opt))
    assert all("rate_group" in big_opt.state[p] and "lr_scale" in big_opt.state[p]
               for p in (big.fc2.weight, big.fc3.weight))
    step("mlp", model, opt)
    step("mlp", big, big_opt)
    assert distance("mlp", model, big) < 1e-10


def test_train_only_new_leaves_inherited_entries_bit_for_bit():
    model, _ = trained("tinygpt")
    # the MLPs' hidden width grows (by a non-multiple), the residual stream does not
    planned, big = grown("tinygpt", model, Plan(width={"@ffn": 1.5}, depth=2.0))
    only_new = train_only_new(planned, big)
    table = provenance(planned)
    before = snapshot(big)
    steps("tinygpt", big, torch.optim.AdamW(only_new.param_groups(DECAY), lr=LR))
    moved_new_blocks = 0
    for name, p in big.named_parameters():
        prov = table[name]
        if prov.new_block is not None:
            moved_new_blocks += not torch.equal(p, before[name])
            continue
        if not p.requires_grad:  # wholly inherited: frozen
            assert any(p is q for q in only_new.frozen), name
            assert torch.equal(p, before[name]), name
            continue
        original = prov.original().expand(p.shape)
        assert torch.equal(p[original], before[name][original]), name
        assert not torch.equal(p[~original], before[name][~original]), name
    assert moved_new_blocks > 0 and only_new.masks and only_new.frozen
    only_new.remove()
    assert all(p.requires_grad for p in big.parameters())


def test_decay_would_move_masked_entries():
    """Why width-grown tensors train without decay: AdamW decays entries whose gradient
    the mask zeroed."""
    model, _ = trained("mlp")
    planned, big = grown("mlp", model, Plan(width=2.0))
    only_new = train_only_new(planned, big)
    before = snapshot(big)
    decayed = [{"params": only_new.trainable, "weight_decay": DECAY}]
    steps("mlp", big, torch.optim.AdamW(decayed, lr=LR))
    original = provenance(planned)["fc2.weight"].original().expand(big.fc2.weight.shape)
    assert not torch.equal(big.fc2.weight[original], before["fc2.weight"][original])


def test_rate_zero_on_inherited_entries_decays_only_new_ones():
    """The GrowthAwareAdamW way to LLaMA-Pro: inherited rate 0 stops decay too, so new
    entries keep their decay."""
    model, _ = trained("mlp")
    planned, big = grown("mlp", model, Plan(width=2.0))
    only_new = train_only_new(planned, big)
    before = snapshot(big)
    opt = growth_param_groups(planned, big, lr=0.0, new_lr=LR, weight_decay=DECAY).optimizer()
    steps("mlp", big, opt)
    original = provenance(planned)["fc2.weight"].original().expand(big.fc2.weight.shape)
    assert torch.equal(big.fc2.weight[original], before["fc2.weight"][original])
    assert not torch.equal(big.fc2.weight[~original], before["fc2.weight"][~original])
    only_new.remove()


def test_mistakes_are_plan_errors():
    model, _ = trained("mlp")
    planned, big = grown("mlp", model, Plan(width=2.0))
    groups = growth_param_groups(planned, big, lr=LR)
    with pytest.raises(PlanError, match="GrowthAwareAdamW"):
        groups.install(torch.optim.AdamW(groups.groups))
    with pytest.raises(PlanError, match="unknown width roles"):
        growth_param_groups(planned, big, lr=LR, width="rows")
    with pytest.raises(PlanError, match="does not match the growth"):
        growth_param_groups(planned, MODELS["mlp"][0](), lr=LR)

"""Inherited capacity against new: parameter groups for asymmetric rates, and training only
what the growth added.

After growth the inherited function is annealed and fragile, while the new capacity is
untrained (TRAINING.md 5, items 1-2): SPARKLING keeps the old parameters on their rate and
re-warms only the new ones; LLaMA-Pro trains only the new blocks. In a grown tensor the two
are entries of one parameter, so this module works per entry
(``lemon_fx.training.provenance``):

- *new*: every tensor of a new block (depth), and, in a width-grown tensor, every entry
  that is not the first copy along all of its axes (a new copy of a unit, the unit's
  column parts in its consumers, the rows a new unit writes) or an avg/zero extra;
- *inherited*: the rest (the first copies: the units the source had, at their place).

``growth_param_groups`` builds AdamW groups tagged ``role`` (``"inherited"``/``"new"``),
weight decay on matrices (``dim >= 2``) only, as ``build_optimizer`` does; a scheduler
gives the roles their own warmups (``LambdaLR(opt, groups.lr_lambdas(old, new))``). New
copies inside an inherited tensor take the ``new`` group's rate through
``GrowthAwareAdamW``'s per-entry ``rate_group``; ``width="modes"`` instead gives each copy
set's *mean* update (the direction the inherited function moves along: the sum mode
``(a + b) / 2`` of a split pair) the inherited rate and the *differences* (``(a - b) / 2``,
the symmetry-breaking modes) the new rate.

``train_only_new`` is LLaMA-Pro's mode: inherited tensors frozen (``requires_grad``
False), inherited entries of width-grown tensors masked out of the gradient by a hook.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lemon_fx.errors import PlanError, Problem
from lemon_fx.training.optimizer_state import GrowthAwareAdamW
from lemon_fx.training.provenance import Growth, TensorProvenance, of_parameters

__all__ = ["GrowthParamGroups", "NewCapacityOnly", "Role", "WidthRoles", "entry_roles",
           "growth_param_groups", "train_only_new"]

Role = Literal["inherited", "new"]
WidthRoles = Literal["copies", "modes", "inherited"]
WIDTH_ROLES: tuple[WidthRoles, ...] = ("copies", "modes", "inherited")


def entry_roles(prov: TensorProvenance) -> Role | torch.Tensor:
    """A tensor's role: ``"new"`` (a new block's), ``"inherited"`` (every entry a first
    copy, or a tensor that is fresh for another reason: a fill in an inherited block), or,
    for a width-grown tensor, a bool mask broadcastable to it, True on new entries."""
    if prov.kind == "fresh":
        return "new" if prov.new_block is not None else "inherited"
    original = prov.original()
    if bool(original.all()):
        return "inherited"
    return ~original


def _trainable_roles(growth: Growth, grown: nn.Module):
    """``(parameter, provenance, role)`` for every grown parameter that trains."""
    params = dict(grown.named_parameters())
    for name, prov in of_parameters(growth, grown).items():
        if params[name].requires_grad:
            yield params[name], prov, entry_roles(prov)


@dataclass
class GrowthParamGroups:
    """Parameter groups of a grown model, tagged by role (see ``growth_param_groups``).

    ``groups``: dicts for an optimizer, each with ``params``, ``lr``, ``weight_decay`` and
    ``role``; a ``new`` group may hold no parameter of its own when it only lends its rate
    to new entries of inherited tensors. ``entry_state``: per parameter, the
    ``GrowthAwareAdamW`` state that gives such entries their group's rate (``rate_group``,
    and ``copy_group`` for ``width="modes"``). ``optimizer(**kwargs)`` builds the
    ``GrowthAwareAdamW`` with both; ``install(opt)`` adds ``entry_state`` to an optimizer
    built from ``groups``. With an empty ``entry_state`` (depth only, or
    ``width="inherited"``) the groups serve ``torch.optim.AdamW`` as well.
    """

    groups: list[dict[str, Any]]
    entry_state: dict[nn.Parameter, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def roles(self) -> list[Role]:
        return [g["role"] for g in self.groups]

    def lr_lambdas(self, inherited: Callable[[int], float], new: Callable[[int], float]
                   ) -> list[Callable[[int], float]]:
        """One rate factor per group, for ``torch.optim.lr_scheduler.LambdaLR``."""
        return [inherited if role == "inherited" else new for role in self.roles]

    def install(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        if self.entry_state and not isinstance(optimizer, GrowthAwareAdamW):
            raise PlanError("per-entry rates need GrowthAwareAdamW", [Problem(
                reason=f"{type(optimizer).__name__} ignores the rate_group of "
                       f"{len(self.entry_state)} width-grown tensors",
                fix="use groups.optimizer(...) (a GrowthAwareAdamW), or "
                    "growth_param_groups(..., width='inherited') for torch.optim.AdamW")])
        for p, entries in self.entry_state.items():
            optimizer.state[p].update({k: v.to(p.device) for k, v in entries.items()})
        return optimizer

    def optimizer(self, **kwargs: Any) -> GrowthAwareAdamW:
        """``GrowthAwareAdamW(groups, **kwargs)`` with the per-entry rates installed."""
        return self.install(GrowthAwareAdamW(self.groups, **kwargs))


def growth_param_groups(growth: Growth, grown: nn.Module, *, lr: float,
                        new_lr: float | None = None, weight_decay: float = 0.0,
                        width: WidthRoles = "copies") -> GrowthParamGroups:
    """AdamW groups that tell the inherited capacity of ``grown`` from the new.

    ``lr``: the inherited capacity's rate; ``new_lr`` (default ``lr``): the new
    capacity's; ``weight_decay`` applies to parameters with ``dim >= 2``. Groups, in this
    order, where not empty: inherited with decay, inherited without, new with decay, new
    without. ``width``: ``"copies"`` (SPARKLING: an original keeps the inherited rate, its
    new copies take the new rate), ``"modes"`` (the mean update of each copy set at the
    inherited rate, the differences at the new rate; extras at the new rate), or
    ``"inherited"`` (width-grown tensors wholly inherited: plain AdamW groups). Parameters
    with ``requires_grad`` False are left out. ``PlanError`` when ``grown`` is not the
    growth's model or ``width`` is unknown.
    """
    if width not in WIDTH_ROLES:
        raise PlanError("unknown width roles", [Problem(
            reason=f"width={width!r}", fix=f"use one of {WIDTH_ROLES}")])
    new_lr = lr if new_lr is None else new_lr
    members: dict[tuple[Role, bool], list[nn.Parameter]] = {
        (r, d): [] for r in ("inherited", "new") for d in (True, False)}
    mixed: list[tuple[nn.Parameter, TensorProvenance, torch.Tensor]] = []
    for p, prov, role in _trainable_roles(growth, grown):
        if isinstance(role, torch.Tensor):
            if width != "inherited":
                mixed.append((p, prov, role))
            role = "inherited"
        members[(role, p.dim() >= 2)].append(p)
    lends = {p.dim() >= 2 for p, _, _ in mixed}
    groups, index = [], {}
    for role, decays in members:
        if not members[(role, decays)] and not (role == "new" and decays in lends):
            continue
        index[(role, decays)] = len(groups)
        groups.append({"params": members[(role, decays)], "role": role,
                       "lr": lr if role == "inherited" else new_lr,
                       "weight_decay": weight_decay if decays else 0.0})
    entry_state: dict[nn.Parameter, dict[str, torch.Tensor]] = {}
    for p, prov, new in mixed:
        decays = p.dim() >= 2
        own, other = index[("inherited", decays)], index[("new", decays)]
        if width == "copies":
            entry_state[p] = {"rate_group": torch.where(new, other, own).to(torch.long)}
            continue
        member = (prov.copies() > 1) & ~prov.extra()
        ids = torch.where(member, prov.source_ids(), -1)
        lent = member | prov.extra()
        entry_state[p] = {"rate_group": torch.where(lent, other, own).to(torch.long),
                          "copy_group": ids.to(torch.long)}
    return GrowthParamGroups(groups, entry_state)


@dataclass
class NewCapacityOnly:
    """What ``train_only_new`` changed, and the groups to train with.

    ``frozen``: the parameters it set to ``requires_grad=False``; ``masks``: per
    width-grown parameter, its mask of new entries (the gradient hook multiplies by it);
    ``param_groups(weight_decay)``: groups for ``torch.optim.AdamW`` over what trains;
    ``remove()`` takes the hooks off and unfreezes.
    """

    frozen: list[nn.Parameter]
    masks: dict[nn.Parameter, torch.Tensor]
    trainable: list[nn.Parameter]
    handles: list[Any] = field(default_factory=list)

    def param_groups(self, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """New tensors with ``dim >= 2`` decayed, other new tensors not, and width-grown
        tensors with **no decay**: AdamW's decay ``theta *= 1 - lr lambda`` would move
        their masked, inherited entries although their gradient is zero (for decay on
        the new entries alone, use ``growth_param_groups(..., lr=0.0, new_lr=...)`` with
        ``GrowthAwareAdamW``, whose per-entry rate 0 stops the decay too)."""
        decayed = [p for p in self.trainable if p not in self.masks and p.dim() >= 2]
        rest = [p for p in self.trainable if p in self.masks or p.dim() < 2]
        groups = [{"params": decayed, "weight_decay": weight_decay},
                  {"params": rest, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for p in self.frozen:
            p.requires_grad_(True)


def train_only_new(growth: Growth, grown: nn.Module) -> NewCapacityOnly:
    """LLaMA-Pro's mode: train only the capacity the growth added.

    Every inherited tensor of ``grown`` gets ``requires_grad=False``; every width-grown
    tensor a gradient hook that zeroes its inherited entries (the first copies). Train
    with ``torch.optim.AdamW(result.param_groups(weight_decay))`` and a *fresh* state: a
    masked entry then has ``m = v = 0`` and its update ``0 / (0 + eps)`` is exactly 0
    (a grown state's moments would still move it). ``result.remove()`` undoes both.
    """
    out = NewCapacityOnly([], {}, [])
    for p, _, role in _trainable_roles(growth, grown):
        if isinstance(role, torch.Tensor):
            mask = role.to(p.dtype)
            out.masks[p] = mask
            out.handles.append(p.register_hook(lambda g, m=mask: g * m.to(g.device, g.dtype)))
            out.trainable.append(p)
        elif role == "inherited":
            p.requires_grad_(False)
            out.frozen.append(p)
        else:
            out.trainable.append(p)
    return out

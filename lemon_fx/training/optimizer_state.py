"""AdamW's state carried through a growth, so that training continues where it stopped.

A fresh AdamW after growth forgets every moment the source had learnt and takes
sign-sized first steps; this module maps the source's ``exp_avg`` ``m``, ``exp_avg_sq``
``v`` and ``step`` onto the grown model instead (TRAINING.md 1.5), so that with equal
splits the grown model's next step is the source's next step in function space.

**The map.** ``lemon_fx.training.provenance`` gives, for grown entry ``i``, its source
entry ``s``, the coefficient ``c_i`` of its value (``theta'_i = c_i theta_s``: 1 for a
copied row, ``1/k_in`` for a column split over ``k_in`` copies, a norm's ``eta``, a tied
head's norm ``1/k``) and ``n_s``, the grown entries continuing ``s``. The chain rule gives
``g_s = sum_i c_i g'_i`` over those entries; copies that are exact duplicates at growth
share it equally, so entry ``i`` receives ``g'_i = a_i g_s`` with the share ``a_i = 1 / (n_s
c_i)``: ``1/k_out`` on a row copied ``k_out`` times, 1 on a split column, ``1/k_out`` on a
hidden matrix that is both. Adam's direction ``m_hat / sqrt(v_hat)`` is unchanged when a
gradient history is multiplied by ``a``, so

    m'_i = a_i m_s,   v'_i = a_i^2 v_s,   step' = step,   eps'_i = a_i eps.

For the grown step to be the source's, entry ``i`` must move ``c_i`` times the source's
move (then every copied row moves like its source row and the ``k_in`` parts of a split
column move by the source column's step in total): its rate is ``lr * c_i`` (the
``lr / k_in`` of muP's Adam rule on split columns), and its decay ``lambda / c_i``, so that
the decay factor ``1 - lr lambda`` is the source's. ``eps'`` keeps ``eps``'s share of the
denominator (without it the steps differ by about ``eps / sqrt(v)``, negligible in practice
but not zero). With LEMON's noisy splits the copies' gradients differ by the noise's
symmetry-breaking term; the map uses the equal share, and the first step is then close to
the source's, not equal to it.

**What is fresh.** PyTorch keeps ``step`` per parameter, so a tensor left out of the state
starts its own bias correction at step 0: the tensors of new blocks (their cancelling
branch ends and everything copied with them: copying the source block's moments would be
wrong, its fan-in rows get +- gradients), tensors set by a ``fill`` step, and tensors of a
transform that is not an entrywise rescale. Nothing is ever zeroed *part way* under a
running step counter (TRAINING.md 1.6: such entries take steps up to 6x too large for about
100 steps): an avg/zero extra (an entry that continues no source entry: a mean, a zero, a
free column) gets ``m = 0`` and the ``v`` (and rate) of the copy next to it (its
neighbour, the entry a circ layout would have copied there), so its first updates are
``(1 - beta1) g / sqrt(v)``: smaller than a continued entry's, never larger.

**Optimizers.** The per-entry rate ``lr * c_i`` varies by column when widths grow by a
non-multiple, which ``torch.optim.AdamW`` cannot express: ``GrowthAwareAdamW`` (a drop-in
subclass) reads ``lr_scale`` (``c``) and ``eps_scale`` (``a``) from each parameter's state,
where ``grow_optimizer_state`` puts them (``target="growth_aware"``). For
``torch.optim.AdamW`` itself use ``target="adamw"``: it refuses a map that needs rate
scales, unless ``allow_inexact=True``, which leaves them out.

**Tied weights** need nothing special: lemon_fx grows a tied embedding/head by expanding
its columns for both uses and dividing the head's final norm by ``k`` (see
``passes.rules.embedding``), so the shared tensor has ``c = 1, a = 1/k`` from both uses and
the final norm ``c = 1/k, a = 1``: the map above is exact for it (tested).

**Gradient clipping** by the global norm measures a different norm after growth (split
columns count ``k_in`` times, copied rows ``1/k_out``), so ``clip_grad_norm_`` clips a grown
model where the source was not clipped, or by another factor. ``GrowthAwareAdamW``'s
``clip_grad_norm_`` measures the source's norm instead, ``sum_i g'_i^2 / (n_s a_i^2) = sum_s
g_s^2`` (weight ``c_i / a_i`` per entry), and clips by it; fresh tensors count as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from lemon_fx.errors import PlanError, Problem
from lemon_fx.training.provenance import Growth, TensorProvenance, compact, of_parameters

__all__ = ["GROWTH_STATE_KEYS", "GrowthAwareAdamW", "grow_optimizer_state"]

# per-parameter state that GrowthAwareAdamW reads besides AdamW's own; kept in their own
# dtype when a state dict is loaded (torch casts floating state to the parameter's dtype)
GROWTH_STATE_KEYS = ("lr_scale", "eps_scale", "rate_group", "copy_group")


def _scale_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


class GrowthAwareAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` with per-entry rates: the optimizer of a grown model.

    Built like AdamW (``GrowthAwareAdamW(params, lr, betas, eps, weight_decay)``; no
    ``amsgrad``, ``fused``, ``foreach``, ``capturable`` or ``differentiable``). Its state
    dict is AdamW's (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter), so it loads an
    AdamW checkpoint and the other way round; each parameter's state may also hold

    - ``lr_scale`` ``c`` (a tensor broadcastable to the parameter): the entry's rate is
      ``lr * c`` and its decay ``lambda / c``, so the decay factor stays ``1 - lr lambda``;
    - ``eps_scale`` ``a``: the entry's ``eps`` is ``a * eps``;
    - ``rate_group``: per entry, the index of the param group whose ``lr`` it uses
      (asymmetric rates for the new copies of a width-grown tensor, set by
      ``lemon_fx.training.param_groups``; the decay factor then uses that rate);
    - ``copy_group``: per entry, the id of its copy set (-1: none): the mean of the update
      over each set (the direction the inherited function moves along) takes the owning
      group's rate, the differences from it (the symmetry-breaking modes) the
      ``rate_group``'s.

    Without them a step is ``torch.optim.AdamW``'s single-tensor step, operation for
    operation (the same bits). ``clip_grad_norm_`` clips by the source's gradient norm (see
    the module text).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, maximize: bool = False) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=False, maximize=maximize, foreach=False, capturable=False,
                         differentiable=False, fused=False)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rates = [float(g["lr"]) for g in self.param_groups]
        for group in self.param_groups:
            if group.get("amsgrad") or group.get("fused") or group.get("capturable"):
                raise ValueError("GrowthAwareAdamW supports neither amsgrad, fused nor "
                                 "capturable")
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GrowthAwareAdamW does not support sparse gradients")
                self._update(p, group, rates)
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any], rates: list[float]) -> None:
        grad = -p.grad if group["maximize"] else p.grad
        state = self.state[p]
        if "step" not in state:  # lazy, as AdamW: its own bias correction from step 0
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        beta1, beta2 = group["betas"]
        lr, decay, eps = float(group["lr"]), group["weight_decay"], group["eps"]
        scale, eps_scale = state.get("lr_scale"), state.get("eps_scale")
        copies = state.get("copy_group")
        rate: float | torch.Tensor = lr
        if "rate_group" in state:
            table = torch.tensor(rates, dtype=_scale_dtype(p), device=p.device)
            rate = table[state["rate_group"].to(torch.long)]

        state["step"] += 1
        if decay != 0 and copies is None:
            p.mul_(1 - rate * decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = float(state["step"].item())
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = exp_avg_sq.sqrt() / bias_correction2_sqrt
        denom = denom.add_(eps) if eps_scale is None else denom.add_(eps * eps_scale)
        if copies is not None:
            self._update_by_modes(p, exp_avg / denom, scale, decay, lr, rate, copies,
                                  bias_correction1)
        elif isinstance(rate, float) and scale is None:
            p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        else:
            size = rate / bias_correction1 if scale is None else rate * scale / bias_correction1
            p.sub_(exp_avg / denom * size)

    @staticmethod
    def _update_by_modes(p: torch.Tensor, direction: torch.Tensor, scale: Any, decay: float,
                         lr: float, rate: float | torch.Tensor, copies: torch.Tensor,
                         bias_correction1: float) -> None:
        """The step split into each copy set's mean (rate ``lr``) and the differences
        from it (rate ``rate``); entries in no set move at ``rate``."""
        d = direction / bias_correction1 if scale is None else direction * (
            scale / bias_correction1)
        if decay != 0:
            d = d + decay * p
        flat = d.reshape(-1)
        ids = copies.to(torch.long).expand(p.shape).reshape(-1)
        member = ids >= 0
        mean = torch.zeros_like(flat)
        if member.any():
            sets = ids[member]
            sums = torch.zeros(int(sets.max()) + 1, dtype=flat.dtype, device=flat.device)
            sums.index_add_(0, sets, flat[member])
            counts = torch.bincount(sets, minlength=sums.numel()).to(flat.dtype)
            mean[member] = (sums / counts.clamp(min=1))[sets]
        rates = (torch.as_tensor(rate, dtype=flat.dtype, device=flat.device)
                 .expand(p.shape).reshape(-1))
        p.sub_((lr * mean + rates * (flat - mean)).reshape(p.shape))

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip every gradient by the *source's* global 2-norm, as
        ``torch.nn.utils.clip_grad_norm_`` would have clipped the source (the same
        ``max_norm / (norm + 1e-6)``, capped at 1): each entry's square counts with weight
        ``lr_scale / eps_scale`` (``= 1 / (n a^2)``: a copied row's ``k`` shares of ``g/k``
        count once, a split column's ``k`` full copies once). Returns that norm."""
        grads = []
        total = torch.zeros((), dtype=torch.float64)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state.get(p, {})
                weight = torch.ones((), dtype=torch.float64, device=p.device)
                if "lr_scale" in state:
                    weight = weight * state["lr_scale"].to(torch.float64)
                if "eps_scale" in state:
                    weight = weight / state["eps_scale"].to(torch.float64)
                g = p.grad.to(torch.float64)
                total = total + (g * g * weight).sum().cpu()
                grads.append(p.grad)
        norm = total.sqrt()
        coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coefficient.to(device=g.device, dtype=g.dtype))
        return norm

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """AdamW's ``load_state_dict``, keeping the growth keys (``GROWTH_STATE_KEYS``) in
        their saved dtype: torch casts floating state to each parameter's dtype, which
        would round a bfloat16 model's ``1/3`` rate scale and its copy-set ids."""
        kept = {i: {k: v for k, v in s.items() if k in GROWTH_STATE_KEYS}
                for i, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved, params):
            for key, value in kept.get(i, {}).items():
                self.state[p][key] = value.detach().clone().to(p.device)


# -- which source parameter each optimizer entry is ----------------------------------------
def _source_names(source: nn.Module | Sequence[str],
                  optimizer: torch.optim.Optimizer | Mapping[str, Any]
                  ) -> tuple[Mapping[str, Any], list[str]]:
    """The optimizer's state dict and the source parameter name of each of its entries,
    in the state dict's numbering (its groups' ``params`` one after another)."""
    module = source if isinstance(source, nn.Module) else None
    names = None if module is not None else list(source)
    if isinstance(optimizer, torch.optim.Optimizer):
        state = optimizer.state_dict()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if module is not None:
            by_id = {id(p): n for n, p in module.named_parameters()}
            missing = [i for i, p in enumerate(params) if id(p) not in by_id]
            if missing:
                raise PlanError("the optimizer does not belong to the source model", [Problem(
                    reason=f"{len(missing)} of its parameters are not the source model's",
                    fix="pass the model the optimizer was built over (the source, before "
                        "tracing), or the parameter names in the optimizer's order")])
            return state, [by_id[id(p)] for p in params]
    elif isinstance(optimizer, Mapping) and "state" in optimizer and "param_groups" in optimizer:
        state = optimizer
    else:
        raise PlanError("grow_optimizer_state needs the source's AdamW", [Problem(
            reason=f"got {type(optimizer).__name__}",
            fix="pass the torch.optim.AdamW (or its state_dict()) that trained the source")])
    groups = state["param_groups"]
    count = sum(len(g["params"]) for g in groups)
    if names is None and all("param_names" in g for g in groups):
        names = [n for g in groups for n in g["param_names"]]
    if names is None:
        ordered = [n for n, _ in module.named_parameters()]
        if len(groups) != 1 or count != len(ordered):
            raise PlanError("cannot tell which parameter each optimizer entry is", [Problem(
                reason=f"the state dict has {len(groups)} param groups over {count} "
                       f"parameters and no param_names; the model has {len(ordered)}",
                fix="pass the optimizer itself instead of its state_dict(), or the source "
                    "parameter names in the optimizer's order as `source`")])
        names = ordered
    if len(names) != count:
        raise PlanError("the parameter names do not match the optimizer", [Problem(
            reason=f"{len(names)} names for {count} optimizer entries",
            fix="give one name per optimizer parameter, in the order of its groups")])
    if module is not None:
        shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}
        flat = [i for g in groups for i in g["params"]]
        problems = [Problem(reason=f"its exp_avg has shape {tuple(s['exp_avg'].shape)}, the "
                            f"parameter {shapes.get(n)}", node=n,
                            fix="pass the optimizer itself, or the names in its order")
                    for i, n in zip(flat, names)
                    if (s := state["state"].get(i)) is not None and "exp_avg" in s
                    and tuple(s["exp_avg"].shape) != shapes.get(n)]
        if problems:
            raise PlanError("the optimizer's entries are not the model's parameters in order",
                            problems)
    return state, names


# -- the map ---------------------------------------------------------------------------------
def _mapped(prov: TensorProvenance, saved: Mapping[str, Any], p: torch.Tensor,
            keep_scales: bool) -> tuple[dict[str, Any], bool]:
    """The grown state of one mapped tensor, and whether it needs a rate scale."""
    share = prov.share()
    out: dict[str, Any] = {"step": saved["step"].clone() if isinstance(saved["step"], torch.Tensor)
                           else torch.tensor(float(saved["step"]), dtype=torch.float32)}
    extra = prov.extra()
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if key not in saved:
            continue
        value = saved[key]
        a = share.to(device=value.device, dtype=torch.float64)
        factor = a if key == "exp_avg" else a * a
        grown = (prov.gather(value).to(torch.float64) * factor).to(value.dtype)
        if key == "exp_avg" and bool(extra.any()):
            grown = grown.masked_fill(extra.to(value.device), 0.0)
        out[key] = grown.expand(p.shape).contiguous()
    coefficient = prov.coefficient()
    # a source grown before (GrowthAwareAdamW) carries its scales: they compose
    for key in ("lr_scale", "eps_scale"):
        if key in saved:
            earlier = saved[key].to(torch.float64).cpu().expand(prov.source_shape)
            later = coefficient if key == "lr_scale" else share
            combined = compact(prov.gather(earlier) * later)
            coefficient, share = ((combined, share) if key == "lr_scale"
                                  else (coefficient, combined))
    needs_rate = not bool((coefficient == 1).all())
    if keep_scales:
        if needs_rate:
            out["lr_scale"] = coefficient.to(_scale_dtype(p))
        if not bool((share == 1).all()):
            out["eps_scale"] = share.to(_scale_dtype(p))
    return out, needs_rate


def grow_optimizer_state(
    growth: Growth,
    source: nn.Module | Sequence[str],
    optimizer: torch.optim.Optimizer | Mapping[str, Any],
    grown: nn.Module,
    *,
    like: torch.optim.Optimizer | None = None,
    target: Literal["growth_aware", "adamw"] = "growth_aware",
    allow_inexact: bool = False,
) -> dict[str, Any]:
    """The source AdamW's state carried onto the grown model, as a state dict to load.

    ``growth``: the ``GrowthRecipe`` (``lemon_fx.plan_growth``) or ``PlannedGrowth``
    (``lemon_fx.api.plan_in_detail``) that grew it (a PlannedGrowth also names the new
    blocks; from a recipe they are found by their cancel steps). ``source``: the source
    model (names its parameters) or its parameter names in the optimizer's order.
    ``optimizer``: the source's ``torch.optim.AdamW`` (or ``GrowthAwareAdamW``), or its
    ``state_dict()`` (then with ``param_names`` in its groups, or ``source`` as names, or a
    single group over ``source.parameters()`` in order). ``grown``: the grown model.

    The result mirrors the source optimizer's param groups and their hyperparameters:
    group ``j`` holds the grown parameters (in ``grown.parameters()`` order) made from
    group ``j``'s, new blocks' copies with their source's; so
    ``GrowthAwareAdamW(grown.parameters(), ...)`` loads it when the source was built over
    ``source.parameters()``, and ``lemon_fx.training.build_optimizer``'s two groups map to
    its two groups. ``like``: an optimizer already built over the grown model (e.g. from
    ``growth_param_groups``): the result then follows its groups and hyperparameters and
    keeps the growth keys already in its state (``rate_group``, ``copy_group``).

    Each mapped tensor gets ``m' = a m``, ``v' = a^2 v`` and the source's ``step``, and,
    for ``target="growth_aware"``, ``lr_scale = c`` and ``eps_scale = a`` (see the module
    text); fresh tensors (new blocks, fills, unmappable transforms) get no entry, so the
    optimizer starts them at step 0. A source optimizer that is itself a grown
    ``GrowthAwareAdamW`` has its ``lr_scale``/``eps_scale`` composed with this growth's
    (grown twice, still the first source's step); its ``rate_group``/``copy_group`` are
    not carried (build the groups for the new growth). ``target="adamw"`` leaves the scales out for
    ``torch.optim.AdamW`` and raises ``PlanError`` naming the tensors that need a rate
    scale (split columns), unless ``allow_inexact=True``: the first steps are then not the
    source's. (Without ``eps_scale`` alone the steps differ by about ``eps / sqrt(v)``
    relative, which is not refused.) Raises ``PlanError`` when the grown model is not
    the growth's, the optimizer is not the source's or holds no Adam state, or its
    entries cannot be named.
    """
    if target not in ("growth_aware", "adamw"):
        raise PlanError("unknown optimizer target", [Problem(
            reason=f"target {target!r}", fix="use 'growth_aware' (GrowthAwareAdamW) or "
            "'adamw' (torch.optim.AdamW)")])
    table = of_parameters(growth, grown)
    saved, names = _source_names(source, optimizer)
    flat = [i for g in saved["param_groups"] for i in g["params"]]
    index_of = dict(zip(names, flat))
    not_adam = [n for n, i in index_of.items() if (s := saved["state"].get(i))
                and not {"step", "exp_avg", "exp_avg_sq"} <= set(s)]
    if not_adam:
        raise PlanError("the optimizer state is not Adam's", [Problem(
            reason="its state has no step/exp_avg/exp_avg_sq", node=n,
            fix="grow the state of a torch.optim.Adam/AdamW; other optimizers' states "
                "have no map here (start them fresh)") for n in not_adam])
    params = dict(grown.named_parameters())

    if like is None:
        name_of = dict(zip(flat, names))
        layout = []
        for g in saved["param_groups"]:
            members = {name_of[i] for i in g["params"]}
            layout.append((g, [n for n in params if table[n].source in members]))
        groups, order, start = [], [], 0
        for g, members in layout:
            group = {k: v for k, v in g.items() if k not in ("params", "param_names")}
            group["params"] = list(range(start, start + len(members)))
            if "param_names" in g:
                group["param_names"] = list(members)
            start += len(members)
            groups.append(group)
            order += members
        kept: dict[str, dict[str, Any]] = {}
    else:
        by_id = {id(p): n for n, p in params.items()}
        like_params = [p for g in like.param_groups for p in g["params"]]
        if any(id(p) not in by_id for p in like_params):
            raise PlanError("`like` is not an optimizer over the grown model", [Problem(
                reason="some of its parameters are not the grown model's",
                fix="build it over grown.parameters() (or growth_param_groups(...))")])
        groups = like.state_dict()["param_groups"]
        order = [by_id[id(p)] for p in like_params]
        kept = {by_id[id(p)]: {k: v for k, v in like.state.get(p, {}).items()
                               if k in GROWTH_STATE_KEYS} for p in like_params}

    state: dict[int, dict[str, Any]] = {}
    needs_rate: list[str] = []
    for i, name in enumerate(order):
        prov = table[name]
        entry = dict(kept.get(name, {}))
        src = index_of.get(prov.source)
        saved_entry = saved["state"].get(src) if src is not None else None
        if prov.kind == "mapped" and saved_entry:
            shape = tuple(saved_entry["exp_avg"].shape)
            if shape != prov.source_shape:
                raise PlanError("the optimizer state does not fit the growth", [Problem(
                    reason=f"the state of '{prov.source}' has shape {shape}; the recipe "
                           f"grows a source tensor of shape {prov.source_shape}", node=name,
                    fix="pass the optimizer of the model this recipe was planned from")])
            mapped, rate = _mapped(prov, saved_entry, params[name], target == "growth_aware")
            entry.update(mapped)
            if rate:
                needs_rate.append(name)
        if entry:
            state[i] = entry
    if target == "adamw" and needs_rate and not allow_inexact:
        raise PlanError(
            "torch.optim.AdamW cannot take the rates that keep the source's training",
            [Problem(reason="its entries need the rate lr * c (c = 1/k_in on split columns; "
                            "per column at a non-multiple width)", node=n,
                     fix="load the state into lemon_fx.training.GrowthAwareAdamW "
                         "(target='growth_aware'), or pass allow_inexact=True to drop the "
                         "rate scales (the first steps are then not the source's)")
             for n in needs_rate])
    return {"state": state, "param_groups": groups}


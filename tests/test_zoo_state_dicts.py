"""The promise of DESIGN.md section 1 on the look-alike zoo of ``tests/zoo.py``: a grown
state_dict keeps the source's names (new blocks numbered in place), so the zoo class built
at the grown sizes loads it strictly and computes the source's function.

Every family is grown under four plans, weights off their init (``real_zoo.trained``,
float64, eval). The grown sizes are read from ``plan_in_detail`` (each group's target by
role, each stack's grown block order) and turned into the class's constructor keywords by
a small per-family spelling (``dim``, ``num_heads``, ``mlp_ratio`` or ``hidden_dim``,
``token_hidden``, ``num_kv_heads``, ``depth``); nothing grown is written here by hand.

Outcomes are written down, so coverage cannot regress silently: ``REFUSED`` names the
cases grow refuses (a typed LemonError with its cause), every other case must grow, load
strictly and match. No zoo family returns hidden states (each ends in a classifier or an
LM head of fixed size), so there are no ``grow_outputs=True`` variants.

At 1.5x a normalized width grows by a non-multiple, and the grown graph's norms scale
their eps by ``k*S/T`` (``hub.folder.norm_eps_scale``). The zoo constructors fix eps, so
they cannot build that model: those cases are in ``NO_GROWN_CONFIG``, and exactly there
the class built at the grown sizes loads strictly but computes another function (~1e-6
off). The function is then checked with each norm's eps set to the scaled value, which is
what a constructor taking eps would build."""

from __future__ import annotations

import functools

import pytest
import torch
from real_zoo import trained
from zoo import ZOO

import lemon_fx
from lemon_fx import LemonError, NotLosslessError, Plan
from lemon_fx.api import plan_in_detail
from lemon_fx.hub.folder import norm_eps_scale

PLANS = {"width2": Plan(width=2.0), "width1.5": Plan(width=1.5), "depth2": Plan(depth=2.0),
         "width2+depth2": Plan(width=2.0, depth=2.0)}

# (family, plan) -> (error, cause in its first problem): grow refuses these, out of scope
POST_LN = (NotLosslessError, "is Post-LN")
REFUSED = {
    ("post_ln_encoder", "width1.5"): (NotLosslessError, "a norm's output is in the zero form"),
    ("post_ln_encoder", "depth2"): POST_LN,
    ("post_ln_encoder", "width2+depth2"): POST_LN,
    ("mlp_mixer", "width1.5"): (NotLosslessError, "LayerNorm needs its input in the avg form"),
}
CASES = [(f, p) for f in sorted(ZOO) for p in PLANS]
GROWS = [c for c in CASES if c not in REFUSED]

# the class cannot be built at the grown config: at 1.5x the grown norms need eps scaled by
# k*S/T = 2/3, and every zoo constructor builds its LayerNorm/RMSNorm with a fixed eps (the
# sizes load strictly, but the class as built computes another function: checked below)
NO_GROWN_CONFIG = {
    ("fused_qkv_chunk", "width1.5"), ("fused_qkv_index", "width1.5"),
    ("fused_qkv_reshape", "width1.5"), ("gpt", "width1.5"), ("manual_attention", "width1.5"),
    ("mha", "width1.5"), ("parallel_block", "width1.5"), ("residual_mlp", "width1.5"),
    ("separate_qkv", "width1.5"), ("split_flatten", "width1.5"), ("swiglu", "width1.5"),
    ("swiglu_gqa", "width1.5"), ("vit", "width1.5"), ("layer_scale_vit", "width1.5"),
}


class NoGrownConfig(Exception):
    """The family's constructor cannot say the grown sizes."""


class _Sizes(dict):
    """role -> grown size; a role whose groups grow to different sizes (the Mixer's token
    and channel MLPs are both ffn) has no single keyword, and reading it says so."""

    def __missing__(self, role):
        raise NoGrownConfig(f"no single grown size for role {role!r}")


def _grown_sizes(planned) -> tuple[_Sizes, dict[str, int], int | None]:
    """(role -> grown size, group name -> grown size, grown block count) from the plan's
    resolution (each width group's target, each stack's grown block order)."""
    by_role: dict[str, set[int]] = {}
    by_name = {}
    for group in planned.analysis.groups:
        target = planned.resolution.target(group.leaf)
        by_role.setdefault(group.role, set()).add(target)
        by_name[group.name] = target
    roles = _Sizes({role: next(iter(t)) for role, t in by_role.items() if len(t) == 1})
    if len(planned.growths) > 1:
        raise NoGrownConfig("more than one block stack grows")
    depth = len(planned.growths[0].order) if planned.growths else None
    return roles, by_name, depth


def _ratio(hidden: int, dim: int) -> float:
    ratio = hidden / dim
    if int(dim * ratio) != hidden:
        raise NoGrownConfig(f"hidden {hidden} is not int(dim * mlp_ratio) for dim {dim}")
    return ratio


def _heads(roles: dict[str, int], dim: int, per_kv: int = 1) -> dict[str, int]:
    heads = roles["heads"] if "heads" in roles else per_kv * roles["kv_heads"]
    if dim % heads or dim // heads != roles["head_dim"]:
        raise NoGrownConfig(f"head_dim {roles['head_dim']} is not dim {dim} // {heads} heads")
    return {"num_heads": heads}


def _grown_kwargs(family: str, planned, source: torch.nn.Module) -> dict[str, object]:
    """The family's constructor keywords at the plan's grown sizes."""
    roles, by_name, depth = _grown_sizes(planned)
    dim = roles["residual"]
    kwargs: dict[str, object] = {"dim": dim}
    if depth is not None:
        kwargs["depth"] = depth
    if family == "residual_mlp":
        kwargs["mlp_ratio"] = _ratio(roles["ffn"], dim)
    elif family == "mlp_mixer":  # two ffn groups per block: token and channel MLPs
        token = {s for n, s in by_name.items() if ".mlp_tokens." in n}
        channel = {s for n, s in by_name.items() if ".mlp_channels." in n}
        if len(token) != 1 or len(channel) != 1:
            raise NoGrownConfig(f"token MLPs {token}, channel MLPs {channel}")
        kwargs.update(token_hidden=token.pop(), mlp_ratio=_ratio(channel.pop(), dim))
    elif family in ("swiglu", "swiglu_gqa"):
        kwargs["hidden_dim"] = roles["ffn"]
        if "kv_heads" in roles:  # grouped-query: each kv head serves a fixed number of q heads
            attn = source.layers[0].self_attn
            kwargs["num_kv_heads"] = roles["kv_heads"]
            kwargs.update(_heads(roles, dim, per_kv=attn.num_heads // attn.num_kv_heads))
        else:
            kwargs.update(_heads(roles, dim))
    else:  # the transformers taking dim, num_heads, mlp_ratio
        kwargs.update(_heads(roles, dim), mlp_ratio=_ratio(roles["ffn"], dim))
    return kwargs


@functools.cache  # one trained source and trace per family: grow never modifies gm
def _source(family: str):
    entry = ZOO[family]
    torch.manual_seed(0)
    model = trained(entry.build())
    gm = lemon_fx.trace(model, entry.example_inputs(torch.Generator().manual_seed(0)))
    return model, gm


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10 * (1 + want.abs().max().item()))


def test_every_refusal_and_no_config_case_is_a_zoo_case():
    assert set(REFUSED) <= set(CASES) and NO_GROWN_CONFIG <= set(GROWS)
    assert len(GROWS) == 60  # 16 families x 4 plans, 4 refused


@pytest.mark.parametrize(("family", "plan"), sorted(REFUSED))
def test_refused_cases_stay_refused(family, plan):
    _, gm = _source(family)
    error, cause = REFUSED[family, plan]
    with pytest.raises(LemonError) as raised:
        lemon_fx.grow(gm, PLANS[plan])
    assert isinstance(raised.value, error)
    assert cause in raised.value.problems[0].reason


@pytest.mark.parametrize(("family", "plan"), GROWS)
def test_grown_state_dict_loads_strictly_into_the_zoo_class(family, plan):
    entry = ZOO[family]
    model, gm = _source(family)
    big = lemon_fx.grow(gm, PLANS[plan])
    planned = plan_in_detail(gm, PLANS[plan])
    kwargs = _grown_kwargs(family, planned, model)
    eps_scale = norm_eps_scale(planned)
    # the class builds the grown model exactly when the sizes say it and no eps moves
    assert (eps_scale != 1.0) == ((family, plan) in NO_GROWN_CONFIG), eps_scale

    torch.manual_seed(123)  # the target's own init must not matter: every tensor is loaded
    target = entry.build(**kwargs).double().eval()
    target.load_state_dict(big.state_dict(), strict=True)
    assert sum(p.numel() for p in target.parameters()) > sum(
        p.numel() for p in model.parameters())
    fresh = entry.example_inputs(torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(*fresh)
    if eps_scale != 1.0:  # the class as built is another function; one taking eps is not
        with torch.no_grad():
            with pytest.raises(AssertionError):
                _close(target(*fresh), want)
        norms = [m for m in target.modules() if isinstance(m, (torch.nn.LayerNorm,
                                                              torch.nn.RMSNorm))]
        assert norms and all(m.eps is not None for m in norms)
        for m in norms:
            m.eps = m.eps * eps_scale
    with torch.no_grad():
        _close(big(*fresh), want)
        _close(target(*fresh), want)

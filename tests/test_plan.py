"""Plan: validation, files, and resolution against a model's groups."""

import json

import pytest
import torch
from torch import nn
from zoo import ResidualMLP

import lemon_fx
from lemon_fx import Plan, PlanError


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.ln = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        x = self.inp(x)
        x = x + self.fc2(torch.relu(self.fc1(self.ln(x))))
        return self.out(x)


@pytest.fixture()
def gm():
    torch.manual_seed(0)
    return lemon_fx.trace(_Net().double(), (torch.randn(2, 4, dtype=torch.float64),))


def _sizes(gm):
    return {g.role: g.size for g in lemon_fx.inspect(gm).groups}


def test_bare_number_scales_every_group(gm):
    big = lemon_fx.grow(gm, Plan(width=1.5))
    assert _sizes(big) == {"residual": 12, "ffn": 24}


def test_mapping_takes_roles_names_ints_and_floats(gm):
    big = lemon_fx.grow(gm, Plan(width={"@residual": 11, "ffn": 2.0}))
    assert _sizes(big) == {"residual": 11, "ffn": 32}


def test_later_selectors_override_earlier_ones(gm):
    big = lemon_fx.grow(gm, Plan(width={"*": 2.0, "@ffn": 20}))
    assert _sizes(big) == {"residual": 16, "ffn": 20}


def test_unknown_selector_lists_the_real_group_names(gm):
    with pytest.raises(PlanError) as info:
        lemon_fx.grow(gm, Plan(width={"blocks.*": 2.0}))
    text = str(info.value)
    assert "'blocks.*' matches no width group" in text
    assert "residual" in text and "ffn" in text


def test_unknown_role_is_a_plan_error(gm):
    with pytest.raises(PlanError, match="unknown role selector '@mlp'"):
        lemon_fx.grow(gm, Plan(width={"@mlp": 2.0}))


def test_a_role_this_model_lacks_is_skipped_but_a_plan_that_grows_nothing_is_refused(gm):
    """One role plan serves many models; a plan matching nothing here returned the same
    model before, silently."""
    big = lemon_fx.grow(gm, Plan(width={"@heads": 2.0, "@ffn": 2.0}))
    assert _sizes(big) == {"residual": 8, "ffn": 32}
    with pytest.raises(PlanError) as info:
        lemon_fx.grow(gm, Plan(width={"@heads": 2.0, "@channels": 2.0}))
    (problem,) = info.value.problems
    assert "the width plan grows nothing: '@heads', '@channels'" in problem.reason
    assert "@ffn, @residual" in problem.fix


def test_no_growable_group_names_the_op_that_keeps_the_width():
    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.h = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x):
            y = self.a(x)
            return self.h(y @ y.transpose(-1, -2) @ y)

    gm = lemon_fx.trace(Mixer(), (torch.randn(2, 5, 4),))
    with pytest.raises(PlanError) as info:
        lemon_fx.grow(gm, Plan(width=2.0))
    (problem,) = info.value.problems
    assert "no growable width group" in problem.reason
    assert "a matmul of two activations sums over this axis" in problem.reason


def test_shrinking_is_refused(gm):
    with pytest.raises(PlanError, match="would shrink from 16 to 10"):
        lemon_fx.grow(gm, Plan(width={"@ffn": 10}))


@pytest.mark.parametrize("bad", [
    dict(width=-1.0), dict(width="big"), dict(method="magic"), dict(placement="random"),
    dict(seed="zero"), dict(width={"@ffn": 0}),
])
def test_invalid_fields_raise_plan_error(bad):
    with pytest.raises(PlanError):
        Plan(**bad)


def test_from_file_yaml_and_json(tmp_path):
    (tmp_path / "p.yaml").write_text("width:\n  '@ffn': 2.0\nseed: 3\nmethod: net2net\n")
    (tmp_path / "p.json").write_text(json.dumps({"width": 1.5, "seed": 1}))
    assert Plan.from_file(tmp_path / "p.yaml") == Plan(width={"@ffn": 2.0}, seed=3,
                                                       method="net2net")
    assert Plan.from_file(tmp_path / "p.json") == Plan(width=1.5, seed=1)


def test_from_file_points_at_the_bad_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("width: 2.0\nseed: [1,\n")
    with pytest.raises(PlanError) as info:
        Plan.from_file(path)
    assert f"{path}:" in str(info.value)


def test_from_file_rejects_unknown_fields(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"widht": 2.0}))
    with pytest.raises(PlanError, match="unknown field 'widht'"):
        Plan.from_file(path)


def test_depth_on_a_model_without_stacks_is_a_plan_error(gm):
    with pytest.raises(PlanError, match="the model has no block stack"):
        lemon_fx.grow(gm, Plan(depth=2.0))


def test_a_bare_int_width_is_a_multiplier(gm):
    assert _sizes(lemon_fx.grow(gm, Plan(width=2))) == {"residual": 16, "ffn": 32}


def test_the_plan_examples_in_the_docs_are_valid_plans():
    import re
    from pathlib import Path

    import yaml

    text = (Path(__file__).parent.parent / "docs" / "plans.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 3
    for block in blocks:
        assert isinstance(Plan.from_dict(yaml.safe_load(block)), Plan)


@pytest.mark.parametrize("placement", [{"blocks": [0, 1, 0, 1]}, 5, None, [0, True, 1]])
def test_a_placement_that_is_not_a_mode_or_a_list_of_indices_is_refused(placement):
    """These were taken as "interleave", silently."""
    with pytest.raises(PlanError, match="is neither 'interleave' nor 'stack' nor a list"):
        Plan(depth=2.0, placement=placement)


def test_plans_far_beyond_any_model_are_refused_before_anything_is_built(gm):
    """width=1e6 ended in an allocator RuntimeError; depth=1e9 ran for minutes."""
    with pytest.raises(PlanError, match=r"would have about \d\.\d+e\+\d+ parameters"):
        lemon_fx.grow(gm, Plan(width=1e6))


def test_a_stack_of_a_billion_blocks_is_refused():
    gm = lemon_fx.trace(ResidualMLP(), (torch.randn(2, 12),))
    with pytest.raises(PlanError, match="would grow from 2 to 2000000000 blocks"):
        lemon_fx.grow(gm, Plan(depth=1e9))

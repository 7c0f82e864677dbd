"""Depth growth: new blocks compute the identity, learn, and land where the plan says."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import ZOO
from zoo_checks import WHOLE_MULTIPLE_STREAM, assert_lossless, traced

import lemon_fx
from lemon_fx import NotLosslessError, Plan, PlanError, UnsupportedOpError


def _stack(gm) -> lemon_fx.BlockStack:
    (stack,) = lemon_fx.inspect(gm).stacks
    return stack


@pytest.mark.parametrize("target", ["L+1", "2L", "3L", "2L+1"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_depth_alone_is_lossless(name, target):
    entry, model, gm = traced(name)
    stack = _stack(gm)
    count = {"L+1": stack.count + 1, "2L": 2 * stack.count, "3L": 3 * stack.count,
             "2L+1": 2 * stack.count + 1}[target]
    plan = Plan(depth={stack.name: count}, allow_inexact=stack.kind == "post_ln")
    big = lemon_fx.grow(gm, plan)
    assert _stack(big).count == count
    atol = 1e-10 if stack.kind != "post_ln" else 1e-9  # eps = 1e-12 in that zoo model
    assert_lossless(model, big, entry, seed=11, atol=atol)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_width_and_depth_together(name):
    entry, model, gm = traced(name)
    stack = _stack(gm)
    width = 2.0 if name in WHOLE_MULTIPLE_STREAM else 1.5
    plan = Plan(width=width, depth=2.0, seed=7, allow_inexact=stack.kind == "post_ln")
    big = lemon_fx.grow(gm, plan)
    assert _stack(big).count == 2 * stack.count
    residual = [g for g in lemon_fx.inspect(big).groups if g.role == "residual"]
    assert residual and all(g.size == int(32 * width) for g in residual)
    assert_lossless(model, big, entry, seed=11, atol=1e-10 if stack.kind != "post_ln" else 1e-9)


def test_width_and_depth_through_onnxruntime(tmp_path):
    entry, model, gm = traced("gpt")
    big = lemon_fx.grow(gm, Plan(width=1.5, depth={"blocks": 5}))
    fresh = entry.example_inputs(torch.Generator().manual_seed(3))
    report = lemon_fx.verify(gm, big, fresh, onnx=str(tmp_path / "big.onnx"), rtol=1e-10,
                             atol=1e-10)
    assert report.ok and report.onnx_max_rel_error <= 1e-5


def test_new_blocks_cancel_exactly_but_are_not_zero():
    entry, model, gm = traced("gpt")
    big = lemon_fx.grow(gm, Plan(width=2.0, depth=2.0, seed=1))
    new = lemon_fx.growth_report(big).new_blocks
    assert [(b.position, b.source) for b in new] == [(1, 0), (3, 1)]
    for b in new:
        fc2 = big.get_submodule(f"{b.name}.mlp.fc2")
        assert fc2.weight.abs().max() > 0.01
        assert torch.equal(fc2.bias, torch.zeros_like(fc2.bias))
        # copies of each duplicated hidden unit cancel: W[:, j] + W[:, j + S] = 0
        hidden = fc2.weight.shape[1] // 2
        torch.testing.assert_close(fc2.weight[:, :hidden] + fc2.weight[:, hidden:],
                                   torch.zeros_like(fc2.weight[:, :hidden]), rtol=0,
                                   atol=1e-15)


def test_depth_alone_sets_the_branch_ends_to_zero():
    """With no duplicated unit there is nothing to cancel: LEMON's projection is 0."""
    entry, model, gm = traced("gpt")
    big = lemon_fx.grow(gm, Plan(depth=2.0))
    fc2 = big.get_submodule("blocks.1.mlp.fc2")
    assert torch.equal(fc2.weight, torch.zeros_like(fc2.weight))


def _one_step_moved(big, entry) -> dict[str, bool]:
    big = big.train()
    for m in big.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    before = {k: v.detach().clone() for k, v in big.named_parameters()}
    optimizer = torch.optim.SGD(big.parameters(), lr=0.1)
    inputs = entry.example_inputs(torch.Generator().manual_seed(5))
    logits = big(*inputs)
    target = torch.randint(0, logits.shape[-1], logits.shape[:-1],
                           generator=torch.Generator().manual_seed(6))
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    loss.backward()
    optimizer.step()
    return {k: not torch.equal(v, before[k]) for k, v in big.named_parameters()}


def _new_block_params(big) -> list[str]:
    names = [b.name + "." for b in lemon_fx.growth_report(big).new_blocks]
    return [k for k, _ in big.named_parameters() if any(k.startswith(n) for n in names)]


@pytest.mark.parametrize("name", ["gpt", "vit", "mha", "fused_qkv_reshape"])
def test_every_parameter_of_every_new_block_learns_with_lemon(name):
    entry, model, gm = traced(name)
    big = lemon_fx.grow(gm, Plan(width=2.0, depth=2.0, seed=2))
    moved = _one_step_moved(big, entry)
    params = _new_block_params(big)
    assert params
    # a parameter whose gradient is zero in every block by construction (attention's key
    # bias: softmax ignores a shift shared by a whole row) cannot move in a new block either
    report = lemon_fx.growth_report(big)
    new = {b.position for b in report.new_blocks}
    total = len(new) + len([p for p in range(64) if f"blocks.{p}." in " ".join(moved)
                            and p not in new])
    originals = [p for p in range(total) if p not in new]
    source_of = {b.name: f"blocks.{originals[b.source]}" for b in report.new_blocks}
    stuck = []
    for k in params:
        block = ".".join(k.split(".")[:2])
        twin = source_of[block] + k[len(block):]
        if not moved[k] and moved[twin]:
            stuck.append(k)
    assert not stuck, stuck


def test_net2net_new_blocks_only_train_their_last_layers_at_first():
    """Zero-initialised branch ends give every earlier weight of the block a zero gradient."""
    entry, model, gm = traced("gpt")
    big = lemon_fx.grow(gm, Plan(width=2.0, depth=2.0, method="net2net"))
    moved = _one_step_moved(big, entry)
    frozen = sorted(k for k in _new_block_params(big) if not moved[k])
    learning = sorted(k for k in _new_block_params(big) if moved[k])
    assert all(k.endswith(("mlp.fc2.weight", "mlp.fc2.bias", "attn.proj.weight",
                           "attn.proj.bias")) for k in learning), learning
    assert any(k.endswith("mlp.fc1.weight") for k in frozen)
    assert any(k.endswith("ln_1.weight") for k in frozen)


class _PostLN(nn.Module):
    def __init__(self, eps: float, depth: int = 2, dim: int = 16):
        super().__init__()
        self.inp = nn.Linear(4, dim)
        self.layers = nn.ModuleList(_PostLNBlock(dim, eps) for _ in range(depth))
        self.out = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return self.out(x)


class _PostLNBlock(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.normal_()

    def forward(self, x):
        return self.norm(x + self.fc2(torch.relu(self.fc1(x))))


def _post_ln_error(eps: float) -> float:
    torch.manual_seed(0)
    model = _PostLN(eps).double().eval()
    gm = lemon_fx.trace(model, (torch.randn(8, 4, dtype=torch.float64),))
    big = lemon_fx.grow(gm, Plan(depth=2.0, width=2.0, allow_inexact=True))
    report = lemon_fx.growth_report(big)
    assert any("eps" in note for note in report.notes)
    return report.measured_error


def test_post_ln_error_is_of_the_order_of_eps():
    errors = {eps: _post_ln_error(eps) for eps in (1e-3, 1e-5, 1e-7)}
    for eps, error in errors.items():
        # bound: each identity norm rescales a unit-variance input by 1/sqrt(1 + eps)
        assert error <= 10 * eps, (eps, error)
    assert errors[1e-3] > 1e-6  # the construction really is inexact...
    assert 30 < errors[1e-3] / errors[1e-5] < 300  # ...and the error follows eps


def test_post_ln_needs_allow_inexact():
    model = _PostLN(1e-5).double()
    gm = lemon_fx.trace(model, (torch.randn(8, 4, dtype=torch.float64),))
    with pytest.raises(NotLosslessError) as info:
        lemon_fx.grow(gm, Plan(depth=2.0))
    assert "allow_inexact=True" in info.value.problems[0].fix


def test_post_ln_at_a_non_multiple_width_is_refused_with_the_fix():
    model = _PostLN(1e-5).double()
    gm = lemon_fx.trace(model, (torch.randn(8, 4, dtype=torch.float64),))
    with pytest.raises(NotLosslessError) as info:
        lemon_fx.grow(gm, Plan(width=1.5, depth=2.0, allow_inexact=True))
    assert "whole multiple" in str(info.value)


def test_placements():
    entry, model, gm = traced("gpt")
    for placement, count, expected in [
        ("interleave", 3, [(2, 1)]),
        ("interleave", 7, [(1, 0), (2, 0), (4, 1), (5, 1), (6, 1)]),
        ("stack", 5, [(2, 0), (3, 1), (4, 0)]),
        ((1, 0, 0, 1), 4, None),
        ((0, 1, 1, 0), 4, [(2, 1), (3, 0)]),
        ((0, 0, 1, 1, 1), 5, [(1, 0), (3, 1), (4, 1)]),
    ]:
        if expected is None:
            with pytest.raises(PlanError, match="first occurrences"):
                lemon_fx.grow(gm, Plan(depth={"blocks": count}, placement=placement))
            continue
        big = lemon_fx.grow(gm, Plan(depth={"blocks": count}, placement=placement))
        new = [(b.position, b.source) for b in lemon_fx.growth_report(big).new_blocks]
        assert new == expected, placement
        assert_lossless(model, big, entry, seed=11)


def test_depth_plan_errors_name_the_stacks():
    entry, model, gm = traced("gpt")
    with pytest.raises(PlanError, match="(?s)no block stack named .layers.*the stacks are: blocks"):
        lemon_fx.grow(gm, Plan(depth={"layers": 4}))
    with pytest.raises(PlanError, match="would shrink from 2 to 1 blocks"):
        lemon_fx.grow(gm, Plan(depth={"blocks": 1}))
    with pytest.raises(PlanError, match="placement lists 3 blocks"):
        lemon_fx.grow(gm, Plan(depth={"blocks": 4}, placement=(0, 1, 1)))


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_plain_stack_is_listed_and_refused():
    gm = lemon_fx.trace(_Plain(), (torch.randn(2, 8),))
    (stack,) = lemon_fx.inspect(gm).stacks
    assert (stack.name, stack.count, stack.kind) == ("layers", 2, "plain")
    with pytest.raises(UnsupportedOpError, match="cannot grow in depth"):
        lemon_fx.grow(gm, Plan(depth=2.0))


def test_inspect_lists_stacks_in_its_table():
    entry, model, gm = traced("post_ln_encoder")
    assert "layers: 2 x post_ln" in str(lemon_fx.inspect(gm))


class _BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class _ResNet(nn.Module):
    """torchvision's layout: stages layer1, layer2 of BasicBlocks, downsampling first."""

    def __init__(self, layers=(2, 2)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(*[_BasicBlock(8, 8) for _ in range(layers[0])])
        self.layer2 = nn.Sequential(_BasicBlock(8, 16, 2),
                                    *[_BasicBlock(16, 16) for _ in range(layers[1] - 1)])
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


def _resnet():
    torch.manual_seed(0)
    model = _ResNet().double().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model, lemon_fx.trace(model, (torch.randn(2, 3, 8, 8, dtype=torch.float64),))


def test_resnet_stages_are_residual_stacks_and_the_downsampling_block_is_not_copied():
    model, gm = _resnet()
    stacks = {s.name: s for s in lemon_fx.inspect(gm).stacks}
    assert {n: (s.count, s.kind) for n, s in stacks.items()} == {
        "layer1": (2, "residual"), "layer2": (2, "residual")}
    assert stacks["layer2"].copyable == [1]
    with pytest.raises(PlanError, match="change the shape of the stream"):
        lemon_fx.grow(gm, Plan(depth={"layer2": 4}, placement=(0, 0, 1, 1)))


@pytest.mark.parametrize("placement", ["interleave", "stack"])
def test_resnet_grows_in_depth_with_zeroed_last_batchnorm(placement):
    model, gm = _resnet()
    big = lemon_fx.grow(gm, Plan(depth={"layer1": 4, "layer2": 3}, placement=placement))
    assert [(s.name, s.count) for s in lemon_fx.inspect(big).stacks] == [("layer1", 4),
                                                                         ("layer2", 3)]
    for b in lemon_fx.growth_report(big).new_blocks:
        bn2 = big.get_submodule(f"{b.name}.bn2")
        assert torch.equal(bn2.weight, torch.zeros_like(bn2.weight))
        assert torch.equal(bn2.bias, torch.zeros_like(bn2.bias))
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(big(x), model(x), rtol=0, atol=1e-12)
    bigger = _ResNet(layers=(4, 3)).double()
    bigger.load_state_dict(big.state_dict(), strict=True)


# --- how a block joins its branch to the stream: only stream + branch grows in depth


class _Joined(nn.Module):
    """``blocks`` of ``join(block, x)`` between an input and a head Linear."""

    def __init__(self, join, depth: int = 2, dim: int = 8):
        super().__init__()
        self.inp = nn.Linear(4, dim)
        self.blocks = nn.ModuleList(_JoinedBlock(join, dim) for _ in range(depth))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class _JoinedBlock(nn.Module):
    def __init__(self, join, dim: int):
        super().__init__()
        self.join = join
        self.norm, self.fc = nn.LayerNorm(dim), nn.Linear(dim, dim)

    def branch(self, x):
        return self.fc(self.norm(x))

    def forward(self, x):
        return self.join(self, x)


def _joined(join, frontend: str = "fx"):
    torch.manual_seed(0)
    model = _Joined(join).double().eval()
    example = torch.randn(2, 5, 4, dtype=torch.float64)
    return model, lemon_fx.trace(model, (example,), frontend=frontend)


def _first(out):
    return out[0] if isinstance(out, tuple) else out  # an export graph returns a tuple


# alpha scales the second operand: torch.add(a, b, alpha=s) = a + s * b
_STREAM_FIRST = {
    "torch.add(x, f, alpha)": lambda s, x: torch.add(x, s.branch(x), alpha=0.5),
    "x.add(f, alpha)": lambda s, x: x.add(s.branch(x), alpha=0.5),
    "torch.add(x, other=f, alpha)": lambda s, x: torch.add(x, other=s.branch(x), alpha=0.5),
    "torch.add(input=x, other=f)": lambda s, x: torch.add(input=x, other=s.branch(x)),
    "torch.add(f, x, alpha=1)": lambda s, x: torch.add(s.branch(x), x, alpha=1),
}
_STREAM_SCALED = {
    "torch.add(f, x, alpha)": lambda s, x: torch.add(s.branch(x), x, alpha=0.5),
    "f.add(x, alpha)": lambda s, x: s.branch(x).add(x, alpha=0.5),
    "torch.add(f, other=x, alpha)": lambda s, x: torch.add(s.branch(x), other=x, alpha=0.5),
}


@pytest.mark.parametrize("placement", ["interleave", "stack"])
@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("form", sorted(_STREAM_FIRST))
def test_an_add_whose_alpha_scales_only_the_branch_grows_exactly(form, frontend, placement):
    model, gm = _joined(_STREAM_FIRST[form], frontend)
    big = lemon_fx.grow(gm, Plan(depth=2.0, placement=placement))
    assert _stack(big).count == 4
    fresh = torch.randn(3, 7, 4, dtype=torch.float64)
    want = model(fresh)
    torch.testing.assert_close(_first(big(fresh)), want, rtol=0,
                               atol=1e-10 * (1 + want.abs().max().item()))


@pytest.mark.parametrize("placement", ["interleave", "stack"])
@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("form", sorted(_STREAM_SCALED))
def test_an_add_whose_alpha_scales_the_stream_is_refused(form, frontend, placement):
    """``f + 0.5 * x``: a new block with a zero branch would compute 0.5 * x, not x."""
    model, gm = _joined(_STREAM_SCALED[form], frontend)
    with pytest.raises(UnsupportedOpError) as info:
        lemon_fx.grow(gm, Plan(depth=2.0, placement=placement))
    (problem,) = info.value.problems
    add = next(n for n in gm.graph.nodes if "add" in str(n.target) and n.kwargs.get("alpha"))
    assert problem.node == add.name
    assert "add" in problem.op
    assert f"'{add.name}' adds the stream as its second operand with alpha=0.5" in \
        problem.reason
    assert "residual stream is scaled by alpha" in problem.reason
    assert "torch.add(x, f(x), alpha=...)" in problem.fix
    assert "stack 'blocks' cannot grow in depth" in str(info.value)


# blocks whose branch ends in a Linear but is joined to the stream in another way
_NOT_STREAM_PLUS_BRANCH = {
    "x - f": (lambda s, x: x - s.branch(x), "sub"),
    "0.7 * x + f": (lambda s, x: 0.7 * x + s.branch(x), "add"),
    "(x + f) * 0.5": (lambda s, x: (x + s.branch(x)) * 0.5, "mul"),
    "x + x + f": (lambda s, x: x + x + s.branch(x), "add"),
}


@pytest.mark.parametrize("depth", [2.0, {"blocks": 3}])
@pytest.mark.parametrize("placement", ["interleave", "stack"])
@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("form", sorted(_NOT_STREAM_PLUS_BRANCH))
def test_a_block_that_is_not_stream_plus_branch_is_refused_for_every_placement(
        form, frontend, placement, depth):
    """"stack" used to divide by the count of copyable blocks (none here) before refusing."""
    join, node = _NOT_STREAM_PLUS_BRANCH[form]
    model, gm = _joined(join, frontend)
    with pytest.raises(UnsupportedOpError) as info:
        lemon_fx.grow(gm, Plan(depth=depth, placement=placement))
    (problem,) = info.value.problems
    assert problem.node.startswith(node)
    assert f"block blocks.0: '{problem.node}'" in problem.reason
    assert "stack 'blocks' cannot grow in depth" in problem.reason
    # the branch does end in a Linear: the fix is about how it joins the stream
    assert problem.fix.startswith("keep its depth, or write the block as x + f(x)")
    assert "restructure" not in problem.fix


def test_a_branch_without_a_last_weighted_layer_keeps_its_fix():
    model, gm = _joined(lambda s, x: x + torch.tanh(s.branch(x)))
    with pytest.raises(UnsupportedOpError) as info:
        lemon_fx.grow(gm, Plan(depth=2.0, placement="stack"))
    (problem,) = info.value.problems
    assert problem.node == "tanh"
    assert "does not end in a layer with weights" in problem.reason
    assert problem.fix.startswith("keep its depth, or restructure the block so every "
                                  "residual branch ends in a Linear/Conv layer; ")


def test_a_constant_divided_by_the_branch_is_not_a_branch_that_writes_zero():
    """``x + 2 / f(x)``: a new block's zeroed branch would divide by zero (it grew with
    NaN outputs); ``x + f(x) / 2`` scales a zero and stays exact."""
    model, gm = _joined(lambda s, x: x + 2.0 / s.branch(x))
    with pytest.raises(UnsupportedOpError) as info:
        lemon_fx.grow(gm, Plan(depth=2.0))
    assert info.value.problems[0].node == "truediv"
    model, gm = _joined(lambda s, x: x + s.branch(x) / 2.0)
    big = lemon_fx.grow(gm, Plan(depth=2.0))
    x = torch.randn(3, 7, 4, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(_first(big(x)), want, rtol=0,
                                   atol=1e-10 * (1 + want.abs().max().item()))


@pytest.mark.parametrize("order", [lemon_fx.resolution.depth.interleave_order,
                                   lemon_fx.resolution.depth.stack_order])
def test_orders_with_no_copyable_block_are_refused(order):
    assert order(2, 2, []) == [0, 1]
    with pytest.raises(PlanError, match="none may be copied"):
        order(2, 4, [])


def _add_in_place(stream_first: bool):
    def join(s, x):
        branch, stream = s.branch(x), x.clone()
        if stream_first:
            return stream.add_(branch, alpha=0.5)
        return branch.add_(stream, alpha=0.5)
    return join


def test_an_in_place_aten_add_with_alpha_is_judged_by_its_operand_order():
    """torch.export keeps ``t.add_(u, alpha=a)`` as aten.add_.Tensor: ``t + a * u``."""
    model, gm = _joined(_add_in_place(stream_first=True), "export")
    assert any(n.target is torch.ops.aten.add_.Tensor for n in gm.graph.nodes)
    big = lemon_fx.grow(gm, Plan(depth=2.0))
    fresh = torch.randn(3, 7, 4, dtype=torch.float64)
    want = model(fresh)
    torch.testing.assert_close(_first(big(fresh)), want, rtol=0,
                               atol=1e-10 * (1 + want.abs().max().item()))
    model, gm = _joined(_add_in_place(stream_first=False), "export")
    with pytest.raises(UnsupportedOpError, match="residual stream is scaled by alpha") as info:
        lemon_fx.grow(gm, Plan(depth=2.0, placement="stack"))
    assert info.value.problems[0].op == "aten.add_.Tensor"


class _Stage(nn.Module):
    """A stage of residual blocks; the stage itself is no residual block (ConvNeXt, RegNet)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(_PreLNBlockForStages() for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return torch.tanh(x)


class _PreLNBlockForStages(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x):
        return x + self.fc(self.ln(x))


class _Staged(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(4, 8), nn.Linear(8, 3)
        self.stages = nn.ModuleList(_Stage() for _ in range(2))

    def forward(self, x):
        x = self.inp(x)
        for stage in self.stages:
            x = stage(x)
        return self.out(x)


def test_a_bare_depth_grows_the_stacks_inside_an_outer_stack_that_cannot_grow():
    # the outer stack of stages is a container (each stage changes the stream): a bare
    # depth grows the block stacks inside it, as the mapping naming them does
    torch.manual_seed(0)
    model = _Staged().double().eval()
    gm = lemon_fx.trace(model, (torch.randn(2, 5, 4, dtype=torch.float64),))
    bare = lemon_fx.grow(gm, Plan(depth=2.0))
    named = lemon_fx.grow(gm, Plan(depth={"stages.0.layers": 4, "stages.1.layers": 4}))
    assert bare.state_dict().keys() == named.state_dict().keys()
    assert all(torch.equal(bare.state_dict()[k], v) for k, v in named.state_dict().items())
    x = torch.randn(3, 7, 4, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(bare(x), want, rtol=0, atol=1e-10 * (1 + want.abs().max()))


class _ResidualStage(_Stage):
    """A stage that is itself a residual block: x + proj(its inner stack on x)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        h = x
        for layer in self.layers:
            h = layer(h)
        return x + self.proj(h)


def test_growing_nested_stacks_in_one_plan_is_refused_and_each_level_grows():
    """Both levels at once built a model that differed by 0.45 (grow's guard caught it as
    a bug); each level alone is exact, and the message says so. A bare depth grows the
    inner level (each stage's block count, as a family's depth multiplier does)."""
    torch.manual_seed(0)
    model = _Staged()
    model.stages = nn.ModuleList(_ResidualStage() for _ in range(2))
    model = model.double().eval()
    gm = lemon_fx.trace(model, (torch.randn(2, 5, 4, dtype=torch.float64),))
    with pytest.raises(PlanError, match="are nested, and this plan grows both") as info:
        lemon_fx.grow(gm, Plan(depth={"stages": 3, "stages.0.layers": 3}))
    assert "grow one level per plan" in info.value.problems[0].fix
    bare = lemon_fx.grow(gm, Plan(depth=2.0))
    assert {s.name: s.count for s in lemon_fx.inspect(bare).stacks} == {
        "stages": 2, "stages.0.layers": 4, "stages.1.layers": 4}
    x = torch.randn(3, 7, 4, dtype=torch.float64)
    for depth in ({"stages": 3}, {"stages.0.layers": 3, "stages.1.layers": 4}):
        big = lemon_fx.grow(gm, Plan(depth=depth))
        with torch.no_grad():
            want = model(x)
            torch.testing.assert_close(big(x), want, rtol=0,
                                       atol=1e-10 * (1 + want.abs().max()))

"""Parameters reached twice: a module called at two sites, and tied weights."""

import pytest
import torch
from torch import nn

import lemon_fx


class _TwiceCalled(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.shared = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = self.inp(x)
        h = h + torch.relu(self.shared(h))
        h = h + torch.relu(self.shared(h))
        return self.out(h)


class _TiedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.fc(self.ln(h))
        return self.head(h)


@pytest.mark.parametrize("width", [2.0, 1.5])
def test_a_module_called_twice_grows_once_and_stays_lossless(width):
    torch.manual_seed(0)
    net = _TwiceCalled().double()
    gm = lemon_fx.trace(net, (torch.randn(3, 4, dtype=torch.float64),))
    big = lemon_fx.grow(gm, lemon_fx.Plan(width=width))
    assert big.shared.weight.shape == (int(8 * width), int(8 * width))
    x = torch.randn(6, 4, dtype=torch.float64)
    torch.testing.assert_close(big(x), net(x), rtol=0, atol=1e-12)


class _TiedWithFinalNorm(_TiedHead):
    def __init__(self):
        super().__init__()
        self.ln_f = nn.LayerNorm(8)
        with torch.no_grad():
            self.ln_f.weight.uniform_(0.5, 1.5)
            self.ln_f.bias.normal_()

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.fc(self.ln(h))
        return self.head(self.ln_f(h))


@pytest.mark.parametrize("width", [2.0, 3.0, 1.5, 2.5])
def test_a_tied_lm_head_grows_with_lemons_1_over_k_rule(width):
    torch.manual_seed(0)
    net = _TiedWithFinalNorm().double()
    gm = lemon_fx.trace(net, (torch.randint(0, 20, (2, 5)),))
    big = lemon_fx.grow(gm, lemon_fx.Plan(width=width))
    assert big.head.weight is big.emb.weight
    k = int(8 * width) // 8
    eta = (k * 8 / int(8 * width)) ** 0.5
    torch.testing.assert_close(big.ln_f.bias[:8], net.ln_f.bias / k, rtol=0, atol=1e-15)
    torch.testing.assert_close(big.ln_f.weight[:8], eta * net.ln_f.weight / k, rtol=0,
                               atol=1e-15)
    ids = torch.randint(0, 20, (3, 7))
    torch.testing.assert_close(big(ids), net(ids), rtol=0, atol=1e-12)


def test_a_tied_lm_head_without_a_final_norm_is_refused_with_both_users_named():
    gm = lemon_fx.trace(_TiedHead().double(), (torch.randint(0, 20, (2, 5)),))
    with pytest.raises(lemon_fx.NotLosslessError) as info:
        lemon_fx.grow(gm, lemon_fx.Plan(width=2.0))
    problem = info.value.problems[0]
    assert problem.node == "emb, head"
    assert "'emb.weight' is shared" in problem.reason
    assert "untie" in problem.fix


def test_tied_weights_that_grow_the_same_way_stay_tied():
    class TiedScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.b = nn.Linear(4, 8)
            self.b.weight = self.a.weight
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            return self.out(torch.relu(self.a(x)) * self.b(x))

    torch.manual_seed(0)
    net = TiedScale().double()
    gm = lemon_fx.trace(net, (torch.randn(3, 4, dtype=torch.float64),))
    big = lemon_fx.grow(gm, lemon_fx.Plan(width=1.5))
    assert big.a.weight is big.b.weight
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(big(x), net(x), rtol=0, atol=1e-12)


# A parameter a layer owns, also read as a value somewhere else: the layer lays its grown
# copy out for itself (fan-in split, a norm's eta), so the value reader would see other
# numbers. Each of these grew silently lossy before (errors 1.4, 2.6e-3, 0.24).


class _WeightAndItsTranspose(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.w = nn.Parameter(torch.randn(8, 8))
        self.h = nn.Linear(8, 3)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.h(torch.relu(y @ self.w) @ self.w.t())


class _ScaledByItsHeadsMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.h = nn.Linear(8, 3)

    def forward(self, x):
        return self.h(torch.relu(self.a(x))) * self.h.weight.mean()


class _NormWeightReused(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.ln = nn.LayerNorm(8)
        self.h = nn.Linear(8, 3)

    def forward(self, x):
        return self.h(self.ln(self.a(x)) * self.ln.weight)


def _randomized(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand_like(p) + 0.5)  # LayerNorm's weight is not all ones
    return module.double().eval()


SPLIT_AND_VALUE = "grown differently (expand in the circ form, split in the circ form)"


@pytest.mark.parametrize(("build", "width", "why", "fix"), [
    (_WeightAndItsTranspose, 2.0, "grown differently (expand, split)", "keep this width fixed"),
    (_WeightAndItsTranspose, 1.5, SPLIT_AND_VALUE, "keep this width fixed"),
    (_ScaledByItsHeadsMean, 2.0, "h_weight reads it as a value", "keep this width fixed"),
    (_NormWeightReused, 1.5, "rescaled for its norm at this width", "whole multiple"),
])
def test_a_layers_parameter_read_as_a_value_is_refused(build, width, why, fix):
    gm = lemon_fx.trace(_randomized(build()), (torch.randn(2, 5, 4, dtype=torch.float64),))
    with pytest.raises(lemon_fx.NotLosslessError) as info:
        lemon_fx.grow(gm, lemon_fx.Plan(width=width))
    (problem,) = info.value.problems
    assert why in problem.reason and "as a value" in problem.reason
    assert fix in problem.fix


def test_a_norm_weight_read_as_a_value_grows_by_whole_multiples():
    """At 2x LEMON's eta is 1 and there are no extra entries: the value is the tiling."""
    net = _randomized(_NormWeightReused())
    gm = lemon_fx.trace(net, (torch.randn(2, 5, 4, dtype=torch.float64),))
    big = lemon_fx.grow(gm, lemon_fx.Plan(width=2.0))
    x = torch.randn(3, 7, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(big(x), net(x), rtol=0, atol=1e-12)


@pytest.mark.usefixtures("unguarded")
@pytest.mark.parametrize("width", [2.0, 3.0])
def test_a_layer_shared_by_every_block_grows_at_whole_multiples_in_any_form(width):
    """ALBERT runs one layer's weights in every block, where the axes sit in different
    LEMON forms (zero after a norm, circ elsewhere): at whole multiples every form is the
    same tiling, so the shared weight grows once. At 1.5x the forms differ: refused."""
    transformers = pytest.importorskip("transformers")
    from real_zoo import trained

    config = transformers.AlbertConfig(
        vocab_size=64, embedding_size=16, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    model = trained(transformers.AlbertForMaskedLM(config))
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    gm = lemon_fx.trace(model, (ids,))
    big = lemon_fx.grow(gm, lemon_fx.Plan(width=width))
    fresh = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(fresh).logits
        torch.testing.assert_close(big(fresh)[0], want, rtol=0,
                                   atol=1e-10 * (1 + want.abs().max()))

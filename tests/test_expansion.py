"""LEMON's expansion maps: W' E_in = E_out W, exactly, in every form and layout."""

import pytest
import torch

from lemon_fx.axes.expansion import LeafGrowth, embed, gather, split_equal, split_lemon

FORMS = ["circ", "avg", "zero"]
SIZES = [(4, 4), (4, 8), (4, 6), (4, 11), (3, 7), (5, 15)]


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("source,target", SIZES)
def test_lemon_split_inverts_expansion(form, source, target):
    g = LeafGrowth(source, target, form)
    x, w = _rand(source, 9, seed=1), _rand(5, source, seed=2)
    noise = _rand(5, target, seed=3)
    grown = split_lemon(w, 1, g, noise)
    torch.testing.assert_close(grown @ embed(x, 0, g), w @ x, rtol=0, atol=1e-12)
    torch.testing.assert_close(split_equal(w, 1, g) @ embed(x, 0, g), w @ x, rtol=0,
                               atol=1e-12)


@pytest.mark.parametrize("source,target", SIZES)
def test_forms_have_their_documented_entries(source, target):
    x = _rand(source)
    k, r = target // source, target % source
    circ = embed(x, 0, LeafGrowth(source, target, "circ"))
    avg = embed(x, 0, LeafGrowth(source, target, "avg"))
    zero = embed(x, 0, LeafGrowth(source, target, "zero"))
    assert torch.equal(circ, x[torch.arange(target) % source])
    assert torch.equal(avg[: k * source], x.repeat(k))
    torch.testing.assert_close(avg[k * source:], x.mean().expand(r), rtol=0, atol=1e-15)
    assert torch.equal(zero[k * source:], torch.zeros(r, dtype=torch.float64))
    # avg keeps the mean; zero scales the mean square by alpha
    g = LeafGrowth(source, target)
    torch.testing.assert_close(avg.mean(), x.mean(), rtol=0, atol=1e-14)
    torch.testing.assert_close((zero**2).mean(), g.alpha * (x**2).mean(), rtol=0, atol=1e-14)


def test_new_units_are_appended_after_the_originals():
    w = _rand(4, 3)
    grown = embed(w, 0, LeafGrowth(4, 6, "circ"))
    assert torch.equal(grown[:4], w)
    assert torch.equal(grown[4:], w[:2])


def test_lemon_split_is_unequal_and_net2net_equal():
    w = _rand(3, 4)
    g = LeafGrowth(4, 8, "circ")
    lemon = split_lemon(w, 1, g, _rand(3, 8, seed=5))
    equal = split_equal(w, 1, g)
    assert torch.equal(equal[:, :4], equal[:, 4:])
    assert not torch.allclose(lemon[:, :4], lemon[:, 4:])
    torch.testing.assert_close(lemon[:, :4] + lemon[:, 4:], w, rtol=0, atol=1e-14)


def test_composite_heads_axis_copies_whole_heads():
    heads, head_dim = 4, 3
    g = ("prod", [LeafGrowth(heads, 6, "circ"), LeafGrowth(head_dim, head_dim)])
    w = _rand(heads * head_dim, 5)
    grown = embed(w, 0, g).reshape(6, head_dim, 5)
    source = w.reshape(heads, head_dim, 5)
    assert torch.equal(grown[:4], source)
    assert torch.equal(grown[4:], source[:2])


def test_concatenated_axis_grows_part_by_part():
    g = ("sum", [LeafGrowth(2, 4, "circ"), LeafGrowth(3, 3)])
    x = torch.arange(5, dtype=torch.float64)
    assert embed(x, 0, g).tolist() == [0, 1, 0, 1, 2, 3, 4]
    w = _rand(2, 5)
    noise = _rand(2, 7, seed=9)
    torch.testing.assert_close(split_lemon(w, 1, g, noise) @ embed(x, 0, g), w @ x, rtol=0,
                               atol=1e-12)


def test_gather_is_the_transpose_of_embed():
    g = LeafGrowth(4, 10, "avg")
    t, x = _rand(3, 10), _rand(4, 2, seed=4)
    torch.testing.assert_close(gather(t, 1, g) @ x, t @ embed(x, 0, g), rtol=0, atol=1e-12)


def test_alpha_and_eta():
    g = LeafGrowth(4, 10)
    assert (g.k, g.r) == (2, 2)
    assert g.alpha == pytest.approx(0.8)
    assert g.eta == pytest.approx(0.8**0.5)

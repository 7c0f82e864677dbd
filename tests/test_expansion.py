"""LEMON's expansion maps: W' E_in = E_out W, exactly, in every form and layout."""

import pytest
import torch

from lemon_fx.axes.expansion import (
    LeafGrowth,
    copy_map,
    embed,
    gather,
    source_size,
    split_equal,
    split_lemon,
    split_lemon_drawn,
    target_size,
)

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


# -- the split that draws only the noise that does not cancel ---------------------------
LAYOUTS = [
    LeafGrowth(6, 8), LeafGrowth(4, 8), LeafGrowth(3, 7), LeafGrowth(5, 5),
    LeafGrowth(6, 8, "avg"), LeafGrowth(6, 8, "zero"), LeafGrowth(3, 7, "avg"),
    ("prod", [LeafGrowth(3, 4), LeafGrowth(2, 2)]),
    ("prod", [LeafGrowth(3, 3), LeafGrowth(2, 5), LeafGrowth(2, 2)]),
    ("sum", [LeafGrowth(2, 3), LeafGrowth(3, 3), LeafGrowth(2, 4)]),
    ("prod", [LeafGrowth(2, 3, "avg"), LeafGrowth(2, 2)]),
    ("prod", [LeafGrowth(40, 40), LeafGrowth(3, 4)]),  # 80 stretches: the index_add_ path
]


def _drawer(seed):
    asked = []

    def fill(view):
        asked.append(list(view.shape))
        view.copy_(_rand(*view.shape, seed=seed + len(asked)))
    return fill, asked


@pytest.mark.parametrize("g", LAYOUTS, ids=str)
def test_drawn_split_inverts_expansion_and_breaks_symmetry(g):
    source, target = source_size(g), target_size(g)
    w, x = _rand(5, source, seed=2), _rand(source, 4, seed=1)
    draw, asked = _drawer(7)
    grown = split_lemon_drawn(w, 1, g, draw)
    assert grown.shape == (5, target)
    torch.testing.assert_close(grown @ embed(x, 0, g), w @ x, rtol=0, atol=1e-12)
    index = copy_map(g)
    if index is None:
        return
    copies = torch.bincount(index, minlength=source)
    single = copies[index] == 1
    # an entry that is its source entry's only copy is that entry, untouched
    assert torch.equal(grown[:, single], w[:, index[single]])
    # noise is asked for exactly the other entries, and makes every copy different
    assert sum(shape[1] for shape in asked) == int((~single).sum())
    assert all(shape[0] == 5 for shape in asked)
    for j in (copies > 1).nonzero().flatten().tolist():
        columns = grown[:, index == j]
        assert not torch.allclose(columns[:, :1].expand_as(columns), columns)


@pytest.mark.parametrize("g", LAYOUTS, ids=str)
def test_copy_map_is_the_expansion_as_an_index(g):
    index = copy_map(g)
    values = 2.0 ** torch.arange(source_size(g), dtype=torch.float64)
    grown = embed(values, 0, g)
    if index is None:  # an avg/zero extra entry (a mean or 0) is no power of two: no copy
        assert not torch.isin(grown, values).all()
    else:
        assert torch.equal(grown, values[index])


def test_drawn_split_with_one_copy_each_draws_nothing():
    draw, asked = _drawer(0)
    w = _rand(3, 4)
    assert torch.equal(split_lemon_drawn(w, 1, LeafGrowth(4, 4), draw), w)
    assert asked == []

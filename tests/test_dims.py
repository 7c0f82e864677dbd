"""DimTable: unification, factorization and concatenation of axes."""

import pytest

from lemon_fx.axes.dims import DimTable, FactorMismatch


def test_unify_merges_classes_and_keeps_fixed_reason():
    t = DimTable()
    a, b = t.new(8), t.new(8)
    t.fix(b, "input")
    t.unify(a, b)
    assert t.find(a) == t.find(b)
    assert t.is_fixed(a) == "input"


def test_unify_refuses_different_sizes():
    t = DimTable()
    with pytest.raises(FactorMismatch):
        t.unify(t.new(4), t.new(8))


def test_head_split_factors_width_into_heads_and_head_dim():
    t = DimTable()
    c, h, d = t.new(64), t.new(4), t.new(16)
    t.factor_as(c, [h, d])
    assert t.leaves(c) == [t.find(h), t.find(d)]
    assert t.tree(c) == ("prod", [t.find(h), t.find(d)])


def test_fused_qkv_and_plain_width_share_leaves_after_refinement():
    t = DimTable()
    qkv, three, c = t.new(192), t.new(3), t.new(64)
    t.factor_as(qkv, [three, c])
    other = t.new(64)
    t.factor_as(other, [t.new(4), t.new(16)])
    t.unify(c, other)
    assert [t.size(x) for x in t.leaves(qkv)] == [3, 4, 16]
    assert t.leaves(qkv)[1:] == t.leaves(other)


def test_common_refinement_of_two_factorizations():
    t = DimTable()
    x, y = t.new(24), t.new(24)
    t.factor_as(x, [t.new(2), t.new(12)])
    t.factor_as(y, [t.new(4), t.new(6)])
    t.unify(x, y)
    assert [t.size(leaf) for leaf in t.leaves(x)] == [2, 2, 6]
    assert t.leaves(x) == t.leaves(y)


def test_factorizations_that_do_not_refine_raise():
    t = DimTable()
    x, y = t.new(12), t.new(12)
    t.factor_as(x, [t.new(3), t.new(4)])
    t.factor_as(y, [t.new(2), t.new(6)])
    with pytest.raises(FactorMismatch):
        t.unify(x, y)


def test_concatenation_refines_by_offsets():
    t = DimTable()
    x, y = t.new(96), t.new(96)
    a, b = t.new(32), t.new(64)
    t.concatenate_as(x, [a, b])
    c, d, e = t.new(32), t.new(32), t.new(32)
    t.concatenate_as(y, [c, d, e])
    t.unify(x, y)
    assert t.find(a) == t.find(c)
    assert t.tree(b) == ("sum", [t.find(d), t.find(e)])


def test_size_one_axes_are_not_leaves():
    t = DimTable()
    c = t.new(8)
    t.factor_as(c, [t.new(1), t.new(8)])
    assert [t.size(x) for x in t.leaves(c)] == [8]


def test_fixed_composite_fixes_its_leaves():
    t = DimTable()
    c, h, d = t.new(64), t.new(4), t.new(16)
    t.factor_as(c, [h, d])
    t.fix(c, "output")
    assert t.is_fixed(h) == "output"
    assert t.is_fixed(d) == "output"


def test_a_concatenation_of_equal_parts_factors_as_a_count_times_the_part():
    # BEiT: cat(q_bias, k_bias, v_bias) viewed as [3, H, Dh]
    t = DimTable()
    q, k, v = t.new(8), t.new(8), t.new(8)
    fused = t.new(24)
    t.concatenate_as(fused, [q, k, v])
    three, heads, head_dim = t.new(3), t.new(2), t.new(4)
    t.factor_as(fused, [three, heads, head_dim])
    assert t.find(q) == t.find(k) == t.find(v)  # one layout for every part
    assert [t.size(leaf) for leaf in t.leaves(fused)] == [3, 2, 4]
    assert t.is_fixed(t.leaves(fused)[0])  # the count of parts never grows
    assert t.leaves(q) == t.leaves(fused)[1:]


def test_a_concatenation_of_unequal_parts_still_cannot_be_factored():
    t = DimTable()
    a, b = t.new(4), t.new(8)
    fused = t.new(12)
    t.concatenate_as(fused, [a, b])
    with pytest.raises(FactorMismatch):
        t.factor_as(fused, [t.new(3), t.new(4)])

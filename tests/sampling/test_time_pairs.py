"""(t, s) pair samplers (flowmap_lit.time_pairs): ordering, each fraction's share and pairs, and the documented
base rates."""

import pytest
import torch

from flowmap_lit.time_pairs import TimePairSampler

N = 200_000


def draw(**kwargs):
    return TimePairSampler(**kwargs)(N, generator=torch.Generator().manual_seed(0))


def test_base_pairs_are_ordered_and_match_the_documented_rates():
    t, s = draw()
    assert ((0 <= s) & (s <= t) & (t <= 1)).all()
    # logit-normal(-0.8, 1): t = the larger of two draws exceeds 7/8 in about 0.6% of pairs
    assert 0.004 < (t > 0.875).float().mean() < 0.008
    t, s = draw(distribution="uniform")  # max / min of two uniforms: P(t > 7/8) = 1 - (7/8)^2
    assert abs((t > 0.875).float().mean() - (1 - 0.875**2)) < 0.005


def test_fractions_give_their_pairs():
    t, s = draw(diagonal_fraction=0.1, zero_fraction=0.2, grid_fraction=0.3, grid_steps=[2], one_fraction=0.15)
    diag, zero, one = (s == t), (s == 0), (t == 1)
    grid = ((t == 1) & (s == 0.5)) | ((t == 0.5) & (s == 0))
    for mask, share in ((diag, 0.1), (zero, 0.2 + 0.3 / 2), (grid, 0.3), (one, 0.15 + 0.3 / 2)):
        assert abs(mask.float().mean() - share) < 0.005
    first = one & ~grid  # the t = 1 pairs: s uniform on [0, 1)
    assert abs(s[first].mean() - 0.5) < 0.01 and abs((s[first] < 0.125).float().mean() - 0.125) < 0.01
    assert ((0 <= s) & (s <= t) & (t <= 1)).all()


def test_unused_options_leave_the_pairs_unchanged():
    base = draw()
    for name in ("one_fraction", "grid_fraction", "zero_fraction", "diagonal_fraction"):
        assert all(torch.equal(a, b) for a, b in zip(base, draw(**{name: 0.0}))), name


@pytest.mark.parametrize("kwargs", [dict(one_fraction=-0.1), dict(grid_fraction=0.6, one_fraction=0.5),
                                    dict(distribution="beta")])
def test_invalid_options_are_refused(kwargs):
    with pytest.raises(ValueError):
        TimePairSampler(**kwargs)

"""Group Normalization: G = 1 is Layer Normalization, G = C is Instance Normalization."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import refnorm
from tests.core.strategies import float_arrays, nonzero_reals
from tests.norms.cases import (
    METHODS,
    U64,
    assert_within,
    per_group,
    reference_stats,
    stat_count,
    x_hat_rounding,
)

GN = next(method for method in METHODS if method.name == "gn")


@st.composite
def grouped_inputs(draw):
    """(x, gamma, beta, dy) with a spatial axis (instance norm needs one), value by value."""
    N, C = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    spatial = tuple(draw(st.lists(st.integers(2, 4), min_size=1, max_size=2)))
    shape = (N, C) + spatial
    x = draw(float_arrays(shape)) + draw(st.floats(5.0, 15.0))
    return (x, draw(arrays(np.float64, (C,), elements=nonzero_reals())),
            draw(float_arrays((C,))), draw(float_arrays(shape)))


def both(forward, backward, x, gamma, beta, dy, **options):
    y, cache = forward(x, gamma, beta, **options)
    return (y, *backward(dy, cache))


@pytest.mark.parametrize(
    ("groups", "forward", "backward"),
    [("one", refnorm.layer_norm_forward, refnorm.layer_norm_backward),
     ("C", refnorm.instance_norm_forward, refnorm.instance_norm_backward)],
)
@given(args=grouped_inputs())
def test_group_norm_limits(groups, forward, backward, args):
    x, gamma, beta, dy = args
    G = 1 if groups == "one" else x.shape[1]
    gn = both(refnorm.group_norm_forward, refnorm.group_norm_backward, x, gamma, beta, dy,
              num_groups=G)
    other = both(forward, backward, x, gamma, beta, dy)
    # The same statistics over the same elements in a different view: the same float64
    # operations, summed perhaps in another order. Each x_hat is then within d of the exact
    # one (x_hat_rounding of the group norm's own groups, large for a nearly constant group),
    # y within |gamma| d; dx is a sum of terms up to T = rstd max|gamma dy| (m + 2), within
    # T (d + m u); dgamma sums dy x_hat, within sum|dy| (2 d + m u sqrt(m)); dbeta sums dy.
    method, options = GN, {"num_groups": G}
    m = stat_count(method, x.shape, options)
    d = x_hat_rounding(method, x, options, 1e-5)
    g = np.abs(gamma).reshape((1, -1) + (1,) * (x.ndim - 2))
    _, var = reference_stats(method, x, options)
    T = per_group(method, np.abs(g * dy), options) * (m + 2) / np.sqrt(var + 1e-5)
    channel_sum = (0,) + tuple(range(2, x.ndim))
    tolerances = [2 * g * d + 4 * U64 * np.abs(other[0]),
                  2 * T * (d + m * U64),
                  (np.abs(dy) * (2 * d + m * U64 * np.sqrt(m))).sum(axis=channel_sum),
                  m * U64 * np.abs(dy).sum(axis=channel_sum)]
    for what, a, b, tol in zip(("y", "dx", "dgamma", "dbeta"), gn, other, tolerances, strict=True):
        assert_within(a, b, tol, what)


def test_groups_are_consecutive_channels():
    # Channels 0, 1 in group 0 and 2, 3 in group 1: shifting channel 2 changes only group 1.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 3))
    y, _ = refnorm.group_norm_forward(x, np.ones(4), np.zeros(4), num_groups=2)
    x2 = x.copy()
    x2[:, 2] += 3.0
    y2, _ = refnorm.group_norm_forward(x2, np.ones(4), np.zeros(4), num_groups=2)
    np.testing.assert_array_equal(y2[:, :2], y[:, :2])
    assert not np.allclose(y2[:, 2:], y[:, 2:])

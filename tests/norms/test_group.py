"""Group Normalization: G = 1 is Layer Normalization, G = C is Instance Normalization."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refnorm


@st.composite
def grouped_inputs(draw):
    N, C = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    spatial = tuple(draw(st.lists(st.integers(2, 4), min_size=1, max_size=2)))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    shape = (N, C) + spatial
    return (5 * rng.standard_normal(shape) + 12, 1 + rng.standard_normal(C),
            rng.standard_normal(C), rng.standard_normal(shape))


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
    # Same statistics taken over the same elements in a different view: a few ulps apart.
    for a, b in zip(gn, other):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * np.abs(b).max())


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

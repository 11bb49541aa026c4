"""The per-channel affine map y = gamma * x_hat + beta and its backward."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from refnorm.core import affine_backward, affine_forward
from refnorm.core.affine import channel_view, non_channel_axes
from refnorm.gradcheck import check_vjp
from tests.core.strategies import float_arrays, shapes


@st.composite
def affine_inputs(draw):
    shape = draw(shapes(min_dims=2))
    C = shape[1]
    return {"x_hat": draw(float_arrays(shape)), "gamma": draw(float_arrays((C,))),
            "beta": draw(float_arrays((C,)))}


@given(affine_inputs())
def test_backward_matches_finite_differences(inputs):
    def vjp(dy, x_hat, gamma, beta):
        dx_hat, dgamma, dbeta = affine_backward(dy, x_hat, gamma)
        return {"x_hat": dx_hat, "gamma": dgamma, "beta": dbeta}

    # y is affine in each single element of each input, so the central difference is exact
    # for any step: a step of 1 leaves only the rounding of L (~1e-16 of the outputs' size).
    errors = check_vjp(affine_forward, vjp, inputs, step=1.0)
    for name, err in errors.items():
        assert err.max_rel_error < 1e-10, (name, err)


def test_channels_are_axis_1():
    x_hat = np.arange(12.0).reshape(2, 3, 2)
    y = affine_forward(x_hat, np.array([1.0, 10.0, 100.0]), np.array([0.0, 0.5, -1.0]))
    np.testing.assert_array_equal(y[1, 1], [10.0 * 8 + 0.5, 10.0 * 9 + 0.5])
    np.testing.assert_array_equal(y[0, 2], [100.0 * 4 - 1.0, 100.0 * 5 - 1.0])


def test_parameter_gradients_sum_over_every_axis_but_channels():
    x_hat = np.arange(12.0).reshape(2, 3, 2)
    dy = np.ones_like(x_hat)
    dx_hat, dgamma, dbeta = affine_backward(dy, x_hat, np.array([2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(dbeta, [4.0, 4.0, 4.0])
    # Channel 0 holds 0, 1 (sample 0) and 6, 7 (sample 1).
    np.testing.assert_array_equal(dgamma, [0 + 1 + 6 + 7, 2 + 3 + 8 + 9, 4 + 5 + 10 + 11])
    np.testing.assert_array_equal(dx_hat[:, 2], 4.0)


def test_channel_view_and_non_channel_axes():
    assert channel_view(np.zeros(5), 4).shape == (1, 5, 1, 1)
    assert channel_view(np.zeros(5), 2).shape == (1, 5)
    assert non_channel_axes(4) == (0, 2, 3)
    assert non_channel_axes(2) == (0,)

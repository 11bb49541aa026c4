"""The shared core: two-pass moments, standardize and its backward, the affine map."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from refnorm.core import affine_backward, affine_forward, moments, standardize, standardize_backward
from refnorm.core.running import update_running_stats
from refnorm.gradcheck import check_vjp

import pytest


@st.composite
def arrays_and_axes(draw):
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=4)))
    axes = tuple(sorted(draw(st.sets(st.integers(0, len(shape) - 1), min_size=1))))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    return 5 * rng.standard_normal(shape) + 12, axes


@given(arrays_and_axes())
def test_moments_match_numpy(case):
    x, axes = case
    mu, var = moments(x, axes)
    np.testing.assert_allclose(mu, x.mean(axis=axes, keepdims=True), rtol=1e-14)
    np.testing.assert_allclose(var, x.var(axis=axes, keepdims=True), rtol=1e-12, atol=1e-12)


@given(arrays_and_axes(), st.sampled_from([1e-5, 0.5]))
def test_standardize_backward_matches_finite_differences(case, eps):
    x, axes = case
    m = int(np.prod([x.shape[a] for a in axes]))
    if m < 3:  # with m <= 2 the gradient is an O(eps) effect (see tests/norms)
        return

    def f(x):
        mu, var = moments(x, axes)
        return standardize(x, mu, var, eps=eps)[0]

    def vjp(dy, x):
        mu, var = moments(x, axes)
        x_hat, rstd = standardize(x, mu, var, eps=eps)
        return {"x": standardize_backward(dy, x_hat, rstd, axes)}

    assert check_vjp(f, vjp, {"x": x})["x"].max_rel_error < 1e-6


def test_affine_backward_matches_finite_differences():
    rng = np.random.default_rng(0)
    inputs = {"x_hat": rng.standard_normal((3, 4, 5)), "gamma": rng.standard_normal(4),
              "beta": rng.standard_normal(4)}

    def vjp(dy, x_hat, gamma, beta):
        dx_hat, dgamma, dbeta = affine_backward(dy, x_hat, gamma)
        return {"x_hat": dx_hat, "gamma": dgamma, "beta": dbeta}

    for name, err in check_vjp(affine_forward, vjp, inputs).items():
        assert err.max_rel_error < 1e-8, name  # linear: exact up to rounding


def test_running_update_leaves_its_arguments_alone():
    rm, rv = np.zeros(2), np.ones(2)
    bm, bv = np.array([1.0, 2.0]), np.array([3.0, 4.0])
    new_mean, new_var = update_running_stats(rm, rv, bm, bv, count=4, momentum=0.5)
    np.testing.assert_allclose(new_mean, [0.5, 1.0])
    np.testing.assert_allclose(new_var, [0.5 + 0.5 * 3 * 4 / 3, 0.5 + 0.5 * 4 * 4 / 3])
    np.testing.assert_array_equal(rm, [0.0, 0.0])
    np.testing.assert_array_equal(rv, [1.0, 1.0])


def test_running_update_needs_two_values():
    with pytest.raises(ValueError, match=r"count must be >= 2 for an unbiased variance; got 1"):
        update_running_stats(np.zeros(1), np.ones(1), np.zeros(1), np.zeros(1), count=1)

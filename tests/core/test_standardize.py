"""standardize and its closed-form backward: finite differences, the two zero sums."""

from __future__ import annotations

import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st

from refnorm.core import moments, reduced_count, standardize, standardize_backward
from refnorm.gradcheck import check_vjp
from tests.core.strategies import arrays_and_axes, float_arrays

U64 = np.finfo(np.float64).eps

# Central differences with h = 1e-6 on values of size ~25: rounding ~1e-9 relative; a wrong
# term in the backward shows at 1e-2 or more. Truncation, h^2 / (var + eps) <= 1e-7 for
# eps >= 1e-5, stays below as well.
FD_TOLERANCE = 1e-6


@given(arrays_and_axes(), st.sampled_from([1e-5, 0.5]))
def test_backward_matches_finite_differences(case, eps):
    x, axes = case
    # With m <= 2 values per statistic x_hat = +-sqrt(var / (var + eps)) whatever x is, and
    # dx is an O(eps) effect below the finite-difference noise (see tests/norms).
    assume(reduced_count(x.shape, axes) >= 3)

    def f(x):
        mu, var = moments(x, axes)
        return standardize(x, mu, var, eps=eps)[0]

    def vjp(dy, x):
        mu, var = moments(x, axes)
        x_hat, rstd = standardize(x, mu, var, eps=eps)
        return {"x": standardize_backward(dy, x_hat, rstd, axes)}

    assert check_vjp(f, vjp, {"x": x})["x"].max_rel_error < FD_TOLERANCE


@given(arrays_and_axes(), st.data())
def test_dx_sums_to_zero_and_follows_x_hat_only_through_eps(case, data):
    # dx = rstd (g - mean(g) - x_hat mean(g x_hat)) sums to rstd * (-sum(x_hat) mean(g x_hat))
    # = 0, and sum(dx x_hat) = rstd mean(g x_hat) (m - sum(x_hat^2)) = rstd sum(g x_hat)
    # eps / (var + eps), from sum(x_hat^2) = m var / (var + eps).
    x, axes = case
    eps = 1e-3
    g = data.draw(float_arrays(x.shape), label="dx_hat")
    mu, var = moments(x, axes)
    x_hat, rstd = standardize(x, mu, var, eps=eps)
    dx = standardize_backward(g, x_hat, rstd, axes)
    m = reduced_count(x.shape, axes)
    # Rounding: x_hat is off by up to d = 2 m u max|x| rstd (the deviations' error, scaled),
    # which leaves sum(x_hat) at m d instead of 0; each dx term is of size rstd max|g|
    # sqrt(m) (|x_hat| <= sqrt(m)) and sums of m of them carry m u of that.
    rstd_max = float(np.max(rstd))
    d = 2 * m * U64 * np.max(np.abs(x)) * rstd_max
    term = rstd_max * max(np.max(np.abs(g)), 1e-300) * np.sqrt(m)
    tol = m * term * (4 * m * U64 + 2 * d)
    np.testing.assert_allclose(dx.sum(axis=axes, keepdims=True), 0.0, atol=tol)
    expected = (g * x_hat).sum(axis=axes, keepdims=True) * rstd * eps / (var + eps)
    np.testing.assert_allclose((dx * x_hat).sum(axis=axes, keepdims=True), expected, atol=tol)


def test_output_is_x_minus_mu_times_rstd_with_eps_inside_the_sqrt():
    x = np.array([[1.0, 3.0, 5.0, 7.0]])            # mean 4, biased variance 5
    mu, var = moments(x, (1,))
    x_hat, rstd = standardize(x, mu, var, eps=4.0)
    np.testing.assert_allclose(rstd, [[1 / 3]], rtol=1e-15)   # 1 / sqrt(5 + 4)
    np.testing.assert_allclose(x_hat, [[-1.0, -1 / 3, 1 / 3, 1.0]], rtol=1e-15)


def test_backward_by_hand_on_three_values():
    # x = (0, 1, 5): mu = 2, var = 14/3; with eps = 1/3, var + eps = 5, rstd = 1/sqrt(5),
    # x_hat = (-2, -1, 3)/sqrt(5). For dx_hat = (1, 0, 0): mean(g) = 1/3,
    # mean(g x_hat) = -2/(3 sqrt(5)); dx = rstd (g - 1/3 + x_hat 2/(3 sqrt(5)))
    # = (1/sqrt(5)) * ((1 - 1/3 - 4/15), (-1/3 - 2/15), (-1/3 + 6/15)) = (6, -7, 1)/(15 sqrt(5)).
    x = np.array([0.0, 1.0, 5.0])
    mu, var = moments(x, (0,))
    x_hat, rstd = standardize(x, mu, var, eps=1 / 3)
    dx = standardize_backward(np.array([1.0, 0.0, 0.0]), x_hat, rstd, (0,))
    np.testing.assert_allclose(dx, np.array([6.0, -7.0, 1.0]) / (15 * np.sqrt(5)), rtol=1e-14)


def test_a_numpy_scalar_eps_keeps_float32():
    # np.float64(1e-5) is not a weak scalar (NEP 50): added as it is, it would promote rstd
    # and x_hat to float64.
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    mu, var = moments(x, (1,))
    x_hat, rstd = standardize(x, mu, var, eps=np.float64(1e-5))
    assert x_hat.dtype == rstd.dtype == np.float32

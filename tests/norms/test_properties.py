"""Properties every activation normalizer must have, over hypothesis-drawn configurations.

Run for bn, in, ln and gn, and over numpy and array_api_strict inputs (the ``xp`` fixture):
finite-difference gradients, normalized outputs, invariance to a positive affine map of each
statistic group, the two zero sums of dx, inputs left untouched, NaN propagation.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from refnorm.backend import to_numpy
from refnorm.gradcheck import check_vjp
from tests.norms.cases import (
    METHODS,
    U64,
    assert_within,
    configs,
    draw_inputs,
    group_sum,
    per_group,
    reference_stats,
    stat_count,
    x_hat_rounding,
)

# Central differences with h = 1e-6 on float64 inputs of size <= 25: rounding errors of ~1e-9
# relative (more where a group is nearly constant and rstd ~ 1/sqrt(eps), still < 1e-7);
# truncation h^2 rstd^2 / 6 < 2e-8 for eps >= 1e-5. A wrong term shows at 1e-2 or more.
FD_TOLERANCE = 1e-6


def run(method, xp, x, gamma, beta, dy, options, eps):
    """Forward and backward in namespace ``xp``; results as numpy arrays."""
    y, cache = method.forward(xp.asarray(x), xp.asarray(gamma), xp.asarray(beta),
                              eps=eps, **options)
    grads = method.backward(xp.asarray(dy), cache)
    return to_numpy(y), tuple(to_numpy(g) for g in grads)


@pytest.mark.parametrize("method", METHODS, ids=repr)
@given(data=st.data())
def test_gradients_match_finite_differences(method, xp, data):
    # Three or more values per statistic: with two, x_hat = +-sqrt(var / (var + eps)) and
    # dx is an O(eps) effect below the finite-difference noise (tested on its own below).
    config = data.draw(configs(method, min_count=3))
    _, options, eps = config
    x, gamma, beta, _ = draw_inputs(data, config)

    def f(x, gamma, beta):
        y, _ = method.forward(xp.asarray(x), xp.asarray(gamma), xp.asarray(beta),
                              eps=eps, **options)
        return y

    def vjp(dy, x, gamma, beta):
        _, cache = method.forward(xp.asarray(x), xp.asarray(gamma), xp.asarray(beta),
                                  eps=eps, **options)
        dx, dgamma, dbeta = method.backward(xp.asarray(dy), cache)
        return {"x": dx, "gamma": dgamma, "beta": dbeta}

    errors = check_vjp(f, vjp, {"x": x, "gamma": gamma, "beta": beta}, seed=1)
    assert set(errors) == {"x", "gamma", "beta"}
    for name, err in errors.items():
        assert err.max_rel_error < FD_TOLERANCE, (name, err)


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_two_values_per_statistic_leave_only_an_eps_gradient(method):
    # Shape (N, C) = (2, 1) for bn, (1, 1, 2) for in, (1, 2) for ln and gn(G=1).
    shape = {"bn": (2, 1), "in": (1, 1, 2), "ln": (1, 2), "gn": (1, 2)}[method.name]
    options = {"num_groups": 1} if method.name == "gn" else {}
    C = shape[1]
    x = np.array([3.0, 8.0]).reshape(shape)
    eps = 1e-5
    dy = np.array([0.3, -1.1]).reshape(shape)
    y, (dx, _, _) = run(method, np, x, np.ones(C), np.zeros(C), dy, options, eps)
    # var = 6.25, so x_hat = -+sqrt(6.25 / (6.25 + eps)) whatever x is ...
    np.testing.assert_allclose(y.ravel(), [-1.0, 1.0], atol=1e-6)
    # ... and dx = (dy_1 - dy_0) * rstd * eps / (2 (var + eps)) * [-1, 1] in closed form.
    var = 6.25
    expected = (-1.1 - 0.3) / np.sqrt(var + eps) * eps / (2 * (var + eps)) * np.array([-1.0, 1.0])
    np.testing.assert_allclose(dx.ravel(), expected, rtol=1e-9)


@pytest.mark.parametrize("method", METHODS, ids=repr)
@given(data=st.data())
def test_output_is_standardized_per_group(method, xp, data):
    config = data.draw(configs(method))
    _, options, eps = config
    x, _, _, _ = draw_inputs(data, config)
    C = x.shape[1]
    y, _ = run(method, xp, x, np.ones(C), np.zeros(C), x, options, eps)
    mu, var = reference_stats(method, y, options)
    _, var_x = reference_stats(method, x, options)
    # Zero mean; variance var/(var + eps), not 1: eps sits inside the square root (both
    # expectations computed independently by numpy). Each y is off by up to d (see
    # x_hat_rounding; large for a nearly constant group), so its group mean by d plus the
    # rounding of a mean of m values of size <= sqrt(m); its variance by 2 max|y| 2d + 4 d^2
    # and numpy's var_x / (var_x + eps) by as much again, plus m u for the sums.
    m = stat_count(method, x.shape, options)
    d = x_hat_rounding(method, x, options, eps)
    assert_within(mu, 0.0, d + 2 * m * np.sqrt(m) * U64, "group mean of y")
    assert_within(var, var_x / (var_x + eps), 8 * (np.sqrt(m) * d + d * d) + 4 * m * U64,
                  "group variance of y")


@pytest.mark.parametrize("method", METHODS, ids=repr)
@given(data=st.data())
def test_invariant_to_positive_affine_map_of_each_group(method, xp, data):
    config = data.draw(configs(method))
    _, options, _ = config
    x, gamma, beta, _ = draw_inputs(data, config)
    view, axes = method.view(x.shape, options)
    stat_shape = tuple(1 if i in axes else n for i, n in enumerate(view))
    log_a = data.draw(arrays(np.float64, stat_shape, elements=st.floats(-1.0, 1.0)), label="log a")
    b = data.draw(arrays(np.float64, stat_shape, elements=st.floats(-50.0, 50.0)), label="b")
    a = np.exp(log_a)                                   # > 0, one per group
    x_mapped = (a * x.reshape(view) + b).reshape(x.shape)
    eps = 1e-12
    y, _ = run(method, xp, x, gamma, beta, x, options, eps)
    y_mapped, _ = run(method, xp, x_mapped, gamma, beta, x, options, eps)
    # The invariance is exact only up to eps. With d = x - mu, x -> a x + b gives
    # x_hat' = a d / sqrt(a^2 var + eps) = r x_hat, r^2 = (var + eps) / (var + eps / a^2), so
    # |x_hat' - x_hat| = |x_hat| |r - 1| <= |x_hat| |r^2 - 1|
    #                 <= sqrt(m - 1) eps |1 - a^-2| / (var + eps a^-2)
    # (|d| <= sqrt((m - 1) var) for the biased variance, so |x_hat| <= sqrt(m - 1)). Tiny where
    # var >> eps; where a group is nearly constant (var ~ eps or below: two values, or a
    # shrunk constant array) the map really does change y, up to |a^2 - 1| sqrt(m - 1).
    # On top of that, each of the two outputs carries its own rounding (x_hat_rounding,
    # for x and for the mapped x), times |gamma|, plus u of the outputs' size.
    m = stat_count(method, x.shape, options)
    _, var = reference_stats(method, x, options)
    a_full = np.broadcast_to(a, view).reshape(x.shape)
    g = np.abs(gamma).reshape((1, -1) + (1,) * (x.ndim - 2))
    exact = np.sqrt(m - 1) * eps * np.abs(1 - a_full**-2) / (var + eps * a_full**-2)
    rounding = (x_hat_rounding(method, x, options, eps)
                + x_hat_rounding(method, x_mapped, options, eps))
    size = g * np.sqrt(m) + np.abs(beta).reshape(g.shape)
    assert_within(y_mapped, y, g * (exact + rounding) + 4 * U64 * size, "y(a x + b) - y(x)")


@pytest.mark.parametrize("method", METHODS, ids=repr)
@given(data=st.data())
def test_dx_sums_to_zero_over_each_group_and_is_orthogonal_to_x_hat_up_to_eps(method, xp, data):
    config = data.draw(configs(method))
    _, options, eps = config
    x, gamma, beta, dy = draw_inputs(data, config)
    y, (dx, _, _) = run(method, xp, x, gamma, beta, dy, options, eps)
    mu, var = reference_stats(method, x, options)
    rstd = 1.0 / np.sqrt(var + eps)
    x_hat = (x - mu) * rstd
    # dx = rstd (g - mean(g) - x_hat mean(g x_hat)) with g = gamma dy sums to
    # -rstd sum(x_hat) mean(g x_hat) = 0. Computed, x_hat is off by up to d (x_hat_rounding),
    # so sum(x_hat) by m d; each of the terms is at most T = rstd max|g| (m + 2) and the
    # sums of m of them round by m u T: |sum(dx)| <= 2 m T (d + m u) per group.
    m = stat_count(method, x.shape, options)
    g = gamma.reshape((1, -1) + (1,) * (x.ndim - 2)) * dy
    T = rstd * per_group(method, np.abs(g), options) * (m + 2)
    d = x_hat_rounding(method, x, options, eps)
    tol = 2 * m * T * (d + m * U64)
    view, axes = method.view(x.shape, options)
    group_tol = tol.reshape(view).max(axis=axes)
    assert_within(group_sum(method, dx, options), 0.0, group_tol, "sum of dx over a group")
    # sum(dx * x_hat) = rstd * sum(g * x_hat) * (1 - sum(x_hat^2) / m), and
    # sum(x_hat^2) = m * var / (var + eps): zero only as eps -> 0. Check the exact value;
    # multiplying by x_hat (<= sqrt(m), itself off by d) scales the tolerance by sqrt(m) + 1.
    expected = group_sum(method, g * x_hat * rstd * eps / (var + eps), options)
    assert_within(group_sum(method, dx * x_hat, options), expected,
                  (np.sqrt(m) + 1) * group_tol, "sum of dx * x_hat over a group")


@pytest.mark.parametrize("method", METHODS, ids=repr)
@given(data=st.data())
def test_inputs_are_not_modified(method, xp, data):
    config = data.draw(configs(method))
    _, options, eps = config
    x, gamma, beta, dy = draw_inputs(data, config)
    args = [xp.asarray(a) for a in (x, gamma, beta, dy)]
    before = [to_numpy(a).copy() for a in args]
    _, cache = method.forward(*args[:3], eps=eps, **options)
    method.backward(args[3], cache)
    for a, b in zip(args, before, strict=True):
        np.testing.assert_array_equal(to_numpy(a), b)


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_array_api_strict_matches_numpy(method):
    strict = pytest.importorskip("array_api_strict")
    rng = np.random.default_rng(7)
    shape = (3, 4, 5, 2)
    options = {"num_groups": 2} if method.name == "gn" else {}
    x = 5.0 * rng.standard_normal(shape) + 12.0
    gamma, beta = rng.standard_normal(4), rng.standard_normal(4)
    dy = rng.standard_normal(shape)
    y_np, grads_np = run(method, np, x, gamma, beta, dy, options, 1e-5)
    y_st, grads_st = run(method, strict, x, gamma, beta, dy, options, 1e-5)
    # The same float64 operations in the same order: equal up to the last bit or two.
    np.testing.assert_allclose(y_st, y_np, rtol=1e-14, atol=1e-14)
    for g_st, g_np in zip(grads_st, grads_np, strict=True):
        np.testing.assert_allclose(g_st, g_np, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_nan_input_poisons_its_group_only(method, xp):
    rng = np.random.default_rng(3)
    shape = (3, 4, 3, 3)
    options = {"num_groups": 2} if method.name == "gn" else {}
    x = 5.0 * rng.standard_normal(shape) + 12.0
    x[1, 2, 0, 1] = np.nan
    poisoned = np.isnan(group_sum(method, x, options))
    view, axes = method.view(shape, options)
    stat_shape = tuple(1 if i in axes else n for i, n in enumerate(view))
    expected_nan = np.broadcast_to(poisoned.reshape(stat_shape), view).reshape(shape)
    y, (dx, dgamma, dbeta) = run(method, xp, x, np.ones(4), np.zeros(4),
                                 rng.standard_normal(shape), options, 1e-5)
    np.testing.assert_array_equal(np.isnan(y), expected_nan)
    np.testing.assert_array_equal(np.isnan(dx), expected_nan)
    assert np.isnan(dgamma).any() and np.isfinite(dbeta).all()


@pytest.mark.parametrize("method", METHODS, ids=repr)
@pytest.mark.parametrize("path", ["reference", "fast"])
@pytest.mark.parametrize("value", [np.inf, -np.inf])
def test_an_infinite_input_poisons_its_group_as_nan_on_both_paths(method, path, value, xp):
    """docs/conventions.md, "Non-finite inputs": a NaN *or an infinity* propagates as NaN into
    the statistics of its group and hence into that group's outputs, never silently zeros
    (an infinite value minus an infinite mean is NaN), and no other group is touched. (The
    fast path takes numpy arrays only; with others it runs the reference.)"""
    rng = np.random.default_rng(5)
    shape = (3, 4, 3, 3)
    options = {"num_groups": 2} if method.name == "gn" else {}
    x = 5.0 * rng.standard_normal(shape) + 12.0
    x[1, 2, 0, 1] = value
    poisoned = ~np.isfinite(group_sum(method, x, options))
    view, axes = method.view(shape, options)
    stat_shape = tuple(1 if i in axes else n for i, n in enumerate(view))
    expected_nan = np.broadcast_to(poisoned.reshape(stat_shape), view).reshape(shape)
    with np.errstate(invalid="ignore"):
        y, _ = method.forward(xp.asarray(x), xp.asarray(np.ones(4)), xp.asarray(np.zeros(4)),
                              eps=1e-5, path=path, **options)
    y = to_numpy(y)
    np.testing.assert_array_equal(np.isnan(y), expected_nan)
    assert np.isfinite(y[~expected_nan]).all()

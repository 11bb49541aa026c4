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

from refnorm.backend import to_numpy
from refnorm.gradcheck import check_vjp
from tests.norms.cases import METHODS, configs, group_sum, reference_stats

# Central differences with h = 1e-6 on float64 inputs of scale ~10 leave rounding errors of
# ~1e-9 relative; a wrong term in a backward shows up at 1e-2 or more.
FD_TOLERANCE = 1e-6


def draw_inputs(data, method, xp_seed_shape):
    """Inputs with a real mean (5 * randn + 12) and parameters away from 1 and 0."""
    shape, options, eps = xp_seed_shape
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    C = shape[1]
    x = 5.0 * rng.standard_normal(shape) + 12.0
    gamma = 1.0 + 0.5 * rng.standard_normal(C)
    beta = 0.5 * rng.standard_normal(C)
    dy = rng.standard_normal(shape)
    return x, gamma, beta, dy, options, eps


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
    x, gamma, beta, _, options, eps = draw_inputs(data, method, config)

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
    y, (dx, _, _) = run(method, np, x, np.ones(C), np.zeros(C), np.array([0.3, -1.1]).reshape(shape),
                        options, eps)
    # var = 6.25, so x_hat = -+sqrt(6.25 / (6.25 + eps)) whatever x is ...
    np.testing.assert_allclose(y.ravel(), [-1.0, 1.0], atol=1e-6)
    # ... and dx = (dy_1 - dy_0) * rstd * eps / (2 (var + eps)) * [-1, 1] in closed form.
    var = 6.25
    expected = (-1.1 - 0.3) / np.sqrt(var + eps) * eps / (2 * (var + eps)) * np.array([-1.0, 1.0])
    np.testing.assert_allclose(dx.ravel(), expected, rtol=1e-9)


@pytest.mark.parametrize("method", METHODS, ids=repr)
@given(data=st.data())
def test_output_is_standardized_per_group(method, xp, data):
    x, _, _, _, options, eps = draw_inputs(data, method, data.draw(configs(method)))
    C = x.shape[1]
    y, _ = run(method, xp, x, np.ones(C), np.zeros(C), x, options, eps)
    mu, var = reference_stats(method, y, options)
    _, var_x = reference_stats(method, x, options)
    # Zero mean up to rounding of values of size ~1; variance var/(var + eps), not 1: eps
    # sits inside the square root. Both computed independently by numpy.
    np.testing.assert_allclose(mu, 0.0, atol=1e-12)
    np.testing.assert_allclose(var, var_x / (var_x + eps), rtol=1e-10)


@pytest.mark.parametrize("method", METHODS, ids=repr)
@given(data=st.data(), log_scale=st.floats(-1.0, 1.0), shift=st.floats(-50.0, 50.0))
def test_invariant_to_positive_affine_map_of_each_group(method, xp, data, log_scale, shift):
    x, gamma, beta, _, options, _ = draw_inputs(data, method, data.draw(configs(method)))
    rng = np.random.default_rng(0)
    view, axes = method.view(x.shape, options)
    stat_shape = tuple(1 if i in axes else n for i, n in enumerate(view))
    a = np.exp(log_scale + 0.1 * rng.standard_normal(stat_shape))  # > 0, one per group
    b = shift + rng.standard_normal(stat_shape)
    x_mapped = (a * x.reshape(view) + b).reshape(x.shape)
    # eps = 1e-12 against variances ~25 * a^2: the map changes y by ~eps / var < 1e-12.
    eps = 1e-12
    y, _ = run(method, xp, x, gamma, beta, x, options, eps)
    y_mapped, _ = run(method, xp, x_mapped, gamma, beta, x, options, eps)
    np.testing.assert_allclose(y_mapped, y, rtol=0, atol=1e-9)


@pytest.mark.parametrize("method", METHODS, ids=repr)
@given(data=st.data())
def test_dx_sums_to_zero_over_each_group_and_is_orthogonal_to_x_hat_up_to_eps(method, xp, data):
    x, gamma, beta, dy, options, eps = draw_inputs(data, method, data.draw(configs(method)))
    y, (dx, _, _) = run(method, xp, x, gamma, beta, dy, options, eps)
    mu, var = reference_stats(method, x, options)
    x_hat = (x - mu) / np.sqrt(var + eps)
    # dx is a difference of terms of size |gamma * dy| * rstd; each sum of m of them
    # carries a rounding error of about m * 1e-16 times that size.
    g = gamma.reshape((1, -1) + (1,) * (x.ndim - 2))
    scale = np.max(np.abs(g * dy) / np.sqrt(var + eps)) * x.size * 1e-14
    np.testing.assert_allclose(group_sum(method, dx, options), 0.0, atol=scale)
    # sum(dx * x_hat) = rstd * sum(dx_hat * x_hat) * (1 - sum(x_hat^2) / m), and
    # sum(x_hat^2) = m * var / (var + eps): zero only as eps -> 0. Check the exact value.
    rstd = 1.0 / np.sqrt(var + eps)
    expected = group_sum(method, g * dy * x_hat * rstd * eps / (var + eps), options)
    np.testing.assert_allclose(group_sum(method, dx * x_hat, options), expected, atol=scale)


@pytest.mark.parametrize("method", METHODS, ids=repr)
@given(data=st.data())
def test_inputs_are_not_modified(method, xp, data):
    x, gamma, beta, dy, options, eps = draw_inputs(data, method, data.draw(configs(method)))
    args = [xp.asarray(a) for a in (x, gamma, beta, dy)]
    before = [to_numpy(a).copy() for a in args]
    _, cache = method.forward(*args[:3], eps=eps, **options)
    method.backward(args[3], cache)
    for a, b in zip(args, before):
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
    for g_st, g_np in zip(grads_st, grads_np):
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

"""The finite-difference checker itself: it must pass right gradients and fail wrong ones."""

from __future__ import annotations

import numpy as np
import pytest

import refnorm
from refnorm.gradcheck import check_layer, check_vjp, numerical_vjp, relative_error


def test_numerical_vjp_of_a_cubic():
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal(7), rng.standard_normal(7)
    numeric = numerical_vjp(lambda x: x**3, {"x": x}, dy, "x")
    # Central differences are exact for cubics up to h^2 * f''' / 6 = 1e-12 and rounding.
    np.testing.assert_allclose(numeric, 3 * x**2 * dy, rtol=1e-7, atol=1e-9)


def test_numerical_vjp_does_not_modify_inputs():
    x = np.arange(4.0)
    numerical_vjp(lambda x: x**2, {"x": x}, np.ones(4), "x")
    np.testing.assert_array_equal(x, np.arange(4.0))


def test_relative_error_definition():
    err = relative_error(np.array([1.0, -2.0]), np.array([1.0, -2.5]))
    assert err.max_abs_error == pytest.approx(0.5)
    assert err.max_rel_error == pytest.approx(0.5 / 2.5)
    assert relative_error(np.zeros(3), np.zeros(3)).max_rel_error == 0.0
    assert relative_error(np.array([np.nan]), np.array([1.0])).max_rel_error == np.inf


def test_a_backward_missing_a_term_is_caught():
    # Drop the mean term of the batch-norm backward: the error must be large, not ~1e-8.
    rng = np.random.default_rng(1)
    x, gamma, beta = 5 * rng.standard_normal((6, 3)) + 12, np.ones(3), np.zeros(3)

    def f(x):
        return refnorm.batch_norm_forward(x, gamma, beta)[0]

    def wrong_vjp(dy, x):
        _, cache = refnorm.batch_norm_forward(x, gamma, beta)
        x_hat, rstd = cache.x_hat, cache.rstd
        return {"x": rstd * (dy - x_hat * np.mean(dy * x_hat, axis=0, keepdims=True))}

    assert check_vjp(f, wrong_vjp, {"x": x})["x"].max_rel_error > 0.05


def test_upstream_gradient_is_not_the_callers_stream():
    # A caller who draws x with default_rng(seed) must not get dy proportional to x.
    x = np.random.default_rng(3).standard_normal(5)
    seen = {}

    def vjp(dy, x):
        seen["dy"] = dy
        return {"x": dy}

    check_vjp(lambda x: x, vjp, {"x": x}, seed=3)
    assert abs(np.corrcoef(seen["dy"], x)[0, 1]) < 0.99


def test_unknown_gradient_name_is_an_error():
    with pytest.raises(ValueError, match=r"unknown inputs: \['y'\]"):
        check_vjp(lambda x: x, lambda dy, x: {"y": dy}, {"x": np.ones(2)})


def test_check_layer_leaves_the_layer_untouched():
    layer = refnorm.build("bn", 2)  # float32 parameters: the check itself runs in float64
    x = np.random.default_rng(2).standard_normal((5, 2)).astype(np.float32)
    errors = check_layer(layer, x, training=True)
    assert set(errors) == {"x", "gamma", "beta"}
    assert max(e.max_rel_error for e in errors.values()) < 1e-6
    assert layer.params["gamma"].dtype == np.float32
    np.testing.assert_array_equal(layer.state["running_mean"], np.zeros(2))

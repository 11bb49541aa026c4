"""Batch Normalization: staged backward, inference, running statistics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refnorm
from refnorm.core.running import update_running_stats
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

BN = next(method for method in METHODS if method.name == "bn")


def inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    C = shape[1]
    return (5 * rng.standard_normal(shape) + 12, 1 + 0.5 * rng.standard_normal(C),
            0.5 * rng.standard_normal(C), rng.standard_normal(shape))


@given(data=st.data())
def test_staged_backward_equals_closed_form(data):
    config = data.draw(configs(BN))
    shape, _, eps = config
    x, gamma, beta, dy = draw_inputs(data, config)
    y, cache = refnorm.batch_norm_forward(x, gamma, beta, eps=eps)
    y_graph, graph_cache = refnorm.batch_norm_forward_graph(x, gamma, beta, eps=eps)
    # Two orderings of the same float64 arithmetic: each x_hat is off by at most d
    # (x_hat_rounding: large where a channel is nearly constant), y by |gamma| d.
    m = stat_count(BN, shape, {})
    d = x_hat_rounding(BN, x, {}, eps)
    g = gamma.reshape((1, -1) + (1,) * (x.ndim - 2))
    assert_within(y_graph, y, 2 * np.abs(g) * d + 4 * U64 * np.abs(y), "staged y")
    dx_s, dgamma_s, dbeta_s = refnorm.batch_norm_backward_graph(dy, graph_cache)
    dx, dgamma, dbeta = refnorm.batch_norm_backward(dy, cache)
    # dx is a sum of terms of size up to T = rstd max|gamma dy| (m + 2) that may cancel (to
    # O(eps) when m = 2): both orderings are within m u T of the exact sum, and their x_hat
    # within d of it, each entering with a factor up to T.
    _, var = reference_stats(BN, x, {})
    T = per_group(BN, np.abs(g * dy), {}) * (m + 2) / np.sqrt(var + eps)
    assert_within(dx_s, dx, 2 * T * (m * U64 + d), "staged dx")
    # dgamma = sum(dy x_hat) over m values: m times the x_hat error plus m u of the sum.
    dgamma_tol = group_sum(BN, np.abs(dy) * (2 * d + m * U64 * np.sqrt(m)), {})
    assert_within(dgamma_s, dgamma, dgamma_tol, "staged dgamma")
    np.testing.assert_array_equal(dbeta_s, dbeta)  # the same sum of dy in both


def test_staged_backward_matches_finite_differences():
    x, gamma, beta, _ = inputs((4, 3, 2, 2))

    def f(x, gamma, beta):
        return refnorm.batch_norm_forward_graph(x, gamma, beta)[0]

    def vjp(dy, x, gamma, beta):
        _, cache = refnorm.batch_norm_forward_graph(x, gamma, beta)
        dx, dgamma, dbeta = refnorm.batch_norm_backward_graph(dy, cache)
        return {"x": dx, "gamma": dgamma, "beta": dbeta}

    for name, err in check_vjp(f, vjp, {"x": x, "gamma": gamma, "beta": beta}).items():
        assert err.max_rel_error < 1e-6, (name, err)


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_eval_forward_uses_the_running_statistics(path):
    x, gamma, beta, _ = inputs((5, 3, 4))
    mean, var = np.array([11.0, 12.0, 13.0]), np.array([20.0, 25.0, 30.0])
    y, _ = refnorm.batch_norm_eval_forward(x, gamma, beta, mean, var, eps=1e-3, path=path)
    c = (slice(None), None)  # (C,) -> (C, 1) broadcast over the last axis
    expected = gamma[c] * (x - mean[c]) / np.sqrt(var[c] + 1e-3) + beta[c]
    np.testing.assert_allclose(y, expected, rtol=1e-13)


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_eval_backward_is_the_frozen_affine_map(path):
    x, gamma, beta, dy = inputs((5, 3, 4))
    mean, var = np.array([11.0, 12.0, 13.0]), np.array([20.0, 25.0, 30.0])
    _, cache = refnorm.batch_norm_eval_forward(x, gamma, beta, mean, var, path=path)
    dx, dgamma, dbeta = refnorm.batch_norm_backward(dy, cache, path=path)
    c = (slice(None), None)
    np.testing.assert_allclose(dx, dy * gamma[c] / np.sqrt(var[c] + 1e-5), rtol=1e-13)

    def f(x, gamma, beta):
        return refnorm.batch_norm_eval_forward(x, gamma, beta, mean, var, path=path)[0]

    def vjp(dy, x, gamma, beta):
        _, cache = refnorm.batch_norm_eval_forward(x, gamma, beta, mean, var, path=path)
        dx, dgamma, dbeta = refnorm.batch_norm_backward(dy, cache, path=path)
        return {"x": dx, "gamma": dgamma, "beta": dbeta}

    for name, err in check_vjp(f, vjp, {"x": x, "gamma": gamma, "beta": beta}).items():
        assert err.max_rel_error < 1e-6, (name, err)


def test_running_update_follows_pytorchs_convention():
    rng = np.random.default_rng(4)
    x = 3 * rng.standard_normal((6, 2, 5)) + 7
    running_mean, running_var = np.array([1.0, 2.0]), np.array([3.0, 4.0])
    _, cache = refnorm.batch_norm_forward(x, np.ones(2), np.zeros(2))
    new_mean, new_var = update_running_stats(
        running_mean, running_var, cache.mean.reshape(2), cache.var.reshape(2),
        count=30, momentum=0.1)
    # Independently: numpy's per-channel mean and unbiased (ddof=1) variance over N and L.
    batch_mean = x.mean(axis=(0, 2))
    batch_var = x.transpose(1, 0, 2).reshape(2, -1).var(axis=1, ddof=1)
    np.testing.assert_allclose(new_mean, 0.9 * running_mean + 0.1 * batch_mean, rtol=1e-14)
    np.testing.assert_allclose(new_var, 0.9 * running_var + 0.1 * batch_var, rtol=1e-14)
    np.testing.assert_array_equal(running_mean, [1.0, 2.0])  # not modified


def test_layer_updates_state_in_training_only():
    layer = refnorm.build("bn", 3, momentum=0.25, dtype=np.float64)
    x, _, _, _ = inputs((8, 3, 4, 4))
    y_eval_before = layer.forward(x, training=False)
    np.testing.assert_array_equal(layer.state["running_mean"], np.zeros(3))
    np.testing.assert_allclose(y_eval_before, x / np.sqrt(1 + 1e-5))  # running stats 0, 1
    layer.forward(x, training=True)
    batch_mean = x.mean(axis=(0, 2, 3))
    batch_var = x.transpose(1, 0, 2, 3).reshape(3, -1).var(axis=1, ddof=1)
    np.testing.assert_allclose(layer.state["running_mean"], 0.25 * batch_mean, rtol=1e-14)
    np.testing.assert_allclose(layer.state["running_var"], 0.75 + 0.25 * batch_var, rtol=1e-14)


def test_running_statistics_converge_to_the_population():
    rng = np.random.default_rng(5)
    layer = refnorm.build("bn", 2, dtype=np.float64)
    true_mean, true_std = np.array([3.0, -2.0]), np.array([2.0, 0.5])
    for _ in range(200):
        x = true_mean[None, :, None] + true_std[None, :, None] * rng.standard_normal((16, 2, 8))
        layer.forward(x, training=True)
    # An EMA with momentum 0.1 averages ~19 batches of 128 values: std error of the mean
    # ~ std / sqrt(19 * 128) ~ 0.02 std; of the variance ~ var * sqrt(2 / 2400) ~ 0.03 var.
    assert np.all(np.abs(layer.state["running_mean"] - true_mean) < 0.1 * true_std)
    np.testing.assert_allclose(layer.state["running_var"], true_std**2, rtol=0.15)


def test_eval_output_of_a_sample_does_not_depend_on_the_batch():
    layer = refnorm.build("bn", 3, dtype=np.float64)
    x, _, _, _ = inputs((6, 3, 2, 2))
    layer.forward(x, training=True)
    alone = layer.forward(x[:1], training=False)
    in_batch = layer.forward(x, training=False)[:1]
    np.testing.assert_array_equal(alone, in_batch)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(layer.forward(x[:2], training=True)[:1],
                                   layer.forward(x, training=True)[:1])


def test_forward_is_the_printed_formula():
    # Luo et al. (journal version) Eq. (1)-(2) with I_bn = (n, i, j); Gitman & Ginsburg's
    # display formulas (1)-(2): numpy's mean and biased variance over (N, H, W), per channel.
    x, gamma, beta, _ = inputs((4, 3, 5, 5), seed=11)
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    expected = gamma.reshape(1, 3, 1, 1) * (x - mean) / np.sqrt(var + 1e-5) \
        + beta.reshape(1, 3, 1, 1)
    y, cache = refnorm.batch_norm_forward(x, gamma, beta, eps=1e-5)
    # Two summation orders of 100 values of size ~12 (var ~25): the outputs, of size ~3,
    # agree to a few hundred float64 roundings.
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(cache.mean, mean, rtol=1e-14)
    np.testing.assert_allclose(cache.var, var, rtol=1e-13)


@pytest.mark.parametrize(("x_dtype", "param_dtype"), [(np.float16, np.float32),
                                                      (np.float32, np.float64),
                                                      (np.float64, np.float32)])
def test_staged_backward_returns_the_dtypes_of_x_and_gamma(x_dtype, param_dtype):
    # As the closed-form backward: dx in the dtype of x, dgamma and dbeta in that of gamma.
    rng = np.random.default_rng(3)
    x = (5 * rng.standard_normal((4, 3, 2, 2)) + 12).astype(x_dtype)
    dy = rng.standard_normal(x.shape).astype(x_dtype)
    gamma, beta = np.ones(3, param_dtype), np.zeros(3, param_dtype)
    _, cache = refnorm.batch_norm_forward_graph(x, gamma, beta)
    dx, dgamma, dbeta = refnorm.batch_norm_backward_graph(dy, cache)
    assert dx.dtype == x_dtype
    assert dgamma.dtype == dbeta.dtype == param_dtype


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_eval_backward_returns_the_dtypes_of_x_and_gamma(path):
    # float32 x with float64 gamma (a float64 layer fed float32 data): dx is float32,
    # dgamma and dbeta float64, as in training.
    x, gamma, beta, dy = inputs((5, 3, 4))
    mean, var = np.array([11.0, 12.0, 13.0]), np.array([20.0, 25.0, 30.0])
    _, cache = refnorm.batch_norm_eval_forward(x.astype(np.float32), gamma, beta, mean, var,
                                               path=path)
    dx, dgamma, dbeta = refnorm.batch_norm_backward(dy.astype(np.float32), cache, path=path)
    assert (dx.dtype, dgamma.dtype, dbeta.dtype) == (np.float32, np.float64, np.float64)


@pytest.mark.parametrize("x_dtype", [np.float16, np.float32])
def test_staged_forward_computes_in_float32_for_float16_and_float32_inputs(x_dtype):
    # Every node of the graph is in the compute dtype, as batch_norm_forward's x_hat is: a
    # float32 input is not silently promoted to float64 by the float64 sum of the mean.
    x, gamma, beta, _ = inputs((4, 3, 5))
    _, cache = refnorm.batch_norm_forward_graph(x.astype(x_dtype), gamma.astype(np.float32),
                                                beta.astype(np.float32))
    for node in (cache.xmu, cache.std, cache.inv_std, cache.x_hat):
        assert node.dtype == np.float32


def test_staged_forward_refuses_a_variance_that_overflows_float32():
    # Squares ~1e40 exceed float32's 3.4e38: without the check every output would be beta.
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, 4, 3, 3)) * 1e20).astype(np.float32)
    g, b = np.ones(4, np.float32), np.full(4, 0.5, np.float32)
    with pytest.raises(ValueError, match=r"the variance of x overflows float32"):
        refnorm.batch_norm_forward_graph(x, g, b)


@pytest.mark.parametrize("momentum", [np.float64(0.1), np.float32(0.1)])
def test_a_numpy_momentum_keeps_the_layers_state_dtype(momentum):
    layer = refnorm.BatchNorm(3, momentum=momentum)      # float32 parameters and state
    x, _, _, _ = inputs((4, 3, 5))
    layer.forward(x.astype(np.float32), training=True)
    assert {v.dtype for v in layer.state.values()} == {np.dtype(np.float32)}


def test_staged_forward_takes_a_numpy_scalar_eps_in_the_compute_dtype():
    x, gamma, beta, _ = inputs((4, 3, 5))
    f32 = [a.astype(np.float32) for a in (x, gamma, beta)]
    _, cache = refnorm.batch_norm_forward_graph(*f32, eps=np.float64(1e-5))
    assert cache.std.dtype == cache.x_hat.dtype == np.float32


def test_running_statistics_follow_the_moving_average_over_several_steps():
    """PyTorch's BatchNorm2d convention step after step: r <- (1 - m) r + m s, with s the
    batch mean (the unbiased batch variance), each step from the last one's result."""
    momentum = 0.3
    layer = refnorm.build("bn", 3, momentum=momentum, dtype=np.float64)
    rng = np.random.default_rng(6)
    mean, var = np.zeros(3), np.ones(3)
    for step in range(3):
        x = (2 + step) * rng.standard_normal((4, 3, 2, 3)) + 5 * step - 2
        layer.forward(x, training=True)
        per_channel = x.transpose(1, 0, 2, 3).reshape(3, -1)            # (C, N*H*W)
        mean = (1 - momentum) * mean + momentum * per_channel.mean(axis=1)
        var = (1 - momentum) * var + momentum * per_channel.var(axis=1, ddof=1)
        np.testing.assert_allclose(layer.state["running_mean"], mean, rtol=1e-13)
        np.testing.assert_allclose(layer.state["running_var"], var, rtol=1e-13)
    x = 3 * rng.standard_normal((2, 3, 2, 3))
    np.testing.assert_allclose(
        layer.forward(x, training=False),
        (x - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5), rtol=1e-12)

"""Weight-side normalizers: WN, NP, TReLU and WS, as reparameterizations and as layers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refnorm
from refnorm.gradcheck import check_layer, check_registered, check_vjp
from refnorm.weights import (
    RELU_MEAN,
    RELU_STD,
    norm_prop_relu_forward,
    translated_relu_backward,
    translated_relu_forward,
    weight_norm_backward,
    weight_norm_forward,
    weight_standardization_backward,
    weight_standardization_forward,
)

FD_TOLERANCE = 1e-6


@st.composite
def weight_shapes(draw, min_weights=2):
    """(C_out, C_in, KH, KW) or (D_out, D_in), with >= ``min_weights`` per output channel."""
    conv = draw(st.booleans())
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    if conv:
        shape += (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    if int(np.prod(shape[1:])) < min_weights:
        shape = (shape[0], min_weights) + shape[2:]
    return shape


# -- Weight Normalization -------------------------------------------------------------------


@given(shape=weight_shapes(), seed=st.integers(0, 2**16), eps=st.sampled_from([1e-5, 0.1]))
def test_weight_norm_gradients(shape, seed, eps):
    rng = np.random.default_rng(seed)
    inputs = {"v": rng.standard_normal(shape), "g": 1 + rng.standard_normal(shape[0])}

    def f(v, g):
        return weight_norm_forward(v, g, eps=eps)[0]

    def vjp(dw, v, g):
        dv, dg = weight_norm_backward(dw, weight_norm_forward(v, g, eps=eps)[1])
        return {"v": dv, "g": dg}

    for name, err in check_vjp(f, vjp, inputs).items():
        assert err.max_rel_error < FD_TOLERANCE, (name, err)


@given(shape=weight_shapes(), seed=st.integers(0, 2**16), eps=st.sampled_from([1e-5, 0.5]))
def test_weight_norm_gradient_is_orthogonal_to_v_up_to_eps(shape, seed, eps):
    rng = np.random.default_rng(seed)
    v, g, dw = rng.standard_normal(shape), rng.standard_normal(shape[0]), rng.standard_normal(shape)
    dv, _ = weight_norm_backward(dw, weight_norm_forward(v, g, eps=eps)[1])
    vv, gw = v.reshape(shape[0], -1), dw.reshape(shape[0], -1)
    n = np.linalg.norm(vv, axis=1)
    # <V, dL/dV> = g <G, V> eps / (||V|| + eps)^2: zero as eps -> 0 (module docstring).
    expected = g * np.sum(gw * vv, axis=1) * eps / (n + eps) ** 2
    got = np.sum(dv.reshape(shape[0], -1) * vv, axis=1)
    scale = np.abs(g) * np.linalg.norm(gw, axis=1) * n / (n + eps)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * scale.max())


def test_weight_norm_with_negligible_eps_is_orthogonal():
    rng = np.random.default_rng(0)
    v, g, dw = rng.standard_normal((3, 4, 3, 3)), rng.standard_normal(3), rng.standard_normal((3, 4, 3, 3))
    dv, _ = weight_norm_backward(dw, weight_norm_forward(v, g, eps=1e-300)[1])
    cos = np.sum(dv * v, axis=(1, 2, 3)) / (np.linalg.norm(dv.reshape(3, -1), axis=1)
                                           * np.linalg.norm(v.reshape(3, -1), axis=1))
    np.testing.assert_allclose(cos, 0.0, atol=1e-14)


def test_weight_norm_zero_filter_has_a_finite_documented_gradient():
    rng = np.random.default_rng(1)
    v = rng.standard_normal((3, 5))
    v[1] = 0.0
    g, dw, eps = np.array([1.0, 2.0, 3.0]), rng.standard_normal((3, 5)), 1e-3
    w, cache = weight_norm_forward(v, g, eps=eps)
    dv, dg = weight_norm_backward(dw, cache)
    assert np.all(w[1] == 0) and np.all(np.isfinite(dv)) and np.all(np.isfinite(dg))
    np.testing.assert_allclose(dv[1], g[1] * dw[1] / eps, rtol=1e-14)  # the limit
    assert dg[1] == 0.0
    # ... and it is the true derivative: V / (||V|| + eps) is differentiable at 0. Central
    # differences across the kink of ||V|| err by ~h / eps: eps = 0.5 and h = 1e-8 keep that
    # at 2e-8, above the rounding noise (~1e-16 |L| / h ~ 1e-8).

    def f(v, g):
        return weight_norm_forward(v, g, eps=0.5)[0]

    def vjp(dy, v, g):
        a, b = weight_norm_backward(dy, weight_norm_forward(v, g, eps=0.5)[1])
        return {"v": a, "g": b}

    assert check_vjp(f, vjp, {"v": v, "g": g}, step=1e-8)["v"].max_rel_error < 1e-6


@pytest.mark.parametrize("kernel_size", [3, None])
def test_data_dependent_init_standardizes_the_batch(kernel_size):
    rng = np.random.default_rng(2)
    layer = refnorm.build("wn", 3, 5, kernel_size, padding=1 if kernel_size else 0,
                          dtype=np.float64, seed=3)
    x = 2 * rng.standard_normal((16, 3, 6, 6) if kernel_size else (64, 3)) + 1
    layer.init_from_batch(x)
    t = layer.forward(x, training=True)
    axes = (0, 2, 3) if kernel_size else (0,)
    np.testing.assert_allclose(t.mean(axis=axes), 0.0, atol=1e-12)
    np.testing.assert_allclose(t.var(axis=axes), 1.0, rtol=1e-12)


def test_norm_prop_data_init_standardizes_what_enters_the_relu():
    rng = np.random.default_rng(10)
    layer = refnorm.build("np", 3, 4, 3, dtype=np.float64)
    x = 3 * rng.standard_normal((16, 3, 6, 6)) + 2
    layer.init_from_batch(x)
    z = layer.preactivation(x)
    np.testing.assert_allclose(z.mean(axis=(0, 2, 3)), 0.0, atol=1e-12)
    np.testing.assert_allclose(z.var(axis=(0, 2, 3)), 1.0, rtol=1e-12)
    with pytest.raises(RuntimeError, match=r"backward\(\) called before forward\(\)"):
        layer.backward(np.ones((16, 4, 4, 4)))  # the init left no stale cache behind


def test_data_dependent_init_refuses_a_constant_channel():
    layer = refnorm.build("wn", 2, 3, dtype=np.float64)
    with pytest.raises(ValueError, match=r"constant over the batch"):
        layer.init_from_batch(np.ones((4, 2)))


# -- Normalization Propagation ---------------------------------------------------------------


def test_rectified_gaussian_constants():
    z = np.random.default_rng(3).standard_normal(2_000_000)
    r = np.maximum(z, 0)
    # Monte Carlo standard errors with 2e6 samples: ~0.0006 for the mean, ~0.0007 for the std.
    assert abs(r.mean() - RELU_MEAN) < 0.003 and abs(r.std() - RELU_STD) < 0.003
    assert RELU_MEAN == pytest.approx(1 / np.sqrt(2 * np.pi), rel=1e-15)
    assert RELU_STD == pytest.approx(np.sqrt(0.5 * (1 - 1 / np.pi)), rel=1e-15)


@pytest.mark.parametrize("kernel_size", [None, 3])
def test_norm_prop_keeps_standard_normal_inputs_standard(kernel_size):
    rng = np.random.default_rng(4)
    C = 32
    # No padding: a zero-padded border sees fewer inputs, so its pre-activation variance is
    # below 1 and the property does not hold there.
    layer = refnorm.build("np", C, C, kernel_size, dtype=np.float64)
    if kernel_size is None:
        q, _ = np.linalg.qr(rng.standard_normal((C, C)))       # orthogonal rows
        layer.params["v"] = q
        x = rng.standard_normal((4096, C))
    else:
        x = rng.standard_normal((32, C, 12, 12))
    y = layer.forward(x, training=True)
    # Each output is (ReLU(z) - mean) / std with z ~ N(0, 1): zero mean and unit variance.
    # Per channel: 4096 (linear) or 3200 (conv) values, but overlapping 3x3 windows make
    # neighbouring conv outputs correlated, so the bounds are loose (measured: <= 0.06 and
    # <= 0.12 over three seeds); over all channels the estimates are ~6x tighter.
    axes = (0,) if kernel_size is None else (0, 2, 3)
    assert np.all(np.abs(y.mean(axis=axes)) < 0.15)
    assert np.all(np.abs(y.var(axis=axes) - 1) < 0.25)
    assert abs(y.mean()) < 0.02 and abs(y.var() - 1) < 0.04


def test_norm_prop_relu_is_not_the_translated_relu():
    z = np.array([[-1.0, 0.5, 2.0]]).reshape(1, 3)
    y_np, _ = norm_prop_relu_forward(z)
    y_tr, _ = translated_relu_forward(z, np.zeros(3))
    np.testing.assert_allclose(y_np, (np.maximum(z, 0) - RELU_MEAN) / RELU_STD)
    np.testing.assert_allclose(y_tr, np.maximum(z, 0))


# -- Translated ReLU ----------------------------------------------------------------------------


def test_translated_relu_gradients():
    rng = np.random.default_rng(5)
    z = rng.standard_normal((4, 3, 5))
    alpha = np.array([-0.5, 0.0, 0.7])
    # keep z away from the kink z = alpha, where finite differences are meaningless
    z = np.where(np.abs(z - alpha[:, None]) < 1e-3, z + 0.01, z)

    def f(z, alpha):
        return translated_relu_forward(z, alpha)[0]

    def vjp(dy, z, alpha):
        dz, dalpha = translated_relu_backward(dy, translated_relu_forward(z, alpha)[1])
        return {"z": dz, "alpha": dalpha}

    for name, err in check_vjp(f, vjp, {"z": z, "alpha": alpha}).items():
        assert err.max_rel_error < FD_TOLERANCE, (name, err)
    y, _ = translated_relu_forward(z, alpha)
    # ReLU(z - a) + a = max(z, a): the paper's form agrees up to one rounding.
    np.testing.assert_array_equal(y, np.maximum(z, alpha[:, None]))
    np.testing.assert_allclose(y, np.maximum(z - alpha[:, None], 0) + alpha[:, None], atol=1e-15)


def test_trelu_layer_has_no_gain_and_no_bias():
    layer = refnorm.build("trelu", 3, 4, 3)
    assert set(layer.params) == {"v", "alpha"}


# -- Weight Standardization --------------------------------------------------------------------


# Three or more weights per channel: with two, W^ = +-sigma / (sigma + eps) whatever W is,
# and the gradient is an O(eps) effect below the finite-difference noise (as for the
# activation normalizers with two values per statistic).
@given(shape=weight_shapes(min_weights=3), seed=st.integers(0, 2**16),
       eps=st.sampled_from([1e-5, 0.1]), eps_mode=st.sampled_from(["add", "sqrt"]),
       correction=st.sampled_from([0, 1]))
def test_ws_gradients(shape, seed, eps, eps_mode, correction):
    rng = np.random.default_rng(seed)
    kw = {"eps": eps, "eps_mode": eps_mode, "correction": correction}

    def f(w):
        return weight_standardization_forward(w, **kw)[0]

    def vjp(dy, w):
        return {"w": weight_standardization_backward(dy, weight_standardization_forward(w, **kw)[1])}

    err = check_vjp(f, vjp, {"w": rng.standard_normal(shape)})["w"]
    assert err.max_rel_error < FD_TOLERANCE, err


@given(shape=weight_shapes(), seed=st.integers(0, 2**16), eps=st.sampled_from([1e-5, 0.3]))
def test_ws_gradient_is_centred_and_orthogonal_to_w_hat_up_to_eps(shape, seed, eps):
    rng = np.random.default_rng(seed)
    w, g = rng.standard_normal(shape), rng.standard_normal(shape)
    w_hat, cache = weight_standardization_forward(w, eps=eps)
    dw = weight_standardization_backward(g, cache)
    C = shape[0]
    dwv, whv, gv = dw.reshape(C, -1), w_hat.reshape(C, -1), g.reshape(C, -1)
    # Eq. (9): zero mean per output channel, exactly.
    np.testing.assert_allclose(dwv.mean(axis=1), 0.0, atol=1e-14 * np.abs(gv).max() / eps)
    # Eq. (8) with eps: <dW, W^> = (1/d) <g, W^> eps / (sigma + eps) (module docstring).
    sigma = w.reshape(C, -1).std(axis=1)
    expected = np.sum(gv * whv, axis=1) / (sigma + eps) * eps / (sigma + eps)
    np.testing.assert_allclose(np.sum(dwv * whv, axis=1), expected, rtol=1e-9,
                               atol=1e-13 * np.abs(gv).sum() / eps)


@pytest.mark.parametrize(("eps_mode", "correction"), [("add", 0), ("add", 1), ("sqrt", 0)])
def test_ws_forward_conventions(eps_mode, correction):
    w = np.random.default_rng(6).standard_normal((4, 3, 3, 3))
    w_hat, _ = weight_standardization_forward(w, eps=1e-3, eps_mode=eps_mode, correction=correction)
    flat = w.reshape(4, -1)
    mu, sd = flat.mean(axis=1, keepdims=True), flat.std(axis=1, ddof=correction, keepdims=True)
    denom = sd + 1e-3 if eps_mode == "add" else np.sqrt(sd**2 + 1e-3)
    np.testing.assert_allclose(w_hat.reshape(4, -1), (flat - mu) / denom, rtol=1e-13)


@pytest.mark.parametrize("eps_mode", ["add", "sqrt"])
def test_ws_constant_filter_standardizes_to_zero_with_a_finite_gradient(eps_mode):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((3, 6))
    w[0] = 0.25  # constant filter: sigma = 0
    w_hat, cache = weight_standardization_forward(w, eps=1e-3, eps_mode=eps_mode)
    np.testing.assert_array_equal(w_hat[0], 0.0)
    dw = weight_standardization_backward(rng.standard_normal((3, 6)), cache)
    assert np.all(np.isfinite(dw))

    def f(w):
        return weight_standardization_forward(w, eps=0.5, eps_mode=eps_mode)[0]

    def vjp(dy, w):
        return {"w": weight_standardization_backward(
            dy, weight_standardization_forward(w, eps=0.5, eps_mode=eps_mode)[1])}

    # (W - mu) / d(sigma) is differentiable at a constant filter: the limit is the gradient.
    # Central differences across the kink of sigma err by ~h / eps (see the WN test above).
    assert check_vjp(f, vjp, {"w": w}, step=1e-8)["w"].max_rel_error < 1e-6


def test_ws_float16_computes_in_float32():
    w = np.random.default_rng(8).standard_normal((4, 9)).astype(np.float16)
    w_hat, cache = weight_standardization_forward(w)
    assert w_hat.dtype == np.float16
    assert weight_standardization_backward(np.ones_like(w), cache).dtype == np.float16


# -- layers and errors --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["wn", "np", "trelu", "ws"])
def test_every_check_case_passes(name):
    for result in check_registered(name):
        for grad, err in result.errors.items():
            assert err.max_rel_error < FD_TOLERANCE, (result, grad)


@pytest.mark.parametrize("name", ["wn", "np", "trelu", "ws"])
def test_layers_run_on_array_api_strict(name):
    strict = pytest.importorskip("array_api_strict")
    layer = refnorm.build(name, 2, 3, 3, padding=1, dtype=strict.float64, xp=strict)
    x = strict.asarray(np.random.default_rng(9).standard_normal((2, 2, 4, 4)))
    y = layer.forward(x, training=True)
    assert type(layer.backward(y)) is type(x)
    errors = check_layer(layer, x)
    assert max(e.max_rel_error for e in errors.values()) < FD_TOLERANCE


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: weight_norm_forward(np.ones(3), np.ones(3)), ValueError, r"v must have shape \(C_out, \.\.\.\)"),
        (lambda: weight_norm_forward(np.ones((3, 2)), np.ones(2)), ValueError, r"g must have shape \(C,\) = \(3,\)"),
        (lambda: weight_norm_forward(np.ones((3, 2), int), np.ones(3)), TypeError, r"v must have a real floating"),
        (lambda: weight_norm_forward(np.ones((3, 2)), np.ones(3), eps=0), ValueError, r"eps must be finite and > 0"),
        (lambda: weight_standardization_forward(np.ones((3, 1))), ValueError, r"more than 1 weight per output channel"),
        (lambda: weight_standardization_forward(np.ones((3, 2)), eps_mode="in"), ValueError, r"eps_mode must be one of"),
        (lambda: weight_standardization_forward(np.ones((3, 2)), correction=2), ValueError, r"correction must be 0 or 1"),
        (lambda: translated_relu_forward(np.ones((2, 3)), np.ones(2)), ValueError, r"alpha must have shape \(C,\) = \(3,\)"),
        (lambda: refnorm.build("wn", 0, 3), ValueError, r"in_channels must be a positive int"),
        (lambda: refnorm.build("ws", 2, 3, "3"), ValueError, r"kernel_size must be an int"),
        (lambda: refnorm.build("trelu", 2, 3, eps=-1.0), ValueError, r"eps must be finite and > 0"),
    ],
)
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()

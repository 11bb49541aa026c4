"""refnorm/weights/standardization.py: the WS pair (Qiao et al. Eq. 2-9) and its layer."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import refnorm
from refnorm.gradcheck import check_vjp
from refnorm.weights import (
    weight_norm_forward,
    weight_standardization_backward,
    weight_standardization_forward,
)
from tests.weights.strategies import (
    FD_TOLERANCE,
    arrays,
    assert_check_cases_pass,
    assert_runs_on_array_api_strict,
    weight_shapes,
)


@st.composite
def spread_filters(draw, min_weights=2):
    """Weights in [-3, 3] whose every filter has sigma >= 0.1 (away from the constant-filter
    kink of sigma, which central differences would straddle)."""
    w = draw(arrays(draw(weight_shapes(min_weights=min_weights))))
    assume(np.min(w.reshape(w.shape[0], -1).std(axis=1)) >= 0.1)
    return w


# Three or more weights per channel: with two, W^ = +-sigma / (sigma + eps) whatever W is,
# and the gradient is an O(eps) effect below the finite-difference noise (as for the
# activation normalizers with two values per statistic).
@given(w=spread_filters(min_weights=3), eps=st.sampled_from([1e-5, 0.1]),
       eps_mode=st.sampled_from(["add", "sqrt"]), correction=st.sampled_from([0, 1]))
def test_gradients_match_finite_differences(w, eps, eps_mode, correction):
    kw = {"eps": eps, "eps_mode": eps_mode, "correction": correction}

    def f(w):
        return weight_standardization_forward(w, **kw)[0]

    def vjp(dy, w):
        _, cache = weight_standardization_forward(w, **kw)
        return {"w": weight_standardization_backward(dy, cache)}

    err = check_vjp(f, vjp, {"w": w})["w"]
    assert err.max_rel_error < FD_TOLERANCE, err


@given(w=spread_filters(), data=st.data(), eps=st.sampled_from([1e-5, 0.3]))
def test_gradient_is_centred_and_orthogonal_to_w_hat_up_to_eps(w, data, eps):
    g = data.draw(arrays(w.shape), label="dw_hat")
    w_hat, cache = weight_standardization_forward(w, eps=eps)
    dw = weight_standardization_backward(g, cache)
    C = w.shape[0]
    dwv, whv, gv = dw.reshape(C, -1), w_hat.reshape(C, -1), g.reshape(C, -1)
    # Below float64's smallest normal (a subnormal g) a rounding is off by up to one
    # subnormal spacing whatever the value: (I + 4) roundings per entry or sum, each scaled
    # by at most 1/d <= 1/eps. (The relative bounds are formed as 1e-14 / eps * |g|: in the
    # order 1e-14 * |g| they underflow to 0 for a subnormal g.)
    floor = (dwv.shape[1] + 4) / eps * np.finfo(np.float64).smallest_subnormal
    # Eq. (9): zero mean per output channel, up to the rounding of entries <= |g| / eps.
    np.testing.assert_allclose(dwv.mean(axis=1), 0.0,
                               atol=1e-14 / eps * np.abs(gv).max() + floor)
    # Eq. (8) with eps: <dW, W^> = (1/d) <g, W^> eps / (sigma + eps) (module docstring).
    sigma = w.reshape(C, -1).std(axis=1)
    expected = np.sum(gv * whv, axis=1) / (sigma + eps) * eps / (sigma + eps)
    np.testing.assert_allclose(np.sum(dwv * whv, axis=1), expected, rtol=1e-9,
                               atol=1e-13 / eps * np.abs(gv).sum() + floor)


@pytest.mark.parametrize(("eps_mode", "correction"), [("add", 0), ("add", 1), ("sqrt", 0)])
def test_forward_conventions(eps_mode, correction):
    w = np.random.default_rng(6).standard_normal((4, 3, 3, 3))
    w_hat, _ = weight_standardization_forward(w, eps=1e-3, eps_mode=eps_mode, correction=correction)
    flat = w.reshape(4, -1)
    mu, sd = flat.mean(axis=1, keepdims=True), flat.std(axis=1, ddof=correction, keepdims=True)
    denom = sd + 1e-3 if eps_mode == "add" else np.sqrt(sd**2 + 1e-3)
    # numpy's own mean/std against refnorm's: a few roundings of O(1) values.
    np.testing.assert_allclose(w_hat.reshape(4, -1), (flat - mu) / denom, rtol=1e-13)


@pytest.mark.parametrize("eps_mode", ["add", "sqrt"])
def test_constant_filter_standardizes_to_zero_with_a_finite_gradient(eps_mode):
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
    # Central differences across the kink of sigma err by ~h / eps: eps = 0.5 and h = 1e-8
    # keep that at 2e-8, above the rounding noise (~1e-16 |L| / h ~ 1e-8).
    assert check_vjp(f, vjp, {"w": w}, step=1e-8)["w"].max_rel_error < 1e-6


@pytest.mark.parametrize(("value", "low", "high"), [(0.7, 0.003, 0.01), (123.4, 0.5, 0.9)])
def test_a_constant_float32_filter_on_the_reference_path_keeps_its_rounded_mean(value, low,
                                                                                 high):
    """The conventions page: a constant float32 filter comes out 0 on the fast path (its mean
    shifted by the first weight is exact), and on the reference path as the rounding of its
    float32 mean divided by that rounding plus eps: 0.006 for 0.7s, 0.70 for 123.4s."""
    w = np.full((1, 3, 5, 5), value, np.float32)
    fast = weight_standardization_forward(w, path="fast")[0]
    reference = weight_standardization_forward(w, path="reference")[0]
    np.testing.assert_array_equal(fast, 0.0)
    delta = np.float32(value) - np.mean(w.reshape(1, -1), axis=1)[0]  # the rounded mean's error
    assert delta != 0
    expected = delta / (abs(delta) + np.float32(1e-5))
    np.testing.assert_allclose(reference, expected, rtol=1e-5)
    assert low < abs(float(expected)) < high


def test_a_constant_float64_filter_on_the_reference_path_as_the_conventions_page_states():
    """The conventions page's 2.2e-11 for a 3x5x5 float64 filter of 0.7s (the size of the
    float32 cases above); the fast path gives 0."""
    w = np.full((1, 3, 5, 5), 0.7)
    np.testing.assert_array_equal(weight_standardization_forward(w, path="fast")[0], 0.0)
    reference = float(np.abs(weight_standardization_forward(w, path="reference")[0]).max())
    assert f"{reference:.2g}" == "2.2e-11", reference


def test_float16_computes_in_float32():
    w = np.random.default_rng(8).standard_normal((4, 9)).astype(np.float16)
    w_hat, cache = weight_standardization_forward(w)
    w_hat32, cache32 = weight_standardization_forward(w.astype(np.float32))
    assert w_hat.dtype == np.float16
    np.testing.assert_array_equal(w_hat, w_hat32.astype(np.float16))  # one rounding
    dy = np.random.default_rng(9).standard_normal((4, 9)).astype(np.float16)
    dw = weight_standardization_backward(dy, cache)
    assert dw.dtype == np.float16
    np.testing.assert_array_equal(
        dw, weight_standardization_backward(dy.astype(np.float32), cache32).astype(np.float16))


def test_backward_refuses_another_functions_cache():
    _, other = weight_norm_forward(np.ones((3, 2)), np.ones(3))
    with pytest.raises(TypeError,
                       match=r"cache must be a WeightStandardizationCache; got WeightNormCache"):
        weight_standardization_backward(np.ones((3, 2)), other)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: weight_standardization_forward(np.ones((3, 1))),
         ValueError, r"more than 1 weight per output channel"),
        (lambda: weight_standardization_forward(np.ones(3)),
         ValueError, r"w must have shape \(C_out, \.\.\.\)"),
        (lambda: weight_standardization_forward(np.ones((3, 2)), eps_mode="in"),
         ValueError, r"eps_mode must be one of"),
        (lambda: weight_standardization_forward(np.ones((3, 2)), correction=2),
         ValueError, r"correction must be 0 or 1"),
        (lambda: weight_standardization_forward(np.ones((3, 2)), correction=1.0),
         TypeError, r"correction must be an int"),
        (lambda: weight_standardization_forward(np.ones((3, 2)), correction=True),
         TypeError, r"correction must be an int"),
        (lambda: weight_standardization_forward(np.ones((3, 2), np.float32), eps=1e-50),
         ValueError, r"rounds to 0 in float32"),
        (lambda: refnorm.build("ws", 1, 3), ValueError, r"more than 1 weight per output channel"),
        (lambda: refnorm.build("ws", 2, 3, 3, correction=2),
         ValueError, r"correction must be 0 or 1"),
    ],
)
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_numpy_integer_correction_is_accepted():
    w = np.random.default_rng(23).standard_normal((3, 5))
    a, _ = weight_standardization_forward(w, correction=np.int64(1))
    b, _ = weight_standardization_forward(w, correction=1)
    np.testing.assert_array_equal(a, b)


# -- the layer ---------------------------------------------------------------------------------


def test_check_cases_pass():
    assert_check_cases_pass("ws")


def test_layer_runs_on_array_api_strict():
    assert_runs_on_array_api_strict("ws")


def test_layer_params_are_the_papers():
    assert set(refnorm.build("ws", 3, 4, 3).params) == {"w"}  # no affine, no bias by default
    assert set(refnorm.build("ws", 3, 4, 3, bias=True).params) == {"w", "b"}


# -- the printed equations, one by one (the docs' equations page cites these) ---------------------


def test_forward_is_eq5_then_eq6():
    # Eq. (5) centres each output channel's weights, Eq. (6) divides by the root mean square
    # of the centred ones; at eps -> 0 this is Eq. (2). eps = 1e-12 moves W^ by eps / sigma
    # relative, sigma ~ 1 here.
    w = np.random.default_rng(12).standard_normal((5, 3, 3, 3))
    w_hat, _ = weight_standardization_forward(w, eps=1e-12)
    for c in range(5):
        w_c = w[c].reshape(-1)
        w_dot = w_c - np.ones(w_c.size) * np.dot(np.ones(w_c.size), w_c) / w_c.size  # Eq. (5)
        expected = w_dot / np.sqrt(np.dot(np.ones(w_c.size), w_dot**2) / w_c.size)  # Eq. (6)
        np.testing.assert_allclose(w_hat[c].reshape(-1), expected, rtol=1e-11, atol=1e-14)


def test_layer_is_eq3_a_convolution_with_the_standardized_weights():
    # Eq. (3): y = W^ * x with W^ = WS(W) (Eq. 2, 4), built here with numpy and run through
    # refnorm's convolution (itself checked against direct loops in tests/nn/test_conv.py).
    rng = np.random.default_rng(13)
    layer = refnorm.build("ws", 3, 4, 3, padding=1, dtype=np.float64)
    x = rng.standard_normal((2, 3, 6, 6))
    w = layer.params["w"].reshape(4, -1)
    w_hat = (w - w.mean(axis=1, keepdims=True)) / (w.std(axis=1, keepdims=True) + layer.eps)
    expected, _ = refnorm.nn.conv2d_forward(x, w_hat.reshape(4, 3, 3, 3), None, padding=1)
    # The same products summed in the same order; W^ differs by a few roundings (~1e-16).
    np.testing.assert_allclose(layer.forward(x, training=True), expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("path", ["reference", "fast"])
@pytest.mark.parametrize(("eps_mode", "correction"), [("sqrt", 0), ("add", 1), ("sqrt", 1)])
def test_layer_standardizes_with_its_own_eps_mode_and_correction(eps_mode, correction, path):
    # Eq. (3) with the layer's conventions: W^ = (W - mu) / d, d = sigma + eps ("add", Eq. 2)
    # or sqrt(sigma^2 + eps) ("sqrt"), sigma with 1/(I - correction) (Eq. 4; 1: the official
    # code's torch.std). eps = 0.5 makes the two placements differ by O(1), not O(eps).
    rng = np.random.default_rng(37)
    layer = refnorm.build("ws", 2, 3, 2, eps=0.5, eps_mode=eps_mode, correction=correction,
                          dtype=np.float64)
    layer.path = path
    w = layer.params["w"].reshape(3, -1)                                 # I = 8
    sd = w.std(axis=1, ddof=correction, keepdims=True)
    d = sd + 0.5 if eps_mode == "add" else np.sqrt(sd**2 + 0.5)
    w_hat = ((w - w.mean(axis=1, keepdims=True)) / d).reshape(3, 2, 2, 2)
    x = rng.standard_normal((2, 2, 5, 5))
    expected, _ = refnorm.nn.conv2d_forward(x, w_hat, None)
    # W^ from numpy's mean and std against refnorm's: a few roundings of O(1) values.
    np.testing.assert_allclose(layer.forward(x, training=True), expected, rtol=0, atol=1e-13)

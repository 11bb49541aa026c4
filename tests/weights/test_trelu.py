"""refnorm/weights/trelu.py: the translated ReLU and the TReLUWeightNorm layer."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refnorm
from refnorm.gradcheck import check_vjp
from refnorm.weights import (
    translated_relu_backward,
    translated_relu_forward,
    weight_norm_forward,
)
from tests.weights.strategies import (
    FD_TOLERANCE,
    arrays,
    assert_check_cases_pass,
    assert_runs_on_array_api_strict,
)


@st.composite
def trelu_inputs(draw):
    """(z, alpha): z (N, C, L) in [-3, 3], thresholds (C,) in [-1, 1]."""
    N, C, L = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    return draw(arrays((N, C, L))), draw(arrays((C,), bound=1.0))


@given(inputs=trelu_inputs())
def test_gradients_match_finite_differences(inputs):
    z, alpha = inputs
    # keep z off the kink z = alpha, where central differences straddle it
    z = np.where(np.abs(z - alpha[:, None]) < 1e-3, alpha[:, None] + 0.01, z)

    def f(z, alpha):
        return translated_relu_forward(z, alpha)[0]

    def vjp(dy, z, alpha):
        dz, dalpha = translated_relu_backward(dy, translated_relu_forward(z, alpha)[1])
        return {"z": dz, "alpha": dalpha}

    for name, err in check_vjp(f, vjp, {"z": z, "alpha": alpha}).items():
        assert err.max_rel_error < FD_TOLERANCE, (name, err)


@given(inputs=trelu_inputs())
def test_is_max_of_z_and_alpha(inputs):
    z, alpha = inputs
    y, _ = translated_relu_forward(z, alpha)
    a = alpha[:, None]
    # max(z, a) is a selection: identical; the paper's ReLU(z - a) + a agrees up to the
    # rounding of one subtraction and one addition of values <= 4: 2 ulps of 4 ~ 1e-15.
    np.testing.assert_array_equal(y, np.maximum(z, a))
    np.testing.assert_allclose(y, np.maximum(z - a, 0) + a, rtol=0, atol=2e-15)


def test_float16_computes_in_float32():
    rng = np.random.default_rng(21)
    z16 = rng.standard_normal((64, 2, 16, 16)).astype(np.float16)
    alpha16 = np.array([-0.25, 0.5], dtype=np.float16)
    y16, cache = translated_relu_forward(z16, alpha16)
    assert y16.dtype == np.float16
    np.testing.assert_array_equal(y16, np.maximum(z16, alpha16[:, None, None]))
    # dalpha sums 16384 float16 values per channel (|sum| up to ~1e4): summed in float16 it
    # would carry ~1e4 * 2**-11 ~ 5 of rounding; in float32 it is the float32 sum, rounded once.
    dy16 = rng.standard_normal(z16.shape).astype(np.float16) + np.float16(1)
    dz16, dalpha16 = translated_relu_backward(dy16, cache)
    _, cache32 = translated_relu_forward(z16.astype(np.float32), alpha16.astype(np.float32))
    dz32, dalpha32 = translated_relu_backward(dy16.astype(np.float32), cache32)
    assert dz16.dtype == np.float16 and dalpha16.dtype == np.float16
    np.testing.assert_array_equal(dz16, dz32.astype(np.float16))
    np.testing.assert_array_equal(dalpha16, dalpha32.astype(np.float16))


def test_backward_refuses_another_functions_cache():
    _, other = weight_norm_forward(np.ones((2, 3)), np.ones(2))
    with pytest.raises(TypeError,
                       match=r"cache must be a TranslatedReLUCache; got WeightNormCache"):
        translated_relu_backward(np.ones((2, 3)), other)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: translated_relu_forward(np.ones((2, 3)), np.ones(2)),
         ValueError, r"alpha must have shape \(C,\) = \(3,\)"),
        (lambda: translated_relu_forward(np.ones((2, 3), int), np.ones(3)),
         TypeError, r"z must have a real floating"),
        (lambda: refnorm.build("trelu", 2, 3, eps=-1.0), ValueError, r"eps must be finite and > 0"),
        # a dy that would broadcast against z's shape is still the wrong shape
        (lambda: translated_relu_backward(
            np.ones((1, 3, 2)), translated_relu_forward(np.ones((2, 3, 2)), np.zeros(3))[1]),
         ValueError, r"dy must have shape \(2, 3, 2\); got \(1, 3, 2\)"),
    ],
)
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


# -- the layer ---------------------------------------------------------------------------------


def test_check_cases_pass():
    assert_check_cases_pass("trelu")


def test_layer_runs_on_array_api_strict():
    assert_runs_on_array_api_strict("trelu")


def test_layer_has_no_gain_and_no_bias():
    layer = refnorm.build("trelu", 3, 4, 3)
    assert set(layer.params) == {"v", "alpha"}


def test_layer_uses_unit_norm_filters():
    rng = np.random.default_rng(22)
    layer = refnorm.build("trelu", 3, 2, None, dtype=np.float64, eps=1e-12)
    layer.params["v"] = np.array([[3.0, 0.0, 4.0], [0.0, -2.0, 0.0]])   # norms 5 and 2
    layer.params["alpha"] = np.array([-10.0, -10.0])                     # passes everything
    x = rng.standard_normal((5, 3))
    expected = x @ np.array([[0.6, 0.0, 0.8], [0.0, -1.0, 0.0]]).T      # V / ||V|| by hand
    # eps / ||V|| ~ 1e-12 relative, plus rounding of 3-term dot products.
    np.testing.assert_allclose(layer.forward(x, training=True), expected, rtol=1e-11, atol=1e-11)


def test_at_the_threshold_the_gradient_goes_to_alpha():
    # TReLU_a(z) = ReLU(z - a) + a (Xiang & Li 2017, as Gitman & Ginsburg print it): at
    # z = a exactly, the ReLU's derivative 0 at 0 sends dy to alpha and nothing to z.
    z = np.array([[[0.5, 0.25, 1.0], [-1.0, 0.0, 2.0]]])                # (1, 2, 3)
    alpha = np.array([0.5, 0.0])
    dy = np.array([[[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]]])
    dz, dalpha = translated_relu_backward(dy, translated_relu_forward(z, alpha)[1])
    np.testing.assert_array_equal(dz, [[[0.0, 0.0, 4.0], [0.0, 0.0, 32.0]]])
    np.testing.assert_array_equal(dalpha, [1.0 + 2.0, 8.0 + 16.0])


def test_layer_starts_as_a_plain_relu():
    # alpha starts at 0 (the layer's docstring): TReLU_0(z) = ReLU(z), so a fresh layer is a
    # unit-norm convolution followed by an ordinary ReLU.
    rng = np.random.default_rng(36)
    layer = refnorm.build("trelu", 3, 4, 3, padding=1, dtype=np.float64, seed=2)
    np.testing.assert_array_equal(layer.params["alpha"], np.zeros(4))
    x = rng.standard_normal((2, 3, 5, 5))
    w, _ = weight_norm_forward(layer.params["v"], np.ones(4), eps=layer.eps)
    z, _ = refnorm.nn.conv2d_forward(x, w, None, padding=1)
    np.testing.assert_array_equal(layer.forward(x, training=True), np.maximum(z, 0.0))


def test_gradients_come_back_in_the_dtypes_of_z_and_of_alpha():
    # dz in z's dtype, dalpha in alpha's (the docstring's Returns), also when the two differ.
    rng = np.random.default_rng(38)
    z = rng.standard_normal((4, 3, 5)).astype(np.float32)
    for alpha_dtype in (np.float64, np.float16):
        alpha = np.array([-0.5, 0.0, 0.5], alpha_dtype)
        y, cache = translated_relu_forward(z, alpha)
        assert y.dtype == np.float32
        dz, dalpha = translated_relu_backward(np.ones_like(z), cache)
        assert dz.dtype == np.float32 and dalpha.dtype == alpha_dtype
        # dalpha counts the entries at or below the threshold: exact in any of these dtypes
        np.testing.assert_array_equal(dalpha, np.sum(z <= alpha.astype(np.float32)[:, None],
                                                     axis=(0, 2)))


def test_z_and_alpha_from_two_array_namespaces_are_refused():
    strict = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError, match=r"one array namespace"):
        translated_relu_forward(np.ones((2, 3)), strict.zeros(3, dtype=strict.float64))
    with pytest.raises(TypeError, match=r"one array namespace"):
        translated_relu_forward(strict.ones((2, 3), dtype=strict.float64), np.zeros(3))

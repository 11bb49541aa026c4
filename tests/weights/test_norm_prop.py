"""refnorm/weights/norm_prop.py: the re-normalized ReLU and the NormProp layer."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import refnorm
from refnorm.gradcheck import check_vjp
from refnorm.weights import (
    RELU_MEAN,
    RELU_STD,
    norm_prop_relu_backward,
    norm_prop_relu_forward,
    translated_relu_forward,
)
from refnorm.weights.trelu import translated_relu_backward
from tests.weights.strategies import (
    FD_TOLERANCE,
    FINITE,
    assert_check_cases_pass,
    assert_runs_on_array_api_strict,
)


def test_rectified_gaussian_constants_by_quadrature_and_monte_carlo():
    # E[ReLU(z)] = int_0^inf z phi(z) dz and E[ReLU(z)^2] = int_0^inf z^2 phi(z) dz, by
    # Simpson's rule on [0, 40] (the tail beyond 40 is below 1e-300): independent of the
    # closed forms 1/sqrt(2 pi) and sqrt((1 - 1/pi) / 2) the module uses.
    z = np.linspace(0.0, 40.0, 400_001)                       # (M,) step 1e-4
    phi = np.exp(-z * z / 2) / math.sqrt(2 * math.pi)         # (M,) the N(0, 1) density
    h = z[1] - z[0]

    def simpson(f):
        return h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    mean, second = simpson(z * phi), simpson(z * z * phi)
    # Simpson's error ~h^4 |f''''| ~ 1e-16 here; the sums' rounding ~1e-15 relative.
    assert RELU_MEAN == pytest.approx(mean, rel=1e-12)
    assert RELU_STD == pytest.approx(math.sqrt(second - mean**2), rel=1e-12)
    r = np.maximum(np.random.default_rng(3).standard_normal(2_000_000), 0)
    # Monte Carlo standard errors with 2e6 samples: ~0.0004 for the mean, ~0.0004 for the std.
    assert abs(r.mean() - RELU_MEAN) < 0.003 and abs(r.std() - RELU_STD) < 0.003


# Values near the kink z = 0 are moved off it: central differences straddling it are wrong.
@given(z=hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=4, max_side=4),
                    elements=st.floats(-3, 3, **FINITE), fill=st.nothing()))
def test_relu_gradient_matches_finite_differences(z):
    z = np.where(np.abs(z) < 1e-3, 0.01, z)

    def f(z):
        return norm_prop_relu_forward(z)[0]

    def vjp(dy, z):
        return {"z": norm_prop_relu_backward(dy, norm_prop_relu_forward(z)[1])}

    assert check_vjp(f, vjp, {"z": z})["z"].max_rel_error < FD_TOLERANCE


def test_relu_is_not_the_translated_relu():
    z = np.array([[-1.0, 0.5, 2.0]])
    y_np, _ = norm_prop_relu_forward(z)
    y_tr, _ = translated_relu_forward(z, np.zeros(3))
    # Written out by hand: ReLU(z) = (0, 0.5, 2), then minus RELU_MEAN, over RELU_STD.
    np.testing.assert_allclose(y_np, [[(0 - RELU_MEAN) / RELU_STD, (0.5 - RELU_MEAN) / RELU_STD,
                                       (2.0 - RELU_MEAN) / RELU_STD]], rtol=1e-15)
    np.testing.assert_array_equal(y_tr, [[0.0, 0.5, 2.0]])


def test_float16_computes_in_float32():
    rng = np.random.default_rng(20)
    z16 = (4 * rng.standard_normal((4, 3, 5))).astype(np.float16)
    y16, cache = norm_prop_relu_forward(z16)
    y32, cache32 = norm_prop_relu_forward(z16.astype(np.float32))
    assert y16.dtype == np.float16
    # The same float32 arithmetic, then one rounding to float16.
    np.testing.assert_array_equal(y16, y32.astype(np.float16))
    dy16 = rng.standard_normal(z16.shape).astype(np.float16)
    dz16 = norm_prop_relu_backward(dy16, cache)
    assert dz16.dtype == np.float16
    np.testing.assert_array_equal(dz16, norm_prop_relu_backward(dy16.astype(np.float32),
                                                                cache32).astype(np.float16))


def test_backward_refuses_another_functions_cache():
    _, other = translated_relu_forward(np.ones((2, 3)), np.zeros(3))
    with pytest.raises(TypeError,
                       match=r"cache must be a NormPropReLUCache; got TranslatedReLUCache"):
        norm_prop_relu_backward(np.ones((2, 3)), other)
    # and the other way round
    _, mine = norm_prop_relu_forward(np.ones((2, 3)))
    with pytest.raises(TypeError, match=r"cache must be a TranslatedReLUCache"):
        translated_relu_backward(np.ones((2, 3)), mine)


# -- the layer ---------------------------------------------------------------------------------


def test_check_cases_pass():
    assert_check_cases_pass("np")


def test_layer_runs_on_array_api_strict():
    assert_runs_on_array_api_strict("np")


@pytest.mark.parametrize("kernel_size", [None, 3])
def test_keeps_standard_normal_inputs_standard(kernel_size):
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


@pytest.mark.parametrize("kernel_size", [None, 3])
def test_layer_is_gitman_ginsburg_display_formula_5(kernel_size):
    """o_j = (ReLU(gamma_j W_j * x / (||W_j||_F + eps) + beta_j) - sqrt(1/(2 pi)))
    / sqrt((1 - 1/pi) / 2), written out in numpy, with gains and biases away from 1 and 0."""
    rng = np.random.default_rng(11)
    layer = refnorm.build("np", 3, 4, kernel_size, dtype=np.float64, eps=1e-3)
    layer.params = {"v": rng.standard_normal(layer.params["v"].shape),
                    "g": rng.uniform(0.5, 2.0, 4), "b": rng.uniform(-1.0, 1.0, 4)}
    v, g, b = layer.params["v"], layer.params["g"], layer.params["b"]
    norms = np.sqrt((v.reshape(4, -1) ** 2).sum(axis=1)) + 1e-3           # (4,)
    if kernel_size is None:
        x = rng.standard_normal((6, 3))
        wx = x @ v.T                                                        # (6, 4)
        shape = (1, 4)
    else:
        x = rng.standard_normal((2, 3, 6, 6))
        windows = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))
        wx = np.einsum("ncijkl,ockl->noij", windows, v)                    # (2, 4, 4, 4)
        shape = (1, 4, 1, 1)
    z = g.reshape(shape) * wx / norms.reshape(shape) + b.reshape(shape)
    expected = (np.maximum(z, 0) - math.sqrt(1 / (2 * math.pi))) / math.sqrt(
        0.5 * (1 - 1 / math.pi))
    np.testing.assert_allclose(layer.forward(x, training=True), expected, rtol=1e-12,
                               atol=1e-12)


def test_data_dependent_init_standardizes_what_enters_the_relu():
    rng = np.random.default_rng(10)
    layer = refnorm.build("np", 3, 4, 3, dtype=np.float64)
    x = 3 * rng.standard_normal((16, 3, 6, 6)) + 2
    layer.forward(x, training=True)
    layer.init_from_batch(x)
    z = layer.preactivation(x)
    # Exact by construction in float64: rounding only.
    np.testing.assert_allclose(z.mean(axis=(0, 2, 3)), 0.0, atol=1e-12)
    np.testing.assert_allclose(z.var(axis=(0, 2, 3)), 1.0, rtol=1e-12)
    # preactivation is what the layer's ReLU receives
    np.testing.assert_allclose(layer.forward(x, training=True),
                               (np.maximum(z, 0) - RELU_MEAN) / RELU_STD, rtol=1e-14, atol=1e-14)
    layer.init_from_batch(x)
    with pytest.raises(RuntimeError, match=r"backward\(\) called before forward\(\)"):
        layer.backward(np.ones((16, 4, 4, 4)))  # the init left no stale cache behind


def test_relu_derivative_at_zero_is_zero():
    # The ReLU's derivative at its kink is taken as 0 (norm_prop_relu_backward's docstring):
    # a pre-activation of exactly 0 passes no gradient, one just above passes dy / RELU_STD.
    z = np.array([[-1.0, 0.0, 5e-324, 2.0], [0.0, -0.0, 1.0, -3.0]])
    dy = np.arange(1.0, 9.0).reshape(2, 4)
    dz = norm_prop_relu_backward(dy, norm_prop_relu_forward(z)[1])
    np.testing.assert_array_equal(dz, [[0.0, 0.0, 3.0 / RELU_STD, 4.0 / RELU_STD],
                                       [0.0, 0.0, 7.0 / RELU_STD, 0.0]])


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: norm_prop_relu_forward(np.ones((2, 3), int)),
         TypeError, r"z must have a real floating"),
        # a dy that would broadcast against z's shape is still the wrong shape
        (lambda: norm_prop_relu_backward(np.ones((1, 3)),
                                         norm_prop_relu_forward(np.ones((2, 3)))[1]),
         ValueError, r"dy must have shape \(2, 3\); got \(1, 3\)"),
        (lambda: norm_prop_relu_backward(np.ones((2, 3), int),
                                         norm_prop_relu_forward(np.ones((2, 3)))[1]),
         TypeError, r"dy must have a real floating"),
    ],
)
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_layer_without_bias_has_no_b_and_no_b_gradient():
    layer = refnorm.build("np", 2, 3, 3, bias=False, dtype=np.float64)
    assert set(layer.params) == {"v", "g"}
    x = np.random.default_rng(15).standard_normal((2, 2, 4, 4))
    layer.backward(layer.forward(x, training=True))
    assert set(layer.grads) == {"v", "g"}

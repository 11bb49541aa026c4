"""dtype behaviour and float32 precision of every activation normalizer."""

from __future__ import annotations

import numpy as np
import pytest

import refnorm
from tests.norms.cases import METHODS, reference_stats

SHAPE = (4, 4, 6, 6)


def options_for(method):
    return {"num_groups": 2} if method.name == "gn" else {}


def forward_backward(method, x, gamma, beta, dy, path="reference"):
    y, cache = method.forward(x, gamma, beta, eps=1e-5, path=path, **options_for(method))
    return (y, *method.backward(dy, cache, path=path))


@pytest.mark.parametrize("method", METHODS, ids=repr)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float32_and_float64_are_kept(method, dtype):
    rng = np.random.default_rng(0)
    x = (5 * rng.standard_normal(SHAPE) + 12).astype(dtype)
    gamma, beta = np.ones(4, dtype), np.zeros(4, dtype)
    y, dx, dgamma, dbeta = forward_backward(method, x, gamma, beta, x)
    assert (y.dtype, dx.dtype, dgamma.dtype, dbeta.dtype) == (dtype,) * 4


@pytest.mark.parametrize("path", ["reference", "fast"])
@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_float16_computes_in_float32_and_returns_float16(method, path):
    rng = np.random.default_rng(1)
    x64 = 2 * rng.standard_normal(SHAPE) + 3
    dy64 = rng.standard_normal(SHAPE)
    x16, dy16 = x64.astype(np.float16), dy64.astype(np.float16)
    gamma, beta = np.ones(4, np.float16), np.zeros(4, np.float16)
    y16, dx16, dgamma16, _ = forward_backward(method, x16, gamma, beta, dy16, path=path)
    assert (y16.dtype, dx16.dtype, dgamma16.dtype) == (np.float16,) * 3
    # The float64 result for the *same* (rounded) inputs; float32 arithmetic then a float16
    # cast must agree to float16's precision (2^-11 relative, ~1e-3 on values of size ~2).
    ref = forward_backward(method, x16.astype(np.float64), gamma.astype(np.float64),
                           beta.astype(np.float64), dy16.astype(np.float64))
    np.testing.assert_allclose(y16.astype(np.float64), ref[0], rtol=0, atol=4e-3)
    np.testing.assert_allclose(dx16.astype(np.float64), ref[1], rtol=0,
                               atol=2e-3 * np.abs(ref[1]).max())
    np.testing.assert_allclose(dgamma16.astype(np.float64), ref[2], rtol=2e-3, atol=0.1)


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_float32_inputs_offset_by_1e4_still_normalize_to_unit_variance(method):
    rng = np.random.default_rng(2)
    x = (1e4 + rng.standard_normal((8, 4, 8, 8))).astype(np.float32)
    y, _ = method.forward(x, np.ones(4, np.float32), np.zeros(4, np.float32),
                          eps=1e-5, **options_for(method))
    mu, var = reference_stats(method, y.astype(np.float64), options_for(method))
    # The bound. The one-pass E[x^2] - E[x]^2 form fails it badly (next test).
    np.testing.assert_allclose(var, 1.0, atol=1e-3)
    # float32 values near 1e4 are spaced 2^-10 ~ 1e-3 apart, so the float32 mean itself is
    # only known to ~5e-4 of a unit standard deviation: the output mean carries that error.
    np.testing.assert_allclose(mu, 0.0, atol=2e-3)


def test_one_pass_variance_fails_the_same_float32_check():
    # Why refnorm's moments are two-pass: the textbook one-pass form in float32 loses the
    # unit variance of data offset by 1e4 (E[x^2] ~ 1e8 has float32 spacing 8).
    rng = np.random.default_rng(2)
    x = (1e4 + rng.standard_normal(4096)).astype(np.float32)
    one_pass = np.mean(x * x) - np.mean(x) ** 2
    assert abs(float(one_pass) - 1.0) > 0.1
    two_pass = np.mean((x - np.mean(x)) ** 2)
    assert abs(float(two_pass) - 1.0) < 0.1


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_float16_statistics_are_not_computed_in_float16(method):
    # float16 values near 300 are spaced 0.25 apart: a float16 mean is off by up to 0.125
    # of a unit standard deviation, and the output mean with it. Computed in float32 (from
    # the exactly representable float16 inputs) the only error left is y's float16 rounding
    # (2^-11 relative on values up to ~4).
    rng = np.random.default_rng(3)
    x = (300 + rng.standard_normal((8, 4, 8, 8))).astype(np.float16)
    y, _ = method.forward(x, np.ones(4, np.float16), np.zeros(4, np.float16),
                          eps=1e-5, **options_for(method))
    mu, var = reference_stats(method, y.astype(np.float64), options_for(method))
    np.testing.assert_allclose(mu, 0.0, atol=2e-3)
    np.testing.assert_allclose(var, 1.0, atol=5e-3)


@pytest.mark.parametrize("method", METHODS, ids=repr)
@pytest.mark.parametrize("eps", [1e-8, 1e5], ids=["below float16", "above float16"])
def test_float16_inputs_take_any_eps_that_float32_holds(method, eps):
    # float16 inputs compute in float32, so eps is added in float32 and is checked there:
    # 1e-8 would round to 0 in float16 (below half its smallest subnormal, 2^-25) and 1e5
    # would overflow it (its largest value is 65504), and both are ordinary float32 numbers.
    rng = np.random.default_rng(4)
    x16 = (2 * rng.standard_normal((2, 4, 3, 3)) + 3).astype(np.float16)
    gamma, beta = np.ones(4, np.float16), np.zeros(4, np.float16)
    y16, _ = method.forward(x16, gamma, beta, eps=eps, **options_for(method))
    y32, _ = method.forward(x16.astype(np.float32), gamma.astype(np.float32),
                            beta.astype(np.float32), eps=eps, **options_for(method))
    assert y16.dtype == np.float16
    np.testing.assert_array_equal(y16, y32.astype(np.float16))


@pytest.mark.parametrize("eps", [1e-8, 1e5], ids=["below float16", "above float16"])
def test_a_float16_layer_accepts_at_its_first_forward_the_eps_it_was_built_with(eps):
    # The layer checks eps against the compute dtype when built (float32 for float16
    # parameters); the forward must not then refuse what the constructor accepted.
    x16 = (2 * np.random.default_rng(5).standard_normal((2, 4, 3, 3)) + 3).astype(np.float16)
    for name in ("bn", "ln", "sn"):
        layer = refnorm.build(name, 4, eps=eps, dtype=np.float16)
        assert layer.forward(x16, training=True).dtype == np.float16


@pytest.mark.parametrize("path", ["reference", "fast"])
@pytest.mark.parametrize("eps", [np.float64(1e-5), np.int64(1)])
@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_a_numpy_scalar_eps_keeps_the_float32_compute_dtype(method, eps, path):
    # check_eps accepts numpy scalars; under NEP 50 a float64 scalar added to the float32
    # variance would promote the whole computation to float64.
    rng = np.random.default_rng(5)
    x = (5 * rng.standard_normal(SHAPE) + 12).astype(np.float32)
    gamma, beta = np.ones(4, np.float32), np.zeros(4, np.float32)
    _, cache = method.forward(x, gamma, beta, eps=eps, path=path, **options_for(method))
    assert cache.x_hat.dtype == cache.rstd.dtype == np.float32


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_a_numpy_scalar_eps_is_accepted_on_array_api_strict(method):
    strict = pytest.importorskip("array_api_strict")
    rng = np.random.default_rng(6)
    x = strict.asarray((5 * rng.standard_normal(SHAPE) + 12).astype(np.float32))
    gamma, beta = strict.ones(4, dtype=strict.float32), strict.zeros(4, dtype=strict.float32)
    y, _ = method.forward(x, gamma, beta, eps=np.float64(1e-5), **options_for(method))
    want, _ = method.forward(x, gamma, beta, eps=1e-5, **options_for(method))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want))

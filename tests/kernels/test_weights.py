"""The Weight Standardization kernels equal the reference (refnorm.weights.standardization).

Forward: the kernel on ``w`` (float32 or float64, any layout, an offset of 0 or 1e3, constant
rows drawn often) against the reference in float64 on the same values, every field of the
cache. Backward: the kernel given the reference cache's fields (cast to the dtype) against the
reference backward in float64. Tolerances as in tests/kernels/helpers: standardizing a row is
conditioned by ``kappa = 1 + max|mean| / min(denominator)`` as an activation's is.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from refnorm import kernels
from refnorm.weights.standardization import (
    weight_standardization_backward,
    weight_standardization_forward,
)
from tests.kernels.helpers import assert_close, upstream


@st.composite
def weights(draw):
    """(w, eps, eps_mode, correction): 4-D or 2-D weights, some rows constant."""
    C_out = draw(st.integers(1, 5))
    tail = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    if np.prod(tail) < 2:
        tail = tail + (2,)
    shape = (C_out,) + tail
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    offset = draw(st.sampled_from([0.0, 1e3]))
    w = offset + draw(arrays(np.float64, shape, elements=st.floats(-2, 2, allow_nan=False,
                                                                    allow_subnormal=False)))
    w += np.random.default_rng(sum(shape)).standard_normal(shape)
    constant = draw(st.lists(st.booleans(), min_size=C_out, max_size=C_out))
    for o, flat in enumerate(constant):
        if flat:
            w[o] = offset + 0.5
    w = w.astype(dtype)
    if draw(st.booleans()):  # a reversed, non-contiguous view
        w = np.flip(w.copy(), 0)
    eps = draw(st.sampled_from([1e-5, 1e-3]))
    return w, eps, draw(st.sampled_from(["add", "sqrt"])), draw(st.sampled_from([0, 1]))


@given(case=weights())
def test_forward_equals_reference(case):
    w, eps, mode, corr = case
    dtype = w.dtype.type
    want, cache = weight_standardization_forward(w.astype(np.float64), eps=eps, eps_mode=mode,
                                                 correction=corr)
    got = kernels.ws_forward(w, eps, mode, corr)
    # w - mean is rounded relative to |mean| by any implementation: conditioned like x_hat
    rows = w.astype(np.float64).reshape(w.shape[0], -1)
    kappa = 1.0 + float(np.max(np.abs(rows.mean(axis=1))) / np.min(cache.denom))
    for name, g, r in (("w_hat", got.w_hat, cache.w_hat), ("denom", got.denom, cache.denom),
                       ("kappa", got.kappa, cache.kappa)):
        assert g.shape == r.shape and g.dtype == dtype, name
        assert_close(name, g, r, dtype, kappa if name == "w_hat" else 1.0)
    assert_close("w_hat (as w)", got.w_hat.reshape(w.shape), want, dtype, kappa)


@given(case=weights())
def test_backward_equals_reference(case):
    w, eps, mode, corr = case
    dtype = w.dtype.type
    _, cache = weight_standardization_forward(w.astype(np.float64), eps=eps, eps_mode=mode,
                                              correction=corr)
    g = upstream(w.shape, np.float64, seed=w.size)
    want = weight_standardization_backward(g, cache)
    got = kernels.ws_backward(g.astype(dtype), cache.w_hat.astype(dtype),
                              cache.denom.astype(dtype), cache.kappa.astype(dtype))
    assert got.dtype == dtype
    # dw is a difference of terms of size |g| / d and kappa |<w_hat, g>| |w_hat| / d per row
    g2 = g.reshape(cache.w_hat.shape)
    terms = (np.max(np.abs(g2), axis=1, keepdims=True) + cache.kappa
             * np.sum(np.abs(cache.w_hat * g2), axis=1, keepdims=True)
             * np.max(np.abs(cache.w_hat), axis=1, keepdims=True)) / cache.denom
    scale = float(np.max(terms))
    assert_close("dw", got.reshape(w.shape), want, dtype, scale=scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("correction", [0, 1])
@pytest.mark.parametrize("eps_mode", ["add", "sqrt"])
def test_every_convention_equals_the_reference(eps_mode, correction, dtype):
    """Each of the four conventions (Qiao et al.'s Eq. 2 and 4, the sqrt placement of eps,
    the official code's unbiased sigma) on fixed weights, beside the drawn cases above
    (25 draws of four independent choices need not meet every pair): filters of I = 27 and
    of I = 2 (where I / (I - 1) = 2), the last one constant."""
    rng = np.random.default_rng(43)
    for shape in ((4, 3, 3, 3), (3, 2)):
        w = rng.standard_normal(shape)
        w[-1] = 0.5                                           # sigma = 0
        w = w.astype(dtype)
        kw = {"eps": 1e-3, "eps_mode": eps_mode, "correction": correction}
        want, cache = weight_standardization_forward(w.astype(np.float64), **kw)
        got = kernels.ws_forward(w, 1e-3, eps_mode, correction)
        rows = w.astype(np.float64).reshape(shape[0], -1)
        kappa = 1.0 + float(np.max(np.abs(rows.mean(axis=1))) / np.min(cache.denom))
        for name in ("w_hat", "denom", "kappa"):
            assert_close(name, getattr(got, name), getattr(cache, name), dtype,
                         kappa if name == "w_hat" else 1.0)
        assert_close("w_hat (as w)", got.w_hat.reshape(shape), want, dtype, kappa)
        g = upstream(shape, np.float64, seed=w.size)
        dw = kernels.ws_backward(g.astype(dtype), cache.w_hat.astype(dtype),
                                 cache.denom.astype(dtype), cache.kappa.astype(dtype))
        g2 = g.reshape(cache.w_hat.shape)
        terms = (np.max(np.abs(g2), axis=1, keepdims=True) + cache.kappa
                 * np.sum(np.abs(cache.w_hat * g2), axis=1, keepdims=True)
                 * np.max(np.abs(cache.w_hat), axis=1, keepdims=True)) / cache.denom
        assert_close("dw", dw.reshape(shape), weight_standardization_backward(g, cache), dtype,
                     scale=float(np.max(terms)))


def test_weights_whose_sum_overflows_float32_are_refused():
    """float32 rows of 20 weights of 3e37: the squared deviations are 0 but the row sum
    (6e38) overflows float32. The reference sums the row in float32 and refuses; the kernel
    sums in float64 and refuses the same weights with the same error."""
    w = np.full((2, 20), 3e37, np.float32)
    for mode in ("add", "sqrt"):
        with pytest.raises(ValueError, match="the variance of w overflows float32"):
            weight_standardization_forward(w, eps=1e-5, eps_mode=mode)
        with pytest.raises(ValueError, match="the variance of w overflows float32"):
            kernels.ws_forward(w, 1e-5, mode, 0)


@pytest.mark.parametrize(("eps_mode", "eps"), [("add", 1e20), ("sqrt", 2e37)])
def test_a_large_eps_is_not_taken_for_an_overflowing_variance(eps_mode, eps):
    """float32 filters of standard-normal weights with an eps the dtype holds: sigma^2 * I is
    about 27, far below float32's 3.4e38, so the reference accepts them; the kernel's
    denominator is near eps (or sqrt(eps)), and its square times I overflows float32, which
    the kernel's overflow check used to read as an overflowing variance and refuse. The
    standardized weights are (w - mean) / denom (Qiao et al. 2019, Eq. 2), computed here in
    float64."""
    w = np.random.default_rng(0).standard_normal((4, 27)).astype(np.float32)
    w64 = w.astype(np.float64)
    sd = w64.std(axis=1, keepdims=True)
    denom = sd + eps if eps_mode == "add" else np.sqrt(sd**2 + eps)
    want = (w64 - w64.mean(axis=1, keepdims=True)) / denom
    got = kernels.ws_forward(w, eps, eps_mode, 0).w_hat
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("eps_mode", ["add", "sqrt"])
def test_float64_filters_whose_squares_overflow_are_refused_in_either_eps_mode(eps_mode):
    """float64 weights of 1e160: the sum of their squared deviations is inf, so sigma and the
    denominator are inf and, with eps added to sigma, kappa = inf / inf is NaN. The reference
    refuses them; reading sigma back from a NaN kappa as 0 would return w_hat = 0."""
    w = 1e160 * np.random.default_rng(1).standard_normal((3, 18))
    with pytest.raises(ValueError, match="the variance of w overflows float64"):
        weight_standardization_forward(w.reshape(3, 2, 3, 3), eps_mode=eps_mode)
    with pytest.raises(ValueError, match="the variance of w overflows float64"):
        kernels.ws_forward(w, 1e-5, eps_mode, 0)


def test_a_filter_whose_sum_overflows_is_refused_beside_a_nan_filter():
    """As the test above, with a NaN in filter 0: a NaN filter excuses no other filter's
    overflowing sum, on the kernel as on the reference."""
    w = np.full((2, 20), 3e37, np.float32)
    w[0, 3] = np.nan
    with pytest.raises(ValueError, match="the variance of w overflows float32"):
        weight_standardization_forward(w, eps=1e-5)
    with pytest.raises(ValueError, match="the variance of w overflows float32"):
        kernels.ws_forward(w, 1e-5, "add", 0)
    w[1] = np.linspace(-1, 1, 20)  # an ordinary filter beside the NaN one: no error
    w_hat = kernels.ws_forward(w, 1e-5, "add", 0).w_hat
    assert np.isnan(w_hat[0]).all() and np.isfinite(w_hat[1]).all()

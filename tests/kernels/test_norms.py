"""The normalizer kernels equal the reference (refnorm.norms) on hypothesis-drawn inputs.

Forward: the kernel on ``x`` (float32 or float64, any layout) against the reference in float64
on the same values, every field the reference cache holds. Backward: the kernel given the
reference cache's fields (cast to the dtype) against the reference backward in float64, so a
backward error is not hidden behind or blamed on the forward. Tolerances: tests/kernels/helpers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refnorm import kernels
from refnorm.kernels import norms as kernel_norms
from refnorm.norms.batch_norm import (
    batch_norm_backward,
    batch_norm_eval_forward,
    batch_norm_forward,
)
from refnorm.norms.group_norm import group_norm_backward, group_norm_forward
from refnorm.norms.instance_norm import (
    instance_norm_backward,
    instance_norm_eval_forward,
    instance_norm_forward,
)
from refnorm.norms.layer_norm import layer_norm_backward, layer_norm_forward
from tests.kernels.helpers import (
    CHUNKING,
    activations,
    assert_close,
    chunking,
    kappa_of,
    params,
    rel_err,
    sn_reference,
    upstream,
)

EPS = 1e-5


def _ref_gn(x, g, b, groups):
    return group_norm_forward(x, g, b, num_groups=groups, eps=EPS)


# name: (reference forward, reference backward, kernel forward, kernel backward, min ndim)
METHODS = {
    "bn": (lambda x, g, b, G: batch_norm_forward(x, g, b, eps=EPS), batch_norm_backward,
           lambda x, g, b, G: kernels.bn_forward(x, g, b, EPS), kernels.bn_backward, 2),
    "in": (lambda x, g, b, G: instance_norm_forward(x, g, b, eps=EPS), instance_norm_backward,
           lambda x, g, b, G: kernels.in_forward(x, g, b, EPS), kernels.in_backward, 3),
    "ln": (lambda x, g, b, G: layer_norm_forward(x, g, b, eps=EPS), layer_norm_backward,
           lambda x, g, b, G: kernels.ln_forward(x, g, b, EPS), kernels.ln_backward, 2),
    "gn": (_ref_gn, group_norm_backward,
           lambda x, g, b, G: kernels.gn_forward(x, g, b, EPS, G), kernels.gn_backward, 2),
}


@st.composite
def norm_cases(draw, method):
    """(x, groups, chunk limits): N in 1..3, odd sizes, spatial rank 0..2 (>= 1 for IN)."""
    min_ndim = METHODS[method][4]
    N = draw(st.integers(1, 3))
    G = draw(st.integers(1, 3)) if method == "gn" else 1
    C = G * draw(st.integers(1, 3))
    spatial = tuple(draw(st.lists(st.integers(1, 7), min_size=min_ndim - 2, max_size=2)))
    shape = (N, C) + spatial
    count = {"bn": N * math.prod(spatial), "in": math.prod(spatial),
             "ln": C * math.prod(spatial), "gn": C // G * math.prod(spatial)}[method]
    if count < 2:  # the reference refuses a statistic of one value; so would the dispatch
        shape = (N, C) + spatial + (2,)
    x = draw(activations(shape=shape))
    return x, G, draw(CHUNKING)


@pytest.mark.parametrize("method", sorted(METHODS))
@given(data=st.data())
def test_forward_equals_reference(method, data):
    ref_fwd, _, fwd, _, _ = METHODS[method]
    x, G, limits = data.draw(norm_cases(method))
    gamma, beta = params(x.shape[1], x.dtype, seed=x.size)
    want_y, cache = ref_fwd(x.astype(np.float64), gamma.astype(np.float64),
                            beta.astype(np.float64), G)
    with chunking(limits):
        y, x_hat, mean, var, rstd = fwd(x, gamma, beta, G)
    kappa = kappa_of(cache.mean, cache.var, EPS)
    assert y.dtype == x.dtype and x_hat.dtype == x.dtype
    for name, got, want in (("y", y, want_y), ("x_hat", x_hat, cache.x_hat),
                            ("mean", mean, cache.mean), ("var", var, cache.var),
                            ("rstd", rstd, cache.rstd)):
        assert got.shape == want.shape, (name, got.shape, want.shape)
        assert_close(name, got, want, x.dtype.type, kappa)


@pytest.mark.parametrize("method", sorted(METHODS))
@given(data=st.data())
def test_backward_equals_reference(method, data):
    ref_fwd, ref_bwd, _, bwd, _ = METHODS[method]
    x, G, limits = data.draw(norm_cases(method))
    dtype = x.dtype.type
    gamma, beta = params(x.shape[1], np.float64, seed=x.size)
    _, cache = ref_fwd(x.astype(np.float64), gamma, beta, G)
    dy = upstream(x.shape, np.float64, seed=x.size + 1)
    want = ref_bwd(dy, cache)
    flip = data.draw(st.booleans())  # a negative-stride dy
    dy_k = dy.astype(dtype)[::-1][::-1] if not flip else np.flip(dy[::-1].astype(dtype), 0)
    with chunking(limits):
        got = bwd(dy_k, cache.x_hat.astype(dtype), cache.rstd.astype(dtype),
                  gamma.astype(dtype))
    axes = (0,) + tuple(range(2, x.ndim))
    # dgamma and dbeta are sums that can cancel: their rounding is relative to the sums of
    # the terms' sizes, not to the (possibly tiny) result, as dx's is to max|terms|.
    scales = {"dx": _term_scale(dy, gamma, cache.rstd),
              "dgamma": float(np.max(np.sum(np.abs(dy * cache.x_hat), axis=axes))),
              "dbeta": float(np.max(np.sum(np.abs(dy), axis=axes)))}
    for name, g, w in zip(("dx", "dgamma", "dbeta"), got, want, strict=True):
        assert g.dtype == dtype, (name, g.dtype)
        assert_close(name, g, w, dtype, scale=scales[name])


@pytest.mark.parametrize("method", ["bn", "in"])
@given(data=st.data())
def test_inference_forward_and_backward_equal_reference(method, data):
    """kernels.norms.eval_forward / eval_backward against BN's and IN's inference pair."""
    ref_fwd, ref_bwd = {"bn": (batch_norm_eval_forward, batch_norm_backward),
                        "in": (instance_norm_eval_forward, instance_norm_backward)}[method]
    x, _, limits = data.draw(norm_cases(method))
    dtype = x.dtype.type
    C = x.shape[1]
    gamma, beta = params(C, np.float64, seed=x.size)
    rng = np.random.default_rng(x.size + 2)
    # running statistics held in the dtype, as a layer holds them: the reference in float64
    # normalizes with the same (rounded) values, so only the kernel's arithmetic differs (a
    # float32 mean of 1e4 is off by 5e-4, which would dominate x - mean otherwise)
    running = [s.astype(dtype).astype(np.float64)
               for s in (float(np.mean(x)) + rng.standard_normal(C), rng.random(C) * 4 + 0.1)]
    want_y, cache = ref_fwd(x.astype(np.float64), gamma, beta, *running, eps=EPS)
    mean, var = (s.astype(dtype) for s in (cache.mean, cache.var))
    with chunking(limits):
        got = kernels.eval_forward(x, gamma.astype(dtype), beta.astype(dtype), mean, var, EPS)
    kappa = kappa_of(cache.mean, cache.var, EPS)
    for name, g, w in (("y", got.y, want_y), ("x_hat", got.x_hat, cache.x_hat),
                       ("rstd", got.rstd, cache.rstd)):
        assert g.shape == w.shape and g.dtype == x.dtype, name
        assert_close(name, g, w, dtype, kappa)
    dy = upstream(x.shape, np.float64, seed=x.size + 1)
    want = ref_bwd(dy, cache)
    with chunking(limits):
        grads = kernels.eval_backward(dy.astype(dtype), cache.x_hat.astype(dtype),
                                      cache.rstd.astype(dtype), gamma.astype(dtype))
    axes = (0,) + tuple(range(2, x.ndim))
    scales = {"dx": _term_scale(dy, gamma, cache.rstd),
              "dgamma": float(np.max(np.sum(np.abs(dy * cache.x_hat), axis=axes))),
              "dbeta": float(np.max(np.sum(np.abs(dy), axis=axes)))}
    for name, g, w in zip(("dx", "dgamma", "dbeta"), grads, want, strict=True):
        assert g.dtype == dtype, name
        assert_close(name, g, w, dtype, scale=scales[name])


def _term_scale(dy, gamma, rstd) -> float:
    """``max|gamma| max|rstd| max|dy|``, a bound on the size of dx's terms (helpers.rel_err)."""
    return float(np.max(np.abs(gamma)) * np.max(rstd) * np.max(np.abs(dy)))


def test_float32_large_offset_beats_the_one_pass_formula():
    """1e4 + randn in float32: the kernel's moments agree with float64 to float32 rounding,
    where E[x^2] - E[x]^2 in float32 loses every digit (the reason this test exists)."""
    rng = np.random.default_rng(0)
    x = (1e4 + rng.standard_normal((2, 4, 33, 31))).astype(np.float32)
    gamma, beta = np.ones(4, np.float32), np.zeros(4, np.float32)
    _, _, mean, var, _ = kernels.bn_forward(x, gamma, beta, EPS)
    x64 = x.astype(np.float64)
    want = x64.var(axis=(0, 2, 3))
    assert rel_err(var.ravel(), want) < 1e-6
    one_pass = (x * x).mean(axis=(0, 2, 3)) - x.mean(axis=(0, 2, 3)) ** 2
    assert rel_err(one_pass, want) > 1e-2  # the failure the kernel avoids


@st.composite
def sn_cases(draw):
    N, C = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    spatial = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=2)))
    if math.prod(spatial) < 2:
        spatial = spatial + (2,)
    scopes = tuple(draw(st.permutations(["in", "ln", "bn"]))[:draw(st.integers(1, 3))])
    if N * math.prod(spatial) < 2 or C * math.prod(spatial) < 2:
        scopes = ("in",)
    x = draw(activations(shape=(N, C) + spatial))
    # the variance conventions: biased, unbiased IN (SwitchNorm2d), every scope unbiased
    # (SwitchNorm1d); as (in_correction, scope_correction)
    corrections = draw(st.sampled_from([(0, 0), (1, 0), (0, 1)]))
    hard = draw(st.booleans())
    logits = [np.asarray(draw(arrays_k(len(scopes)))) for _ in range(2)]
    given = "bn" in scopes and draw(st.booleans())  # inference: population BN statistics
    return x, scopes, corrections, hard, logits, draw(CHUNKING), given


def arrays_k(K):
    return st.lists(st.floats(-2, 2, allow_nan=False), min_size=K, max_size=K).map(np.array)


@given(case=sn_cases())
def test_switchable_equals_reference(case):
    x, scopes, (corr, scope_corr), hard, logits, limits, given = case
    dtype = x.dtype.type
    N, C = x.shape[:2]
    gamma, beta = params(C, np.float64, seed=x.size)
    population = None
    if given:  # near the batch's own BN statistics, as after training
        rng = np.random.default_rng(x.size + 2)
        x64 = x.astype(np.float64)
        population = tuple(  # held in the dtype, as a layer holds them (see above)
            s.astype(dtype).astype(np.float64) for s in (
                x64.mean(axis=(0, *range(2, x.ndim))) + 0.1 * rng.standard_normal(C),
                x64.var(axis=(0, *range(2, x.ndim))) * (1 + 0.1 * rng.random(C)) + 0.1))
    want_y, cache, backward, logit_scale = sn_reference(
        x.astype(np.float64), gamma, beta, logits, eps=EPS, scopes=scopes, in_correction=corr,
        hard=hard, population=population, scope_correction=scope_corr)
    ratios = (cache.w_mean, cache.w_var)
    bn = None if not given else (cache.mu["bn"].astype(dtype), cache.var["bn"].astype(dtype))
    with chunking(limits):
        got_forward = kernels.sn_forward(
            x, gamma.astype(dtype), beta.astype(dtype), *ratios, eps=EPS, scopes=scopes,
            in_correction=corr, scope_correction=scope_corr, bn=bn)
    kappa = kappa_of(cache.mu["in"], cache.var["in"], EPS)
    for name in ("y", "h", "x_hat", "rstd"):
        want = want_y if name == "y" else getattr(cache, name)
        assert_close(name, getattr(got_forward, name), want, dtype, kappa)
    for k in ("in", "ln", "bn"):
        assert_close(f"mu[{k}]", got_forward.mu[k], cache.mu[k], dtype, kappa)
        assert_close(f"var[{k}]", got_forward.var[k], cache.var[k], dtype, kappa)
        # the offsets from each side's own stored mu["in"]: their differences mu_k - mu_in
        # are what both hold, to the dtype's precision on the data's scale (no kappa)
        assert_close(f"offset[{k}] - offset[in]",
                     np.asarray(got_forward.offset[k], np.float64) - got_forward.offset["in"],
                     cache.offset[k] - cache.offset["in"], dtype,
                     scale=float(np.max(np.sqrt(cache.var["in"] + EPS))))
    dy = upstream(x.shape, np.float64, seed=x.size + 1)
    want = backward(dy)
    stats = ({k: v.astype(dtype) for k, v in cache.offset.items()},
             {k: v.astype(dtype) for k, v in cache.var.items()})
    with chunking(limits):
        got = kernels.sn_backward(
            dy.astype(dtype), cache.x_hat.astype(dtype), cache.rstd.astype(dtype),
            gamma.astype(dtype), stats, ratios, scopes=scopes, in_correction=corr,
            scope_correction=scope_corr, hard=hard, frozen=("bn",) if given else ())
    names = ("dx", "dgamma", "dbeta", "dmean_logits", "dvar_logits")
    scales = dict(zip(("dmean_logits", "dvar_logits"), logit_scale(dy), strict=True),
                  dx=_term_scale(dy, gamma, cache.rstd))
    for name, g, w in zip(names, got, want, strict=True):
        # dx and the logit gradients need differences of means (mu_mix - mu_in, mu_in - mu_k),
        # which the cache holds as offsets from its IN mean: a float32 cache keeps them to
        # eps32 of their own size, so float32 needs no kappa; the float64 reference's x_hat
        # and means are conditioned by kappa, as the forward is (dgamma, dbeta are not: they
        # need dy and x_hat only)
        k = 1.0 if name in ("dgamma", "dbeta") else kappa
        assert_close(name, np.reshape(g, np.shape(w)), w, dtype, k, scale=scales.get(name, 0.0))


def test_float16_computes_in_float32_and_returns_float16():
    """float16 input: y comes back in float16, the cache fields in float32, as the reference."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 5, 3)).astype(np.float16)
    gamma, beta = params(4, np.float16, seed=2)
    want_y, cache = group_norm_forward(x, gamma, beta, num_groups=2, eps=EPS)
    y, x_hat, mean, var, rstd = kernels.gn_forward(x, gamma, beta, EPS, 2)
    assert y.dtype == np.float16 and x_hat.dtype == cache.x_hat.dtype == np.float32
    assert rel_err(x_hat, cache.x_hat) < 1e-5  # float32 arithmetic on both sides
    # y is rounded to float16 by both (eps16 = 9.8e-4): at most one float16 ulp apart
    assert rel_err(y, want_y) < 2e-3


def test_switchable_statistics_merge_a_last_chunk_shorter_than_the_others():
    """SN's moments come in chunks of a plane merged by Chan's formula: with planes of 5
    values cut into chunks of 3, the last chunk holds two values (its own mean, its own
    weight in the merge). Every scope's mean and variance equal numpy's in float64.
    (The drawn cases reach such a chunk only by chance: most drawn chunks divide S.)"""
    rng = np.random.default_rng(0)
    x = 3 + rng.standard_normal((2, 4, 5)) * np.arange(1, 6)   # (N, C, S), S = 5
    with chunking(("never", (3, 3), False)):  # chunks of 3 values, whatever the threads
        k = kernels.sn_forward(x, np.ones(4), np.zeros(4), np.ones(3) / 3, np.ones(3) / 3,
                               eps=1e-5, scopes=("in", "ln", "bn"))
    for scope, axes in (("in", (2,)), ("ln", (1, 2)), ("bn", (0, 2))):
        np.testing.assert_allclose(k.mu[scope], x.mean(axis=axes, keepdims=True),
                                   rtol=1e-13, err_msg=scope)
        np.testing.assert_allclose(k.var[scope], x.var(axis=axes, keepdims=True),
                                   rtol=1e-12, err_msg=scope)


def test_the_work_layout_follows_the_documented_rules(monkeypatch):
    """refnorm.kernels.norms: one task per statistic where the units keep every thread busy
    and fit the L2 cache; (plane, chunk) tasks for BN beyond BN_UNITS_UP_TO samples (its
    channels' planes lie a sample apart) and for units beyond MAX_UNIT values; UNIT_PATH
    forces either."""
    monkeypatch.setattr(kernel_norms, "UNIT_PATH", "auto")
    many = 4 * kernel_norms.threads()                   # units enough for every thread
    few_samples = kernel_norms.BN_UNITS_UP_TO
    assert kernel_norms._use_units(many, 1024, 1, 2)    # LN rows, small: one task each
    assert kernel_norms._use_units(many, 1024, 0, few_samples)
    assert not kernel_norms._use_units(many, 1024, 0, few_samples + 1)
    assert kernel_norms._use_units(many, kernel_norms.MAX_UNIT, 4, 2)
    assert not kernel_norms._use_units(many, kernel_norms.MAX_UNIT + 1, 4, 2)
    monkeypatch.setattr(kernel_norms, "UNIT_PATH", "never")
    assert not kernel_norms._use_units(many, 1024, 1, 2)
    monkeypatch.setattr(kernel_norms, "UNIT_PATH", "always")
    assert kernel_norms._use_units(many, kernel_norms.MAX_UNIT + 1, 0, 64)


@pytest.mark.parametrize("layout", [("always", None, False), ("never", (4096, 4096), False),
                                    ("always", None, True)])
@pytest.mark.parametrize("method", ["bn", "in", "ln"])
def test_planes_longer_than_one_cache_segment_have_exact_moments(method, layout):
    """A plane (one task per statistic) or a chunk (plane tasks) is read in segments of
    L1_VALUES values, each in two passes, merged by Chan's formula. The drawn cases are far
    smaller than one segment: here planes of two full segments and a short one of 5 values
    (chunks of 2051 with the limits given: a full segment and one of 3) give numpy's float64
    mean and variance, every value counted once."""
    from refnorm.kernels import _loops

    S = 2 * _loops.L1_VALUES + 5
    rng = np.random.default_rng(7)
    # the spread grows along the plane: a dropped or double-counted value moves the moments
    x = 5.0 + rng.standard_normal((2, 3, S)) * np.linspace(0.5, 2.0, S)
    axes = {"bn": (0, 2), "in": (2,), "ln": (1, 2)}[method]
    forward = METHODS[method][2]
    with chunking(layout):
        y, x_hat, mean, var, rstd = forward(x, np.ones(3), np.zeros(3), 1)
    np.testing.assert_allclose(mean, x.mean(axis=axes, keepdims=True), rtol=1e-13)
    np.testing.assert_allclose(var, x.var(axis=axes, keepdims=True), rtol=1e-12)
    want = (x - x.mean(axis=axes, keepdims=True)) / np.sqrt(x.var(axis=axes, keepdims=True) + EPS)
    assert_close("x_hat", x_hat, want, np.float64)


@pytest.mark.parametrize("layout", [("always", None, False), ("never", (1024, 1024), False)])
@pytest.mark.parametrize("method", ["bn", "in", "ln", "gn", "eval", "sn"])
def test_float32_parameter_gradients_are_float64_sums(method, layout):
    """The kernels widen float32 data to float64 before any arithmetic (refnorm.kernels._loops):
    with float64 parameters, dgamma = sum(dy x_hat) and dbeta = sum(dy) come back in float64
    and equal the float64 sums of the float32 values to float64 rounding, over planes of
    thousands of values, where a float32 product or running sum would be off by 1e-7..1e-5."""
    rng = np.random.default_rng(11)
    shape = (2, 4, 48, 64)
    dy = rng.standard_normal(shape).astype(np.float32)
    x_hat = rng.standard_normal(shape).astype(np.float32)
    rstd = np.ones((1, 4, 1, 1), np.float32)
    gamma = 1.0 + rng.standard_normal(4)                         # float64
    with chunking(layout):
        if method == "sn":
            stats = ({k: np.zeros((1, 1, 1), np.float32) for k in ("in", "ln", "bn")},
                     {k: np.ones((1, 1, 1), np.float32) for k in ("in", "ln", "bn")})
            got = kernels.sn_backward(dy, x_hat.reshape(2, 4, -1), np.ones((2, 4, 1), np.float32),
                                      gamma, stats, (np.ones(1), np.ones(1)), scopes=("in",))
        elif method == "eval":
            got = kernels.eval_backward(dy, x_hat, rstd, gamma)
        else:
            r = {"bn": rstd, "in": np.ones((2, 4, 1, 1), np.float32),
                 "ln": np.ones((2, 1, 1, 1), np.float32),
                 "gn": np.ones((2, 2, 1, 1, 1), np.float32)}[method]
            got = METHODS[method][3](dy, x_hat, r, gamma)
    d64, h64 = dy.astype(np.float64), x_hat.astype(np.float64)
    axes = (0, 2, 3)
    for name, value, terms in (("dgamma", got.dgamma, d64 * h64), ("dbeta", got.dbeta, d64)):
        assert value.dtype == np.float64, name
        err = np.max(np.abs(value - terms.sum(axis=axes)) / np.abs(terms).sum(axis=axes))
        assert err < 1e-13, f"{name}: error {err:.3g} relative to the sum of |terms|"


@pytest.mark.parametrize("layout", [("always", None, False), ("never", None, False),
                                    ("never", (2, 5), False)])
@pytest.mark.parametrize("method", ["bn", "in", "ln", "gn"])
def test_one_overflowing_statistic_among_others_is_refused(method, layout):
    """float32 values of 1e19 in the first channel of the first sample only: that one
    statistic's squared deviations overflow float32 (the reference's sum is infinite and it
    refuses), while every later statistic fits. The kernels count the overflowing units
    over all units, in either work layout, and refuse as the reference does."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 3, 5)).astype(np.float32)
    x[0, 0] *= np.float32(1e19)
    gamma, beta = params(4, np.float32, seed=1)
    with chunking(layout), pytest.raises(ValueError, match="the variance of x overflows float32"):
        METHODS[method][2](x, gamma, beta, 2)
@pytest.mark.parametrize("layout", [("always", None, False), ("never", None, False),
                                    ("never", (2, 5), False)])
@pytest.mark.parametrize("method", ["bn", "in", "ln", "gn"])
def test_an_overflowing_statistic_beside_a_nan_statistic_is_refused_as_the_reference_does(
        method, layout):
    """As the test above, with a NaN in the last channel of the last sample, a statistic of
    its own: the NaN unit's sum is NaN, not an overflow, and excuses no other unit. Both
    paths raise the same error, which quotes the largest |x| of the refused statistic."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 3, 5)).astype(np.float32)
    x[0, 0] *= np.float32(1e19)
    x[1, 3, 0, 0] = np.nan
    gamma, beta = params(4, np.float32, seed=1)
    with pytest.raises(ValueError, match="the variance of x overflows float32") as want:
        METHODS[method][0](x, gamma, beta, 2)
    with chunking(layout), pytest.raises(ValueError) as got:
        METHODS[method][2](x, gamma, beta, 2)
    assert str(got.value) == str(want.value)
    x[0, 0] /= np.float32(1e19)  # ordinary statistics beside the NaN one: no error
    with chunking(layout):
        y = METHODS[method][2](x, gamma, beta, 2).y
    want_y = METHODS[method][0](x, gamma, beta, 2)[0]
    np.testing.assert_array_equal(np.isnan(y), np.isnan(want_y))
    assert np.isnan(y[1, 3]).all() and np.isfinite(y[0, 0]).all()


@pytest.mark.parametrize("layout", [("always", None, False), ("never", (2, 5), False)])
def test_constant_planes_normalize_to_exactly_zero(layout):
    """Instance Normalization of planes of 7 equal values near 1e4: the kernels sum each
    segment or chunk shifted by its first value (refnorm.kernels._loops), so the shifted sum
    is exactly 0, the mean exactly the value and the variance exactly 0 (an unshifted sum
    of 7 copies divided by 7 misses the value by an ulp for about a third of such values);
    x_hat is then exactly 0 and y exactly beta, in either work layout."""
    rng = np.random.default_rng(8)
    values = 1e4 + rng.random((4, 5, 1))
    x = np.repeat(values, 7, axis=2)                            # (N, C, S), constant planes
    gamma, beta = params(5, np.float64, seed=2)
    with chunking(layout):
        y, x_hat, mean, var, _ = kernels.in_forward(x, gamma, beta, EPS)
    np.testing.assert_array_equal(mean, values)
    np.testing.assert_array_equal(var, np.zeros_like(values))
    np.testing.assert_array_equal(x_hat, np.zeros_like(x))
    np.testing.assert_array_equal(y, np.broadcast_to(beta[None, :, None], x.shape))



@pytest.mark.parametrize("scopes", [("in",), ("in", "ln", "bn")])
def test_switchable_refuses_an_overflowing_plane_sum_beside_a_nan_plane(scopes):
    """As the test below, with a NaN in another sample's plane: it makes its own plane's (and
    LN and BN scopes') statistics NaN and excuses no other plane's overflowing sum."""
    x = np.full((2, 3, 20), 3e37, np.float32)
    x[1, 2, 0] = np.nan
    ones, zeros = np.ones(3, np.float32), np.zeros(3, np.float32)
    K = len(scopes)
    with pytest.raises(ValueError, match="the variance of x overflows float32"):
        sn_reference(x, ones, zeros, [np.zeros(K, np.float32)] * 2, eps=EPS, scopes=scopes,
                     in_correction=0)
    with pytest.raises(ValueError, match="the variance of x overflows float32"):
        kernels.sn_forward(x, ones, zeros, np.full(K, 1 / K), np.full(K, 1 / K), eps=EPS,
                           scopes=scopes)


def test_switchable_refuses_an_ln_pool_whose_sum_of_in_means_overflows_beside_a_nan():
    """(N, C) input, one value per plane, scopes LN and BN: sample 1's four IN means of 1e38
    fit float32, as does each plane's sum, but the LN pool's sum of them (4e38) does not. The
    reference's LN mean is then infinite and it refuses; the kernel, whose float64 LN
    variance is 0, refuses the same input by that sum. Sample 0's NaN excuses nothing."""
    x = np.full((2, 4), 1e38, np.float32)
    x[0, 0] = np.nan
    ones, zeros = np.ones(4, np.float32), np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="the variance of x overflows float32"):
        sn_reference(x, ones, zeros, [np.zeros(2, np.float32)] * 2, eps=EPS, scopes=("ln", "bn"),
                     in_correction=0)
    with pytest.raises(ValueError, match="the variance of x overflows float32"):
        kernels.sn_forward(x, ones, zeros, np.full(2, 0.5), np.full(2, 0.5), eps=EPS,
                           scopes=("ln", "bn"))


def test_switchable_refuses_float32_values_whose_sum_overflows():
    """float32 planes of 20 values of 3e37: their squared deviations are 0 but their sum
    (6e38) overflows float32. The reference forms that sum in float32 and refuses (its mean
    is infinite); the kernel, which sums in float64, refuses the same input with the same
    error."""
    x = np.full((2, 3, 20), 3e37, np.float32)
    ones, zeros = np.ones(3, np.float32), np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="the variance of x overflows float32"):
        sn_reference(x, ones, zeros, [np.zeros(1, np.float32)] * 2, eps=EPS, scopes=("in",),
                     in_correction=0)
    with pytest.raises(ValueError, match="the variance of x overflows float32"):
        kernels.sn_forward(x, ones, zeros, np.ones(1), np.ones(1), eps=EPS, scopes=("in",))


def test_switchable_refuses_a_bn_scope_whose_sum_of_in_means_overflows_float32():
    """BN scope alone: IN means 3e38, 3e38 and 1 are finite float32 values and so is every
    plane's sum, but the BN pool sums the IN means to 6e38, beyond float32. The reference
    forms that sum in float32 and refuses; the kernel, which pools in float64, refuses the
    same input (the BN scope's pooled sums, not only the LN scope's)."""
    x = np.array([3e38, 3e38, 1.0], np.float32).reshape(3, 1, 1)
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    with pytest.raises(ValueError, match="the variance of x overflows float32"), \
            np.errstate(over="ignore", invalid="ignore"):
        sn_reference(x, one, zero, [zero] * 2, eps=EPS, scopes=("bn",), in_correction=0)
    with pytest.raises(ValueError, match="the variance of x overflows float32"), \
            np.errstate(over="ignore", invalid="ignore"):
        kernels.sn_forward(x, one, zero, np.ones(1), np.ones(1), eps=EPS, scopes=("bn",))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_switchable_inference_on_the_bn_scope_alone_keeps_dx_finite_beside_a_bad_input(bad):
    """SN at inference with the BN scope alone and given population statistics is an affine
    map of each value: y = gamma (x - mu) rstd + beta, so dx = gamma rstd dy whatever x holds.
    A NaN or an infinity in one input value leaves the other values' dx finite in the
    reference (refnorm.norms.switchable_norm.switchable_norm_backward), as BN's inference
    backward does (kernels.eval_backward); the kernel must not spread it over the plane
    through a zero coefficient times x_hat."""
    from refnorm.norms import switchable_norm as sn

    rng = np.random.default_rng(4)
    x = 12 + rng.standard_normal((2, 3, 5))
    x[0, 1, 2] = bad
    gamma, beta = params(3, np.float64, seed=3)
    mean, var = 12 + rng.standard_normal(3), 1 + rng.random(3)
    options = sn.SwitchableOptions(scopes=("bn",))
    dy = upstream(x.shape, np.float64, seed=5)
    for path in ("reference", "fast"):
        with np.errstate(invalid="ignore"):  # the bad value's own plane statistics
            _, cache = sn.switchable_norm_eval_forward(x, gamma, beta, np.zeros(1),
                                                       np.zeros(1), mean, var, eps=EPS,
                                                       options=options, path=path)
            dx = sn.switchable_norm_backward(dy, cache, path=path).dx
        want = gamma[None, :, None] * dy / np.sqrt(var[None, :, None] + EPS)
        np.testing.assert_allclose(dx, want, rtol=1e-13, err_msg=path)


def test_outputs_of_4_mib_or_more_are_streamed_and_smaller_ones_are_not():
    """docs/performance.md: outputs of 4 MiB or more (STREAM_FROM) are written with
    non-temporal stores; smaller ones, such as the training step's activations, with plain
    stores."""
    assert kernel_norms.STREAM_FROM == 4 * 2**20
    assert kernel_norms.streams(4 * 2**20)
    assert not kernel_norms.streams(4 * 2**20 - 1)


@pytest.mark.parametrize("method", ["bn", "gn"])
def test_streamed_outputs_start_on_a_64_byte_boundary(method):
    """The non-temporal stores write aligned 64-byte vectors: y, x_hat and dx of a streamed
    call are allocated 64-byte aligned (docs/performance.md), whatever their size."""
    rng = np.random.default_rng(7)
    gamma, beta = params(4, np.float32, seed=1)
    with chunking(("always", None, True)):  # every output streamed
        for size in (3, 5, 7, 9, 11, 13):
            x = rng.standard_normal((2, 4, size)).astype(np.float32)
            if method == "bn":
                k = kernels.bn_forward(x, gamma, beta, EPS)
                dx = kernels.bn_backward(x, k.x_hat, k.rstd, gamma).dx
            else:
                k = kernels.gn_forward(x, gamma, beta, EPS, 2)
                dx = kernels.gn_backward(x, k.x_hat, k.rstd, gamma).dx
            for name, a in (("y", k.y), ("x_hat", k.x_hat), ("dx", dx)):
                assert a.ctypes.data % 64 == 0, (name, size)


def test_the_inference_forward_compiles_its_loop_for_one_type_of_statistics():
    """docs/performance.md ("First run"): the per-plane statistics and coefficients the
    inference loops are given are always fresh writable float64 arrays, so a batch of one
    (where broadcasting the running statistics returns a read-only view) compiles no second
    signature of normalize_affine."""
    from numba import types

    rng = np.random.default_rng(8)
    gamma, beta = params(3, np.float64, seed=2)
    mean = rng.standard_normal((1, 3, 1, 1))
    var = 1 + rng.random((1, 3, 1, 1))
    for N in (1, 2):
        kernels.eval_forward(rng.standard_normal((N, 3, 4, 4)), gamma, beta, mean, var, EPS)
    stats = types.Array(types.float64, 1, "C")
    for signature in kernel_norms.loops().normalize_affine.signatures:
        assert list(signature[1:5]) == [stats] * 4, signature


def test_bn_takes_whole_channels_up_to_4_samples_and_memory_order_tasks_beyond(monkeypatch):
    """docs/performance.md: BN takes units only up to BN_UNITS_UP_TO = 4 samples; the
    training step's 32 samples run as tasks in memory order."""
    monkeypatch.setattr(kernel_norms, "UNIT_PATH", "auto")
    many = 4 * kernel_norms.threads()
    assert kernel_norms._use_units(many, 1024, 0, 4)
    assert not kernel_norms._use_units(many, 1024, 0, 5)
    assert not kernel_norms._use_units(many, 1024, 0, 32)


def test_every_loop_is_cached_on_disk_and_its_fastmath_only_reassociates_and_contracts():
    """docs/performance.md: numba keeps each kernel in its disk cache (``cache=True``), and
    ``fastmath`` allows only reassociation and contraction, so that NaN and infinities
    propagate as in the reference (no ``nnan``, ``ninf``, ``afn``...). The two thread-count
    helpers are compiled per process and hold no arithmetic."""
    from numba.core.caching import NullCache
    from numba.core.registry import CPUDispatcher

    compiled = kernel_norms.loops()
    loops = {name: obj for name, obj in vars(compiled).items()
             if isinstance(obj, CPUDispatcher) and name not in ("num_threads", "set_threads")}
    assert {"unit_forward", "tasks_backward", "chunk_moments", "im2col", "max_pool",
            "relu_backward", "ws_forward"} <= set(loops)
    for name, loop in loops.items():
        assert not isinstance(loop._cache, NullCache), name
        fastmath = loop.targetoptions.get("fastmath") or set()
        assert set(fastmath) <= {"reassoc", "contract"}, name


def test_a_few_large_planes_are_cut_into_4_tasks_per_thread(monkeypatch):
    """docs/performance.md: where a call's planes are few, chunk_size aims at 4 tasks per
    thread, and _use_units takes whole statistics only when they keep every thread busy
    (4 per thread, or a multiple of the thread count)."""
    monkeypatch.setattr(kernel_norms, "threads", lambda: 2)
    monkeypatch.setattr(kernel_norms, "UNIT_PATH", "auto")
    S = 4 * kernel_norms.MAX_CHUNK                         # 65 536 values: 4 chunks at least
    assert kernel_norms.chunk_size(1, S) == S // 8         # 8 tasks for 2 threads
    assert kernel_norms.chunk_size(2, S) == S // 4         # 2 planes x 4 chunks
    assert kernel_norms.chunk_size(8, 4096) == 4096        # planes enough: whole planes
    assert kernel_norms._use_units(8, 1024, 1, 8)          # 4 units per thread
    assert kernel_norms._use_units(6, 1024, 1, 6)          # a multiple of the threads
    assert not kernel_norms._use_units(5, 1024, 1, 5)      # 2.5 per thread: one idles

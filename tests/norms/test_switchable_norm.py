"""Switchable Normalization: gradients, the two backwards, one-hot limits, the layer, errors."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import refnorm
from refnorm.backend import to_numpy
from refnorm.gradcheck import check_vjp
from refnorm.norms.switchable_norm import (
    SCOPES,
    SwitchableOptions,
    ratios,
    scope_moments,
    switchable_norm_backward,
    switchable_norm_backward_compact,
    switchable_norm_eval_forward,
    switchable_norm_forward,
)
from tests.norms import large_mean

FD_TOLERANCE = 1e-6  # as for the other normalizers: finite-difference noise is ~1e-8
NAMES = ("x", "gamma", "beta", "mean_logits", "var_logits")


def _values(low, high):
    return st.floats(low, high, allow_nan=False, allow_infinity=False, width=64)


def _drawn(draw, shape, low, high):
    # fill=nothing: every element drawn on its own (a shared fill value would make whole
    # groups constant), so a failure shrinks to a small array a person can read.
    return draw(arrays(np.float64, shape, elements=_values(low, high), fill=st.nothing()))


@st.composite
def sn_problems(draw):
    """A valid SN configuration, inputs with a real mean and drawn control parameters."""
    scopes = draw(st.sampled_from([("in", "ln", "bn"), ("in", "ln"), ("ln", "bn"),
                                   ("bn", "in"), ("in",), ("ln",), ("bn",)]))
    two_d = "in" not in scopes and draw(st.booleans())
    N, C = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    spatial = () if two_d else tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    S = int(np.prod(spatial))
    # the variance conventions: biased, SwitchNorm2d's unbiased IN variance (S >= 3: see
    # below), SwitchNorm1d's every scope unbiased over its own values
    correction = draw(st.sampled_from(["none", "in", "scope"] if S >= 3 else ["none", "scope"]))
    options = SwitchableOptions(scopes, in_correction=int(correction == "in"),
                                scope_correction=int(correction == "scope"))
    counts = {"in": S, "ln": C * S, "bn": N * S}
    # Three or more values per statistic: with two the IN/BN/LN gradient is an O(eps)
    # effect below the finite-difference noise (see tests/norms/test_properties.py).
    assume(all(counts[k] >= 3 for k in scopes))
    # Two scopes with identical statistics (IN = LN when C = 1, IN = BN when N = 1) make
    # the ratio gradients exactly zero; test_identical_scopes_give_zero_ratio_gradients
    # covers that case.
    assume(not {"in", "ln"} <= set(scopes) or C >= 2)
    assume(not {"in", "bn"} <= set(scopes) or N >= 2)
    assume(not {"ln", "bn"} <= set(scopes) or N >= 2 or C >= 2)
    K, shape = len(scopes), (N, C) + spatial
    offset = draw(st.sampled_from([0.0, 12.0]))  # 12: the mean subtraction matters
    x = offset + _drawn(draw, shape, -10, 10)
    # Every statistic in use must see some spread: a (nearly) constant group makes the
    # normalization's gradient of size 1/sqrt(eps), where finite differences lose digits.
    mu, var = scope_moments(x.reshape(N, C, S), options)
    assume(min(float(np.min(var[k])) for k in scopes) > 0.1)
    inputs = {
        "x": x,
        "gamma": 1 + _drawn(draw, (C,), -1, 1),
        "beta": _drawn(draw, (C,), -1, 1),
        "mean_logits": _drawn(draw, (K,), -5, 5),   # near-uniform to saturated ratios
        "var_logits": _drawn(draw, (K,), -5, 5),
    }
    return inputs, options, draw(st.sampled_from([1e-5, 1e-2]))


def sn_pair(options, eps=1e-5, xp=np, population=None):
    def f(x, gamma, beta, mean_logits, var_logits):
        args = [xp.asarray(a) for a in (x, gamma, beta, mean_logits, var_logits)]
        if population is None:
            return switchable_norm_forward(*args, eps=eps, options=options)[0]
        return switchable_norm_eval_forward(*args, *population, eps=eps, options=options)[0]

    def vjp(dy, x, gamma, beta, mean_logits, var_logits, backward=switchable_norm_backward):
        args = [xp.asarray(a) for a in (x, gamma, beta, mean_logits, var_logits)]
        if population is None:
            _, cache = switchable_norm_forward(*args, eps=eps, options=options)
        else:
            _, cache = switchable_norm_eval_forward(*args, *population, eps=eps, options=options)
        return dict(zip(NAMES, backward(xp.asarray(dy), cache), strict=True))

    return f, vjp


@given(sn_problems())
def test_gradients_match_finite_differences(problem):
    inputs, options, eps = problem
    f, vjp = sn_pair(options, eps)
    # check_vjp measures the deviation beyond the finite-difference noise floor, so a
    # saturated softmax (a true gradient near the noise) is judged on what it can show.
    for name, err in check_vjp(f, vjp, inputs, seed=3).items():
        assert err.max_rel_error < FD_TOLERANCE, (name, err)


def test_identical_scopes_give_zero_ratio_gradients():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((1, 1, 4, 4))  # N = C = 1: IN, LN and BN see the same values
    _, cache = switchable_norm_forward(x, np.ones(1), np.zeros(1), rng.standard_normal(3),
                                       rng.standard_normal(3))
    _, _, _, dml, dvl = switchable_norm_backward(rng.standard_normal(x.shape), cache)
    np.testing.assert_allclose(dml, 0.0, atol=1e-14)
    np.testing.assert_allclose(dvl, 0.0, atol=1e-14)


@given(sn_problems(), st.data())
def test_eval_gradients_match_finite_differences(problem, data):
    inputs, options, eps = problem
    C = inputs["x"].shape[1]
    population = (_drawn(data.draw, (C,), -20, 20), _drawn(data.draw, (C,), 0.5, 50))
    f, vjp = sn_pair(options, eps, population=population)
    for name, err in check_vjp(f, vjp, inputs, seed=4).items():
        assert err.max_rel_error < FD_TOLERANCE, (name, err)


@given(sn_problems(), st.booleans(), st.booleans(), st.data())
def test_appendix_backward_equals_compact_backward(problem, hard, frozen_bn, data):
    inputs, options, eps = problem
    options = SwitchableOptions(options.scopes, options.in_correction, hard)
    args = list(inputs.values())
    if frozen_bn:  # population BN statistics: the backward has no BN terms
        C = inputs["x"].shape[1]
        population = (_drawn(data.draw, (C,), -20, 20), _drawn(data.draw, (C,), 0.5, 50))
        _, cache = switchable_norm_eval_forward(*args, *population, eps=eps, options=options)
    else:
        _, cache = switchable_norm_forward(*args, eps=eps, options=options)
    dy = _drawn(data.draw, inputs["x"].shape, -1, 1)
    appendix = switchable_norm_backward(dy, cache)
    compact = switchable_norm_backward_compact(dy, cache)
    # Two orderings of float64 sums of terms of size |gamma dy| rstd ~ 1: rounding only.
    scale = np.abs(dy).max() * np.abs(inputs["gamma"]).max() * cache.rstd.max()
    for name, a, b in zip(NAMES, appendix, compact, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12 * scale * dy.size, err_msg=name)


def test_array_api_strict_matches_numpy():
    strict = pytest.importorskip("array_api_strict")
    rng = np.random.default_rng(0)
    inputs = {"x": 5 * rng.standard_normal((3, 4, 3, 2)) + 12, "gamma": rng.standard_normal(4),
              "beta": rng.standard_normal(4), "mean_logits": rng.standard_normal(3),
              "var_logits": rng.standard_normal(3)}
    dy = rng.standard_normal((3, 4, 3, 2))
    results = []
    for xp in (np, strict):
        args = [xp.asarray(a) for a in inputs.values()]
        y, cache = switchable_norm_forward(*args, options=SwitchableOptions(in_correction=1))
        results.append([to_numpy(a) for a in (y, *switchable_norm_backward(xp.asarray(dy), cache))])
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-13, atol=1e-13)
    f, vjp = sn_pair(SwitchableOptions(), xp=strict)
    for name, err in check_vjp(f, vjp, inputs).items():
        assert err.max_rel_error < FD_TOLERANCE, name


@pytest.mark.parametrize(
    ("scope", "forward", "backward"),
    [("bn", refnorm.batch_norm_forward, refnorm.batch_norm_backward),
     ("in", refnorm.instance_norm_forward, refnorm.instance_norm_backward),
     ("ln", refnorm.layer_norm_forward, refnorm.layer_norm_backward)],
)
def test_one_hot_ratios_equal_the_single_normalizer(scope, forward, backward):
    rng = np.random.default_rng(1)
    x = 5 * rng.standard_normal((4, 3, 3, 3)) + 12
    gamma, beta = rng.standard_normal(3), rng.standard_normal(3)
    dy = rng.standard_normal(x.shape)
    logits = np.array([2.0 if s == scope else -1.0 for s in ("in", "ln", "bn")])
    y, cache = switchable_norm_forward(x, gamma, beta, logits, logits.copy(),
                                       options=SwitchableOptions(hard=True))
    y_ref, cache_ref = forward(x, gamma, beta)
    dx, dgamma, dbeta, dml, dvl = switchable_norm_backward(dy, cache)
    # Eq. (4) reaches the same statistics by another route (IN moments first): the results
    # agree to float64 rounding of values of size ~1 (1e-11 leaves a wide margin).
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-11)
    for got, want in zip((dx, dgamma, dbeta), backward(dy, cache_ref), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-11 * np.abs(want).max())
    np.testing.assert_array_equal(dml, np.zeros(3))  # argmax has no gradient
    np.testing.assert_array_equal(dvl, np.zeros(3))


def test_soft_ratios_approach_the_single_normalizer():
    rng = np.random.default_rng(2)
    x = 5 * rng.standard_normal((4, 3, 3, 3)) + 12
    gamma, beta = np.ones(3), np.zeros(3)
    y, _ = switchable_norm_forward(x, gamma, beta, np.array([0, 0, 40.0]), np.array([0, 0, 40.0]))
    # softmax([0, 0, 40]) puts 2 e^-40 ~ 8e-18 on IN and LN: BN up to rounding.
    np.testing.assert_allclose(y, refnorm.batch_norm_forward(x, gamma, beta)[0], atol=1e-12)


def test_stable_statistics_equal_the_direct_ones():
    rng = np.random.default_rng(3)
    h = 5 * rng.standard_normal((4, 3, 10)) + 12
    mu, var = scope_moments(h, SwitchableOptions())
    np.testing.assert_allclose(var["ln"][:, 0, 0], h.reshape(4, -1).var(axis=1), rtol=1e-12)
    np.testing.assert_allclose(var["bn"][0, :, 0], h.transpose(1, 0, 2).reshape(3, -1).var(axis=1),
                               rtol=1e-12)
    np.testing.assert_allclose(mu["ln"][:, 0, 0], h.reshape(4, -1).mean(axis=1), rtol=1e-14)
    _, var_unbiased = scope_moments(h, SwitchableOptions(in_correction=1))
    np.testing.assert_allclose(var_unbiased["in"][..., 0], h.var(axis=2, ddof=1), rtol=1e-12)


def test_official_code_statistics_option():
    # The official code: var_in = x.var(-1) (unbiased), var_ln = mean_c(var_in + mean_in^2)
    # - mean_ln^2; refnorm's stable form with in_correction=1 must give the same numbers.
    rng = np.random.default_rng(4)
    h = rng.standard_normal((4, 3, 10))
    mean_in, var_in = h.mean(axis=2, keepdims=True), h.var(axis=2, ddof=1, keepdims=True)
    temp = var_in + mean_in**2
    mean_ln, mean_bn = mean_in.mean(1, keepdims=True), mean_in.mean(0, keepdims=True)
    _, var = scope_moments(h, SwitchableOptions(in_correction=1))
    np.testing.assert_allclose(var["ln"], temp.mean(1, keepdims=True) - mean_ln**2, rtol=1e-12)
    np.testing.assert_allclose(var["bn"], temp.mean(0, keepdims=True) - mean_bn**2, rtol=1e-12)


def official_switchnorm1d_forward(x, weight, bias, mean_weight, var_weight, eps=1e-5):
    """The official ``SwitchNorm1d.forward`` in training, transcribed in numpy.

    switchablenorms/Switchable-Normalization, devkit/ops/switchable_norm.py (the same class
    in models/switchable_norm.py): ``mean_ln = x.mean(1)``, ``var_ln = x.var(1)``,
    ``mean_bn = x.mean(0)``, ``var_bn = x.var(0)``, where ``torch.var`` is unbiased by
    default (ddof=1 here); the ratios are ``softmax(mean_weight)``, ``softmax(var_weight)``
    over (LN, BN); ``(x - mean) / (var + eps).sqrt() * weight + bias``.
    """
    mean_ln = x.mean(1, keepdims=True)
    var_ln = x.var(1, ddof=1, keepdims=True)
    mean_bn = x.mean(0, keepdims=True)
    var_bn = x.var(0, ddof=1, keepdims=True)
    mean_w = np.exp(mean_weight) / np.exp(mean_weight).sum()
    var_w = np.exp(var_weight) / np.exp(var_weight).sum()
    mean = mean_w[0] * mean_ln + mean_w[1] * mean_bn
    var = var_w[0] * var_ln + var_w[1] * var_bn
    return (x - mean) / np.sqrt(var + eps) * weight + bias


@pytest.mark.parametrize("path", ["reference", "fast"])
@pytest.mark.parametrize("shape", [(5, 4), (2, 7), (16, 3)])
def test_scope_correction_is_the_official_switchnorm1d(path, shape):
    # Forward: refnorm with scopes=("ln", "bn") and scope_correction=1 computes the official
    # code's numbers; backward: its gradients are the derivatives of those formulas (central
    # differences of the transcription, the suite's gradcheck tolerance).
    rng = np.random.default_rng(sum(shape))
    inputs = {"x": 3 * rng.standard_normal(shape) + 2, "gamma": 1 + rng.standard_normal(shape[1]),
              "beta": rng.standard_normal(shape[1]), "mean_logits": rng.standard_normal(2),
              "var_logits": rng.standard_normal(2)}
    options = SwitchableOptions(("ln", "bn"), scope_correction=1)

    def official(x, gamma, beta, mean_logits, var_logits):
        return official_switchnorm1d_forward(x, gamma, beta, mean_logits, var_logits)

    def vjp(dy, **args):
        _, cache = switchable_norm_forward(*args.values(), options=options, path=path)
        return dict(zip(NAMES, switchable_norm_backward(dy, cache, path=path), strict=True))

    y, _ = switchable_norm_forward(*inputs.values(), options=options, path=path)
    # the same formulas, summed in another order: float64 rounding of values of size ~3
    np.testing.assert_allclose(y, official(**inputs), rtol=0, atol=1e-13)
    for name, err in check_vjp(official, vjp, inputs, seed=7).items():
        assert err.max_rel_error < FD_TOLERANCE, (name, err)
    # and the default (biased) variances are another function: far from the official one
    y_biased, _ = switchable_norm_forward(*inputs.values(),
                                          options=SwitchableOptions(("ln", "bn")), path=path)
    assert np.max(np.abs(y_biased - official(**inputs))) > 0.1  # the conventions page


# docs/conventions.md, "The official SwitchNorm1d": the largest change of an eval output that
# the moving average's m/(m-1) factor makes on a BN variance scope_correction=1 has already
# unbiased, after 6 steps, seeds 0-7, as (min, max) printed with two digits
EXTRA_FACTOR_EFFECT = {8: ("0.058", "0.089"), 32: ("0.017", "0.021"), 128: ("0.0045", "0.0059")}


def extra_factor_effect(N, seed, C=16, steps=6):
    """max |y_refnorm - y_without_the_extra_factor| at eval, as the conventions page says."""
    rng = np.random.default_rng(seed)
    layer = refnorm.build("sn", C, scopes=("ln", "bn"), scope_correction=1, dtype=np.float64)
    without = np.ones(C)  # the same moving average, momentum 0.1, without the factor
    for _ in range(steps):
        layer.forward(3 * rng.standard_normal((N, C)) + 2, training=True)
        without = 0.9 * without + 0.1 * layer.batch_statistics().var  # unbiased already
    x = 3 * rng.standard_normal((N, C)) + 2
    y = layer.forward(x, training=False)
    layer.set_population(layer.state["running_mean"], without)
    return float(np.max(np.abs(y - layer.forward(x, training=False))))


@pytest.mark.parametrize("N", sorted(EXTRA_FACTOR_EFFECT))
def test_the_extra_bessel_factor_on_eval_as_documented(N):
    effects = [extra_factor_effect(N, seed) for seed in range(8)]
    assert (f"{min(effects):.2g}", f"{max(effects):.2g}") == EXTRA_FACTOR_EFFECT[N], effects
    page = (Path(__file__).resolve().parents[2] / "docs" / "conventions.md").read_text()
    assert f"| {N} | {EXTRA_FACTOR_EFFECT[N][0]} to {EXTRA_FACTOR_EFFECT[N][1]} |" in page


def test_scope_correction_multiplies_every_variance_by_its_bessel_factor():
    # m_k / (m_k - 1) with m_k = S, C S, N S for IN, LN, BN, on a 4-d input
    rng = np.random.default_rng(8)
    h = rng.standard_normal((3, 4, 5)) + 2
    _, biased = scope_moments(h, SwitchableOptions())
    _, unbiased = scope_moments(h, SwitchableOptions(scope_correction=1))
    for k, m in (("in", 5), ("ln", 20), ("bn", 15)):
        np.testing.assert_allclose(unbiased[k], biased[k] * m / (m - 1), rtol=1e-14)
    np.testing.assert_allclose(unbiased["ln"], h.reshape(3, -1).var(1, ddof=1)[:, None, None],
                               rtol=1e-13)


def test_float32_offset_by_1e4():
    # The printed E[h^2] - mu^2 loses the variance here (tests/errata/test_sn_appendix.py);
    # the law of total variance keeps it.
    rng = np.random.default_rng(5)
    x = (1e4 + rng.standard_normal((8, 4, 8, 8))).astype(np.float32)
    ones, zeros = np.ones(4, np.float32), np.zeros(4, np.float32)
    logits = np.array([-5.0, -5.0, 5.0], np.float32)  # mostly the BN scope
    y, _ = switchable_norm_forward(x, ones, zeros, logits, logits)
    var = y.astype(np.float64).transpose(1, 0, 2, 3).reshape(4, -1).var(axis=1)
    # float32 rounding of values near 1e4 is ~1e-3 absolute, ~1e-3 of the unit variance
    # at most; the bound.
    np.testing.assert_allclose(var, 1.0, atol=1e-3)


@pytest.mark.parametrize("path", ["reference", "fast"])
@pytest.mark.parametrize(("shape", "seed"), [((1, 7, 5, 3), 0), ((3, 7, 5, 3), 1),
                                             ((4, 3, 6, 6), 2)])
def test_float32_at_a_large_mean_is_as_accurate_as_the_kernels(path, shape, seed):
    # Mean 1e4, spread 1e-3 (one float32 ulp of the mean): y, dx, dgamma, dbeta and the
    # control parameters' gradients within the bound of tests/norms/large_mean.py, the BN,
    # IN, LN and GN kernels' error on the same data (measured here) or SN's own error at mean
    # 0, plus one rounding for each of the ratios, mean offsets and variances. (1, 7, 5, 3) is
    # the case that lost 4 digits at spread 1 and all of them at 1e-3.
    options = SwitchableOptions()
    x, deviations, params, dy = large_mean.case(shape, np.float32, seed)
    errors = large_mean.sn_error(x, deviations, params, dy, options, path=path)
    at_zero = large_mean.sn_error(deviations, deviations, params, dy, options, path=path)
    kernels = large_mean.kernels_error(x, deviations, params, dy)
    limits = large_mean.bound(kernels, at_zero, np.float32)
    assert not large_mean.failures(errors, limits), large_mean.failures(errors, limits)


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_float64_at_a_large_mean_is_as_accurate_as_the_kernels(path):
    # The float64 case that lost digits: (2, 1, 6, 5), in_correction=1, mean 1e4, spread 1e-3,
    # where S_k summed from the unshifted means lost 5 digits of the mean ratios' gradient
    # (relative error 6e-6); the same bound as in float32, with float64's unit roundoff.
    options = SwitchableOptions(in_correction=1)
    x, deviations, params, dy = large_mean.case((2, 1, 6, 5), np.float64, 5)
    errors = large_mean.sn_error(x, deviations, params, dy, options, path=path)
    at_zero = large_mean.sn_error(deviations, deviations, params, dy, options, path=path)
    kernels = large_mean.kernels_error(x, deviations, params, dy)
    limits = large_mean.bound(kernels, at_zero, np.float64)
    assert not large_mean.failures(errors, limits), large_mean.failures(errors, limits)


def test_two_dimensional_inputs_use_ln_and_bn():
    rng = np.random.default_rng(6)
    x = 3 * rng.standard_normal((5, 4)) + 2
    y, _ = switchable_norm_forward(x, np.ones(4), np.zeros(4), np.zeros(2), np.zeros(2),
                                   eps=1e-5, options=SwitchableOptions(("ln", "bn")))
    mu = 0.5 * x.mean(axis=1, keepdims=True) + 0.5 * x.mean(axis=0, keepdims=True)
    var = 0.5 * x.var(axis=1, keepdims=True) + 0.5 * x.var(axis=0, keepdims=True)
    np.testing.assert_allclose(y, (x - mu) / np.sqrt(var + 1e-5), rtol=1e-12)


def test_nan_poisons_its_sample_and_channel_only():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 4, 3, 3))
    x[1, 2, 0, 0] = np.nan
    y, cache = switchable_norm_forward(x, np.ones(4), np.zeros(4), np.zeros(3), np.zeros(3))
    dx = switchable_norm_backward(rng.standard_normal(x.shape), cache)[0]
    # IN(1, 2), LN(1) and BN(2) are NaN: sample 1 and channel 2 everywhere.
    expected = np.zeros(x.shape, bool)
    expected[1], expected[:, 2] = True, True
    np.testing.assert_array_equal(np.isnan(y), expected)
    np.testing.assert_array_equal(np.isnan(dx), np.ones(x.shape, bool))  # BN ties every sample


# -- the layer, running statistics, population readiness ---------------------------------------


def test_layer_starts_with_equal_ratios_and_fills_every_gradient():
    layer = refnorm.build("sn", 4, dtype=np.float64)
    assert layer.current_ratios() == {"mean": dict.fromkeys(SCOPES, 1 / 3),
                                      "var": dict.fromkeys(SCOPES, 1 / 3)}
    # docs/conventions.md: the control parameters themselves start at 0 (equal ratios alone
    # would hold for any equal start)
    np.testing.assert_array_equal(layer.params["mean_logits"], np.zeros(3))
    np.testing.assert_array_equal(layer.params["var_logits"], np.zeros(3))
    x = np.random.default_rng(0).standard_normal((2, 4, 3, 3))
    layer.forward(x, training=True)
    layer.backward(x)
    assert set(layer.grads) == set(NAMES[1:])


def test_layer_builds_its_options_once():
    layer = refnorm.build("sn", 4, scopes=["in", "bn"], in_correction=1, hard=True)
    assert layer.options == SwitchableOptions(("in", "bn"), in_correction=1, hard=True)
    assert layer.params["mean_logits"].shape == (2,)


def test_moving_average_matches_batch_norms_running_statistics():
    rng = np.random.default_rng(8)
    sn = refnorm.build("sn", 3, dtype=np.float64)
    bn = refnorm.build("bn", 3, dtype=np.float64)
    for _ in range(5):
        x = 2 * rng.standard_normal((4, 3, 5, 5)) + 1
        sn.forward(x, training=True)
        bn.forward(x, training=True)
    for key in ("running_mean", "running_var"):
        np.testing.assert_allclose(sn.state[key], bn.state[key], rtol=1e-12)


@pytest.mark.parametrize(("inference", "scopes", "ready"),
                         [("moving_average", SCOPES, True), ("batch_average", SCOPES, False),
                          ("batch_average", ("in", "ln"), True)])
def test_population_readiness_is_state(inference, scopes, ready):
    layer = refnorm.build("sn", 3, inference=inference, scopes=scopes)
    flag = layer.state["population_ready"]
    assert flag.shape == () and flag.dtype == np.bool_ and bool(flag) is ready
    assert not hasattr(layer, "population_ready")


def test_batch_average_layer_refuses_eval_until_its_population_is_set():
    rng = np.random.default_rng(9)
    sn = refnorm.build("sn", 3, dtype=np.float64, inference="batch_average")
    with pytest.raises(RuntimeError, match=r"no population statistics yet.*batch_average"):
        sn.forward(np.ones((2, 3, 2, 2)), training=False)
    x = 3 * rng.standard_normal((4, 3, 4, 4)) + 7
    sn.forward(x, training=True)  # training leaves the running statistics alone here
    np.testing.assert_array_equal(sn.state["running_mean"], np.zeros(3))
    stats = sn.batch_statistics()
    values = x.transpose(1, 0, 2, 3).reshape(3, -1)
    assert stats.count == 64
    np.testing.assert_allclose(stats.mean, values.mean(axis=1), rtol=1e-13)
    np.testing.assert_allclose(stats.var, values.var(axis=1), rtol=1e-12)
    sn.set_population(stats.mean, stats.var)
    assert bool(sn.state["population_ready"])
    np.testing.assert_array_equal(sn.state["running_var"], stats.var)
    y = sn.forward(x, training=False)
    np.testing.assert_array_equal(sn.forward(x[:1], training=False), y[:1])  # per sample


def test_batch_statistics_and_set_population_errors():
    sn = refnorm.build("sn", 3)
    with pytest.raises(ValueError, match="no batch statistics yet"):
        sn.batch_statistics()
    sn.forward(np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2), training=True)
    sn.batch_statistics()
    sn.reset()  # drops the cache and the batch statistics with it
    with pytest.raises(ValueError, match="no batch statistics yet"):
        sn.batch_statistics()
    with pytest.raises(ValueError, match="running_mean|mean"):
        sn.set_population(np.zeros(2), np.ones(3))
    with pytest.raises(ValueError, match=">= 0"):
        sn.set_population(np.zeros(3), -np.ones(3))
    no_bn = refnorm.build("sn", 3, scopes=("in", "ln"))
    for call in (no_bn.batch_statistics, lambda: no_bn.set_population(np.zeros(3), np.ones(3))):
        with pytest.raises(ValueError, match="no BN scope"):
            call()


def test_hard_layer_selects_the_largest_logit():
    layer = refnorm.build("sn", 3, hard=True, dtype=np.float64)
    layer.params["mean_logits"] = np.array([0.1, 0.5, 0.2])
    layer.params["var_logits"] = np.array([0.9, 0.5, 0.2])
    assert layer.current_ratios() == {"mean": {"in": 0.0, "ln": 1.0, "bn": 0.0},
                                      "var": {"in": 1.0, "ln": 0.0, "bn": 0.0}}


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_hard_ratios_of_tied_logits_take_the_first_scope(path):
    """Tied control parameters (the layer starts with all of them 0) make the argmax of
    Eq. (5) the first of the tied scopes in ``options.scopes`` order, numpy's and PyTorch's
    argmax convention: here IN for the means and LN (tied with BN) for the variances."""
    rng = np.random.default_rng(8)
    x = 5 * rng.standard_normal((3, 4, 3, 3)) + 12
    mean_logits, var_logits = np.zeros(3), np.array([-1.0, 0.5, 0.5])
    np.testing.assert_array_equal(ratios(mean_logits, hard=True), [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(ratios(var_logits, hard=True), [0.0, 1.0, 0.0])
    y, _ = switchable_norm_forward(x, np.ones(4), np.zeros(4), mean_logits, var_logits,
                                   options=SwitchableOptions(hard=True), path=path)
    mu_in = x.mean(axis=(2, 3), keepdims=True)
    var_ln = x.var(axis=(1, 2, 3), keepdims=True)
    # a few float64 roundings of values of size <= 1e2
    np.testing.assert_allclose(y, (x - mu_in) / np.sqrt(var_ln + 1e-5), rtol=0, atol=1e-11)
    layer = refnorm.build("sn", 4, hard=True, dtype=np.float64)
    assert layer.current_ratios()["mean"] == {"in": 1.0, "ln": 0.0, "bn": 0.0}


@pytest.mark.parametrize("backward", [
    lambda dy, c: switchable_norm_backward(dy, c, path="reference"),
    lambda dy, c: switchable_norm_backward(dy, c, path="fast"),
    switchable_norm_backward_compact], ids=["reference", "fast", "compact"])
def test_hard_ratios_give_zero_control_gradients_even_beside_a_nan(backward):
    """One-hot ratios have no gradient (the argmax is piecewise constant): the control
    parameters get zeros, also where a NaN input makes the sums S_k of Eq. (12)-(14) NaN
    (a zero ratio times NaN would be NaN)."""
    rng = np.random.default_rng(14)
    x = 5 * rng.standard_normal((3, 4, 2, 2)) + 12
    x[1, 2, 0, 1] = np.nan
    mean_logits, var_logits = np.array([0.2, 1.0, -0.3]), np.array([1.5, 0.0, 0.4])
    with np.errstate(invalid="ignore"):
        _, cache = switchable_norm_forward(x, np.ones(4), np.zeros(4), mean_logits, var_logits,
                                           options=SwitchableOptions(hard=True))
        grads = backward(rng.standard_normal(x.shape), cache)
    np.testing.assert_array_equal(grads.dmean_logits, np.zeros(3))
    np.testing.assert_array_equal(grads.dvar_logits, np.zeros(3))


# -- errors ------------------------------------------------------------------------------------


def args(shape=(2, 3, 2, 2), K=3):
    return (np.ones(shape), np.ones(shape[1]), np.zeros(shape[1]), np.zeros(K), np.zeros(K))


LN_BN = SwitchableOptions(("ln", "bn"))


@pytest.mark.parametrize("which", [3, 4])
def test_control_parameters_of_the_wrong_length(which):
    a = list(args())
    a[which] = np.zeros(2)
    name = "mean_logits" if which == 3 else "var_logits"
    with pytest.raises(ValueError, match=rf"{name} must have shape \(3,\), one control parameter "
                                         r"per scope; got shape \(2,\)"):
        switchable_norm_forward(*a)


def test_bn_scope_with_one_value_per_channel_in_training():
    with pytest.raises(ValueError, match=r"the BN scope needs more than 1 value per statistic"):
        switchable_norm_forward(*args((1, 3), K=2), options=LN_BN)
    # ... while at inference the population statistics serve a single sample:
    y, _ = switchable_norm_eval_forward(*args((1, 3), K=2), np.zeros(3), np.ones(3),
                                        options=LN_BN)
    assert np.all(np.isfinite(y))


@pytest.mark.parametrize("shape", [(4, 3, 1, 1), (4, 3)])
def test_in_scope_on_single_positions_is_refused_not_nan(shape):
    with pytest.raises(ValueError, match=r"the IN scope needs more than 1 value.*"
                                         r"scopes=\('ln', 'bn'\).*official code returns NaN"):
        switchable_norm_forward(*args(shape))


@pytest.mark.parametrize(
    ("kw", "error", "message"),
    [({"scopes": ("in", "xn")}, ValueError, "scopes must be a non-empty subset"),
     ({"scopes": ()}, ValueError, "scopes must be a non-empty subset"),
     ({"scopes": ("in", "in", "bn")}, ValueError, "without repeats"),
     ({"scopes": "bn"}, TypeError, "scopes must be a tuple of scope names"),
     ({"in_correction": 2}, ValueError, "in_correction must be 0 or 1"),
     ({"in_correction": True}, TypeError, "in_correction must be an int"),
     ({"in_correction": 1.0}, TypeError, "in_correction must be an int"),
     ({"hard": 1}, TypeError, "hard must be a bool"),
     ({"hard": "yes"}, TypeError, "hard must be a bool"),
     ({"scope_correction": 2}, ValueError, "scope_correction must be 0 or 1"),
     ({"scope_correction": True}, TypeError, "scope_correction must be an int"),
     ({"in_correction": 1, "scope_correction": 1}, ValueError,
      "two conventions for the same variances")],
)
def test_bad_options(kw, error, message):
    # The checks' rule: a wrong kind of value is a TypeError, a wrong value a ValueError.
    with pytest.raises(error, match=message):
        SwitchableOptions(**kw)
    with pytest.raises(error, match=message):
        refnorm.build("sn", 3, **kw)


def test_numpy_flags_and_counts_are_options_too():
    options = SwitchableOptions(hard=np.bool_(True), in_correction=np.int64(1))
    assert options == SwitchableOptions(hard=True, in_correction=1)
    assert type(options.hard) is bool and type(options.in_correction) is int


@pytest.mark.parametrize("in_correction", [0, 1])
def test_an_empty_map_is_refused_for_its_empty_statistics(in_correction):
    x = np.ones((2, 4, 0, 3))  # the in_correction=1 error named the option when it was 0
    message = ("in_correction=1" if in_correction else
               r"the IN scope needs more than 1 value per statistic; .* gives 0")
    with pytest.raises(ValueError, match=message):
        switchable_norm_forward(x, np.ones(4), np.zeros(4), np.zeros(3), np.zeros(3),
                                options=SwitchableOptions(in_correction=in_correction))


@pytest.mark.parametrize("path", ["reference", "fast"])
@pytest.mark.parametrize("training", [True, False])
def test_each_gradient_comes_in_the_dtype_of_what_it_differentiates(path, training):
    """float16 x, float64 gamma and beta, float32 control parameters: dx is float16,
    dgamma and dbeta float64, the control-parameter gradients float32 (the layer keeps one
    dtype for all, the pure functions take each argument's own)."""
    rng = np.random.default_rng(13)
    x = (5 * rng.standard_normal((3, 4, 2, 2)) + 12).astype(np.float16)
    logits = (rng.standard_normal(3).astype(np.float32),
              rng.standard_normal(3).astype(np.float32))
    a = (x, np.ones(4), np.zeros(4), *logits)
    if training:
        _, cache = switchable_norm_forward(*a, path=path)
    else:
        _, cache = switchable_norm_eval_forward(*a, np.full(4, 12.0), np.full(4, 25.0),
                                                path=path)
    grads = switchable_norm_backward(rng.standard_normal(x.shape).astype(np.float16), cache,
                                     path=path)
    assert [g.dtype for g in grads] == [np.float16, np.float64, np.float64, np.float32,
                                        np.float32]


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_control_parameters_of_an_integer_dtype_are_refused(path):
    a = list(args())
    a[3] = np.zeros(3, dtype=np.int64)
    with pytest.raises(TypeError, match=r"mean_logits must have a real floating-point dtype"):
        switchable_norm_forward(*a, path=path)


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_an_upstream_gradient_of_another_shape_is_refused_even_with_as_many_values(path):
    """dy of shape (2, 3, 4) holds as many values as x of shape (2, 3, 2, 2), and the (N, C, S)
    view the backward works on would take it: refused, naming the shape it must have."""
    _, cache = switchable_norm_forward(*args(), path=path)
    with pytest.raises(ValueError, match=r"dy must have shape \(2, 3, 2, 2\); got \(2, 3, 4\)"):
        switchable_norm_backward(np.ones((2, 3, 4)), cache, path=path)


@pytest.mark.parametrize(("shape", "scopes"), [((0, 4, 2, 2), ("in", "ln")),
                                              ((0, 4, 2, 2), ("ln",)),
                                              ((3, 0, 2, 2), ("in", "bn")),
                                              ((3, 0, 2, 2), ("in",))])
def test_an_empty_axis_gives_empty_outputs_where_the_scopes_allow_it(shape, scopes):
    """An empty batch with per-sample scopes only (IN, LN) or an empty channel axis without
    the LN scope leaves every statistic in use with its values (as IN, BN and LN accept such
    inputs): empty outputs and zero parameter gradients on both paths, without a warning.
    The reference used to stop at the unused scope's NaN mean of nothing, with numpy's
    "zero-size array to reduction operation maximum" from its overflow check, and both paths
    warned "Mean of empty slice" for it."""
    C, K = shape[1], len(scopes)
    options = SwitchableOptions(scopes)
    for path in ("reference", "fast"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y, cache = switchable_norm_forward(np.ones(shape), np.ones(C), np.zeros(C),
                                               np.zeros(K), np.zeros(K), options=options,
                                               path=path)
            grads = switchable_norm_backward(np.ones(shape), cache, path=path)
        assert y.shape == shape and grads.dx.shape == shape
        for g in (grads.dgamma, grads.dbeta, grads.dmean_logits, grads.dvar_logits):
            np.testing.assert_array_equal(g, 0.0)


def test_options_are_passed_as_one_object():
    with pytest.raises(TypeError, match="options must be a SwitchableOptions"):
        switchable_norm_forward(*args(), options={"scopes": ("in", "bn")})
    with pytest.raises(TypeError):
        switchable_norm_forward(*args(), scopes=("ln", "bn"))  # no loose option keywords


def test_unbiased_in_variance_needs_two_positions():
    with pytest.raises(ValueError, match=r"in_correction=1 .* more than one spatial position"):
        switchable_norm_forward(*args((4, 3), K=2),
                                options=SwitchableOptions(("ln", "bn"), in_correction=1))


def test_bad_inference_mode():
    with pytest.raises(ValueError, match=r"inference must be 'moving_average' or 'batch_average'"):
        refnorm.build("sn", 3, inference="ema")


@pytest.mark.parametrize("momentum", [0.0, -0.1, 1.5])
def test_a_momentum_out_of_range_is_refused_when_the_layer_is_built(momentum):
    # when built, not at the first training forward that would update the moving average
    with pytest.raises(ValueError, match=r"momentum must be in \(0, 1\]; got"):
        refnorm.build("sn", 3, momentum=momentum)


def test_ratios_of_large_control_parameters_do_not_overflow():
    """Eq. (5)'s softmax is taken after subtracting the largest logit: e^100 overflows float32
    (and e^1000 float64), which would make the ratios NaN."""
    np.testing.assert_array_equal(ratios(np.array([1000.0, 0.0, 0.0])), [1.0, 0.0, 0.0])
    w = ratios(np.array([0.0, 0.0, 100.0], dtype=np.float32))
    assert np.all(np.isfinite(w)) and w[2] == 1.0
    x = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    one, zero = np.ones(3, np.float32), np.zeros(3, np.float32)
    big = np.array([0.0, 0.0, 100.0], np.float32)  # all on the BN scope
    for path in ("reference", "fast"):
        y, _ = switchable_norm_forward(x, one, zero, big, big, path=path)
        np.testing.assert_allclose(y, refnorm.batch_norm_forward(x, one, zero)[0], atol=1e-5)


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_hard_ratios_take_the_mean_and_the_variance_from_their_own_scopes(path):
    """hard=True: Eq. (5)'s softmax becomes the one-hot argmax of each set of control
    parameters on its own. Mean logits that pick LN and variance logits that pick IN give
    (x - mu_ln) / sqrt(sigma_in^2 + eps), on both paths, and no logit gradient."""
    rng = np.random.default_rng(4)
    x = 5 * rng.standard_normal((3, 4, 3, 3)) + 12
    mean_logits, var_logits = np.array([0.1, 2.0, -1.0]), np.array([1.5, -0.3, 0.2])
    y, cache = switchable_norm_forward(x, np.ones(4), np.zeros(4), mean_logits, var_logits,
                                       options=SwitchableOptions(hard=True), path=path)
    np.testing.assert_array_equal(cache.w_mean, [0.0, 1.0, 0.0])
    np.testing.assert_array_equal(cache.w_var, [1.0, 0.0, 0.0])
    mu_ln = x.mean(axis=(1, 2, 3), keepdims=True)
    var_in = x.var(axis=(2, 3), keepdims=True)
    np.testing.assert_allclose(y, (x - mu_ln) / np.sqrt(var_in + 1e-5), rtol=0, atol=1e-11)
    grads = switchable_norm_backward(rng.standard_normal(x.shape), cache, path=path)
    np.testing.assert_array_equal(grads.dmean_logits, np.zeros(3))
    np.testing.assert_array_equal(grads.dvar_logits, np.zeros(3))


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_hard_ratios_at_inference_take_the_variance_from_its_own_scope(path):
    """The same at inference, where the BN scope's statistics are given: variance logits
    that pick BN normalize by the given running variance, mean logits that pick IN by each
    sample's own mean."""
    rng = np.random.default_rng(5)
    x = 5 * rng.standard_normal((3, 4, 3, 3)) + 12
    mean, var = 12 + rng.standard_normal(4), 1 + rng.random(4)
    mean_logits, var_logits = np.array([2.0, 0.1, -1.0]), np.array([-1.0, 0.2, 1.5])
    y, _ = switchable_norm_eval_forward(x, np.ones(4), np.zeros(4), mean_logits, var_logits,
                                        mean, var, options=SwitchableOptions(hard=True),
                                        path=path)
    mu_in = x.mean(axis=(2, 3), keepdims=True)
    want = (x - mu_in) / np.sqrt(var[None, :, None, None] + 1e-5)
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-11)


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_an_infinite_population_variance_keeps_the_other_channels_gradient_through_ln(path):
    """An infinite running variance is accepted at inference (only a negative one is
    refused): its channel's mixed variance is infinite, rstd 0 and its output beta. Its
    values still enter the LN scope's statistics of their sample (Eq. 4), which normalize
    the other channels, so their dx is not constant over the plane: the LN term of Eq. (9),
    2 w'_ln (h - mu_ln) / (C S) sum_c dL/dsigma^2, needs h where x_hat (0 there) has lost
    it. Checked against central finite differences of the reference forward."""
    rng = np.random.default_rng(9)
    inputs = {"x": 5 * rng.standard_normal((2, 3, 4)) + 12,
              "gamma": 1 + 0.3 * rng.standard_normal(3), "beta": rng.standard_normal(3),
              "mean_logits": rng.standard_normal(3), "var_logits": rng.standard_normal(3)}
    population = (12 + rng.standard_normal(3), np.array([20.0, np.inf, 30.0]))

    def f(**a):
        return switchable_norm_eval_forward(*a.values(), *population)[0]

    def vjp(dy, **a):
        _, cache = switchable_norm_eval_forward(*a.values(), *population, path=path)
        with np.errstate(invalid="ignore"):  # 0 * inf in the logits' S'_bn, not checked here
            return {"x": switchable_norm_backward(dy, cache, path=path).dx}

    assert np.all(f(**inputs)[:, 1] == inputs["beta"][1])
    err = check_vjp(f, vjp, inputs, seed=5)["x"]
    assert err.max_rel_error < FD_TOLERANCE, err


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_a_zero_population_variance_is_accepted_at_inference(path):
    """A channel constant over all the data (a dead ReLU's) has population variance 0: valid
    statistics, only a negative variance is refused. With the BN scope alone the output is
    (x - mean) / sqrt(0 + eps), from the pure eval forward and from a layer whose population
    was set to them."""
    rng = np.random.default_rng(12)
    x = 5 * rng.standard_normal((3, 4, 2, 2)) + 12
    mean, var = 12 + rng.standard_normal(4), np.array([0.0, 1.5, 0.0, 2.0])
    want = (x - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5)
    y, _ = switchable_norm_eval_forward(x, np.ones(4), np.zeros(4), np.zeros(1), np.zeros(1),
                                        mean, var, options=SwitchableOptions(("bn",)),
                                        path=path)
    # one subtraction and one division of float64 values of size <= 1e3 or so
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=0)
    layer = refnorm.build("sn", 4, scopes=("bn",), inference="batch_average",
                          dtype=np.float64)
    layer.path = path
    layer.set_population(mean, var)
    np.testing.assert_allclose(layer.forward(x, training=False), want, rtol=1e-12, atol=0)


def test_with_scope_correction_the_batch_average_pools_the_unbiased_variances():
    """With scope_correction=1 each batch's BN-scope variance is the unbiased one (the
    official SwitchNorm1d's x.var(0)), and the batch average pools it as it is: over one
    batch the population variance is the unbiased variance over the batch, not the biased
    variance of the values fed."""
    rng = np.random.default_rng(13)
    x = 3 * rng.standard_normal((6, 4)) + 2
    layer = refnorm.build("sn", 4, scopes=("ln", "bn"), scope_correction=1,
                          inference="batch_average", dtype=np.float64)
    refnorm.batch_average(layer, [x])
    np.testing.assert_allclose(layer.state["running_mean"], x.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(layer.state["running_var"], x.var(axis=0, ddof=1), rtol=1e-12)


def test_population_without_a_bn_scope_is_a_value_error():
    layer = refnorm.build("sn", 3, scopes=("in", "ln"))
    with pytest.raises(ValueError, match="no BN scope"):
        layer.population()


def test_the_options_are_frozen():
    """docs/conventions.md: the options form one *frozen* SwitchableOptions, so a layer's
    options cannot drift from the ones it validated when it was built."""
    options = SwitchableOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.hard = True
    layer = refnorm.build("sn", 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        layer.options.in_correction = 1


def test_with_in_correction_the_moving_average_unbiases_again_and_the_batch_average_does_not():
    """docs/conventions.md, SN: with in_correction=1 the LN and BN variances inherit the
    unbiased IN variance (law of total variance over unbiased IN variances); the moving
    average still applies its m/(m-1) factor to that BN-scope variance, and the batch
    average pools it as it is (not the biased variance of all the values)."""
    rng = np.random.default_rng(0)
    x = 3 * rng.standard_normal((4, 3, 5, 5)) + 2
    m = 4 * 25
    var_bn = x.var(axis=(2, 3), ddof=1).mean(axis=0) + x.mean(axis=(2, 3)).var(axis=0)
    moving = refnorm.build("sn", 3, dtype=np.float64, in_correction=1, momentum=1.0)
    moving.forward(x, training=True)
    np.testing.assert_allclose(moving.state["running_var"], var_bn * m / (m - 1), rtol=1e-12)
    pooled = refnorm.build("sn", 3, dtype=np.float64, in_correction=1,
                           inference="batch_average")
    refnorm.batch_average(pooled, [x])
    np.testing.assert_allclose(pooled.state["running_var"], var_bn, rtol=1e-12)
    everything = x.transpose(1, 0, 2, 3).reshape(3, -1)
    assert np.all(pooled.state["running_var"] > everything.var(axis=1) * (1 + 1e-3))


@pytest.mark.parametrize("name", ["mean", "var"])
def test_set_population_refuses_a_value_its_dtype_cannot_hold(name):
    """1e39 is finite in float64 and infinite in float32: a float32 layer would store an
    infinity and normalize every value of that channel to 0 or NaN without a word."""
    layer = refnorm.build("sn", 2, dtype=np.float32, inference="batch_average")
    stats = {"mean": np.zeros(2), "var": np.ones(2)}
    stats[name][1] = 1e39
    with pytest.raises(ValueError, match=rf"{name} has a finite entry beyond the layer's dtype "
                                         r"float32: it would be stored as an infinity"):
        layer.set_population(stats["mean"], stats["var"])
    assert not bool(layer.state["population_ready"])  # left as it was
    layer.set_population(np.zeros(2), np.full(2, 3e38))  # the largest float32s are kept
    assert np.isfinite(layer.state["running_var"]).all()


def test_set_population_checks_only_finite_entries_against_the_dtype():
    """The dtype check is for finite entries that would become infinite; an entry already
    infinite is stored as given, as the eval forward takes it (only a negative variance is
    refused there)."""
    layer = refnorm.build("sn", 2, dtype=np.float32, inference="batch_average")
    layer.set_population(np.array([0.0, -np.inf]), np.array([1.0, np.inf]))
    np.testing.assert_array_equal(layer.state["running_mean"], [0.0, -np.inf])
    np.testing.assert_array_equal(layer.state["running_var"], [1.0, np.inf])
    assert bool(layer.state["population_ready"])

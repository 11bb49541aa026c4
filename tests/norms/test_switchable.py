"""Switchable Normalization: gradients, the two backwards, one-hot limits, inference, errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import refnorm
from refnorm.backend import to_numpy
from refnorm.gradcheck import check_vjp
from refnorm.norms.switchable import (
    SwitchableOptions,
    batch_average,
    scope_moments,
    switchable_norm_backward,
    switchable_norm_backward_compact,
    switchable_norm_eval_forward,
    switchable_norm_forward,
)

FD_TOLERANCE = 1e-6  # as for the other normalizers: finite-difference noise is ~1e-8
NAMES = ("x", "gamma", "beta", "mean_logits", "var_logits")


@st.composite
def sn_problems(draw):
    """A valid SN configuration, inputs 5 * randn + 12 and random control parameters."""
    scopes = draw(st.sampled_from([("in", "ln", "bn"), ("in", "ln"), ("ln", "bn"),
                                   ("bn", "in"), ("in",), ("ln",), ("bn",)]))
    two_d = "in" not in scopes and draw(st.booleans())
    N, C = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    spatial = () if two_d else tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    S = int(np.prod(spatial))
    options = {
        "scopes": scopes,
        "stats": draw(st.sampled_from(["stable", "paper"])),
        "in_correction": draw(st.sampled_from([0, 1])) if S >= 3 else 0,
        "eps": draw(st.sampled_from([1e-5, 1e-2])),
    }
    counts = {"in": S, "ln": C * S, "bn": N * S}
    # Three or more values per statistic: with two the IN/BN/LN gradient is an O(eps)
    # effect below the finite-difference noise (see tests/norms/test_properties.py).
    assume(all(counts[k] >= 3 for k in scopes))
    # Two scopes with identical statistics (IN = LN when C = 1, IN = BN when N = 1) make
    # the ratio gradients exactly zero; a relative error is then noise over noise.
    # test_identical_scopes_give_zero_ratio_gradients covers that case.
    assume(not {"in", "ln"} <= set(scopes) or C >= 2)
    assume(not {"in", "bn"} <= set(scopes) or N >= 2)
    assume(not {"ln", "bn"} <= set(scopes) or N >= 2 or C >= 2)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    K, shape = len(scopes), (N, C) + spatial
    scale = draw(st.sampled_from([0.5, 2.0]))  # near-uniform or peaked ratios
    inputs = {
        "x": 5 * rng.standard_normal(shape) + 12,
        "gamma": 1 + 0.5 * rng.standard_normal(C),
        "beta": 0.5 * rng.standard_normal(C),
        "mean_logits": scale * rng.standard_normal(K),
        "var_logits": scale * rng.standard_normal(K),
    }
    return inputs, options


def sn_pair(options, xp=np, population=None):
    def f(x, gamma, beta, mean_logits, var_logits):
        args = [xp.asarray(a) for a in (x, gamma, beta, mean_logits, var_logits)]
        if population is None:
            return switchable_norm_forward(*args, **options)[0]
        return switchable_norm_eval_forward(*args, *population, **options)[0]

    def vjp(dy, x, gamma, beta, mean_logits, var_logits, backward=switchable_norm_backward):
        args = [xp.asarray(a) for a in (x, gamma, beta, mean_logits, var_logits)]
        if population is None:
            _, cache = switchable_norm_forward(*args, **options)
        else:
            _, cache = switchable_norm_eval_forward(*args, *population, **options)
        return dict(zip(NAMES, backward(xp.asarray(dy), cache)))

    return f, vjp


@given(sn_problems())
def test_gradients_match_finite_differences(problem):
    inputs, options = problem
    f, vjp = sn_pair(options)
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


@given(sn_problems())
def test_eval_gradients_match_finite_differences(problem):
    inputs, options = problem
    C = inputs["x"].shape[1]
    population = (12 + np.arange(C) / C, 20 + np.arange(C, dtype=float))
    f, vjp = sn_pair(options, population=population)
    for name, err in check_vjp(f, vjp, inputs, seed=4).items():
        assert err.max_rel_error < FD_TOLERANCE, (name, err)


@given(sn_problems(), st.booleans())
def test_appendix_backward_equals_compact_backward(problem, hard):
    inputs, options = problem
    _, cache = switchable_norm_forward(*inputs.values(), hard=hard, **options)
    dy = np.random.default_rng(5).standard_normal(inputs["x"].shape)
    appendix = switchable_norm_backward(dy, cache)
    compact = switchable_norm_backward_compact(dy, cache)
    # Two orderings of float64 sums of terms of size |gamma dy| rstd ~ 1: rounding only.
    scale = np.abs(dy).max() * np.abs(inputs["gamma"]).max() * cache.rstd.max()
    for name, a, b in zip(NAMES, appendix, compact):
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
        y, cache = switchable_norm_forward(*args, in_correction=1)
        results.append([to_numpy(a) for a in (y, *switchable_norm_backward(xp.asarray(dy), cache))])
    for a, b in zip(*results):
        np.testing.assert_allclose(b, a, rtol=1e-13, atol=1e-13)
    f, vjp = sn_pair({}, xp=strict)
    for name, err in check_vjp(f, vjp, inputs).items():
        assert err.max_rel_error < FD_TOLERANCE, name


@pytest.mark.parametrize(
    ("scope", "forward", "backward"),
    [("bn", refnorm.batch_norm_forward, refnorm.batch_norm_backward),
     ("in", refnorm.instance_norm_forward, refnorm.instance_norm_backward),
     ("ln", refnorm.layer_norm_forward, refnorm.layer_norm_backward)],
)
@pytest.mark.parametrize("stats", ["stable", "paper"])
def test_one_hot_ratios_equal_the_single_normalizer(scope, forward, backward, stats):
    rng = np.random.default_rng(1)
    x = 5 * rng.standard_normal((4, 3, 3, 3)) + 12
    gamma, beta = rng.standard_normal(3), rng.standard_normal(3)
    dy = rng.standard_normal(x.shape)
    logits = np.array([2.0 if s == scope else -1.0 for s in ("in", "ln", "bn")])
    y, cache = switchable_norm_forward(x, gamma, beta, logits, logits.copy(),
                                       hard=True, stats=stats)
    y_ref, cache_ref = forward(x, gamma, beta)
    dx, dgamma, dbeta, dml, dvl = switchable_norm_backward(dy, cache)
    # Eq. (4) reaches the same statistics by another route (IN moments first): the results
    # agree to float64 rounding of values of size ~1 (the printed form loses ~m * 144 ulps
    # of E[h^2] ~ 144 for this data; 1e-11 covers both).
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-11)
    for got, want in zip((dx, dgamma, dbeta), backward(dy, cache_ref)):
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


@pytest.mark.parametrize(("stats", "bound"), [("stable", 1e-3), ("paper", None)])
def test_float32_offset_by_1e4(stats, bound):
    rng = np.random.default_rng(5)
    x = (1e4 + rng.standard_normal((8, 4, 8, 8))).astype(np.float32)
    ones, zeros = np.ones(4, np.float32), np.zeros(4, np.float32)
    logits = np.array([-5.0, -5.0, 5.0], np.float32)  # mostly the BN scope
    with np.errstate(invalid="ignore"):  # the printed form can go negative: sqrt -> NaN
        y, _ = switchable_norm_forward(x, ones, zeros, logits, logits, stats=stats)
    var = y.astype(np.float64).transpose(1, 0, 2, 3).reshape(4, -1).var(axis=1)
    if bound is not None:
        np.testing.assert_allclose(var, 1.0, atol=bound)  # the bound
    else:
        # The printed E[h^2] - mu^2 loses the variance at this offset (errata page).
        assert np.max(np.abs(var - 1.0)) > 0.05 or not np.all(np.isfinite(var))


def test_two_dimensional_inputs_use_ln_and_bn():
    rng = np.random.default_rng(6)
    x = 3 * rng.standard_normal((5, 4)) + 2
    y, _ = switchable_norm_forward(x, np.ones(4), np.zeros(4), np.zeros(2), np.zeros(2),
                                   scopes=("ln", "bn"), eps=1e-5)
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


# -- the layer, running statistics, batch average ----------------------------------------------


def test_layer_starts_with_equal_ratios_and_fills_every_gradient():
    layer = refnorm.build("sn", 4, dtype=np.float64)
    assert layer.current_ratios() == {"mean": dict.fromkeys(("in", "ln", "bn"), 1 / 3),
                                      "var": dict.fromkeys(("in", "ln", "bn"), 1 / 3)}
    x = np.random.default_rng(0).standard_normal((2, 4, 3, 3))
    layer.forward(x, training=True)
    layer.backward(x)
    assert set(layer.grads) == set(NAMES[1:])


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


def test_batch_average_equals_the_population_of_the_batches_fed():
    rng = np.random.default_rng(9)
    sn = refnorm.build("sn", 3, dtype=np.float64, inference="batch_average")
    with pytest.raises(RuntimeError, match=r"no population statistics yet.*batch_average"):
        sn.forward(np.ones((2, 3, 2, 2)), training=False)
    batches = [3 * rng.standard_normal((n, 3, 4, 4)) + 7 for n in (2, 5, 3)]  # unequal sizes
    sn.forward(batches[0], training=True)  # training leaves the state alone in this mode
    np.testing.assert_array_equal(sn.state["running_mean"], np.zeros(3))
    params = copy.deepcopy(sn.params)
    assert batch_average(sn, batches) == 3
    everything = np.concatenate(batches).transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(sn.state["running_mean"], everything.mean(axis=1), rtol=1e-13)
    np.testing.assert_allclose(sn.state["running_var"], everything.var(axis=1), rtol=1e-12)
    for key in params:
        np.testing.assert_array_equal(sn.params[key], params[key])
    x = rng.standard_normal((4, 3, 4, 4))
    np.testing.assert_array_equal(sn.forward(x[:1], training=False), sn.forward(x, training=False)[:1])


def test_batch_average_freezes_the_rest_of_the_network():
    rng = np.random.default_rng(10)
    bn = refnorm.build("bn", 3, dtype=np.float64)
    sn = refnorm.build("sn", 3, dtype=np.float64)  # moving average: its own state is kept too
    model = [bn, sn]
    bn_state, sn_state = copy.deepcopy(bn.state), copy.deepcopy(sn.state)
    batches = [rng.standard_normal((4, 3, 2, 2)) + 5 for _ in range(3)]
    batch_average(model, batches)
    for key in bn_state:
        np.testing.assert_array_equal(bn.state[key], bn_state[key])
    # The SN input is BN's training-mode output of each batch (BN statistics of that batch).
    fed = np.concatenate([copy.deepcopy(bn).forward(b, training=True) for b in batches])
    fed = fed.transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(sn.state["running_mean"], fed.mean(axis=1), atol=1e-13)
    np.testing.assert_allclose(sn.state["running_var"], fed.var(axis=1), rtol=1e-12)
    assert not np.allclose(sn.state["running_var"], sn_state["running_var"])


def test_batch_average_needs_an_sn_layer_and_a_batch():
    with pytest.raises(ValueError, match="no SwitchableNorm layer"):
        batch_average([refnorm.build("bn", 2)], [np.ones((2, 2))])
    with pytest.raises(ValueError, match="at least one batch"):
        batch_average(refnorm.build("sn", 2), [])


def test_hard_layer_selects_the_largest_logit():
    layer = refnorm.build("sn", 3, hard=True, dtype=np.float64)
    layer.params["mean_logits"] = np.array([0.1, 0.5, 0.2])
    layer.params["var_logits"] = np.array([0.9, 0.5, 0.2])
    assert layer.current_ratios() == {"mean": {"in": 0.0, "ln": 1.0, "bn": 0.0},
                                      "var": {"in": 1.0, "ln": 0.0, "bn": 0.0}}


# -- errors ------------------------------------------------------------------------------------


def args(shape=(2, 3, 2, 2), K=3):
    return (np.ones(shape), np.ones(shape[1]), np.zeros(shape[1]), np.zeros(K), np.zeros(K))


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
        switchable_norm_forward(*args((1, 3), K=2), scopes=("ln", "bn"))
    # ... while at inference the population statistics serve a single sample:
    y, _ = switchable_norm_eval_forward(*args((1, 3), K=2), np.zeros(3), np.ones(3),
                                        scopes=("ln", "bn"))
    assert np.all(np.isfinite(y))


@pytest.mark.parametrize("shape", [(4, 3, 1, 1), (4, 3)])
def test_in_scope_on_single_positions_is_refused_not_nan(shape):
    with pytest.raises(ValueError, match=r"the IN scope needs more than 1 value.*"
                                         r"scopes=\('ln', 'bn'\).*official code returns NaN"):
        switchable_norm_forward(*args(shape))


@pytest.mark.parametrize(
    ("kw", "message"),
    [({"scopes": ("in", "xn")}, "scopes must be a non-empty subset"),
     ({"scopes": ()}, "scopes must be a non-empty subset"),
     ({"scopes": ("in", "in", "bn")}, "without repeats"),
     ({"stats": "fast"}, r"stats must be one of \('stable', 'paper'\)"),
     ({"in_correction": 2}, "in_correction must be 0 or 1")],
)
def test_bad_options(kw, message):
    with pytest.raises(ValueError, match=message):
        switchable_norm_forward(*args(), **kw)
    with pytest.raises(ValueError, match=message):
        refnorm.build("sn", 3, **kw)


def test_unbiased_in_variance_needs_two_positions():
    with pytest.raises(ValueError, match=r"in_correction=1 .* needs more than one spatial position"):
        switchable_norm_forward(*args((4, 3), K=2), scopes=("ln", "bn"), in_correction=1)


def test_bad_inference_mode():
    with pytest.raises(ValueError, match=r"inference must be 'moving_average' or 'batch_average'"):
        refnorm.build("sn", 3, inference="ema")

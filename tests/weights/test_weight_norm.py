"""refnorm/weights/weight_norm.py: the WN pair, its float16 path and the WeightNorm layer."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refnorm
from refnorm.gradcheck import check_vjp
from refnorm.weights import weight_norm_backward, weight_norm_forward
from refnorm.weights.norm_prop import norm_prop_relu_forward
from tests.weights.strategies import (
    FD_TOLERANCE,
    arrays,
    arrays_away_from_zero,
    assert_check_cases_pass,
    assert_runs_on_array_api_strict,
    weight_shapes,
)


@st.composite
def wn_inputs(draw):
    """(v, g): filters with every element 0.1 <= |v| <= 3, gains in [-3, 3]."""
    shape = draw(weight_shapes())
    return draw(arrays_away_from_zero(shape)), draw(arrays((shape[0],)))


def wn_vjp(eps):
    def vjp(dw, v, g):
        dv, dg = weight_norm_backward(dw, weight_norm_forward(v, g, eps=eps)[1])
        return {"v": dv, "g": dg}
    return vjp


@given(inputs=wn_inputs(), eps=st.sampled_from([1e-5, 0.1]))
def test_gradients_match_finite_differences(inputs, eps):
    v, g = inputs

    def f(v, g):
        return weight_norm_forward(v, g, eps=eps)[0]

    for name, err in check_vjp(f, wn_vjp(eps), {"v": v, "g": g}).items():
        assert err.max_rel_error < FD_TOLERANCE, (name, err)


@given(inputs=wn_inputs(), data=st.data(), eps=st.sampled_from([1e-5, 0.5]))
def test_gradient_is_orthogonal_to_v_up_to_eps(inputs, data, eps):
    v, g = inputs
    shape = v.shape
    dw = data.draw(arrays(shape), label="dw")
    dv, _ = weight_norm_backward(dw, weight_norm_forward(v, g, eps=eps)[1])
    vv, gw = v.reshape(shape[0], -1), dw.reshape(shape[0], -1)
    n = np.linalg.norm(vv, axis=1)
    # <V, dL/dV> = g <G, V> eps / (||V|| + eps)^2: zero as eps -> 0 (module docstring).
    expected = g * np.sum(gw * vv, axis=1) * eps / (n + eps) ** 2
    got = np.sum(dv.reshape(shape[0], -1) * vv, axis=1)
    # Both sides are sums of I <= 36 terms of size |g| |G| ||V|| / (N + eps): rounding
    # leaves ~1e-15 of that; 1e-12 of it is a margin of 1000.
    scale = np.abs(g) * np.linalg.norm(gw, axis=1) * n / (n + eps)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * scale.max())


def test_with_negligible_eps_the_gradient_is_orthogonal():
    rng = np.random.default_rng(0)
    v, g = rng.standard_normal((3, 4, 3, 3)), rng.standard_normal(3)
    dw = rng.standard_normal((3, 4, 3, 3))
    dv, _ = weight_norm_backward(dw, weight_norm_forward(v, g, eps=1e-300)[1])
    cos = np.sum(dv * v, axis=(1, 2, 3)) / (np.linalg.norm(dv.reshape(3, -1), axis=1)
                                           * np.linalg.norm(v.reshape(3, -1), axis=1))
    # eps / ||V|| ~ 1e-300: only rounding of a 36-term dot product of unit vectors, ~1e-16.
    np.testing.assert_allclose(cos, 0.0, atol=1e-14)


def test_zero_filter_has_a_finite_documented_gradient():
    rng = np.random.default_rng(1)
    v = rng.standard_normal((3, 5))
    v[1] = 0.0
    g, dw, eps = np.array([1.0, 2.0, 3.0]), rng.standard_normal((3, 5)), 1e-3
    w, cache = weight_norm_forward(v, g, eps=eps)
    dv, dg = weight_norm_backward(dw, cache)
    assert np.all(w[1] == 0) and np.all(np.isfinite(dv)) and np.all(np.isfinite(dg))
    np.testing.assert_allclose(dv[1], g[1] * dw[1] / eps, rtol=1e-14)  # the limit, one division
    assert dg[1] == 0.0
    # ... and it is the true derivative: V / (||V|| + eps) is differentiable at 0. Central
    # differences across the kink of ||V|| err by ~h / eps: eps = 0.5 and h = 1e-8 keep that
    # at 2e-8, above the rounding noise (~1e-16 |L| / h ~ 1e-8).

    def f(v, g):
        return weight_norm_forward(v, g, eps=0.5)[0]

    assert check_vjp(f, wn_vjp(0.5), {"v": v, "g": g}, step=1e-8)["v"].max_rel_error < 1e-6


# -- float16 computes in float32 -------------------------------------------------------------


def filters_of_norm(norm, shape, seed):
    """float16 filters of ``shape`` whose float64 norm is ``norm`` (up to float16 rounding)."""
    v = np.random.default_rng(seed).standard_normal(shape)
    norms = np.linalg.norm(v.reshape(shape[0], -1), axis=1)              # (C_out,)
    v *= norm / norms.reshape((-1,) + (1,) * (len(shape) - 1))
    return v.astype(np.float16)


def test_float16_filters_of_norm_1e3_give_the_float32_weights():
    v16 = filters_of_norm(1e3, (3, 4, 3, 3), seed=11)
    g16 = np.array([1.0, 0.5, 2.0], dtype=np.float16)
    # The premise: in float16 the squared norm (1e6 > 65504) overflows to inf, which made
    # V / (||V|| + eps) silently 0 when the norm was computed in float16.
    with np.errstate(over="ignore"):
        assert np.all(np.isinf(np.sum(v16.reshape(3, -1) ** 2, axis=1, dtype=np.float16)))
    w16, cache = weight_norm_forward(v16, g16)
    w32, cache32 = weight_norm_forward(v16.astype(np.float32), g16.astype(np.float32))
    assert w16.dtype == np.float16 and np.all(np.isfinite(w16))
    assert np.all(np.linalg.norm(w16.astype(np.float64).reshape(3, -1), axis=1) > 0.4)
    # Within float16 rounding of the float32 result: half a float16 ulp is 2**-11 relative
    # (10 stored mantissa bits) for normal values, and 2**-25 absolute (half the subnormal
    # spacing 2**-24) for values below the smallest normal 6.1e-5.
    np.testing.assert_allclose(w16.astype(np.float32), w32, rtol=2**-11, atol=2**-25)
    # In fact the same float32 arithmetic followed by one rounding: bit-identical.
    np.testing.assert_array_equal(w16, w32.astype(np.float16))

    dw16 = np.random.default_rng(12).standard_normal(v16.shape).astype(np.float16)
    dv16, dg16 = weight_norm_backward(dw16, cache)
    dv32, dg32 = weight_norm_backward(dw16.astype(np.float32), cache32)
    assert dv16.dtype == np.float16 and dg16.dtype == np.float16
    assert np.all(np.isfinite(dv16)) and np.all(np.isfinite(dg16))
    np.testing.assert_array_equal(dv16, dv32.astype(np.float16))
    np.testing.assert_array_equal(dg16, dg32.astype(np.float16))


def test_float16_layer_at_filter_norm_1e3_matches_float32():
    rng = np.random.default_rng(13)
    layer16 = refnorm.build("wn", 2, 3, 3, padding=1, dtype=np.float16, seed=4)
    layer16.params["v"] = filters_of_norm(1e3, (3, 2, 3, 3), seed=14)
    layer32 = copy.deepcopy(layer16)
    layer32.params = {k: p.astype(np.float32) for k, p in layer16.params.items()}
    x = rng.standard_normal((2, 2, 5, 5)).astype(np.float16)
    y16 = layer16.forward(x, training=True)
    y32 = layer32.forward(x.astype(np.float32), training=True)
    assert y16.dtype == np.float16 and np.all(np.isfinite(y16))
    # The layer rounds W to float16 before the convolution (its parameters are float16), so
    # y16 carries W's rounding (2**-11 relative per weight) summed over 18 products of O(1)
    # terms, then its own: 3e-3 of max |y| bounds both with a margin of ~2.
    np.testing.assert_allclose(y16.astype(np.float32), y32, rtol=0,
                               atol=3e-3 * np.max(np.abs(y32)))
    assert np.max(np.abs(y32)) > 0.1  # not a comparison of zeros


# -- cache, inputs ----------------------------------------------------------------------------


def test_backward_refuses_another_functions_cache():
    _, other = norm_prop_relu_forward(np.ones((3, 2)))
    with pytest.raises(TypeError, match=r"cache must be a WeightNormCache; got NormPropReLUCache"):
        weight_norm_backward(np.ones((3, 2)), other)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: weight_norm_forward(np.ones(3), np.ones(3)),
         ValueError, r"v must have shape \(C_out, \.\.\.\)"),
        (lambda: weight_norm_forward(np.ones((3, 2)), np.ones(2)),
         ValueError, r"g must have shape \(C,\) = \(3,\)"),
        (lambda: weight_norm_forward(np.ones((3, 2), int), np.ones(3)),
         TypeError, r"v must have a real floating"),
        (lambda: weight_norm_forward(np.ones((3, 2)), np.ones(3), eps=0),
         ValueError, r"eps must be finite and > 0"),
        (lambda: weight_norm_forward(np.ones((3, 2), np.float32), np.ones(3, np.float32),
                                     eps=1e-50),
         ValueError, r"rounds to 0 in float32"),
        (lambda: weight_norm_backward(np.ones((3, 3)),
                                      weight_norm_forward(np.ones((3, 2)), np.ones(3))[1]),
         ValueError, r"dw must have shape \(3, 2\)"),
        (lambda: refnorm.build("wn", 2, 3, eps=-1.0), ValueError, r"eps must be finite and > 0"),
    ],
)
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


# -- the layer ---------------------------------------------------------------------------------


def test_check_cases_pass():
    assert_check_cases_pass("wn")


def test_layer_runs_on_array_api_strict():
    assert_runs_on_array_api_strict("wn")


def test_layer_without_bias_has_no_b_and_no_b_gradient():
    layer = refnorm.build("wn", 2, 3, 3, bias=False, dtype=np.float64)
    assert set(layer.params) == {"v", "g"}
    x = np.random.default_rng(15).standard_normal((2, 2, 4, 4))
    layer.backward(layer.forward(x, training=True))
    assert set(layer.grads) == {"v", "g"}


# -- data-dependent initialization --------------------------------------------------------------


@pytest.mark.parametrize("eps", [None, 0.5], ids=["default eps", "eps 0.5"])
@pytest.mark.parametrize("kernel_size", [3, None])
def test_data_dependent_init_standardizes_the_batch(kernel_size, eps):
    # Salimans & Kingma (2016, section 3), with Gitman & Ginsburg's eps: the init standardizes
    # t = V x / (||V|| + eps) with the layer's own eps, which the forward then divides by.
    # eps = 0.5 is comparable to the filter norms (~1): a direction formed with another eps
    # would leave the variance off by O(1), not O(eps).
    rng = np.random.default_rng(2)
    options = {} if eps is None else {"eps": eps}
    layer = refnorm.build("wn", 3, 5, kernel_size, padding=1 if kernel_size else 0,
                          dtype=np.float64, seed=3, **options)
    x = 2 * rng.standard_normal((16, 3, 6, 6) if kernel_size else (64, 3)) + 1
    layer.init_from_batch(x)
    t = layer.forward(x, training=True)
    axes = (0, 2, 3) if kernel_size else (0,)
    # Exact by construction in float64; values ~O(1) averaged over <= 576 entries: rounding.
    np.testing.assert_allclose(t.mean(axis=axes), 0.0, atol=1e-12)
    np.testing.assert_allclose(t.var(axis=axes), 1.0, rtol=1e-12)


def test_data_dependent_init_drops_the_cache():
    layer = refnorm.build("wn", 2, 3, dtype=np.float64)
    x = np.random.default_rng(16).standard_normal((8, 2))
    layer.forward(x, training=True)
    layer.init_from_batch(x)
    with pytest.raises(RuntimeError, match=r"backward\(\) called before forward\(\)"):
        layer.backward(np.ones((8, 3)))


def layer_arrays(layer):
    return {**{f"params[{k}]": v for k, v in layer.params.items()},
            **{f"state[{k}]": v for k, v in layer.state.items()}}


@pytest.mark.parametrize(
    ("bias", "x", "message"),
    [
        (False, np.arange(16.0).reshape(8, 2), r"build the layer with bias=True"),
        (True, np.ones((8, 2)), r"constant over the batch"),
        (True, np.ones((8, 5)), r"x must have D_in = w.shape\[1\] = 2"),
    ],
    ids=["no-bias", "constant-channel", "wrong-shape"],
)
def test_a_failed_data_dependent_init_leaves_the_layer_exactly_as_it_was(bias, x, message):
    layer = refnorm.build("wn", 2, 3, bias=bias, dtype=np.float64, seed=5)
    layer.params["g"] = np.array([0.5, 2.0, -1.5])  # not the ones the init starts from
    if bias:
        layer.params["b"] = np.array([0.25, -0.5, 1.0])
    x_ok = np.random.default_rng(17).standard_normal((4, 2))
    y = layer.forward(x_ok, training=True)  # a cache to keep
    before = {k: a.copy() for k, a in layer_arrays(layer).items()}
    twin = copy.deepcopy(layer)
    with pytest.raises(ValueError, match=message):
        layer.init_from_batch(x)
    after = layer_arrays(layer)
    assert after.keys() == before.keys()
    for k, a in before.items():
        assert after[k].dtype == a.dtype and after[k].shape == a.shape, k
        assert after[k].tobytes() == a.tobytes(), k  # bit-identical
    # The cache of the last forward is still there, and still the one of the old parameters.
    dy = np.random.default_rng(18).standard_normal(y.shape)
    np.testing.assert_array_equal(layer.backward(dy), twin.backward(dy))
    for k in twin.grads:
        np.testing.assert_array_equal(layer.grads[k], twin.grads[k])


@pytest.mark.parametrize(
    ("dtype", "x", "message"),
    [
        # Identical samples: every channel constant (its float64-summed mean is exact, so
        # its std is 0 here; the float64 case, where it is not, is tested below).
        (np.float32, np.repeat([[0.3, -1.2, 0.8, 2.1, -0.4]], 7, axis=0),
         r"constant over the batch"),
        # Varied but tiny float16 inputs: std ~1e-5, so 1/std overflows float16 (g was inf).
        (np.float16, 1e-5 * np.random.default_rng(20).standard_normal((16, 5)),
         r"varies too little over the batch for float16"),
    ],
    ids=["float32-identical-samples", "float16-tiny"],
)
def test_data_dependent_init_refuses_what_rounding_would_make_absurd(dtype, x, message):
    layer = refnorm.build("wn", 5, 3, dtype=dtype, seed=1)
    before = {k: a.copy() for k, a in layer.params.items()}
    with pytest.raises(ValueError, match=message):
        layer.init_from_batch(x.astype(dtype))
    for k, a in before.items():
        assert layer.params[k].tobytes() == a.tobytes(), k


def test_data_dependent_init_on_float16_inputs_stays_finite():
    # Inputs ~300 in float16: the squared deviations (~1e5) overflow float16 but not float32.
    rng = np.random.default_rng(19)
    layer = refnorm.build("wn", 3, 2, dtype=np.float16, seed=6)
    x = (300 * rng.standard_normal((64, 3))).astype(np.float16)
    layer.init_from_batch(x)
    assert layer.params["g"].dtype == np.float16 and np.all(np.isfinite(layer.params["g"]))
    t = layer.forward(x, training=True).astype(np.float64)
    # g, b and t are rounded to float16 (2**-11 relative): mean ~0 and variance ~1 to a few
    # 1e-3 of the pre-activations' size (~300 * 1/300 after scaling, i.e. O(1)).
    np.testing.assert_allclose(t.mean(axis=0), 0.0, atol=1e-2)
    np.testing.assert_allclose(t.var(axis=0), 1.0, rtol=1e-2)


# -- Gitman & Ginsburg's display formulas (3) and (4), numbered in order of appearance -----------


def test_layer_is_the_printed_formula():
    # o_j = gamma_j (W_j * x) / (||W_j||_F + eps) + beta_j, with the convolution of the raw
    # filters scaled afterwards (a convolution is linear in its weights).
    rng = np.random.default_rng(14)
    layer = refnorm.build("wn", 3, 4, 3, padding=1, dtype=np.float64)
    layer.params = {"v": 2 * rng.standard_normal((4, 3, 3, 3)),
                    "g": rng.standard_normal(4), "b": rng.standard_normal(4)}
    x = rng.standard_normal((2, 3, 5, 5))
    raw, _ = refnorm.nn.conv2d_forward(x, layer.params["v"], None, padding=1)
    norms = np.sqrt((layer.params["v"] ** 2).sum(axis=(1, 2, 3)))
    c = (1, 4, 1, 1)
    expected = (layer.params["g"].reshape(c) * raw / (norms.reshape(c) + layer.eps)
                + layer.params["b"].reshape(c))
    # Two orders of the same 27-term sums of values of size ~3: a few roundings of ~30.
    np.testing.assert_allclose(layer.forward(x, training=True), expected, rtol=0, atol=1e-12)


def test_orthonormal_rows_keep_normalized_inputs_normalized():
    # Formula (4) (Arpit et al., as Gitman & Ginsburg print it): with weights of orthonormal
    # rows and standard normal inputs, E[o] ~ 0, Var[o] ~ 1 and ||o|| ~ sqrt(D_out/D_in) ||x||.
    rng = np.random.default_rng(15)
    x = rng.standard_normal((4096, 64))
    layer = refnorm.build("wn", 64, 32, dtype=np.float64)
    q, _ = np.linalg.qr(rng.standard_normal((64, 32)))                # (64, 32), q^T q = I
    layer.params["v"] = 3 * q.T                                       # rows of norm 3
    o = layer.forward(x, training=True)
    # Each o_j = q_j^T x is exactly N(0, 1): over 4096 samples the mean has standard error
    # 1/64 ~ 0.016 and the variance sqrt(2/4096) ~ 0.022; the bounds are 5 of those.
    assert np.all(np.abs(o.mean(axis=0)) < 0.08)
    assert np.all(np.abs(o.var(axis=0) - 1) < 0.11)
    # ||o||^2 / ||x||^2 is the share of x's 262144 squared standard normal coordinates (in
    # the rows' basis) that the 32 rows keep: Beta(65536, 65536), 1/2 with a standard
    # deviation of 0.28% of it (0.14% for the norms); 1% is seven of those.
    ratio = np.linalg.norm(o) / np.linalg.norm(x)
    assert abs(ratio / np.sqrt(32 / 64) - 1) < 0.01
    # D_out = D_in: an orthogonal W keeps every sample's norm, up to the eps of the formula.
    square = refnorm.build("wn", 64, 64, dtype=np.float64)
    square.params["v"], _ = np.linalg.qr(rng.standard_normal((64, 64)))
    kept = np.linalg.norm(square.forward(x, training=True), axis=1)
    np.testing.assert_allclose(kept, np.linalg.norm(x, axis=1) / (1 + square.eps), rtol=1e-12)


def test_gradients_come_back_in_the_dtypes_of_v_and_of_g():
    # dv in v's dtype and dg in g's (the docstring's Returns), also when the two differ.
    rng = np.random.default_rng(30)
    v = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    g = rng.standard_normal(3)                                          # float64
    w, cache = weight_norm_forward(v, g)
    assert w.dtype == np.float32
    dv, dg = weight_norm_backward(rng.standard_normal(v.shape).astype(np.float32), cache)
    assert dv.dtype == np.float32 and dg.dtype == np.float64
    _, cache = weight_norm_forward(v.astype(np.float64), g.astype(np.float32))
    dv, dg = weight_norm_backward(rng.standard_normal(v.shape), cache)
    assert dv.dtype == np.float64 and dg.dtype == np.float32


@pytest.mark.parametrize(("dtype", "big", "remedy"),
                         [(np.float32, 1e20, "compute in float64 or rescale v$"),
                          (np.float64, 1e160, "rescale v$")], ids=["float32", "float64"])
def test_a_filter_whose_squared_norm_overflows_is_refused(dtype, big, remedy):
    # One filter of norm ~1e20 (float32) or ~1e160 (float64) among ordinary ones: its squared
    # norm is inf, which would make that filter's W_j = g_j V_j / inf = 0 without a word
    # (module docstring). One such filter is enough to refuse the call.
    v = np.random.default_rng(31).standard_normal((3, 2, 3, 3))
    v[1] *= big
    with np.errstate(over="ignore"), pytest.raises(
            ValueError, match=f"squared norm of a filter of v overflows {np.dtype(dtype)}.*"
                              f"{remedy}"):
        weight_norm_forward(v.astype(dtype), np.ones(3, dtype))
    # a NaN weight is no overflow: it propagates to its own filter only
    v_nan = np.ones((2, 4), dtype)
    v_nan[0, 0] = np.nan
    w, _ = weight_norm_forward(v_nan, np.ones(2, dtype))
    assert np.all(np.isnan(w[0])) and np.all(np.isfinite(w[1]))


@pytest.mark.parametrize("kernel_size", [3, None])
def test_data_dependent_init_does_not_depend_on_the_current_gain_and_bias(kernel_size):
    # Salimans & Kingma (2016, §3): the init takes t = V x / ||V|| (unit gain, no bias) and sets
    # g = 1 / std(t), b = -mean(t) / std(t). A layer that has trained already (g, b away from
    # 1 and 0) must end up with the same g and b as a freshly built one with the same V.
    rng = np.random.default_rng(32)
    options = {"padding": 1} if kernel_size else {}
    fresh = refnorm.build("wn", 3, 5, kernel_size, dtype=np.float64, seed=3, **options)
    trained = copy.deepcopy(fresh)
    trained.params["g"] = rng.uniform(0.5, 3.0, 5) * rng.choice([-1.0, 1.0], 5)
    trained.params["b"] = rng.uniform(-2.0, 2.0, 5)
    x = 2 * rng.standard_normal((16, 3, 6, 6) if kernel_size else (64, 3)) + 1
    fresh.init_from_batch(x)
    trained.init_from_batch(x)
    for k in ("g", "b"):
        np.testing.assert_array_equal(trained.params[k], fresh.params[k])
    t = trained.forward(x, training=True)
    axes = (0, 2, 3) if kernel_size else (0,)
    # exact by construction in float64: rounding only
    np.testing.assert_allclose(t.mean(axis=axes), 0.0, atol=1e-12)
    np.testing.assert_allclose(t.var(axis=axes), 1.0, rtol=1e-12)


def test_data_dependent_init_refuses_a_bias_that_would_overflow_to_minus_infinity():
    # float16, one input and one output, V = 1 (so W = 1 / (1 + eps) rounds to 1 and t = x):
    # 65535 samples at 1000 and one at 1000.5 (the next float16). mean(t) ~ 1000 > 0 and
    # std(t) = 0.5 sqrt(65535) / 65536 ~ 2e-3, so g = 1/std ~ 512 fits float16 but
    # b = -mean/std ~ -5e5 is below -65504: b would be -inf.
    layer = refnorm.build("wn", 1, 1, dtype=np.float16, seed=2)
    layer.params["v"] = np.ones((1, 1), np.float16)
    x = np.full((65536, 1), 1000.0, np.float16)
    x[0, 0] = 1000.5
    before = {k: a.copy() for k, a in layer.params.items()}
    with pytest.raises(ValueError, match=r"varies too little over the batch for float16"):
        layer.init_from_batch(x)
    for k, a in before.items():
        assert layer.params[k].tobytes() == a.tobytes(), k


def test_preactivation_uses_the_layers_eps():
    # preactivation is W(v, g) x + b with the layer's own eps (here 0.5, far from the default
    # 1e-5): for WeightNorm it is the forward itself.
    rng = np.random.default_rng(34)
    layer = refnorm.build("wn", 3, 4, 3, padding=1, eps=0.5, dtype=np.float64)
    layer.params["g"] = rng.uniform(0.5, 2.0, 4)
    layer.params["b"] = rng.uniform(-1.0, 1.0, 4)
    x = rng.standard_normal((2, 3, 5, 5))
    np.testing.assert_array_equal(layer.preactivation(x), layer.forward(x, training=True))


@pytest.mark.parametrize("name", ["wn", "np"])
def test_the_gain_starts_at_one_and_the_bias_at_zero(name):
    """docs/conventions.md, "Weight-side methods": WN (and NP's WN layer) start at g = 1,
    b = 0, before any data-dependent initialization."""
    layer = refnorm.build(name, 3, 4, 3, dtype=np.float64)
    np.testing.assert_array_equal(layer.params["g"], np.ones(4))
    np.testing.assert_array_equal(layer.params["b"], np.zeros(4))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_an_infinite_weight_is_not_reported_as_an_overflow(dtype):
    # Only finite filters whose squared norm overflows are refused (module docstring); an
    # infinite weight is a non-finite input, which, as a NaN, spoils its own filter only
    # (as the activation normalizers give NaN statistics for a non-finite group).
    v = np.random.default_rng(44).standard_normal((3, 2, 2, 2)).astype(dtype)
    g = np.ones(3, dtype)
    v_inf = v.copy()
    v_inf[1, 0, 0, 0] = np.inf
    with np.errstate(invalid="ignore"):  # inf / inf in the spoiled filter
        w, _ = weight_norm_forward(v_inf, g)
    clean, _ = weight_norm_forward(v, g)
    assert np.isnan(w[1]).any()
    np.testing.assert_array_equal(w[[0, 2]], clean[[0, 2]])


def test_data_dependent_init_refuses_a_float64_channel_made_constant_by_identical_samples():
    # 1000 identical samples: every channel of t is one value repeated. The float64 sum of
    # 1000 equal float64 values rounds, and a mean formed from it alone leaves a std of
    # ~1e-14 |mean| (g = 1/std ~ 1e14); refused as constant, and the layer is unchanged.
    layer = refnorm.build("wn", 5, 3, dtype=np.float64, seed=0)
    x = np.repeat([[0.3, -1.2, 0.8, 2.1, -0.4]], 1000, axis=0)
    t = x @ (layer.params["v"] / np.linalg.norm(layer.params["v"], axis=1, keepdims=True)).T
    assert np.all(t.max(axis=0) == t.min(axis=0))                       # constant channels
    assert np.all(np.sqrt(((t - t.sum(axis=0) / 1000) ** 2).mean(axis=0)) > 0)  # that std
    before = {k: a.copy() for k, a in layer.params.items()}
    with pytest.raises(ValueError, match=r"constant over the batch"):
        layer.init_from_batch(x)
    for k, a in before.items():
        assert layer.params[k].tobytes() == a.tobytes(), k


def test_v_and_g_from_two_array_namespaces_are_refused():
    strict = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError, match=r"one array namespace"):
        weight_norm_forward(np.ones((3, 4)), strict.ones(3, dtype=strict.float64))
    with pytest.raises(TypeError, match=r"one array namespace"):
        weight_norm_forward(strict.ones((3, 4), dtype=strict.float64), np.ones(3))


@pytest.mark.parametrize("spoiler", [np.inf, np.nan], ids=["inf", "nan"])
def test_an_overflowing_filter_is_refused_beside_a_non_finite_one(spoiler):
    # Each filter is its own: a NaN or an infinity spoils only its own filter (the test
    # above), so it must not hide another filter's overflow, which alone is refused.
    # ||v_0|| ~ 1e20 * sqrt(4): the squared norm ~ 1e40 > 3.4e38, float32's largest.
    v = np.random.default_rng(45).standard_normal((3, 4))
    v[0] *= 1e20
    v = v.astype(np.float32)
    v[2, 1] = spoiler
    with np.errstate(over="ignore", invalid="ignore"), pytest.raises(
            ValueError, match=r"squared norm of a filter of v overflows float32 \(\|v\| up to "
                              r"[0-9.]+e\+(19|20)\)"):
        weight_norm_forward(v, np.ones(3, np.float32))


def test_data_dependent_init_names_an_overflowing_variance_of_a_finite_batch():
    # float32 inputs ~1e30: t ~1e30 and its squared deviations ~1e60 overflow float32 (max
    # 3.4e38). The batch is finite, so the error must say overflow, not "non-finite input".
    layer = refnorm.build("wn", 3, 2, dtype=np.float32, seed=1)
    x = (1e30 * np.random.default_rng(46).standard_normal((8, 3))).astype(np.float32)
    assert np.all(np.isfinite(x))
    with pytest.raises(ValueError, match=r"variance of x overflows float32"):
        layer.init_from_batch(x)
    np.testing.assert_array_equal(layer.params["g"], np.ones(2, np.float32))

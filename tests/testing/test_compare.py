"""refnorm.testing.assert_matches on numpy and dlpack callables."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from refnorm.testing import Case, as_impl, assert_matches, norm_inputs, reference
from refnorm.testing.compare import compare_case
from refnorm.testing.tolerance import reference_outputs, underflow_floors
from tests.testing.impls import NumpyBN, NumpyGN, numpy_bn_forward


def test_numpy_callable_with_backward_matches():
    bn = NumpyBN(3)
    assert_matches("bn", numpy_bn_forward, lambda dy, x, g, b: bn.backward(dy, x, g, b),
                   num_channels=3)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_low_precision_inputs_match_within_derived_tolerance(dtype):
    def forward(x, gamma, beta):   # computes in float32 as refnorm does, returns x's dtype
        return numpy_bn_forward(x.astype(np.float32), gamma.astype(np.float32),
                                beta.astype(np.float32)).astype(x.dtype)
    assert_matches("bn", forward, dtype=dtype)


def test_failure_names_output_error_index_and_shrunk_input():
    def eps_outside(x, gamma, beta):
        axes = (0,) + tuple(range(2, x.ndim))
        view = (1, -1) + (1,) * (x.ndim - 2)
        x_hat = (x - x.mean(axis=axes, keepdims=True)) / (np.sqrt(x.var(axis=axes,
                                                                        keepdims=True)) + 1e-5)
        return gamma.reshape(view) * x_hat + beta.reshape(view)
    with pytest.raises(AssertionError) as info:
        assert_matches("bn", eps_outside)
    text = str(info.value)
    assert re.search(r"y: max \|error\| \S+ at index \(", text), text
    assert "Smallest failing input (shrunk by hypothesis):\nCase(method='bn'" in text


def test_wrong_dgamma_fails_on_the_gradient():
    bad = NumpyBN(3, dgamma_wrong=True)
    with pytest.raises(AssertionError, match=r"dgamma: max \|error\|"):
        assert_matches("bn", numpy_bn_forward, lambda dy, x, g, b: bad.backward(dy, x, g, b),
                       num_channels=3, spatial=2)


def test_dlpack_callable_through_convert():
    torch = pytest.importorskip("torch")

    def forward(x, gamma, beta):   # takes and returns torch tensors
        return torch.nn.functional.batch_norm(x, None, None, gamma, beta, training=True)
    assert_matches("bn", forward, convert=torch.from_numpy)


def test_refuses_a_callable_of_the_wrong_arity():
    with pytest.raises(TypeError, match="impl must take \\(x, gamma, beta\\)"):
        assert_matches("bn", lambda x: x)


def test_gn_needs_num_groups_from_the_call_or_the_implementation():
    def forward(x, gamma, beta):  # a GN with G = 2, which says so nowhere
        from refnorm import group_norm_forward
        return group_norm_forward(x, gamma, beta, num_groups=2)[0]

    with pytest.raises(ValueError, match="num_groups must be given for method 'gn'"):
        assert_matches("gn", forward)
    forward.num_groups = 2
    assert_matches("gn", forward, max_examples=5)


# -- subnormal outputs: gamma below the dtype's smallest normal number ------------

LOW_AND_FULL = [np.float16, np.float32, np.float64]


def _compute(dtype):
    """float32 for float16 (as refnorm computes), else the dtype itself."""
    return np.float32 if np.dtype(dtype) == np.float16 else dtype


def _numpy_bn_in(dtype, eps=1e-5):
    """tests.testing.impls' BN forward and backward, computing in float32 for float16 and
    rounding the results to ``dtype`` once: a correct low-precision implementation."""
    c = _compute(dtype)
    bn = NumpyBN(1, eps=eps)

    def forward(x, gamma, beta):
        return numpy_bn_forward(x.astype(c), gamma.astype(c), beta.astype(c),
                                eps=eps).astype(dtype)

    def backward(dy, x, gamma, beta):
        grads = bn.backward(dy.astype(c), x.astype(c), gamma.astype(c), beta.astype(c))
        return tuple(g.astype(dtype) for g in grads)
    return forward, backward


def _refnorm_in_dtype(method, options):
    """refnorm's own pure functions called on the dtype under test (float16 computes in
    float32 and returns float16): a second correct implementation, for every method."""
    def forward(x, *params):
        return reference.forward(method, x, params, options)[0]

    def backward(dy, x, *params):
        return reference.backward(method, dy, reference.forward(method, x, params, options)[1])
    return forward, backward


@st.composite
def _subnormal(draw, dtype, size):
    """``size`` values of ``dtype`` below its smallest normal number, of either sign."""
    info = np.finfo(dtype)
    low = float(info.smallest_subnormal)
    high = float(info.smallest_normal) - low                     # the largest subnormal
    mags = draw(hnp.arrays(np.float64, size, elements=st.floats(
        low, high, allow_subnormal=low < np.finfo(np.float64).tiny)))
    signs = draw(hnp.arrays(np.float64, size, elements=st.sampled_from([-1.0, 1.0])))
    values = (signs * mags).astype(dtype)
    assert np.all(np.abs(values) < info.smallest_normal)
    return values


def _with_subnormal_affine(data, case, dtype):
    """``case`` with gamma and beta (WN: g) in the subnormal range of ``dtype``."""
    C = case.params[0].shape[0]
    params = (data.draw(_subnormal(dtype, C)),)
    if case.method != "wn":
        params += (data.draw(_subnormal(dtype, C)),) + case.params[2:]
    return dataclasses.replace(case, params=params)


@pytest.mark.parametrize("dtype", LOW_AND_FULL, ids=lambda d: np.dtype(d).name)
@given(data=st.data())
def test_subnormal_gamma_numpy_bn_matches(dtype, data):
    """A gamma below the smallest normal makes y and dx subnormal: a few bits, no relative
    precision. A correct implementation is within the floor (one subnormal spacing of the
    returned dtype, plus the compute dtype's scaled by each output's factors)."""
    case = _with_subnormal_affine(data, data.draw(norm_inputs("bn", dtype=dtype)), dtype)
    forward, backward = _numpy_bn_in(dtype, case.eps)
    impl = as_impl("bn", forward, backward=backward)
    mismatch = compare_case(impl, case, {"eps": case.eps})
    assert mismatch is None, f"{mismatch}\n{case!r}"


@pytest.mark.parametrize("dtype", LOW_AND_FULL, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("method", ["bn", "in", "ln", "gn", "sn", "wn"])
@given(data=st.data())
def test_subnormal_gamma_refnorm_in_dtype_matches(method, dtype, data):
    case = _with_subnormal_affine(data, data.draw(norm_inputs(method, dtype=dtype)), dtype)
    options = {"eps": case.eps, "num_groups": case.num_groups}
    forward, backward = _refnorm_in_dtype(method, options)
    mismatch = compare_case(as_impl(method, forward, backward=backward), case, options)
    assert mismatch is None, f"{mismatch}\n{case!r}"


def test_the_float16_floor_is_a_rounding_not_the_smallest_normal():
    """A float16 layer that flushes subnormal results to zero is off by up to the smallest
    normal (6.1e-5), far beyond the rounding of a subnormal (half a spacing, 3e-8): it is
    told so, on a gamma of 1e-6 (17 spacings) and x_hat = -1, 1."""
    forward, _ = _numpy_bn_in(np.float16)

    def flush_to_zero(x, gamma, beta):
        y = forward(x, gamma, beta)
        return np.where(np.abs(y) < np.finfo(np.float16).smallest_normal, 0, y).astype(y.dtype)

    f16 = np.float16
    issue_25 = Case("bn", "offset", np.array([[100.0], [100.06]], f16),     # as reported
                    (np.array([1e-7], f16), np.array([0.0], f16)),
                    np.array([[0.5], [0.25]], f16), 1e-5)
    assert compare_case(as_impl("bn", forward), issue_25, {"eps": 1e-5}) is None
    case = Case("bn", "plain", np.array([[0.0], [2.0]], f16),
                (np.array([1e-6], f16), np.array([0.0], f16)), np.array([[0.5], [0.25]], f16),
                1e-5)
    assert compare_case(as_impl("bn", forward), case, {"eps": 1e-5}) is None
    mismatch = compare_case(as_impl("bn", flush_to_zero), case, {"eps": 1e-5})
    assert mismatch is not None and mismatch.output == "y" and mismatch.got == 0.0, mismatch


def test_the_floor_is_whole_subnormal_spacings():
    """IEEE 754 smallest subnormals, written out: binary16 2**-24, binary32 2**-149,
    binary64 2**-1074; S = 0 leaves the returned value's own rounding."""
    assert underflow_floors(np.float16, {"y": 0.0}) == {"y": 2.0**-24}
    assert underflow_floors(np.float32, {"y": 2.0}) == \
        {"y": 2.0**-149 + 2 * (2.0**-149 + 2.0**-1074)}
    assert underflow_floors(np.float64, {"y": 3.0}) == {"y": 7 * 2.0**-1074}


def test_float16_is_assumed_to_compute_in_float32():
    from refnorm.testing.tolerance import compute_dtype, unit_roundoff

    assert compute_dtype(np.float16) == np.float32
    assert unit_roundoff(np.float16) == (2.0**-24, 2.0**-11)
    assert unit_roundoff(np.float32) == (2.0**-24, 2.0**-24)


def test_dbeta_tolerance_covers_naive_float32_summation():
    """The module docstring bounds a naive sum of m terms by (m + 4) u per term: a float32
    implementation that sums dbeta left to right must pass. Here 1024 of its additions each
    lose a quarter of an ulp at partial sums of 2048..3072, so it returns 0 for a dbeta of
    1/16: within per_channel (m + 4) u max|dy| = 2.25, far outside (m + 4) u max|dy|."""
    from refnorm.testing.strategies import Case
    from refnorm.testing.tolerance import tolerances

    dy = np.concatenate([np.ones(2048), np.full(1024, 1 + 2.0**-14),
                         -np.ones(3072)]).astype(np.float32)
    naive = np.float32(0)
    for v in dy:
        naive = np.float32(naive + v)
    exact = float(np.sum(dy.astype(np.float64)))
    assert naive == 0 and exact == 1 / 16
    x = np.random.default_rng(0).standard_normal((1, 1, dy.size)).astype(np.float32)
    case = Case("bn", "plain", x, (np.ones(1, np.float32), np.zeros(1, np.float32)),
                dy.reshape(x.shape), 1e-5)
    tol = tolerances(case, {"dbeta": np.array([exact])})["dbeta"]
    assert abs(float(naive) - exact) <= tol


def _refnorm_float32(method, options, *, dbeta_error=0.0):
    """refnorm's own functions on float32 inputs (a correct float32 implementation), with
    ``dbeta_error`` added to dbeta."""
    def forward(x, *params):
        return reference.forward(method, x, params, options)[0]

    def backward(dy, x, *params):
        grads = list(reference.backward(method, dy, reference.forward(method, x, params,
                                                                      options)[1]))
        if dbeta_error:
            grads[2] = grads[2] + np.float32(dbeta_error)
        return tuple(grads)
    return forward, backward


def test_dbeta_is_held_to_the_rounding_of_one_channels_sum():
    """dbeta_c sums the P = N * H * W values of channel c: the bound is P (m + 4) u max|dy|
    (about 8e-6 here, P = 4 in float32), not that of a sum over the whole input (C times
    more). A dbeta 3e-5 off, four times the bound, is no rounding and fails."""
    rng = np.random.default_rng(0)
    f32 = np.float32
    case = Case("bn", "plain", rng.standard_normal((2, 8, 2)).astype(f32),
                (np.ones(8, f32), np.zeros(8, f32)),
                rng.uniform(-1, 1, (2, 8, 2)).astype(f32), 1e-5)
    options = {"eps": 1e-5}
    forward, backward = _refnorm_float32("bn", options)
    assert compare_case(as_impl("bn", forward, backward=backward), case, options) is None
    forward, backward = _refnorm_float32("bn", options, dbeta_error=3e-5)
    mismatch = compare_case(as_impl("bn", forward, backward=backward), case, options)
    assert mismatch is not None and mismatch.output == "dbeta", mismatch


def test_refnorms_side_is_computed_in_float64():
    """The tolerances bound the rounding of the implementation alone: refnorm's outputs are
    computed in float64 from the inputs as drawn, whatever the dtype under test."""
    rng = np.random.default_rng(1)
    f16 = np.float16
    x = (100 + rng.standard_normal((3, 2, 4))).astype(f16)
    params = (np.array([1.5, -0.5], f16), np.array([0.25, 1.0], f16))
    case = Case("bn", "offset", x, params, rng.standard_normal(x.shape).astype(f16), 1e-5)
    out = reference_outputs(case, {"eps": 1e-5}, with_grads=True)
    want_y, cache = reference.forward("bn", x.astype(np.float64),
                                      tuple(p.astype(np.float64) for p in params),
                                      {"eps": 1e-5})
    assert all(v.dtype == np.float64 for v in out.values()), {k: v.dtype for k, v in
                                                               out.items()}
    np.testing.assert_array_equal(out["y"], want_y)
    np.testing.assert_array_equal(out["dx"], reference.backward(
        "bn", case.dy.astype(np.float64), cache)[0])


def test_weight_norm_with_filters_of_very_different_norms_matches_in_float32():
    """dv of a filter of norm n is of size |dy| / n and carries rounding of that size: the
    bound takes the smallest filter norm. A float32 WN with one filter of norm ~0.02 (its
    upstream gradient nearly along it, so that dv cancels) and one of norm ~25 passes."""
    rng = np.random.default_rng(0)
    f32 = np.float32
    v = np.stack([1e-2 * rng.standard_normal(6), 10 * rng.standard_normal(6)])
    dy = np.stack([v[0] / np.linalg.norm(v[0]) + 1e-3 * rng.standard_normal(6),
                   rng.standard_normal(6)])
    case = Case("wn", "plain", v.astype(f32), (np.array([1.0, 0.5], f32),), dy.astype(f32),
                1e-5)
    options = {"eps": 1e-5}
    forward, backward = _refnorm_float32("wn", options)
    assert compare_case(as_impl("wn", forward, backward=backward), case, options) is None


def test_a_group_count_that_does_not_divide_12_is_diagnosed_on_2g_channels():
    """The diagnosis probes GN on 12 channels unless told: a layer with G = 5 groups given
    to assert_matches (and no num_groups attribute) cannot take 12; it is probed on 10, and
    its interleaved layout is named."""
    interleaved = NumpyGN(5, layout="interleaved")

    def gn(x, gamma, beta):
        return interleaved(x, gamma, beta)

    with pytest.raises(AssertionError, match=r"First diverging convention \(refnorm\.testing\."
                                             r"fingerprint\): group layout: found interleaved, "
                                             r"G = 5"):
        assert_matches("gn", gn, num_groups=5, max_examples=20)

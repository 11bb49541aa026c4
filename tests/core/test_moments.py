"""Two-pass moments over axes: against numpy, the element count, float32 far from zero."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

from refnorm.backend import to_numpy
from refnorm.core import moments, reduced_count
from refnorm.core.moments import check_variance_finite
from tests.core.strategies import arrays_and_axes

U64 = np.finfo(np.float64).eps


@given(arrays_and_axes())
def test_moments_match_numpy(xp, case):
    x, axes = case
    mu, var = (to_numpy(a) for a in moments(xp.asarray(x), axes))
    m = reduced_count(x.shape, axes)
    # Each of the two results sums m values of size <= max|x| (resp. of the squared
    # deviations); two summation orders differ by at most m rounding errors of that size.
    # The deviations x - mu themselves are known to d = 2 m u max|x|, which moves the
    # variance by up to 2 sqrt(var) d + d^2: all three vanish only for exact data.
    size = np.max(np.abs(x))
    d = 2 * m * U64 * size
    expected_var = x.var(axis=axes, keepdims=True)
    np.testing.assert_allclose(mu, x.mean(axis=axes, keepdims=True), rtol=0, atol=m * U64 * size)
    atol = m * U64 * expected_var + 2 * np.sqrt(expected_var) * d + d * d
    assert np.all(np.abs(var - expected_var) <= atol), (var, expected_var)
    assert mu.shape == var.shape == tuple(1 if i in axes else n for i, n in enumerate(x.shape))


@pytest.mark.parametrize(("shape", "axes", "count"),
                         [((2, 3, 4), (0, 2), 8), ((5,), (0,), 5), ((2, 3), (1,), 3)])
def test_reduced_count_is_the_product_of_the_reduced_sides(shape, axes, count):
    assert reduced_count(shape, axes) == count


def test_constant_input_has_zero_variance_exactly_not_a_negative_one():
    # The one-pass E[x^2] - E[x]^2 can come out negative (then sqrt(var + eps) is NaN for a
    # small eps); the two-pass mean of squares cannot.
    x = np.full((3, 7), 0.1)
    _, var = moments(x, (1,))
    assert np.all(var >= 0)
    np.testing.assert_allclose(var, 0.0, atol=1e-32)  # (m u |x|)^2 = (7 * 2.2e-16 * 0.1)^2


def test_float32_far_from_zero_keeps_a_unit_variance():
    # float32 inputs offset by 1e4: the mean of squares E[x^2] ~ 1e8 has float32 spacing 8,
    # so the one-pass form loses the unit variance entirely; two passes keep it to the
    # spacing of the inputs (2^-10 ~ 1e-3 near 1e4).
    rng = np.random.default_rng(0)
    x = (1e4 + rng.standard_normal(4096)).astype(np.float32)
    mu, var = moments(x, (0,))
    assert var.dtype == np.float32
    exact = x.astype(np.float64).var()
    np.testing.assert_allclose(float(var[0]), exact, rtol=1e-2)
    one_pass = np.mean(x * x) - np.mean(x) ** 2
    assert abs(float(one_pass) - exact) > 0.1  # the check above can tell the two apart


def test_input_is_not_modified():
    x = np.arange(6.0).reshape(2, 3)
    moments(x, (1,))
    np.testing.assert_array_equal(x, np.arange(6.0).reshape(2, 3))


def test_a_merged_nan_variance_is_not_an_overflow_but_a_merged_infinity_is():
    x = np.ones((2, 3))  # finite local data, two groups; the NaN came from another device's
    check_variance_finite(np.array([[np.nan], [1.0]]), x, merged=True)  # no error
    with pytest.raises(ValueError, match="overflows"):
        check_variance_finite(np.array([[np.nan], [1.0]]), x)
    with pytest.raises(ValueError, match="overflows"):
        check_variance_finite(np.array([[np.inf], [1.0]]), x, merged=True)


def test_a_constant_float32_group_has_its_constant_as_mean_and_zero_variance():
    # The float64 sum of equal float32 values is exact (module docstring): the mean is the
    # constant itself, so the deviations and the variance are exactly 0. A float32 sum of
    # 1000 values of 1e5 + 1/8 rounds at additions and is not.
    x = np.full((2, 1000), np.float32(100000.125))
    x[1] = np.float32(-3.3e7)
    mu, var = moments(x, (1,))
    assert mu.dtype == var.dtype == np.float32
    np.testing.assert_array_equal(mu, x[:, :1])
    np.testing.assert_array_equal(var, 0.0)


def test_a_nan_gives_nan_statistics_for_its_group_only_and_no_error():
    # "Non-finite inputs give NaN statistics for their group": not an overflow error.
    x = np.array([[1.0, np.nan, 3.0], [1.0, 2.0, 3.0]])
    mu, var = moments(x, (1,))
    assert np.isnan(mu[0, 0]) and np.isnan(var[0, 0])
    assert (mu[1, 0], var[1, 0]) == (2.0, 2.0 / 3.0)


def test_an_empty_input_with_a_nan_variance_is_not_an_overflow():
    # The mean over nothing is NaN (SN's unused scope on an empty axis): nothing overflowed.
    check_variance_finite(np.array([np.nan]), np.empty((0, 3)))


@pytest.mark.parametrize(("dtype", "value", "remedy"),
                         [(np.float32, 1e20, "compute in float64 or rescale x"),
                          (np.float64, 1e160, "; rescale x$")])
def test_an_overflowing_variance_names_a_remedy_that_fits_the_dtype(dtype, value, remedy):
    # (value, -value): the mean is 0, the squared deviations overflow the dtype. float64
    # has no wider dtype to offer: only rescaling helps there.
    x = np.array([value, -value], dtype)
    with pytest.raises(ValueError, match=remedy) as info:
        moments(x, (0,))
    assert ("compute in float64" in str(info.value)) == (dtype == np.float32)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_an_overflowing_group_is_refused_beside_a_non_finite_group(bad):
    # A NaN or inf gives its own group non-finite statistics and excuses no other group: the
    # float32 squared deviations of row 1 (about 1e40) overflow, and the error quotes that
    # row's largest |x| (2e20), not the non-finite row's. Before, one non-finite value anywhere
    # in x excused every overflow, and row 1 normalized to beta.
    x = np.array([[1.0, bad, 3.0], [1e20, -1e20, 2e20]], np.float32)
    with pytest.raises(ValueError, match=r"overflows float32 \(\|x\| up to 2e\+20\)"):
        moments(x, (1,))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_group_beside_ordinary_float32_groups_is_no_overflow(bad):
    x = np.array([[1.0, bad, 3.0], [1.0, 2.0, 3.0]], np.float32)
    mu, var = moments(x, (1,))
    assert not np.isfinite(var[0, 0])
    assert (mu[1, 0], var[1, 0]) == (2.0, np.float32(2.0 / 3.0))


def test_each_statistic_is_checked_against_its_own_group_over_several_axes():
    # var (1, C, 1) of x (N, C, S), reduced over axes 0 and 2 as in batch normalization:
    # channel 0 holds a NaN (in sample 1), channel 1 is finite. An infinite variance of
    # channel 0 is its NaN's; one of channel 1 is an overflow, merged or not.
    x = np.ones((2, 2, 3))
    x[1, 0, 2] = np.nan
    nan_channel = np.array([np.inf, 1.0]).reshape(1, 2, 1)
    finite_channel = np.array([1.0, np.inf]).reshape(1, 2, 1)
    check_variance_finite(nan_channel, x)
    check_variance_finite(nan_channel, x, merged=True)
    for merged in (False, True):
        with pytest.raises(ValueError, match="the variance of x overflows float64"):
            check_variance_finite(finite_channel, x, merged=merged)
    # per sample (N, 1, 1), as layer normalization: sample 0 is finite, sample 1 is not
    check_variance_finite(np.array([1.0, np.inf]).reshape(2, 1, 1), x)
    with pytest.raises(ValueError, match="the variance of x overflows float64"):
        check_variance_finite(np.array([np.inf, 1.0]).reshape(2, 1, 1), x)


def test_the_error_quotes_the_largest_value_of_the_refused_groups():
    # Row 0: 1000 values of +-1e18, whose float32 squares sum to 1e39 (overflow); row 1: two
    # values of +-1e19 among zeros, whose squares sum to 2e38 (fits). The error quotes the
    # refused row's largest |x|, 1e18, not row 1's larger 1e19.
    x = np.zeros((2, 1000), np.float32)
    x[0] = np.float32(1e18) * np.resize([1.0, -1.0], 1000)
    x[1, :2] = [1e19, -1e19]
    with pytest.raises(ValueError, match=r"overflows float32 \(\|x\| up to 1e\+18\)"):
        moments(x, (1,))

"""The running-statistics update (PyTorch's momentum convention, unbiased variance)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from refnorm.core import moments
from refnorm.core.running import update_running_stats


def test_update_weights_the_new_batch_by_momentum_and_unbiases_the_variance():
    rm, rv = np.zeros(2), np.ones(2)
    bm, bv = np.array([1.0, 2.0]), np.array([3.0, 4.0])
    new_mean, new_var = update_running_stats(rm, rv, bm, bv, count=4, momentum=0.5)
    np.testing.assert_allclose(new_mean, [0.5, 1.0], rtol=1e-15)
    # Unbiased batch variances 3 * 4/3 = 4 and 4 * 4/3 = 16/3; halfway from 1 to those.
    np.testing.assert_allclose(new_var, [2.5, 1.0 / 2 + 8.0 / 3], rtol=1e-15)


def test_arguments_are_not_modified():
    rm, rv = np.zeros(2), np.ones(2)
    bm, bv = np.array([1.0, 2.0]), np.array([3.0, 4.0])
    update_running_stats(rm, rv, bm, bv, count=4, momentum=0.5)
    np.testing.assert_array_equal(rm, [0.0, 0.0])
    np.testing.assert_array_equal(rv, [1.0, 1.0])
    np.testing.assert_array_equal(bm, [1.0, 2.0])
    np.testing.assert_array_equal(bv, [3.0, 4.0])


def test_momentum_one_forgets_the_past():
    new_mean, new_var = update_running_stats(np.full(1, 7.0), np.full(1, 7.0), np.zeros(1),
                                             np.full(1, 2.0), count=2, momentum=1.0)
    np.testing.assert_array_equal(new_mean, [0.0])
    np.testing.assert_array_equal(new_var, [4.0])   # 2 * 2 / (2 - 1)


def test_result_keeps_the_dtype_of_the_running_statistics():
    new_mean, new_var = update_running_stats(np.zeros(2, np.float32), np.ones(2, np.float32),
                                             np.ones(2), np.ones(2), count=3)
    assert new_mean.dtype == new_var.dtype == np.float32


def test_needs_two_values():
    with pytest.raises(ValueError, match=r"count must be >= 2 for an unbiased variance; got 1"):
        update_running_stats(np.zeros(1), np.ones(1), np.zeros(1), np.zeros(1), count=1)


@pytest.mark.parametrize("momentum", [0.0, -0.1, 1.5])
def test_momentum_must_be_in_0_1(momentum):
    with pytest.raises(ValueError, match=r"momentum must be in \(0, 1\]; got"):
        update_running_stats(np.zeros(1), np.ones(1), np.zeros(1), np.ones(1), count=2,
                             momentum=momentum)


def test_default_momentum_is_pytorchs_0_1():
    # PyTorch's default weight of the new batch: 0.9 of the old value plus 0.1 of the new.
    new_mean, new_var = update_running_stats(np.zeros(1), np.ones(1), np.full(1, 10.0),
                                             np.full(1, 6.0), count=4)
    np.testing.assert_allclose(new_mean, [1.0], rtol=1e-15)
    np.testing.assert_allclose(new_var, [0.9 + 0.1 * 8.0], rtol=1e-15)   # 6 * 4/3 = 8


@pytest.mark.parametrize("momentum", [np.float64(0.5), Fraction(1, 2)])
def test_a_numpy_or_fraction_momentum_keeps_the_dtype_of_the_running_statistics(momentum):
    # Both are real numbers in (0, 1]; neither may turn float32 state into float64 (numpy
    # scalars promote under NEP 50) or into an object array (a Fraction).
    new_mean, new_var = update_running_stats(np.zeros(2, np.float32), np.ones(2, np.float32),
                                             np.full(2, 2.0, np.float32),
                                             np.full(2, 3.0, np.float32), count=4,
                                             momentum=momentum)
    assert new_mean.dtype == new_var.dtype == np.float32
    np.testing.assert_array_equal(new_mean, [1.0, 1.0])
    np.testing.assert_array_equal(new_var, [2.5, 2.5])   # (1 + 3 * 4/3) / 2


def test_a_batch_norms_running_statistics_equal_pytorchs_over_steps():
    # The convention against an independent implementation: torch.nn.BatchNorm2d in float64
    # updates its running statistics with the same momentum and the unbiased batch variance
    # (m = N * H * W = 12 values per channel); equal to float64 rounding over three steps.
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    bn = torch.nn.BatchNorm2d(3, momentum=0.3, dtype=torch.float64)
    mean, var = np.zeros(3), np.ones(3)
    for _ in range(3):
        x = 5 * rng.standard_normal((2, 3, 2, 3)) + 12
        bn(torch.from_numpy(x))
        mu, v = moments(x, (0, 2, 3))
        mean, var = update_running_stats(mean, var, mu.reshape(3), v.reshape(3), count=12,
                                         momentum=0.3)
    np.testing.assert_allclose(mean, bn.running_mean.numpy(), rtol=1e-14)
    np.testing.assert_allclose(var, bn.running_var.numpy(), rtol=1e-14)

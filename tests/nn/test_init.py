"""He-normal initialization: its distribution, its fan-in in conv and linear layers, the seed."""

from __future__ import annotations

import numpy as np
import pytest

import refnorm.nn as nn
from refnorm.backend import to_numpy
from refnorm.nn import he_normal


def assert_he_normal(w, fan_in):
    """Sample mean and std of ``w`` against normal(0, sqrt(2 / fan_in)).

    With n draws the sample std has a relative standard error of 1/sqrt(2 n) (0.6% for
    n = 15360) and the mean one of std/sqrt(n): 3% and 5 standard errors are never reached
    by a correct draw (more than 5 standard errors either way), while a wrong fan-in (the
    std off by a factor sqrt(KH KW) or sqrt(2)) or a uniform draw of the wrong width is.
    """
    w = np.asarray(to_numpy(w), dtype=np.float64)
    std = np.sqrt(2.0 / fan_in)
    assert abs(w.std() / std - 1) < 0.03, (w.std(), std)
    assert abs(w.mean()) < 5 * std / np.sqrt(w.size)


def test_he_normal_has_mean_0_and_std_sqrt_2_over_fan_in():
    w = he_normal((64, 240), fan_in=240, seed=0, xp=np, dtype=np.float64)
    assert w.shape == (64, 240) and w.dtype == np.float64
    assert_he_normal(w, 240)
    # Normal, not uniform: about 4.55% of normal draws lie beyond 2 std (binomial standard
    # error 0.17% at n = 15360), none of a uniform draw of the same std (bounded by 1.73).
    beyond = np.mean(np.abs(w) > 2 * np.sqrt(2.0 / 240))
    assert 0.035 < beyond < 0.056


def test_conv_fan_in_is_c_in_kh_kw_and_bias_starts_at_zero():
    conv = nn.Conv2d(16, 64, (3, 5), seed=7)
    w, b = conv.params["w"], conv.params["b"]
    assert w.shape == (64, 16, 3, 5) and w.dtype == np.float32 and b.dtype == np.float32
    assert_he_normal(w, 16 * 3 * 5)
    np.testing.assert_array_equal(b, np.zeros(64))


def test_linear_fan_in_is_d_in_and_bias_starts_at_zero():
    lin = nn.Linear(300, 50, seed=3, dtype=np.float64)
    assert lin.params["w"].shape == (50, 300)
    assert_he_normal(lin.params["w"], 300)
    np.testing.assert_array_equal(lin.params["b"], np.zeros(50))


def test_the_seed_alone_decides_the_weights_in_every_dtype_and_namespace():
    def draw(seed, **kw):
        return he_normal((4, 3, 2, 2), fan_in=12, seed=seed, **kw)

    w64 = draw(5, xp=np, dtype=np.float64)
    np.testing.assert_array_equal(draw(5, xp=np, dtype=np.float64), w64)
    assert not np.array_equal(draw(6, xp=np, dtype=np.float64), w64)
    # float32 is the float64 draw rounded once, not another draw.
    np.testing.assert_array_equal(draw(5, xp=np, dtype=np.float32), w64.astype(np.float32))
    strict = pytest.importorskip("array_api_strict")
    w_strict = draw(5, xp=strict, dtype=strict.float64)
    assert type(w_strict) is not np.ndarray
    np.testing.assert_array_equal(to_numpy(w_strict), w64)
    np.testing.assert_array_equal(nn.Conv2d(3, 4, 2, seed=5, dtype=np.float64).params["w"], w64)


@pytest.mark.parametrize("seed", [1.5, "1", None, True])
def test_seed_must_be_an_int(seed):
    with pytest.raises(TypeError, match=r"seed must be an int; got"):
        he_normal((2, 2), fan_in=2, seed=seed, xp=np, dtype=np.float64)


@pytest.mark.parametrize("fan_in, error", [(0, ValueError), (-3, ValueError), (2.5, TypeError)])
def test_he_normal_refuses_a_fan_in_that_is_not_a_positive_int(fan_in, error):
    with pytest.raises(error, match="fan_in"):
        he_normal((2, 3), fan_in=fan_in, seed=0, xp=np, dtype=np.float32)


def test_he_normal_refuses_an_integer_dtype():
    # int32 would truncate the normal draws, mostly to 0
    with pytest.raises(TypeError, match="real floating dtype"):
        he_normal((2, 3), fan_in=3, seed=0, xp=np, dtype=np.int32)


def test_he_normal_is_numpys_float64_standard_normal_scaled():
    """The documented draw: numpy.random.default_rng(seed).standard_normal(shape) in float64
    times sqrt(2 / fan_in), rounded once to the dtype; reproducible with numpy alone."""
    want = np.random.default_rng(11).standard_normal((5, 3, 2)) * np.sqrt(2.0 / 6)
    got = he_normal((5, 3, 2), fan_in=6, seed=11, xp=np, dtype=np.float64)
    np.testing.assert_array_equal(got, want)
    got32 = he_normal((5, 3, 2), fan_in=6, seed=11, xp=np, dtype=np.float32)
    np.testing.assert_array_equal(got32, want.astype(np.float32))


def test_a_negative_seed_is_refused_by_name_wherever_weights_are_drawn():
    """numpy's generators take seeds >= 0 and say "expected non-negative integer", naming
    nothing; the layers that draw weights pass their seed here."""
    with pytest.raises(ValueError, match=r"^seed must be >= 0; got -1$"):
        he_normal((2, 2), fan_in=2, seed=-1, xp=np, dtype=np.float64)
    with pytest.raises(ValueError, match=r"^seed must be >= 0; got -3$"):
        nn.Conv2d(3, 4, 3, seed=-3)

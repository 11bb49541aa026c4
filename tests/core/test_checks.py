"""The shared argument checks: each raises the right type with a message naming the argument,
what was expected and what came, and lets good values through."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from refnorm.core.checks import (
    check_cache,
    check_channel_param,
    check_count,
    check_eps,
    check_float_array,
    check_input,
    check_like,
    check_momentum,
    check_ndim,
    prepare_channel_norm,
)


@dataclass(frozen=True)
class AlphaCache:
    pass


@dataclass(frozen=True)
class BetaCache:
    pass


def test_float_array_returns_the_namespace_and_refuses_other_kinds():
    assert check_float_array("x", np.ones(2, np.float32)) is np
    with pytest.raises(TypeError, match=r"^x must be an array; got list$"):
        check_float_array("x", [1.0])
    with pytest.raises(TypeError, match=r"^w must have a real floating-point dtype; got int64$"):
        check_float_array("w", np.ones(2, np.int64))
    with pytest.raises(TypeError, match=r"got complex128$"):
        check_float_array("w", np.ones(2, np.complex128))


def test_ndim_names_the_layout_and_the_shape():
    check_ndim("x", np.ones((2, 3)), min_ndim=2, layout="(N, C)")
    with pytest.raises(ValueError, match=r"^x must have layout \(N, C\), at least 2 dimensions; "
                                         r"got shape \(3,\) \(1 dimensions\)$"):
        check_ndim("x", np.ones(3), min_ndim=2, layout="(N, C)")


def test_input_layout_mentions_the_spatial_axis_only_when_needed():
    assert check_input(np.ones((2, 3)), min_ndim=2) is np
    with pytest.raises(ValueError, match=r"with a spatial axis, at least 3 dimensions"):
        check_input(np.ones((2, 3)), min_ndim=3)


def test_channel_param_shape():
    check_channel_param("gamma", np.ones(3), 3)
    with pytest.raises(ValueError, match=r"^gamma must have shape \(C,\) = \(3,\) to match x's "
                                         r"channel axis; got shape \(1, 3\)$"):
        check_channel_param("gamma", np.ones((1, 3)), 3)


@pytest.mark.parametrize("eps", [1e-300, 1e-5, 1, np.float32(0.1)])
def test_eps_accepts_positive_finite_reals(eps):
    check_eps(eps)


@pytest.mark.parametrize(("eps", "error"), [(0.0, ValueError), (-1.0, ValueError),
                                            (float("nan"), ValueError), (float("inf"), ValueError),
                                            (True, TypeError), ("1e-5", TypeError)])
def test_eps_refuses(eps, error):
    with pytest.raises(error, match=r"^eps must be"):
        check_eps(eps)


@pytest.mark.parametrize("momentum", [1e-6, 0.1, 1])
def test_momentum_accepts_0_to_1(momentum):
    check_momentum(momentum)


@pytest.mark.parametrize(("momentum", "error"), [(0, ValueError), (1.01, ValueError),
                                                 (False, TypeError), (None, TypeError)])
def test_momentum_refuses(momentum, error):
    with pytest.raises(error, match=r"^momentum must be"):
        check_momentum(momentum)


def test_count_refuses_one_value_per_statistic():
    check_count(2, what="layer normalization", shape=(1, 2))
    with pytest.raises(ValueError, match=r"^layer normalization needs more than 1 value per "
                                         r"statistic; x of shape \(4, 1\) gives 1$"):
        check_count(1, what="layer normalization", shape=(4, 1))


def test_like_checks_dtype_then_shape():
    check_like("dy", np.ones((2, 3)), (2, 3))
    with pytest.raises(ValueError, match=r"^dy must have shape \(2, 3\); got \(3, 2\)$"):
        check_like("dy", np.ones((3, 2)), (2, 3))
    with pytest.raises(TypeError, match=r"^dy must have a real floating-point dtype"):
        check_like("dy", np.ones((2, 3), np.int32), (2, 3))


def test_cache_must_be_exactly_the_expected_type_with_the_right_article():
    check_cache(AlphaCache(), AlphaCache)
    with pytest.raises(TypeError, match=r"^cache must be an AlphaCache; got BetaCache$"):
        check_cache(BetaCache(), AlphaCache)
    with pytest.raises(TypeError, match=r"^cache must be a BetaCache; got NoneType$"):
        check_cache(None, BetaCache)


def test_prepare_channel_norm_computes_float16_in_float32_and_keeps_the_rest():
    x = np.ones((2, 3, 4), np.float16)
    xp, xc, gc, bc = prepare_channel_norm(x, np.ones(3, np.float16), np.zeros(3, np.float16),
                                          eps=1e-5)
    assert xp is np and xc.dtype == gc.dtype == bc.dtype == np.float32
    _, xc, gc, _ = prepare_channel_norm(x.astype(np.float64), np.ones(3), np.zeros(3), eps=1e-5)
    assert xc.dtype == gc.dtype == np.float64


def test_prepare_channel_norm_refuses_mixed_namespaces():
    strict = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError, match=r"one array namespace"):
        prepare_channel_norm(np.ones((2, 3)), strict.ones(3, dtype=strict.float64),
                             np.zeros(3), eps=1e-5)

"""The shared argument checks: each raises the right type with a message naming the argument,
what was expected and what came, and lets good values through."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np
import pytest

from refnorm.core.checks import (
    as_pair,
    check_bias,
    check_bool,
    check_cache,
    check_channel_param,
    check_count,
    check_device,
    check_eps,
    check_float_array,
    check_input,
    check_like,
    check_momentum,
    check_ndim,
    check_param_dtype,
    check_positive_int,
    check_rank,
    is_int,
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


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_eps_rounds_to_zero_exactly_where_the_dtype_rounds_it(dtype):
    tiny = float(np.finfo(dtype).smallest_subnormal)
    for eps in (tiny / 2, tiny / 2 * (1 + 1e-6), tiny, 1e-300, 1e-50, 1e-30, 1e-8):
        if eps == 0:  # half float64's smallest subnormal is 0 as a Python float
            continue
        if np.asarray(eps, dtype=dtype) > 0:  # numpy's own rounding is the truth
            check_eps(eps, xp=np, dtype=dtype)
        else:
            with pytest.raises(ValueError, match="rounds to 0"):
                check_eps(eps, xp=np, dtype=dtype)


def test_channel_param_errors_name_the_axis_they_count():
    import refnorm
    from refnorm.weights import translated_relu_forward, weight_norm_forward

    with pytest.raises(ValueError, match=r"g must have shape \(C,\) = \(2,\) to match v's "
                                         r"output axis \(axis 0\); got shape \(3,\)"):
        weight_norm_forward(np.ones((2, 3)), np.ones(3))
    with pytest.raises(ValueError, match=r"alpha .* to match z's channel axis"):
        translated_relu_forward(np.ones((2, 4)), np.ones(3))
    with pytest.raises(ValueError, match=r"mean .* to match the layer's channels"):
        refnorm.build("sn", 4).set_population(np.ones(3), np.ones(4))


@pytest.mark.parametrize("eps", [1e-300, 1e-5, 1, np.float32(0.1)])
def test_eps_accepts_positive_finite_reals(eps):
    check_eps(eps)


@pytest.mark.parametrize(("eps", "error"), [(0.0, ValueError), (-1.0, ValueError),
                                            (float("nan"), ValueError), (float("inf"), ValueError),
                                            (True, TypeError), ("1e-5", TypeError),
                                            (10**400, ValueError)])
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


# -- layer-constructor checks: counts, pairs, flags, dtypes, bias --------------------------


@pytest.mark.parametrize(("value", "expected"), [(3, True), (np.int32(3), True), (0, True),
                                                 (True, False), (np.bool_(True), False),
                                                 (3.0, False), ("3", False)])
def test_is_int_excludes_bools_and_floats(value, expected):
    assert is_int(value) is expected


@pytest.mark.parametrize(("value", "pair"), [(2, (2, 2)), ((1, 3), (1, 3)), ([4, 5], (4, 5)),
                                             (np.int64(2), (2, 2))])
def test_as_pair_accepts_an_int_or_a_pair(value, pair):
    result = as_pair("stride", value, minimum=1)
    assert result == pair and all(type(v) is int for v in result)


@pytest.mark.parametrize(("value", "error", "match"), [
    (0, ValueError, r"^stride must be >= 1 \(an int or a pair of ints\); got 0$"),
    ((2, 0), ValueError, r"got \(2, 0\)$"),
    (1.0, TypeError, r"^stride must be an int or a pair of ints; got 1.0$"),
    ((1, 2, 3), TypeError, r"got \(1, 2, 3\)$"),
    ((1, True), TypeError, r"got \(1, True\)$"),
])
def test_as_pair_refuses(value, error, match):
    with pytest.raises(error, match=match):
        as_pair("stride", value, minimum=1)


def test_as_pair_minimum_zero_allows_zero_padding():
    assert as_pair("padding", 0, minimum=0) == (0, 0)
    with pytest.raises(ValueError, match=r"padding must be >= 0"):
        as_pair("padding", (0, -1), minimum=0)


def test_positive_int():
    assert check_positive_int("in_channels", np.int16(4)) == 4
    with pytest.raises(ValueError, match=r"^in_channels must be >= 1; got 0$"):
        check_positive_int("in_channels", 0)
    with pytest.raises(TypeError, match=r"^in_channels must be an int; got bool$"):
        check_positive_int("in_channels", True)


def test_bool():
    assert check_bool("bias", np.bool_(False)) is False
    with pytest.raises(TypeError, match=r"^bias must be a bool; got int$"):
        check_bool("bias", 1)


def test_rank_counts_the_axes_of_the_layout():
    assert check_rank("x", np.ones((2, 3)), layout="(N, D_in)") is np
    with pytest.raises(ValueError, match=r"^x must have layout \(N, C, H, W\), 4 dimensions; "
                                         r"got shape \(2, 3\) \(2 dimensions\)$"):
        check_rank("x", np.ones((2, 3)), layout="(N, C, H, W)")
    with pytest.raises(TypeError, match=r"x must have a real floating-point dtype"):
        check_rank("x", np.ones((2, 3), np.int8), layout="(N, D_in)")


def test_param_dtype_defaults_to_float32():
    assert check_param_dtype(np, None) == np.float32
    assert check_param_dtype(np, np.float16) == np.float16
    with pytest.raises(TypeError, match=r"^dtype must be a real floating dtype; got"):
        check_param_dtype(np, np.int32)


def test_bias_is_none_or_a_vector_of_the_output_size():
    check_bias(None, 3, axis_name="C_out")
    check_bias(np.zeros(3), 3, axis_name="C_out")
    with pytest.raises(ValueError, match=r"^b must have shape \(D_out,\) = \(3,\) to match w's "
                                         r"axis 0; got shape \(2,\)$"):
        check_bias(np.zeros(2), 3, axis_name="D_out")
    with pytest.raises(TypeError, match=r"b must have a real floating-point dtype"):
        check_bias(np.zeros(3, np.int64), 3, axis_name="C_out")


def test_check_once_checks_a_signature_once_and_forgets_when_full(monkeypatch):
    from refnorm.core import checks

    monkeypatch.setattr(checks, "CHECKED", {})
    monkeypatch.setattr(checks, "CHECKED_LIMIT", 2)
    runs = []

    def check(tag):
        runs.append(tag)
        return tag.upper()

    assert checks.check_once(lambda: ("a",), lambda: check("a")) == "A"
    assert checks.check_once(lambda: ("a",), lambda: check("a")) == "A"  # remembered
    assert runs == ["a"]
    checks.check_once(lambda: ("b",), lambda: check("b"))
    checks.check_once(lambda: ("c",), lambda: check("c"))  # full: emptied, then kept
    assert set(checks.CHECKED) == {("c",)}
    checks.check_once(lambda: ("a",), lambda: check("a"))  # forgotten: checked again
    assert runs == ["a", "b", "c", "a"]


def test_check_once_always_checks_what_it_cannot_remember(monkeypatch):
    """A signature that cannot be formed or hashed is checked on every call, so the error is
    the reference's; a check that raises is never remembered."""
    from refnorm.core import checks

    monkeypatch.setattr(checks, "CHECKED", {})
    runs = []
    for _ in range(2):
        checks.check_once(lambda: ("x", [1]), lambda: runs.append("unhashable"))
        checks.check_once(lambda: None.shape, lambda: runs.append("unformed"))
    assert runs == ["unhashable", "unformed"] * 2

    def bad():
        runs.append("bad")
        raise ValueError("no")

    for _ in range(2):
        with pytest.raises(ValueError, match="no"):
            checks.check_once(lambda: ("bad",), bad)
    assert runs.count("bad") == 2 and ("bad",) not in checks.CHECKED


def test_eps_that_overflows_the_compute_dtype_is_refused_and_its_largest_value_is_not():
    # 1e39 is inf in float32: every output would be beta. float32's largest value is finite.
    with pytest.raises(ValueError, match=r"^eps=1e\+39 overflows float32, the compute dtype"):
        check_eps(1e39, xp=np, dtype=np.float32)
    check_eps(float(np.finfo(np.float32).max), xp=np, dtype=np.float32)
    check_eps(1e39, xp=np, dtype=np.float64)


def test_eps_just_above_the_largest_float32_is_refused():
    # 4e38 lies between float32's largest value (3.4e38) and twice it: as float32 it is inf,
    # so it is refused as 1e39 is, not only values far beyond the range.
    assert 4e38 > float(np.finfo(np.float32).max)
    with pytest.raises(ValueError, match=r"^eps=4e\+38 overflows float32, the compute dtype"):
        check_eps(4e38, xp=np, dtype=np.float32)


def test_prepare_channel_norm_gives_a_gamma_the_caller_cannot_change():
    # Caches keep gamma_c: a caller who updates gamma in place after the forward must not
    # change the backward, even where no cast is needed (float64 in, float64 computed).
    gamma = np.ones(3)
    _, _, gamma_c, _ = prepare_channel_norm(np.ones((2, 3)), gamma, np.zeros(3), eps=1e-5)
    gamma *= 2
    np.testing.assert_array_equal(gamma_c, np.ones(3))


def test_float_array_refuses_a_masked_array_by_name():
    masked = np.ma.masked_array(np.ones(3), mask=[False, True, False])
    with pytest.raises(TypeError, match=r"^gamma must be an array, not a numpy masked array"):
        check_float_array("gamma", masked)


def test_device_must_be_none_for_cupy():
    # CuPy's creation functions take no device=: any device is refused, None is the default.
    cupy_like = ModuleType("cupy")
    with pytest.raises(ValueError, match=r"^device must be None with xp=cupy .*got 0$"):
        check_device(cupy_like, 0)
    assert check_device(cupy_like, None) is None
    assert check_device(np, "cpu") == "cpu"


def test_channel_param_refuses_a_column_of_the_right_length():
    # (C, 1) has C entries but would broadcast against (1, C, ...) into a wrong shape.
    with pytest.raises(ValueError, match=r"^beta must have shape \(C,\) = \(3,\) to match x's "
                                         r"channel axis; got shape \(3, 1\)$"):
        check_channel_param("beta", np.ones((3, 1)), 3)


def test_bias_refuses_a_column_of_the_right_length():
    with pytest.raises(ValueError, match=r"^b must have shape \(C_out,\) = \(3,\) to match w's "
                                         r"axis 0; got shape \(3, 1\)$"):
        check_bias(np.zeros((3, 1)), 3, axis_name="C_out")


def test_rank_refuses_more_axes_than_the_layout_names():
    with pytest.raises(ValueError, match=r"^x must have layout \(N, D_in\), 2 dimensions; "
                                         r"got shape \(2, 3, 4\) \(3 dimensions\)$"):
        check_rank("x", np.ones((2, 3, 4)), layout="(N, D_in)")


def test_cache_of_a_subclass_of_the_expected_type_is_refused():
    @dataclass(frozen=True)
    class AlphaChildCache(AlphaCache):
        pass

    with pytest.raises(TypeError, match=r"^cache must be an AlphaCache; got AlphaChildCache$"):
        check_cache(AlphaChildCache(), AlphaCache)


def test_prepare_channel_norm_checks_the_shape_of_beta():
    with pytest.raises(ValueError, match=r"^beta must have shape \(C,\) = \(3,\)"):
        prepare_channel_norm(np.ones((2, 3)), np.ones(3), np.zeros(2), eps=1e-5)

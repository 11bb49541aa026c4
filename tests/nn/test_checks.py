"""The layer-constructor checks of refnorm/nn/_checks.py: counts, pairs, flags, dtypes, bias."""

from __future__ import annotations

import numpy as np
import pytest

from refnorm.nn._checks import (
    as_pair,
    check_bias,
    check_bool,
    check_param_dtype,
    check_positive_int,
    check_rank,
    is_int,
)


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

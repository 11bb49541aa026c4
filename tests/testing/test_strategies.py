"""refnorm.testing.strategies: every drawn case is one refnorm accepts, of the kind it says."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import find, given, settings
from hypothesis import strategies as st

from refnorm.testing import assert_matches, norm_inputs
from refnorm.testing.reference import METHODS
from refnorm.testing.tolerance import reference_outputs


@pytest.mark.parametrize("method", METHODS)
@given(data=st.data())
def test_drawn_cases_are_valid_for_refnorm(method, data):
    dtype = data.draw(st.sampled_from([np.float16, np.float32, np.float64]))
    case = data.draw(norm_inputs(method, dtype=dtype))
    assert case.x.dtype == dtype and case.dy.shape == case.x.shape
    assert case.dy.size == 1 or np.ptp(case.dy) > 0             # never a constant upstream
    options = {"eps": case.eps, "num_groups": case.num_groups}
    out = reference_outputs(case, options, with_grads=True)     # refnorm raises if invalid
    assert all(np.all(np.isfinite(v)) for v in out.values())


@given(case=norm_inputs("bn", kinds=("tiny_variance",)))
def test_tiny_variance_is_below_eps(case):
    var = np.var(case.x, axis=(0,) + tuple(range(2, case.x.ndim)))
    assert np.all(var < case.eps)


@given(case=norm_inputs("gn", num_groups=3, spatial=0))
def test_fixed_groups_and_rank(case):
    assert case.num_groups == 3 and case.x.ndim == 2 and case.x.shape[1] % 3 == 0
    assert math.prod(case.x.shape[1:]) // 3 >= 2


@pytest.mark.parametrize("method", ["in", "ln", "gn", "sn"])
def test_a_batch_of_one_sample_is_drawn(method):
    """The module docstring: N = 1 where the method allows it (IN, LN, GN, SN)."""
    case = find(norm_inputs(method), lambda c: c.x.shape[0] == 1,
                settings=settings(database=None, max_examples=200))
    assert case.x.shape[0] == 1


@pytest.mark.parametrize("kinds", [("Plain",), (), ("plain", "weird"), "plain"])
def test_norm_inputs_refuses_unknown_kinds(kinds):
    # ("Plain",) used to draw tiny_variance inputs labelled "Plain"
    with pytest.raises(ValueError, match="kinds must be a non-empty tuple"):
        @settings(max_examples=1, database=None, deadline=None)
        @given(norm_inputs("ln", kinds=kinds))
        def draw(case):
            pass
        draw()


@pytest.mark.parametrize("option", [{"spatial": -1}, {"num_channels": 0}, {"num_groups": 0},
                                    {"eps": -1.0}])
def test_norm_inputs_refuses_out_of_range_options(option):
    with pytest.raises(ValueError):
        @settings(max_examples=1, database=None, deadline=None)
        @given(norm_inputs("gn" if "num_groups" in option else "ln", **option))
        def draw(case):
            pass
        draw()


@pytest.mark.parametrize(("option", "says"), [
    ({"input_shape": ()}, r"input_shape must be None or a non-empty tuple of ints >= 1"),
    ({"input_shape": (0, 3)}, r"input_shape must be None or a non-empty tuple of ints >= 1"),
    ({"dtype": np.int32}, r"dtype must be float16, float32 or float64; got int32"),
])
def test_norm_inputs_refuses_shapes_and_dtypes_it_cannot_draw_by_name(option, says):
    """The docstring: ``dtype`` float16, float32 or float64, ``input_shape`` the trailing
    shape (C, *spatial). input_shape=() was an IndexError inside the draw, and an int dtype
    drew truncated integer arrays (every tiny-variance input constant)."""
    with pytest.raises(ValueError, match=says):
        @settings(max_examples=1, database=None, deadline=None)
        @given(norm_inputs("ln", **option))
        def draw(case):
            pass
        draw()


def test_assert_matches_names_a_negative_eps():
    def ln(x, g, b):
        return x  # never reached

    with pytest.raises(ValueError, match="eps must be finite and > 0"):
        assert_matches("ln", ln, eps=-1.0, max_examples=2)

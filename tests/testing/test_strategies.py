"""refnorm.testing.strategies: every drawn case is one refnorm accepts, of the kind it says."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import find, given, settings
from hypothesis import strategies as st

from refnorm.testing import norm_inputs
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

"""Hypothesis strategies and layer checks shared by the weight-side tests.

Array values are drawn through ``hypothesis.extra.numpy`` with bounded, finite elements and
no fill value (every element drawn on its own), so a failure shrinks to a small array that
can be read off the report.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import refnorm
from refnorm.gradcheck import check_layer, check_registered

# Central differences at h = 1e-6 in float64 err by ~1e-10 relative on these O(1) functions
# (rounding ~1e-16 |L| / h plus truncation ~h^2); a wrong term in a backward gives >= 1e-3.
FD_TOLERANCE = 1e-6

FINITE = {"allow_nan": False, "allow_infinity": False}


@st.composite
def weight_shapes(draw, min_weights=2):
    """(C_out, C_in, KH, KW) or (D_out, D_in), with >= ``min_weights`` per output channel."""
    conv = draw(st.booleans())
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    if conv:
        shape += (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    if int(np.prod(shape[1:])) < min_weights:
        shape = (shape[0], min_weights) + shape[2:]
    return shape


def arrays(shape, *, bound=3.0):
    """float64 arrays of ``shape`` with elements in [-bound, bound]."""
    return hnp.arrays(np.float64, shape, elements=st.floats(-bound, bound, **FINITE),
                      fill=st.nothing())


def arrays_away_from_zero(shape, *, low=0.1, high=3.0):
    """float64 arrays whose elements have ``low <= |value| <= high``.

    No filter is then near V = 0, where ||V|| has a kink that central differences straddle.
    """
    magnitude = st.floats(low, high, **FINITE)
    return hnp.arrays(np.float64, shape, elements=magnitude | magnitude.map(lambda a: -a),
                      fill=st.nothing())


def assert_check_cases_pass(name):
    """``refnorm gradcheck <name>``: every registered check case within FD_TOLERANCE."""
    for result in check_registered(name):
        for grad, err in result.errors.items():
            assert err.max_rel_error < FD_TOLERANCE, (result, grad)


def assert_runs_on_array_api_strict(name, **options):
    """The layer runs, and gradchecks, with array_api_strict parameters and inputs."""
    strict = pytest.importorskip("array_api_strict")
    layer = refnorm.build(name, 2, 3, 3, padding=1, dtype=strict.float64, xp=strict, **options)
    x = strict.asarray(np.random.default_rng(9).standard_normal((2, 2, 4, 4)))
    y = layer.forward(x, training=True)
    assert type(layer.backward(y)) is type(x)
    errors = check_layer(layer, x)
    assert max(e.max_rel_error for e in errors.values()) < FD_TOLERANCE

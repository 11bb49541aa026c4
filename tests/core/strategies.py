"""Hypothesis strategies for array values: bounded, finite, readable when shrunk.

Array values are drawn element by element through :func:`hypothesis.extra.numpy.arrays`, not
from a drawn seed fed to ``numpy.random.default_rng``: a failing case then shrinks to a
small array of simple numbers (mostly 0.0) that a person can read, instead of to a seed.

Shrunk arrays are often constant, so their variance is 0: tests of normalizers derive their
tolerances from the drawn case (see ``tests/norms/cases.py``) or ``assume`` what they need.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

# Values whose size is below this (but not 0) are not drawn. A gradient made only of such
# values (weights of 1e-300 beside a bias of 10) is lost in the rounding of the outputs that
# finite differences subtract; that limit of finite differences is not what these tests are
# about.
MIN_MAGNITUDE = 1e-3


def reals(lo: float = -10.0, hi: float = 10.0) -> st.SearchStrategy[float]:
    """Finite float64 values in ``[lo, hi]``: 0.0 or at least ``MIN_MAGNITUDE`` in size."""
    def finite(a: float, b: float) -> st.SearchStrategy[float]:
        return st.floats(a, b, allow_nan=False, allow_infinity=False, allow_subnormal=False,
                         width=64)

    parts = []
    if lo <= 0.0 <= hi:
        parts.append(st.just(0.0))  # first: a failure shrinks towards zeros
    if hi >= MIN_MAGNITUDE:
        parts.append(finite(max(lo, MIN_MAGNITUDE), hi))
    if lo <= -MIN_MAGNITUDE:
        parts.append(finite(lo, min(hi, -MIN_MAGNITUDE)))
    return st.one_of(*parts)


def float_arrays(shape, lo: float = -10.0, hi: float = 10.0) -> st.SearchStrategy[np.ndarray]:
    """float64 arrays of ``shape`` with elements from :func:`reals`."""
    return arrays(np.float64, shape, elements=reals(lo, hi))


def nonzero_reals(lo: float = 0.25, hi: float = 4.0) -> st.SearchStrategy[float]:
    """A value of size in ``[lo, hi]`` of either sign, for a scale (gamma) away from 0.

    A gamma near 0 makes ``dx`` (proportional to gamma) tiny next to the outputs, below what
    finite differences resolve.
    """
    size = st.floats(lo, hi, allow_nan=False, allow_infinity=False, width=64)
    return st.one_of(size, size.map(lambda v: -v))


def shapes(*, min_dims: int = 1, max_dims: int = 4, max_side: int = 4):
    """Small array shapes: every finite-difference check perturbs each element."""
    return st.lists(st.integers(1, max_side), min_size=min_dims, max_size=max_dims).map(tuple)


@st.composite
def arrays_and_axes(draw, *, offset: bool = True):
    """``(x, axes)``: x of a small drawn shape, ``axes`` a non-empty set of its axes.

    With ``offset`` the values are ``c + u`` with ``u`` in [-10, 10] and a drawn ``c`` in
    [5, 15], so the mean is never near 0 and its subtraction is exercised (as with the
    ``5 * randn + 12`` inputs of CS231n).
    """
    shape = draw(shapes())
    axes = tuple(sorted(draw(st.sets(st.integers(0, len(shape) - 1), min_size=1))))
    x = draw(float_arrays(shape))
    if offset:
        x = x + draw(st.floats(5.0, 15.0))
    return x, axes

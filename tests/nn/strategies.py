"""Hypothesis strategies shared by the nn tests: small window configurations, and array
values drawn element by element (``hypothesis.extra.numpy``) so that a failure shrinks to a
small readable array rather than to a seed."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tests.core.strategies import float_arrays, reals


def pair_or_int(draw, values):
    """Draw a pair from ``values``; when both entries agree, sometimes pass it as one int."""
    a, b = draw(values), draw(values)
    if a == b and draw(st.booleans()):
        return (a, a), a
    return (a, b), (a, b)


@st.composite
def conv_configs(draw, *, max_extra=3):
    """(x_shape, w_shape, stride, padding, bias): every kernel fits the padded input.

    ``stride``/``padding`` are what the function is given (an int or a pair), sizes small
    enough that a finite-difference check over every element stays fast.
    """
    N, C_in, C_out = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    (KH, KW), _ = pair_or_int(draw, st.integers(1, 3))
    _, stride = pair_or_int(draw, st.integers(1, 3))
    (ph, pw), padding = pair_or_int(draw, st.integers(0, 2))
    H = draw(st.integers(max(1, KH - 2 * ph), max(1, KH - 2 * ph) + max_extra))
    W = draw(st.integers(max(1, KW - 2 * pw), max(1, KW - 2 * pw) + max_extra))
    bias = draw(st.booleans())
    return (N, C_in, H, W), (C_out, C_in, KH, KW), stride, padding, bias


@st.composite
def pool_configs(draw, *, max_extra=3):
    """(x_shape, kernel_size, stride): ``stride`` None (= kernel) or drawn, kernel fits."""
    N, C = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    (KH, KW), kernel_size = pair_or_int(draw, st.integers(1, 3))
    stride = draw(st.none() | st.integers(1, 3) | st.tuples(st.integers(1, 3), st.integers(1, 3)))
    H = draw(st.integers(KH, KH + max_extra))
    W = draw(st.integers(KW, KW + max_extra))
    return (N, C, H, W), kernel_size, stride


def as_pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


@st.composite
def conv_arrays(draw, config):
    """(x, w, b) for a :func:`conv_configs` draw: x in [-10, 10], w and b in [-1, 1] (as
    He-initialized weights are), b None without a bias."""
    x_shape, w_shape, _, _, bias = config
    x = draw(float_arrays(x_shape))
    w = draw(float_arrays(w_shape, -1.0, 1.0))
    b = draw(float_arrays((w_shape[0],), -1.0, 1.0)) if bias else None
    return x, w, b


def away_from_zero(shape, gap: float = 0.1):
    """Values in [-10, -gap] or [gap, 10]: no finite-difference step below ``gap`` crosses 0."""
    size = st.floats(gap, 10.0, allow_nan=False, allow_infinity=False, width=64)
    return arrays(np.float64, shape, elements=st.one_of(size, size.map(lambda v: -v)))


def small_integers(shape, top: int = 2):
    """Integer-valued floats 0..top: ties in a pooling window are common."""
    return arrays(np.float64, shape, elements=st.integers(0, top).map(float))


@st.composite
def distinct_values(draw, shape, spacing: float = 0.5):
    """``12 + spacing * k`` for a drawn permutation k of 0..n-1: no two entries closer than
    ``spacing``, so no pooling window has a tie and a small step never moves an argmax."""
    n = math.prod(shape)
    order = draw(st.permutations(range(n)))
    return 12.0 + spacing * np.asarray(order, dtype=np.float64).reshape(shape)


__all__ = ["as_pair", "away_from_zero", "conv_arrays", "conv_configs", "distinct_values",
           "float_arrays", "pool_configs", "reals", "small_integers"]

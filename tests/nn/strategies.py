"""Hypothesis strategies shared by the nn tests: small window configurations."""

from __future__ import annotations

from hypothesis import strategies as st


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

"""Helpers shared by the synchronized-statistics tests: sharded batches drawn by hypothesis."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

# Sums over devices reorder float64 additions of values of size <= ~100: rounding only.
ATOL = 1e-11


@st.composite
def sharded_batches(draw):
    """(shard sizes, x, dy): P = 1..4 devices with 0..3 samples each, at least 2 in all.

    Array values are drawn element by element (bounded, finite) so a failure shrinks to a
    small array; x has a real mean (offset 12) so the mean subtraction matters.
    """
    P = draw(st.integers(1, 4))
    sizes = draw(st.lists(st.integers(0, 3), min_size=P, max_size=P))
    if sum(sizes) < 2:
        sizes[0] += 2
    C = draw(st.integers(1, 3))
    spatial = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    shape = (sum(sizes), C) + spatial
    values = st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=64)
    x = 12 + draw(arrays(np.float64, shape, elements=values, fill=st.nothing()))
    dy = draw(arrays(np.float64, shape, elements=values, fill=st.nothing()))
    return sizes, x, dy


def channel_params(draw, C, K=0):
    """gamma, beta (C,) and, for SN, K mean and K variance control parameters."""
    values = st.floats(-2, 2, allow_nan=False, allow_infinity=False, width=64)
    shapes = [(C,), (C,)] + ([(K,), (K,)] if K else [])
    return tuple(draw(arrays(np.float64, s, elements=values, fill=st.nothing())) for s in shapes)


def split(a, sizes):
    edges = np.cumsum([0] + list(sizes))
    return [a[edges[i]:edges[i + 1]] for i in range(len(sizes))]


def combine(results, index, concat):
    """Per-device results: outputs and dx concatenate, parameter gradients add."""
    parts = [r[index] for r in results]
    return np.concatenate(parts) if concat else sum(parts)

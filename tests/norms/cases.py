"""The four activation normalizers as data, for the generic property tests.

Each entry says how to call the method's pure functions and, independently of refnorm's
code, which elements share a statistic (``view``): the tests compute expected statistics
with numpy from that description alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

import refnorm


@dataclass(frozen=True)
class Method:
    name: str
    forward: Callable[..., Any]   # forward(x, gamma, beta, *, eps, **options)
    backward: Callable[..., Any]  # backward(dy, cache)
    min_ndim: int                 # 2 if (N, C) inputs are accepted, 3 if a spatial axis is needed
    view: Callable[..., tuple[tuple[int, ...], tuple[int, ...]]]  # (shape, options) -> (view, axes)

    def __repr__(self) -> str:
        return self.name


def _bn_view(shape, options):
    return tuple(shape), (0,) + tuple(range(2, len(shape)))


def _in_view(shape, options):
    return tuple(shape), tuple(range(2, len(shape)))


def _ln_view(shape, options):
    return tuple(shape), tuple(range(1, len(shape)))


def _gn_view(shape, options):
    N, C, G = shape[0], shape[1], options["num_groups"]
    view = (N, G, C // G) + tuple(shape[2:])
    return view, tuple(range(2, len(view)))


METHODS = [
    Method("bn", refnorm.batch_norm_forward, refnorm.batch_norm_backward, 2, _bn_view),
    Method("in", refnorm.instance_norm_forward, refnorm.instance_norm_backward, 3, _in_view),
    Method("ln", refnorm.layer_norm_forward, refnorm.layer_norm_backward, 2, _ln_view),
    Method("gn", refnorm.group_norm_forward, refnorm.group_norm_backward, 2, _gn_view),
]


def stat_count(method: Method, shape, options) -> int:
    view, axes = method.view(shape, options)
    return int(np.prod([view[a] for a in axes]))


@st.composite
def configs(draw, method: Method, *, max_side: int = 4, min_count: int = 2):
    """Draw ``(shape, options, eps)`` with every statistic over at least ``min_count`` values."""
    ndim = draw(st.integers(method.min_ndim, 4))
    shape = tuple(draw(st.integers(1, max_side)) for _ in range(ndim))
    options = {}
    if method.name == "gn":
        C = shape[1]
        options["num_groups"] = draw(st.sampled_from([g for g in range(1, C + 1) if C % g == 0]))
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    assume(stat_count(method, shape, options) >= min_count)
    return shape, options, eps


def reference_stats(method: Method, x: np.ndarray, options):
    """Mean and biased variance of each statistic group, by numpy, broadcast to x.shape."""
    view, axes = method.view(x.shape, options)
    xv = x.reshape(view)
    mu = np.broadcast_to(xv.mean(axis=axes, keepdims=True), view).reshape(x.shape)
    var = np.broadcast_to(xv.var(axis=axes, keepdims=True), view).reshape(x.shape)
    return mu, var


def group_sum(method: Method, a: np.ndarray, options) -> np.ndarray:
    """Sum of ``a`` over each statistic group (the group's reduction axes)."""
    view, axes = method.view(a.shape, options)
    return a.reshape(view).sum(axis=axes)

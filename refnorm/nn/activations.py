"""The rectified linear unit, ``relu(x) = max(x, 0)``, element-wise.

Its derivative is 1 where ``x > 0`` and 0 where ``x < 0``. At ``x = 0`` the function has no
derivative (the one-sided slopes are 0 and 1); refnorm takes 0 there, as PyTorch and most
libraries do, so the backward is ``dx = dy * [x > 0]``. A finite-difference check is
invalid at 0 for the same reason: it returns the average slope 1/2.

At a NaN input ``y`` is NaN and, since ``NaN > 0`` is false, ``dx = 0``; PyTorch passes
``dx = dy`` there (the docs' conventions page).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from refnorm.backend import Array, array_namespace
from refnorm.core.checks import check_cache, check_float_array, check_like, check_once
from refnorm.dispatch import dispatched
from refnorm.kernels import nn as kernels
from refnorm.layer import Layer


@dataclass(frozen=True)
class ReLUCache:
    """What :func:`relu_forward` saves for :func:`relu_backward`.

    Attributes
    ----------
    positive : bool array, ``x.shape``
        ``x > 0``. Saved instead of ``x``: the backward needs only the mask (one byte per
        element).
    """

    positive: Array


@dispatched
def relu_forward(x: Array) -> tuple[Array, ReLUCache]:
    """``y = max(x, 0)`` element-wise; NaN stays NaN.

    Parameters
    ----------
    x : array, any shape
        Real floating.
    path : {"reference", "fast"}, optional
        Which implementation computes (:mod:`refnorm.dispatch`); default: the process-wide
        choice, else the reference. The fast path writes ``y`` and the mask in one pass.

    Returns
    -------
    y : array, ``x.shape``, dtype of ``x``
    cache : ReLUCache
    """
    xp = check_float_array("x", x)
    # asarray: numpy's maximum of a 0-d array is a numpy scalar, not an array
    y = xp.asarray(xp.maximum(x, xp.zeros_like(x)))
    return y, ReLUCache(positive=xp.asarray(x > 0))


@dispatched
def relu_backward(dy: Array, cache: ReLUCache) -> Array:
    """Backward of :func:`relu_forward`: ``dx = dy`` where ``x > 0``, else 0 (also at ``x = 0``
    and at a NaN ``x``, where PyTorch passes ``dy``).

    Parameters
    ----------
    dy : array, ``x.shape``
        Upstream gradient.
    cache : ReLUCache
    path : {"reference", "fast"}, optional
        Which implementation computes (:mod:`refnorm.dispatch`); default: the process-wide
        choice, else the reference.

    Returns
    -------
    dx : array, ``x.shape``, dtype of ``dy``
    """
    check_cache(cache, ReLUCache)
    check_like("dy", dy, tuple(cache.positive.shape))
    xp = array_namespace(dy, cache.positive)
    return xp.where(cache.positive, dy, xp.zeros_like(dy))


class ReLU(Layer):
    """The ReLU as a layer (no parameters, so not registered by name)."""

    def _forward(self, x: Array, training: bool) -> tuple[Array, ReLUCache]:
        return relu_forward(x, path=self.compute_path())

    def _backward(self, dy: Array, cache: ReLUCache) -> tuple[Array, dict[str, Any]]:
        return relu_backward(dy, cache, path=self.compute_path()), {}


# -- the fast path: the same checks, then the fused loops ----------------------------------------


@relu_forward.fast
def _relu_forward_fast(x: Array) -> tuple[Array, ReLUCache]:
    check_float_array("x", x)
    y, positive = kernels.relu_forward(x)
    return y, ReLUCache(positive=positive)


@relu_backward.fast
def _relu_backward_fast(dy: Array, cache: ReLUCache) -> Array:
    check_cache(cache, ReLUCache)

    def check() -> None:
        check_like("dy", dy, tuple(cache.positive.shape))
        array_namespace(dy, cache.positive)

    check_once(lambda: ("relu dy", type(dy), dy.shape, dy.dtype, cache.positive.shape,
                        type(cache.positive)), check)
    return kernels.relu_backward(dy, cache.positive)

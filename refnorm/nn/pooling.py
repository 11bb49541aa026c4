"""Max pooling, average pooling and global average pooling over (N, C, H, W) inputs.

The two windowed poolings reuse the convolution's :func:`~refnorm.nn.conv.im2col`: with the
columns viewed as (C, KH KW, N H_out W_out), each window is one column of KH KW entries in
row-major window order (k = i KW + j for kernel offset (i, j)), and

    max pooling      y = max_k window[k]          dwindow[k] = dy if k = argmax, else 0
    average pooling  y = mean_k window[k]         dwindow[k] = dy / (KH KW)

after which :func:`~refnorm.nn.conv.col2im` adds each window's gradient back onto the input
(overlapping windows, ``stride < kernel_size``, add up). The stride defaults to the kernel
size (non-overlapping windows); there is no padding.

Ties in max pooling: where several entries of a window share the maximum, the gradient goes
to the first of them in row-major window order (the Array API's ``argmax`` returns the first
occurrence), as in PyTorch's CPU kernels. A NaN is the maximum of its window: ``y`` is NaN and
``dy`` goes to the window's *first* NaN, where PyTorch's CPU kernel sends it to the *last*
(the docs' conventions page). The max is not differentiable there (its
one-sided derivatives differ), so finite differences cannot check this choice: a central
difference splits the gradient equally between tied entries.

Global average pooling averages each channel over all its positions, (N, C, *spatial) ->
(N, C), the step before the classifier of a small conv-net.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from refnorm.backend import Array, array_namespace, compute_dtype, device_of, on_device
from refnorm.core.checks import (
    as_pair,
    check_cache,
    check_float_array,
    check_like,
    check_ndim,
    check_once,
    check_rank,
    typed,
)
from refnorm.dispatch import dispatched
from refnorm.kernels import nn as kernels
from refnorm.layer import Layer
from refnorm.nn.conv import Window, col2im, im2col, sliding_window


@dataclass(frozen=True)
class PoolCache:
    """What a windowed pooling forward saves for its backward (average pooling's whole cache).

    Attributes
    ----------
    x_shape : (N, C, H, W)
    y_shape : (N, C, H_out, W_out)
        The shape ``dy`` must have.
    window : Window
        Kernel, stride (padding 0) and output size.
    compute_dtype, x_dtype : dtypes
        The dtype the backward computes in and the one ``dx`` is returned in.
    """

    x_shape: tuple[int, ...]
    y_shape: tuple[int, ...]
    window: Window
    compute_dtype: Any
    x_dtype: Any


@dataclass(frozen=True)
class MaxPool2dCache:
    """What :func:`max_pool2d_forward` saves: where each window's maximum was.

    Attributes
    ----------
    argmax : int array, (C, N * H_out * W_out)
        The index k = i KW + j of each window's (first) maximum; saved instead of ``x``, the
        backward needs only where the maximum was.
    pool : PoolCache
        The shapes and dtypes.
    """

    argmax: Array
    pool: PoolCache


def _windows(x: Array, kernel_size: Any, stride: Any) -> tuple[Array, Window]:
    """The windows of ``x`` (N, C, H, W) as (C, KH KW, N H_out W_out), in the compute dtype."""
    xp = check_rank("x", x, layout="(N, C, H, W)")
    stride = kernel_size if stride is None else stride
    win = sliding_window(x.shape, kernel_size=kernel_size, stride=stride)
    C, (KH, KW), (H_out, W_out) = x.shape[1], win.kernel, win.out
    xc = xp.astype(x, compute_dtype(xp, x.dtype), copy=False)
    cols = im2col(xc, kernel_size=win.kernel, stride=win.stride)  # (C KH KW, N H_out W_out)
    N = x.shape[0]
    windows = xp.reshape(cols, (C, KH * KW, N * H_out * W_out))   # (C, KH KW, N H_out W_out)
    return windows, win


def _to_nchw(xp: Any, a: Array, y_shape: tuple[int, ...]) -> Array:
    """(C, N H_out W_out) -> (N, C, H_out, W_out)."""
    N, C, H_out, W_out = y_shape
    a = xp.reshape(a, (C, N, H_out, W_out))                       # (C, N, H_out, W_out)
    return xp.permute_dims(a, (1, 0, 2, 3))                       # (N, C, H_out, W_out)


def _from_nchw(xp: Any, dy: Array, cache: PoolCache) -> Array:
    """``dy`` (N, C, H_out, W_out) -> (C, 1, N H_out W_out) in the compute dtype, checked."""
    check_like("dy", dy, cache.y_shape)
    N, C, H_out, W_out = cache.y_shape
    dy = xp.astype(dy, cache.compute_dtype, copy=False)
    dy = xp.permute_dims(dy, (1, 0, 2, 3))                        # (C, N, H_out, W_out)
    return xp.reshape(dy, (C, 1, N * H_out * W_out))              # (C, 1, N H_out W_out)


def _windows_backward(xp: Any, dwindows: Array, cache: PoolCache) -> Array:
    """Window gradients (C, KH KW, N H_out W_out) -> ``dx`` (N, C, H, W) via col2im."""
    C, K, L = dwindows.shape
    win = cache.window
    dcols = xp.reshape(dwindows, (C * K, L))                      # (C KH KW, N H_out W_out)
    dx = col2im(dcols, cache.x_shape, kernel_size=win.kernel, stride=win.stride)  # (N, C, H, W)
    return xp.astype(dx, cache.x_dtype, copy=False)


@dispatched
def max_pool2d_forward(
    x: Array, *, kernel_size: Any, stride: Any = None
) -> tuple[Array, MaxPool2dCache]:
    """The maximum of each KH x KW window.

    Parameters
    ----------
    x : array, (N, C, H, W)
        Real floating.
    kernel_size : int or pair of ints, >= 1
        (KH, KW); no larger than (H, W).
    stride : int or pair of ints, >= 1, default ``kernel_size``
    path : {"reference", "fast"}, optional
        Which implementation computes (:mod:`refnorm.dispatch`); default: the process-wide
        choice, else the reference.

    Returns
    -------
    y : array, (N, C, H_out, W_out), dtype of ``x``
        ``H_out = (H - KH) // s_h + 1``, ``W_out`` likewise.
    cache : MaxPool2dCache
        Records the first maximum of each window in row-major window order; a window holding
        a NaN records its first NaN (PyTorch: the last).
    """
    windows, win = _windows(x, kernel_size, stride)               # (C, KH KW, N H_out W_out)
    xp = array_namespace(x)
    y_shape = (x.shape[0], x.shape[1]) + win.out
    y = xp.max(windows, axis=1)                                   # (C, N H_out W_out)
    argmax = xp.argmax(windows, axis=1)                           # (C, N H_out W_out)
    pool = PoolCache(x_shape=tuple(x.shape), y_shape=y_shape, window=win,
                     compute_dtype=windows.dtype, x_dtype=x.dtype)
    cache = MaxPool2dCache(argmax=argmax, pool=pool)
    return xp.astype(_to_nchw(xp, y, y_shape), x.dtype, copy=False), cache


@dispatched
def max_pool2d_backward(dy: Array, cache: MaxPool2dCache) -> Array:
    """Backward of :func:`max_pool2d_forward`: each window's ``dy`` goes to its first maximum.

    Parameters
    ----------
    dy : array, (N, C, H_out, W_out)
        Upstream gradient.
    cache : MaxPool2dCache
    path : {"reference", "fast"}, optional
        As in :func:`max_pool2d_forward`.

    Returns
    -------
    dx : array, (N, C, H, W), dtype of ``x``
        Zero except at the recorded maxima (a window's first NaN, if it holds one); an entry
        that is the maximum of several overlapping windows receives the sum of their ``dy``.
    """
    check_cache(cache, MaxPool2dCache)
    check_float_array("dy", dy)
    xp = array_namespace(dy, cache.argmax)
    dy_w = _from_nchw(xp, dy, cache.pool)                         # (C, 1, N H_out W_out)
    C, L = cache.argmax.shape
    K = math.prod(cache.pool.window.kernel)
    k = xp.arange(K, dtype=cache.argmax.dtype, **on_device(device_of(cache.argmax)))
    k = xp.reshape(k, (1, K, 1))                                  # (1, KH KW, 1)
    is_max = xp.reshape(cache.argmax, (C, 1, L)) == k             # (C, KH KW, N H_out W_out)
    dwindows = xp.where(is_max, dy_w, xp.zeros_like(dy_w))        # (C, KH KW, N H_out W_out)
    return _windows_backward(xp, dwindows, cache.pool)


@dispatched
def avg_pool2d_forward(
    x: Array, *, kernel_size: Any, stride: Any = None
) -> tuple[Array, PoolCache]:
    """The mean of each KH x KW window.

    Parameters
    ----------
    x : array, (N, C, H, W)
        Real floating; float16 computes in float32 and returns float16.
    kernel_size : int or pair of ints, >= 1
        (KH, KW); no larger than (H, W).
    stride : int or pair of ints, >= 1, default ``kernel_size``
    path : {"reference", "fast"}, optional
        As in :func:`max_pool2d_forward`; the fast path takes the windows with one pass of
        :func:`refnorm.kernels.nn.im2col`.

    Returns
    -------
    y : array, (N, C, H_out, W_out), dtype of ``x``
    cache : PoolCache
    """
    windows, win = _windows(x, kernel_size, stride)               # (C, KH KW, N H_out W_out)
    xp = array_namespace(x)
    y_shape = (x.shape[0], x.shape[1]) + win.out
    y = xp.mean(windows, axis=1)                                  # (C, N H_out W_out)
    cache = PoolCache(x_shape=tuple(x.shape), y_shape=y_shape, window=win,
                      compute_dtype=windows.dtype, x_dtype=x.dtype)
    return xp.astype(_to_nchw(xp, y, y_shape), x.dtype, copy=False), cache


@dispatched
def avg_pool2d_backward(dy: Array, cache: PoolCache) -> Array:
    """Backward of :func:`avg_pool2d_forward`: each window entry gets ``dy / (KH KW)``.

    Parameters
    ----------
    dy : array, (N, C, H_out, W_out)
        Upstream gradient.
    cache : PoolCache
    path : {"reference", "fast"}, optional
        As in :func:`max_pool2d_forward`; the fast path adds the windows back with one pass of
        :func:`refnorm.kernels.nn.col2im`.

    Returns
    -------
    dx : array, (N, C, H, W), dtype of ``x``
    """
    check_cache(cache, PoolCache)
    xp = check_float_array("dy", dy)
    dy_w = _from_nchw(xp, dy, cache)                              # (C, 1, N H_out W_out)
    C, _, L = dy_w.shape
    K = math.prod(cache.window.kernel)
    dwindows = xp.broadcast_to(dy_w / K, (C, K, L))               # (C, KH KW, N H_out W_out)
    return _windows_backward(xp, dwindows, cache)


@dataclass(frozen=True)
class GlobalAvgPoolCache:
    """What :func:`global_avg_pool_forward` saves: only shapes and dtypes.

    Attributes
    ----------
    x_shape : (N, C, *spatial)
    compute_dtype, x_dtype : dtypes
        The dtype the backward computes in and the one ``dx`` is returned in.
    """

    x_shape: tuple[int, ...]
    compute_dtype: Any
    x_dtype: Any


def global_avg_pool_forward(x: Array) -> tuple[Array, GlobalAvgPoolCache]:
    """The mean of each channel over all its positions.

    No ``path``: one mean over the spatial axes, a single numpy pass.

    Parameters
    ----------
    x : array, (N, C, H, W), or more generally (N, C, *spatial) with a spatial axis
        Real floating; float16 computes in float32 and returns float16. Each spatial axis
        must be non-empty (``ValueError``).

    Returns
    -------
    y : array, (N, C), dtype of ``x``
    cache : GlobalAvgPoolCache
    """
    xp = check_float_array("x", x)
    check_ndim("x", x, min_ndim=3, layout="(N, C, *spatial) with a spatial axis")
    if 0 in tuple(x.shape[2:]):
        raise ValueError(f"x must have at least one position to average over; got shape "
                         f"{tuple(x.shape)} (an empty spatial axis)")
    dtype = compute_dtype(xp, x.dtype)
    spatial_axes = tuple(range(2, x.ndim))
    y = xp.mean(xp.astype(x, dtype, copy=False), axis=spatial_axes)  # (N, C)
    cache = GlobalAvgPoolCache(x_shape=tuple(x.shape), compute_dtype=dtype, x_dtype=x.dtype)
    return xp.astype(y, x.dtype, copy=False), cache


def global_avg_pool_backward(dy: Array, cache: GlobalAvgPoolCache) -> Array:
    """Backward of :func:`global_avg_pool_forward`: every position gets ``dy / (H W)``.

    No ``path``: one broadcast multiply, a single numpy pass.

    Parameters
    ----------
    dy : array, (N, C)
        Upstream gradient.
    cache : GlobalAvgPoolCache

    Returns
    -------
    dx : array, ``x_shape`` (N, C, H, W), dtype of ``x``
    """
    check_cache(cache, GlobalAvgPoolCache)
    N, C = cache.x_shape[:2]
    check_like("dy", dy, (N, C))
    xp = array_namespace(dy)
    spatial = cache.x_shape[2:]
    count = math.prod(spatial)
    dy_c = xp.astype(dy, cache.compute_dtype, copy=False)
    dy_v = xp.reshape(dy_c / count, (N, C) + (1,) * len(spatial))  # (N, C, 1, 1)
    dx = xp.ones(cache.x_shape, dtype=cache.compute_dtype,
                 **on_device(device_of(dy))) * dy_v               # (N, C, H, W)
    return xp.astype(dx, cache.x_dtype, copy=False)


class _Pool2d(Layer):
    """A windowed pooling's hyperparameters (no parameters, so not registered by name).

    Parameters
    ----------
    kernel_size : int or pair of ints
    stride : int or pair of ints, default ``kernel_size``
    """

    def __init__(self, kernel_size: Any, *, stride: Any = None) -> None:
        super().__init__()
        self.kernel_size = as_pair("kernel_size", kernel_size, minimum=1)
        self.stride = self.kernel_size if stride is None else as_pair("stride", stride, minimum=1)


class MaxPool2d(_Pool2d):
    """Max pooling as a layer: :func:`max_pool2d_forward` / :func:`max_pool2d_backward`."""

    def _forward(self, x: Array, training: bool) -> tuple[Array, MaxPool2dCache]:
        return max_pool2d_forward(x, kernel_size=self.kernel_size, stride=self.stride,
                                  path=self.compute_path())

    def _backward(self, dy: Array, cache: MaxPool2dCache) -> tuple[Array, dict[str, Any]]:
        return max_pool2d_backward(dy, cache, path=self.compute_path()), {}


class AvgPool2d(_Pool2d):
    """Average pooling as a layer: :func:`avg_pool2d_forward` / :func:`avg_pool2d_backward`."""

    def _forward(self, x: Array, training: bool) -> tuple[Array, PoolCache]:
        return avg_pool2d_forward(x, kernel_size=self.kernel_size, stride=self.stride,
                                  path=self.compute_path())

    def _backward(self, dy: Array, cache: PoolCache) -> tuple[Array, dict[str, Any]]:
        return avg_pool2d_backward(dy, cache, path=self.compute_path()), {}


class GlobalAvgPool(Layer):
    """Global average pooling (N, C, H, W) -> (N, C) as a layer (no parameters, not registered)."""

    def _forward(self, x: Array, training: bool) -> tuple[Array, GlobalAvgPoolCache]:
        return global_avg_pool_forward(x)

    def _backward(self, dy: Array, cache: GlobalAvgPoolCache) -> tuple[Array, dict[str, Any]]:
        return global_avg_pool_backward(dy, cache), {}


# -- the fast path: the same checks, then the fused loops ----------------------------------------


def _check_geometry(pool: PoolCache, argmax: Array | None = None) -> None:
    """The fast backwards' check that a pooling cache's shapes agree as the forward makes them:
    their loops turn ``x_shape``, the window and ``argmax``'s shape into addresses, so a cache
    built or edited by hand whose fields disagree would make them read or write outside the
    arrays. Such a cache is refused here."""
    def refuse(why: str) -> None:
        raise ValueError(f"pooling backward: the cache's fields disagree ({why}); the fast path "
                         f"reads only caches its forward made")

    x_shape, win = pool.x_shape, pool.window
    if len(x_shape) != 4:
        refuse(f"x_shape {x_shape}")
    if sliding_window(x_shape, kernel_size=win.kernel, stride=win.stride) != win:
        refuse(f"window {win} for x_shape {x_shape}")
    if tuple(pool.y_shape) != tuple(x_shape[:2]) + tuple(win.out):
        refuse(f"y_shape {pool.y_shape} for x_shape {x_shape} and window {win}")
    if argmax is not None:
        shape = (x_shape[1], x_shape[0] * win.out[0] * win.out[1])
        if not (isinstance(argmax, np.ndarray) and argmax.dtype.kind in "iu"
                and argmax.shape == shape):
            refuse(f"argmax of shape {getattr(argmax, 'shape', None)} and dtype "
                   f"{getattr(argmax, 'dtype', None)}, where the forward makes {shape} integers")


@max_pool2d_forward.fast
def _max_pool2d_forward_fast(x: Array, *, kernel_size: Any,
                             stride: Any = None) -> tuple[Array, MaxPool2dCache]:
    def check() -> tuple[Any, Window]:
        xp = check_rank("x", x, layout="(N, C, H, W)")
        return xp, sliding_window(x.shape, kernel_size=kernel_size,
                                  stride=kernel_size if stride is None else stride)

    xp, win = check_once(lambda: ("max_pool2d", type(x), x.shape, x.dtype, typed(kernel_size),
                                  typed(stride)), check)
    k = kernels.max_pool_forward(x, win.kernel, win.stride)
    pool = PoolCache(x_shape=tuple(x.shape), y_shape=tuple(k.y.shape), window=win,
                     compute_dtype=compute_dtype(xp, x.dtype), x_dtype=x.dtype)
    return k.y, MaxPool2dCache(argmax=k.argmax, pool=pool)


@max_pool2d_backward.fast
def _max_pool2d_backward_fast(dy: Array, cache: MaxPool2dCache) -> Array:
    check_cache(cache, MaxPool2dCache)

    def check() -> Any:
        xp = array_namespace(dy, cache.argmax)
        check_like("dy", dy, cache.pool.y_shape)
        return xp

    xp = check_once(lambda: ("max_pool2d dy", type(dy), dy.shape, dy.dtype, cache.pool.y_shape,
                             type(cache.argmax)), check)
    check_once(lambda: ("max_pool2d cache", cache.pool, type(cache.argmax), cache.argmax.shape,
                        cache.argmax.dtype), lambda: _check_geometry(cache.pool, cache.argmax))
    win = cache.pool.window
    dx = kernels.max_pool_backward(dy, cache.argmax, cache.pool.x_shape, win.kernel, win.stride)
    return xp.astype(dx, cache.pool.x_dtype, copy=False)


@avg_pool2d_forward.fast
def _avg_pool2d_forward_fast(x: Array, *, kernel_size: Any,
                             stride: Any = None) -> tuple[Array, PoolCache]:
    check_rank("x", x, layout="(N, C, H, W)")
    win = sliding_window(x.shape, kernel_size=kernel_size,
                         stride=kernel_size if stride is None else stride)
    cols = kernels.im2col(x, win.kernel, win.stride, (0, 0))     # (C KH KW, N H_out W_out)
    C, K = x.shape[1], math.prod(win.kernel)
    y = np.mean(np.reshape(cols, (C, K, cols.shape[1])), axis=1)  # (C, N H_out W_out)
    y_shape = (x.shape[0], C) + win.out
    cache = PoolCache(x_shape=tuple(x.shape), y_shape=y_shape, window=win,
                      compute_dtype=cols.dtype, x_dtype=x.dtype)
    return _to_nchw(np, y, y_shape).astype(x.dtype, copy=False), cache


@avg_pool2d_backward.fast
def _avg_pool2d_backward_fast(dy: Array, cache: PoolCache) -> Array:
    check_cache(cache, PoolCache)
    check_float_array("dy", dy)
    check_once(lambda: ("avg_pool2d cache", cache), lambda: _check_geometry(cache))
    dy_w = _from_nchw(np, dy, cache)                              # (C, 1, N H_out W_out)
    C, _, L = dy_w.shape
    win = cache.window
    K = math.prod(win.kernel)
    dcols = np.broadcast_to(dy_w / K, (C, K, L)).reshape(C * K, L)  # (C KH KW, N H_out W_out)
    dx = kernels.col2im(dcols, cache.x_shape, win.kernel, win.stride, (0, 0))
    return dx.astype(cache.x_dtype, copy=False)

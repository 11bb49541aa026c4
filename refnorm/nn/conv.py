"""Two-dimensional convolution as im2col and one matrix product.

A convolution (strictly a cross-correlation, as in every deep-learning library) of an input
x (N, C_in, H, W) with weights w (C_out, C_in, KH, KW) and a bias b (C_out,) is

    y[n, o, p, q] = b[o] + sum_{c, i, j} w[o, c, i, j] * x_pad[n, c, s_h p + i, s_w q + j]

where x_pad is x with ``pad_h`` rows of zeros above and below and ``pad_w`` columns left and
right, and the output has H_out = floor((H + 2 pad_h - KH) / s_h) + 1 rows (W_out likewise).
When the division is not exact the last rows or columns are reached by no window; they are
ignored and get a zero gradient (PyTorch's convention).

:func:`im2col` copies every window into a column,

    cols[(c, i, j), (n, p, q)] = x_pad[n, c, s_h p + i, s_w q + j]     (C_in KH KW, N H_out W_out)

so that the convolution is one matrix product and its backward two more:

    Y     = W cols + b        W = w as a (C_out, C_in KH KW) matrix, Y (C_out, N H_out W_out)
    dW    = dY cols^T         db = dY summed over its columns
    dcols = W^T dY            dx = col2im(dcols)

im2col is linear in x; :func:`col2im` is its adjoint (its transpose): it adds every column
entry back onto the input position it was copied from, so an input position that several
windows cover receives the sum of their gradients, and padding positions are dropped.

Both are written with Array API functions only, no in-place assignment. im2col pads with
zeros (a concatenation) and takes one strided slice per kernel offset (i, j). col2im undoes
each step in reverse with its adjoint: the strided slice by zero-interleaving
(:func:`_dilate`), the offset by zero padding that places the patch, the padding by cropping,
and sums the KH KW placed patches.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from refnorm.backend import Array, array_namespace, compute_dtype, device_of, on_device
from refnorm.core.checks import (
    as_pair,
    check_bias,
    check_bool,
    check_cache,
    check_float_array,
    check_like,
    check_once,
    check_positive_int,
    check_rank,
    is_int,
    typed,
)
from refnorm.dispatch import dispatched
from refnorm.kernels import nn as kernels
from refnorm.layer import CheckCase, Layer
from refnorm.nn.init import he_normal


class Window(NamedTuple):
    """Where a sliding window goes over an (N, C, H, W) input; every entry is (along H, along W).

    Attributes
    ----------
    kernel : (KH, KW)
    stride : (s_h, s_w)
    padding : (pad_h, pad_w)
        Zero rows above and below, zero columns left and right.
    out : (H_out, W_out)
        The number of window positions: ``(H + 2 pad_h - KH) // s_h + 1`` (W likewise).
    """

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    out: tuple[int, int]


def sliding_window(
    x_shape: tuple[int, ...], *, kernel_size: Any, stride: Any = 1, padding: Any = 0
) -> Window:
    """Check a window's hyperparameters against an input shape and count its positions.

    Parameters
    ----------
    x_shape : tuple of 4 ints
        (N, C, H, W).
    kernel_size, stride : int or pair of ints, each >= 1
    padding : int or pair of ints, each >= 0

    Returns
    -------
    Window

    Raises
    ------
    TypeError
        If ``x_shape`` is not a tuple of 4 ints, or a hyperparameter is neither an int nor a
        pair of ints.
    ValueError
        If ``kernel_size`` or ``stride`` has an entry < 1, ``padding`` one < 0, or the
        kernel is larger than the padded input.
    """
    if not (isinstance(x_shape, tuple) and len(x_shape) == 4 and all(map(is_int, x_shape))):
        raise TypeError(f"x_shape must be a tuple of 4 ints (N, C, H, W); got {x_shape!r}")
    kernel = as_pair("kernel_size", kernel_size, minimum=1)
    strides = as_pair("stride", stride, minimum=1)
    pads = as_pair("padding", padding, minimum=0)
    H, W = x_shape[2], x_shape[3]
    padded = (H + 2 * pads[0], W + 2 * pads[1])
    if kernel[0] > padded[0] or kernel[1] > padded[1]:
        raise ValueError(
            f"kernel (KH, KW) = {kernel} must fit in the padded input "
            f"(H + 2 pad_h, W + 2 pad_w) = {padded}; got x of shape {tuple(x_shape)} "
            f"with padding {pads}"
        )
    out = ((padded[0] - kernel[0]) // strides[0] + 1, (padded[1] - kernel[1]) // strides[1] + 1)
    return Window(kernel, strides, pads, out)


def im2col(x: Array, *, kernel_size: Any, stride: Any = 1, padding: Any = 0) -> Array:
    """Copy every window of a zero-padded input into a column.

    No ``path``: a building block of :func:`conv2d_forward` and the poolings, whose fast
    variants call :func:`refnorm.kernels.nn.im2col` (one pass) instead.

    Parameters
    ----------
    x : array, (N, C, H, W)
        Real floating.
    kernel_size, stride, padding : int or pair of ints
        As in :func:`sliding_window`.

    Returns
    -------
    cols : array, (C * KH * KW, N * H_out * W_out), dtype of ``x``
        ``cols[(c, i, j), (n, p, q)] = x_pad[n, c, s_h p + i, s_w q + j]``; rows run over
        (c, i, j) in row-major order, the order of ``w.reshape(C_out, -1)``'s columns, and
        columns over (n, p, q) in row-major order.
    """
    xp = check_rank("x", x, layout="(N, C, H, W)")
    win = sliding_window(x.shape, kernel_size=kernel_size, stride=stride, padding=padding)
    N, C = x.shape[0], x.shape[1]
    (KH, KW), (sh, sw), (H_out, W_out) = win.kernel, win.stride, win.out
    pad_h, pad_w = win.padding
    # Hp = H + 2 pad_h rows, Wp = W + 2 pad_w columns
    x_pad = _zero_pad(xp, x, (pad_h, pad_h), (pad_w, pad_w))      # (N, C, Hp, Wp)
    patches = [
        x_pad[:, :, i:i + sh * (H_out - 1) + 1:sh, j:j + sw * (W_out - 1) + 1:sw]
        for i in range(KH)
        for j in range(KW)
    ]                                                             # KH KW x (N, C, H_out, W_out)
    cols = xp.stack(patches, axis=2)                              # (N, C, KH KW, H_out, W_out)
    cols = xp.permute_dims(cols, (1, 2, 0, 3, 4))                 # (C, KH KW, N, H_out, W_out)
    return xp.reshape(cols, (C * KH * KW, N * H_out * W_out))     # (C KH KW, N H_out W_out)


def col2im(
    cols: Array,
    x_shape: tuple[int, ...],
    *,
    kernel_size: Any,
    stride: Any = 1,
    padding: Any = 0,
) -> Array:
    """The adjoint of :func:`im2col`: add every column entry back where it was copied from.

    For any ``x`` of shape ``x_shape`` and ``c`` of the columns' shape,
    ``sum(im2col(x) * c) == sum(x * col2im(c, x.shape))``: col2im is the transpose of the
    linear map im2col, so it turns a gradient with respect to the columns into the gradient
    with respect to ``x``. An input position covered by several windows receives the sum of
    their entries; entries that fell on the zero padding are dropped.

    No ``path``: a building block of :func:`conv2d_backward` and the poolings, whose fast
    variants call the kernels' col2im (one pass) instead.

    Parameters
    ----------
    cols : array, (C * KH * KW, N * H_out * W_out)
        Real floating, laid out as :func:`im2col` returns.
    x_shape : tuple of 4 ints
        (N, C, H, W), the shape of the input :func:`im2col` was given.
    kernel_size, stride, padding : int or pair of ints
        The values :func:`im2col` was given.

    Returns
    -------
    x : array, (N, C, H, W), dtype of ``cols``
    """
    xp = check_float_array("cols", cols)
    if not (isinstance(x_shape, tuple) and len(x_shape) == 4 and all(map(is_int, x_shape))):
        raise TypeError(f"x_shape must be a tuple of 4 ints (N, C, H, W); got {x_shape!r}")
    win = sliding_window(x_shape, kernel_size=kernel_size, stride=stride, padding=padding)
    N, C, H, W = x_shape
    (KH, KW), (H_out, W_out), (pad_h, pad_w) = win.kernel, win.out, win.padding
    expected = (C * KH * KW, N * H_out * W_out)
    if tuple(cols.shape) != expected:
        raise ValueError(
            f"cols must have shape (C KH KW, N H_out W_out) = {expected} for x_shape "
            f"{tuple(x_shape)} and kernel {win.kernel}; got {tuple(cols.shape)}"
        )
    Hp, Wp = H + 2 * pad_h, W + 2 * pad_w
    patches = xp.reshape(cols, (C, KH * KW, N, H_out, W_out))     # (C, KH KW, N, H_out, W_out)
    patches = xp.permute_dims(patches, (2, 0, 1, 3, 4))           # (N, C, KH KW, H_out, W_out)
    spread = _dilate(xp, patches, win.stride)                     # (N, C, KH KW, H_span, W_span)
    H_span, W_span = spread.shape[-2], spread.shape[-1]
    dx_pad = xp.zeros((N, C, Hp, Wp), dtype=cols.dtype,
                      **on_device(device_of(cols)))              # (N, C, Hp, Wp)
    for k in range(KH * KW):
        i, j = divmod(k, KW)
        placed = _zero_pad(xp, spread[:, :, k, :, :],
                           (i, Hp - i - H_span), (j, Wp - j - W_span))  # (N, C, Hp, Wp)
        dx_pad = dx_pad + placed
    return dx_pad[:, :, pad_h:pad_h + H, pad_w:pad_w + W]         # (N, C, H, W)


def _zero_pad(xp: ModuleType, a: Array, pad_h: tuple[int, int], pad_w: tuple[int, int]) -> Array:
    """``a`` (..., h, w) with (top, bottom) zero rows and (left, right) zero columns added.

    Returns an array of shape (..., top + h + bottom, left + w + right). Its adjoint is the
    crop ``a[..., top:top + h, left:left + w]``.
    """
    lead, where = tuple(a.shape[:-2]), on_device(device_of(a))
    (top, bottom), (left, right) = pad_h, pad_w
    if top or bottom:
        w = a.shape[-1]
        a = xp.concat([xp.zeros(lead + (top, w), dtype=a.dtype, **where), a,
                       xp.zeros(lead + (bottom, w), dtype=a.dtype, **where)],
                      axis=-2)                                             # (..., h', w)
    if left or right:
        h = a.shape[-2]
        a = xp.concat([xp.zeros(lead + (h, left), dtype=a.dtype, **where), a,
                       xp.zeros(lead + (h, right), dtype=a.dtype, **where)],
                      axis=-1)                                             # (..., h', w')
    return a


def _dilate(xp: ModuleType, a: Array, stride: tuple[int, int]) -> Array:
    """Spread ``a`` (..., h, w) out to every ``s_h``-th row and ``s_w``-th column, zeros between.

    Returns ``d`` of shape (..., s_h (h - 1) + 1, s_w (w - 1) + 1) with
    ``d[..., s_h p, s_w q] = a[..., p, q]`` and zeros elsewhere: the adjoint of the strided
    slice ``d[..., ::s_h, ::s_w]``.
    """
    sh, sw = stride
    lead, where = tuple(a.shape[:-2]), on_device(device_of(a))
    h, w = a.shape[-2], a.shape[-1]
    if sh > 1:
        gaps = xp.zeros(lead + (h, sh - 1, w), dtype=a.dtype, **where)  # (..., h, s_h - 1, w)
        a = xp.concat([xp.expand_dims(a, axis=-2), gaps], axis=-2)  # (..., h, s_h, w)
        a = xp.reshape(a, lead + (h * sh, w))[..., :sh * (h - 1) + 1, :]  # (..., H_span, w)
    if sw > 1:
        rows = a.shape[-2]
        gaps = xp.zeros(lead + (rows, w, sw - 1), dtype=a.dtype,
                        **where)                                  # (..., H_span, w, s_w - 1)
        a = xp.concat([xp.expand_dims(a, axis=-1), gaps], axis=-1)  # (..., H_span, w, s_w)
        a = xp.reshape(a, lead + (rows, w * sw))[..., :sw * (w - 1) + 1]  # (..., H_span, W_span)
    return a


@dataclass(frozen=True)
class Conv2dCache:
    """What :func:`conv2d_forward` saves for :func:`conv2d_backward`.

    Attributes
    ----------
    cols : array, (C_in * KH * KW, N * H_out * W_out)
        ``im2col(x)`` in the compute dtype. Saved instead of ``x`` because ``dW = dY cols^T``
        needs exactly this matrix; the price is about KH KW / (s_h s_w) times the memory of
        ``x``.
    w_mat : array, (C_out, C_in * KH * KW)
        The weights as a matrix in the compute dtype (``dcols = W^T dY``).
    x_shape : (N, C_in, H, W)
    w_shape : (C_out, C_in, KH, KW)
    y_shape : (N, C_out, H_out, W_out)
        The shape ``dy`` must have.
    window : Window
        Kernel, stride, padding and output size.
    has_bias : bool
        Whether the forward added a bias (the backward then returns ``db``, else ``None``).
    x_dtype, w_dtype, b_dtype : dtypes
        The dtypes ``dx``, ``dw`` and ``db`` are returned in (``b_dtype`` None without bias).
    """

    cols: Array
    w_mat: Array
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    y_shape: tuple[int, ...]
    window: Window
    has_bias: bool
    x_dtype: Any
    w_dtype: Any
    b_dtype: Any


def _conv_window(x: Array, w: Array, b: Array | None, *, stride: Any,
                 padding: Any) -> tuple[ModuleType, Window]:
    """Check :func:`conv2d_forward`'s arguments; return the namespace and the window."""
    xp = check_rank("x", x, layout="(N, C_in, H, W)")
    check_rank("w", w, layout="(C_out, C_in, KH, KW)")
    C_out, C_in, KH, KW = w.shape
    if x.shape[1] != C_in:
        raise ValueError(
            f"x must have C_in = w.shape[1] = {C_in} channels on axis 1 to match w of shape "
            f"{tuple(w.shape)}; got x of shape {tuple(x.shape)}"
        )
    check_bias(b, C_out, axis_name="C_out")
    array_namespace(x, w, b)  # one namespace for all three
    return xp, sliding_window(x.shape, kernel_size=(KH, KW), stride=stride, padding=padding)


def _conv_cache(x: Array, w: Array, b: Array | None, win: Window, cols: Array,
                w_mat: Array) -> Conv2dCache:
    return Conv2dCache(
        cols=cols, w_mat=w_mat, x_shape=tuple(x.shape), w_shape=tuple(w.shape),
        y_shape=(x.shape[0], w.shape[0]) + win.out, window=win, has_bias=b is not None,
        x_dtype=x.dtype, w_dtype=w.dtype, b_dtype=None if b is None else b.dtype,
    )


@dispatched
def conv2d_forward(
    x: Array, w: Array, b: Array | None = None, *, stride: Any = 1, padding: Any = 0
) -> tuple[Array, Conv2dCache]:
    """A 2-D convolution (cross-correlation) with zero padding, by im2col and a matmul.

    Parameters
    ----------
    x : array, (N, C_in, H, W)
        Real floating; float16 computes in float32 and returns float16.
    w : array, (C_out, C_in, KH, KW)
        Real floating, cast to the compute dtype of ``x``.
    b : array, (C_out,), optional
        Added to every output position of channel ``o``; ``None`` for no bias.
    stride : int or pair of ints, >= 1
        Step of the window along (H, W).
    padding : int or pair of ints, >= 0
        Zero rows added above and below, zero columns left and right.
    path : {"reference", "fast"}, optional
        Which implementation computes (:mod:`refnorm.dispatch`); default: the process-wide
        choice, else the reference.

    Returns
    -------
    y : array, (N, C_out, H_out, W_out), dtype of ``x``
        ``H_out = (H + 2 pad_h - KH) // s_h + 1``, ``W_out`` likewise.
    cache : Conv2dCache

    Raises
    ------
    ValueError
        If ``x`` or ``w`` is not 4-D, ``w.shape[1] != x.shape[1]``, ``b`` is not (C_out,),
        the kernel is larger than the padded input, a stride is < 1 or a padding < 0.
    TypeError
        For non-floating arrays, arrays from different namespaces, or a stride or padding
        that is neither an int nor a pair of ints.
    """
    xp, win = _conv_window(x, w, b, stride=stride, padding=padding)
    C_out, C_in, KH, KW = w.shape
    N, (H_out, W_out) = x.shape[0], win.out
    dtype = compute_dtype(xp, x.dtype)
    cols = im2col(xp.astype(x, dtype, copy=False), kernel_size=win.kernel,
                  stride=win.stride, padding=win.padding)         # (C_in KH KW, N H_out W_out)
    wc = xp.astype(w, dtype, copy=True)  # a copy: the cache must not follow in-place changes
    w_mat = xp.reshape(wc, (C_out, C_in * KH * KW))               # (C_out, C_in KH KW)
    y = xp.matmul(w_mat, cols)                   # (C_out, N H_out W_out)  WS Eq. (1), (7)
    if b is not None:
        y = y + xp.reshape(xp.astype(b, dtype, copy=False), (C_out, 1))
    y = xp.reshape(y, (C_out, N, H_out, W_out))                   # (C_out, N, H_out, W_out)
    y = xp.permute_dims(y, (1, 0, 2, 3))                          # (N, C_out, H_out, W_out)
    return xp.astype(y, x.dtype, copy=False), _conv_cache(x, w, b, win, cols, w_mat)


@dispatched
def conv2d_backward(dy: Array, cache: Conv2dCache, *,
                    input_grad: bool = True) -> tuple[Array | None, Array, Array | None]:
    """Backward of :func:`conv2d_forward`: three matrix products and a col2im.

    Parameters
    ----------
    dy : array, (N, C_out, H_out, W_out)
        Upstream gradient.
    cache : Conv2dCache
    input_grad : bool, default True
        Whether to compute ``dx``; False skips its matrix product and the col2im (a first
        layer, whose input is the data) and returns ``dx = None``.
    path : {"reference", "fast"}, optional
        As in :func:`conv2d_forward`.

    Returns
    -------
    dx : array, (N, C_in, H, W), dtype of ``x``; None if ``input_grad`` is False
    dw : array, (C_out, C_in, KH, KW), dtype of ``w``
    db : array, (C_out,), dtype of ``b``; ``None`` if the forward had no bias
    """
    check_cache(cache, Conv2dCache)
    check_like("dy", dy, cache.y_shape)
    xp = array_namespace(dy, cache.cols)
    N, C_out, H_out, W_out = cache.y_shape
    dy_c = xp.astype(dy, cache.cols.dtype, copy=False)
    dy_mat = xp.permute_dims(dy_c, (1, 0, 2, 3))                  # (C_out, N, H_out, W_out)
    dy_mat = xp.reshape(dy_mat, (C_out, N * H_out * W_out))       # (C_out, N H_out W_out)
    dw = xp.matmul(dy_mat, cache.cols.T)                          # (C_out, C_in KH KW)
    dw = xp.reshape(dw, cache.w_shape)                            # (C_out, C_in, KH, KW)
    dx = None
    if check_bool("input_grad", input_grad):
        dcols = xp.matmul(cache.w_mat.T, dy_mat)                  # (C_in KH KW, N H_out W_out)
        win = cache.window
        dx = col2im(dcols, cache.x_shape, kernel_size=win.kernel, stride=win.stride,
                    padding=win.padding)                          # (N, C_in, H, W)
        dx = xp.astype(dx, cache.x_dtype, copy=False)
    db = None
    if cache.has_bias:
        db = xp.astype(xp.sum(dy_mat, axis=1), cache.b_dtype, copy=False)  # (C_out,)
    return dx, xp.astype(dw, cache.w_dtype, copy=False), db


class Conv2d(Layer):
    """A 2-D convolution layer with He-normal weights and a zero bias.

    Parameters
    ----------
    in_channels : int
        C_in, the size of the input's axis 1 (first, as for every registered layer).
    out_channels : int
        C_out.
    kernel_size : int or pair of ints
        (KH, KW).
    stride : int or pair of ints, default 1
    padding : int or pair of ints, default 0
        Zero padding, as in :func:`conv2d_forward`.
    bias : bool, default True
        Whether the layer has the parameter ``b``.
    dtype, xp, device : where the parameters live (:class:`~refnorm.layer.Layer`)
    seed : int, default 0
        Seeds ``numpy.random.default_rng`` for the weights.

    Learned parameters
    ------------------
    w : (C_out, C_in, KH, KW), ``normal(0, sqrt(2 / (C_in KH KW)))`` (He et al., 2015)
    b : (C_out,), zeros; present only with ``bias=True``
    """

    check_cases = (
        CheckCase((2, 3, 5, 5), {"out_channels": 4, "kernel_size": 3}),
        CheckCase((2, 2, 6, 5), {"out_channels": 3, "kernel_size": (3, 2), "stride": 2,
                                 "padding": 1}),
        CheckCase((1, 3, 5, 6), {"out_channels": 2, "kernel_size": (2, 3), "stride": (1, 2),
                                 "padding": (1, 0)}),
        CheckCase((2, 2, 4, 4), {"out_channels": 3, "kernel_size": 1, "stride": 2}),
    )

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        *,
        stride: Any = 1,
        padding: Any = 0,
        bias: bool = True,
        dtype: Any = None,
        xp: ModuleType | None = None,
        device: Any = None,
        seed: int = 0,
    ) -> None:
        super().__init__(dtype=dtype, xp=xp, device=device)
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.out_channels = check_positive_int("out_channels", out_channels)
        self.kernel_size = as_pair("kernel_size", kernel_size, minimum=1)
        self.stride = as_pair("stride", stride, minimum=1)
        self.padding = as_pair("padding", padding, minimum=0)
        bias = check_bool("bias", bias)
        shape = (out_channels, in_channels) + self.kernel_size    # (C_out, C_in, KH, KW)
        fan_in = in_channels * self.kernel_size[0] * self.kernel_size[1]
        self.params = {"w": he_normal(shape, fan_in=fan_in, seed=seed, xp=self.xp,
                                      device=self.device,
                                      dtype=self.dtype)}
        if bias:
            self.params["b"] = self.xp.zeros((out_channels,), dtype=self.dtype,
                                             **on_device(self.device))

    def _forward(self, x: Array, training: bool) -> tuple[Array, Conv2dCache]:
        return conv2d_forward(x, self.params["w"], self.params.get("b"), stride=self.stride,
                              padding=self.padding, path=self.compute_path())

    def _backward(self, dy: Array, cache: Conv2dCache) -> tuple[Array | None, dict[str, Array]]:
        dx, dw, db = conv2d_backward(dy, cache, input_grad=self.input_grad,
                                     path=self.compute_path())
        grads = {"w": dw} if db is None else {"w": dw, "b": db}
        return dx, grads


# -- the fast path: the same checks, then im2col and col2im as single passes ---------------------


@conv2d_forward.fast
def _conv2d_forward_fast(x: Array, w: Array, b: Array | None = None, *, stride: Any = 1,
                         padding: Any = 0) -> tuple[Array, Conv2dCache]:
    win = check_once(
        lambda: ("conv2d", type(x), x.shape, x.dtype, type(w), w.shape, w.dtype,
                 None if b is None else (type(b), b.shape, b.dtype),
                 typed(stride), typed(padding)),
        lambda: _conv_window(x, w, b, stride=stride, padding=padding)[1])
    k = kernels.conv_forward(x, w, b, win.stride, win.padding)
    return k.y, _conv_cache(x, w, b, win, k.cols, k.w_mat)


def _check_geometry(cache: Conv2dCache) -> None:
    """The fast backward's check that the cache's shapes agree as the forward makes them:
    its loops turn ``x_shape``, ``window`` and the columns' shape into addresses, so a cache
    built or edited by hand whose fields disagree would make them read outside the arrays.
    Such a cache is refused here (the reference refuses most of them too)."""
    def refuse(why: str) -> None:
        raise ValueError(f"conv2d_backward: the cache's fields disagree ({why}); the fast path "
                         f"reads only caches its forward made")

    x_shape, w_shape, win = cache.x_shape, cache.w_shape, cache.window
    if len(x_shape) != 4 or len(w_shape) != 4 or w_shape[1] != x_shape[1]:
        refuse(f"x_shape {x_shape}, w_shape {w_shape}")
    if sliding_window(x_shape, kernel_size=w_shape[2:], stride=win.stride,
                      padding=win.padding) != win:
        refuse(f"window {win} for x_shape {x_shape} and w_shape {w_shape}")
    if tuple(cache.y_shape) != (x_shape[0], w_shape[0]) + tuple(win.out):
        refuse(f"y_shape {cache.y_shape} for x_shape {x_shape} and window {win}")
    K = w_shape[1] * w_shape[2] * w_shape[3]
    for name, a, shape in (("cols", cache.cols, (K, x_shape[0] * win.out[0] * win.out[1])),
                           ("w_mat", cache.w_mat, (w_shape[0], K))):
        if not (isinstance(a, np.ndarray) and a.dtype.kind == "f" and a.shape == shape):
            refuse(f"{name} of shape {getattr(a, 'shape', None)} and dtype "
                   f"{getattr(a, 'dtype', None)}, where the forward makes {shape} floating")


@conv2d_backward.fast
def _conv2d_backward_fast(dy: Array, cache: Conv2dCache, *,
                          input_grad: bool = True) -> tuple[Array | None, Array, Array | None]:
    check_cache(cache, Conv2dCache)

    def check() -> ModuleType:
        check_like("dy", dy, cache.y_shape)
        return array_namespace(dy, cache.cols)

    xp = check_once(lambda: ("conv2d dy", type(dy), dy.shape, dy.dtype, cache.y_shape,
                             type(cache.cols)), check)
    check_once(lambda: ("conv2d cache", cache.x_shape, cache.w_shape, cache.y_shape,
                        cache.window, type(cache.cols), cache.cols.shape, cache.cols.dtype,
                        type(cache.w_mat), cache.w_mat.shape, cache.w_mat.dtype),
               lambda: _check_geometry(cache))
    win = cache.window
    g = kernels.conv_backward(xp.astype(dy, cache.cols.dtype, copy=False), cache.cols,
                              cache.w_mat, cache.x_shape, (win.kernel, win.stride, win.padding),
                              input_grad=check_bool("input_grad", input_grad),
                              bias=cache.has_bias)
    return (None if g.dx is None else xp.astype(g.dx, cache.x_dtype, copy=False),
            xp.astype(g.dw, cache.w_dtype, copy=False),
            None if g.db is None else xp.astype(g.db, cache.b_dtype, copy=False))

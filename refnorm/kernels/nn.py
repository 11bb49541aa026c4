"""Fast convolution, pooling, ReLU and Weight Standardization on numpy arrays (numba, BLAS).

- :func:`conv_forward` / :func:`conv_backward` equal :func:`refnorm.nn.conv.conv2d_forward`
  and :func:`refnorm.nn.conv.conv2d_backward`: the same im2col and matrix products (numpy's
  BLAS, on one thread below :data:`BLAS_PARALLEL_FROM` multiply-adds: :func:`blas_threads`),
  with im2col and col2im as single parallel passes
  (:func:`~refnorm.kernels._loops.im2col` reads x once and writes the columns once;
  :func:`~refnorm.kernels._loops.col2im` reads the columns once and writes ``dx`` once,
  instead of the reference's zero padding and zero interleaving per kernel offset); the
  backward skips ``dx`` when asked (``input_grad=False``). Below both thresholds, a
  convolution large enough runs by blocks of samples on helper threads
  (:func:`refnorm.kernels.blocks.by_samples`), bitwise as on one thread.
- :func:`max_pool_forward` / :func:`max_pool_backward` equal
  :func:`refnorm.nn.pooling.max_pool2d_forward` / ``max_pool2d_backward``, ties to the first
  maximum in row-major window order, without building the windows.
- :func:`relu_forward` and :func:`relu_backward` equal
  :func:`refnorm.nn.activations.relu_forward` (``y`` and the mask in one pass) and
  :func:`refnorm.nn.activations.relu_backward` (optionally in place).
- :func:`ws_forward` / :func:`ws_backward` equal
  :func:`refnorm.weights.standardization.weight_standardization_forward` / ``_backward``.

Hyperparameters are given as checked pairs (the public functions check them first).
"""
from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from refnorm.kernels import norms as kernel_norms
from refnorm.kernels.blocks import by_samples
from refnorm.kernels.norms import compute_array, launch, loops, refuse_overflow, threads
from refnorm.kernels.records import ConvForward, ConvGrads, MaxPooled, WeightStandardized

# multiply-adds of a convolution's matrix products below which numpy's BLAS runs them on one
# thread (refnorm.kernels.nn.blas_threads): measured crossover, see docs/performance.md
BLAS_PARALLEL_FROM = 1 << 26


@functools.cache
def _blas() -> list[Any]:
    """numpy's BLAS libraries as threadpoolctl controllers (empty without threadpoolctl)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return []
    return list(ThreadpoolController().select(user_api="blas").lib_controllers)


@contextlib.contextmanager
def blas_threads(work: int) -> Iterator[None]:
    """Run the block's BLAS calls on refnorm's thread count (numba's) when they do at least
    :data:`BLAS_PARALLEL_FROM` multiply-adds (``work``), else on one thread; the BLAS
    libraries' own settings are restored after. Without threadpoolctl, BLAS keeps its own."""
    wanted = threads() if work >= BLAS_PARALLEL_FROM else 1
    libs = _blas()
    before = [lib.num_threads for lib in libs]
    for lib, n in zip(libs, before, strict=True):
        if n != wanted:
            lib.set_num_threads(wanted)
    try:
        yield
    finally:
        for lib, n in zip(libs, before, strict=True):
            if n != wanted:
                lib.set_num_threads(n)


def out_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """Window positions along one axis: ``(size + 2 pad - kernel) // stride + 1``."""
    return (size + 2 * pad - kernel) // stride + 1


def spaced_rows(rows: int, length: int, dtype: Any) -> np.ndarray:
    """An empty C-contiguous (``rows``, ``length`` or a little more) array whose rows lie an
    odd number of 64-byte cache lines apart; its first ``length`` columns are the array meant
    and the rest are never written or read (the loops are given the whole array, which numba
    types as C-contiguous, and index only those columns; the callers keep the view).

    Rows a power-of-two number of bytes apart, like the columns' rows at the study's sizes
    (N H_out W_out = 32 x 256 float32 values: 32 KiB), fall into the same sets of the L1
    cache, and BLAS, reading a block of rows at a time, evicts its own lines: the middle
    convolution's forward products took 1.09 ms on such rows and 0.92 ms on rows one line
    further apart (as on a contiguous copy by sample, 0.93 ms). An odd number of lines puts
    64 consecutive rows in 64 different sets of every 4 KiB.
    """
    item = np.dtype(dtype).itemsize
    lines = -(-length * item // 64)
    lines += 1 - lines % 2
    return np.empty((rows, lines * 64 // item), dtype=dtype)


def im2col(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int],
           padding: tuple[int, int]) -> np.ndarray:
    """Equals :func:`refnorm.nn.conv.im2col`.

    Parameters
    ----------
    x : array, (N, C, H, W)
    kernel, stride, padding : pairs of int

    Returns
    -------
    cols : array, (C * KH * KW, N * H_out * W_out), compute dtype of ``x``; its rows lie an
        odd number of cache lines apart (:func:`spaced_rows`)
    """
    xc = compute_array(x)
    N, C, H, W = xc.shape
    H_out = out_size(H, kernel[0], stride[0], padding[0])
    W_out = out_size(W, kernel[1], stride[1], padding[1])
    L = N * H_out * W_out
    wide = spaced_rows(C * kernel[0] * kernel[1], L, xc.dtype)
    launch(loops().im2col, xc.size + wide.size, xc, kernel[0], kernel[1], stride[0], stride[1],
           padding[0], padding[1], H_out, W_out, wide, 0)
    return wide[:, :L]


def _split_work(products: int, values: int) -> int:
    """The work :func:`~refnorm.kernels.blocks.by_samples` is given for a convolution whose
    products do ``products`` multiply-adds and whose loops move ``values``: 0 (one block) when
    the products are large enough for BLAS's threads or the loops for numba's, which then run
    them (a block on a helper thread must not start a parallel region of its own)."""
    return (products if products < BLAS_PARALLEL_FROM and values < kernel_norms.SERIAL_BELOW
            else 0)


def col2im(cols: np.ndarray, x_shape: tuple[int, ...], kernel: tuple[int, int],
           stride: tuple[int, int], padding: tuple[int, int]) -> np.ndarray:
    """Equals :func:`refnorm.nn.conv.col2im`.

    Parameters
    ----------
    cols : array, (C * KH * KW, N * H_out * W_out)
    x_shape : (N, C, H, W)
    kernel, stride, padding : pairs of int

    Returns
    -------
    dx : array, (N, C, H, W), compute dtype of ``cols``
    """
    cc = compute_array(cols)
    H_out = out_size(x_shape[2], kernel[0], stride[0], padding[0])
    W_out = out_size(x_shape[3], kernel[1], stride[1], padding[1])
    want = (x_shape[1] * kernel[0] * kernel[1], x_shape[0] * H_out * W_out)
    if cc.shape != want:  # the loop reads cols at the addresses x_shape gives
        raise ValueError(f"cols must have shape {want} for x_shape {tuple(x_shape)}; got "
                         f"{cc.shape}")
    return _col2im_by_sample(cc.reshape(cc.shape[0], x_shape[0], H_out * W_out
                                        ).transpose(1, 0, 2), x_shape, kernel, stride, padding)


def _col2im_by_sample(cols3: np.ndarray, x_shape: tuple[int, ...],
                      kernel: tuple[int, int], stride: tuple[int, int],
                      padding: tuple[int, int]) -> np.ndarray:
    """col2im of columns laid out by sample, (N, C KH KW, H_out W_out) (any outer strides)."""
    H_out = out_size(x_shape[2], kernel[0], stride[0], padding[0])
    W_out = out_size(x_shape[3], kernel[1], stride[1], padding[1])
    dx = np.empty(x_shape, dtype=cols3.dtype)
    launch(loops().col2im, cols3.size + dx.size, cols3, kernel[0], kernel[1], stride[0],
           stride[1], padding[0], padding[1], H_out, W_out, dx)
    return dx


def conv_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None,
                 stride: tuple[int, int], padding: tuple[int, int]) -> ConvForward:
    """Equals :func:`refnorm.nn.conv.conv2d_forward`.

    Parameters
    ----------
    x : array, (N, C_in, H, W)
    w : array, (C_out, C_in, KH, KW)
    b : array, (C_out,), or None
    stride, padding : pairs of int

    Returns
    -------
    ConvForward : ``y`` ((N, C_out, H_out, W_out), dtype of ``x``), ``cols``
        ((C_in * KH * KW, N * H_out * W_out)) and ``w_mat`` ((C_out, C_in * KH * KW)), the
        cache's fields, in the compute dtype
    """
    xc = compute_array(x)
    N, C_in, H, W = xc.shape
    C_out, _, KH, KW = w.shape
    H_out = out_size(H, KH, stride[0], padding[0])
    W_out = out_size(W, KW, stride[1], padding[1])
    S = H_out * W_out
    R = C_in * KH * KW
    wide = spaced_rows(R, N * S, xc.dtype)
    # a copy, never a view of the caller's w: the cache keeps w_mat
    w_mat = np.array(w, dtype=xc.dtype, order="C", copy=True).reshape(C_out, R)
    bias = None if b is None else np.asarray(b, dtype=xc.dtype).reshape(C_out, 1)
    y = np.empty((N, C_out, S), dtype=xc.dtype)

    def block(lo: int, hi: int) -> None:
        # im2col of the block's samples, then one product per sample written in
        # (N, C_out, H_out W_out) order: no transpose copy
        launch(loops().im2col, (hi - lo) * (C_in * H * W + R * S), xc[lo:hi], KH, KW,
               stride[0], stride[1], padding[0], padding[1], H_out, W_out, wide, lo)
        np.matmul(w_mat, wide[:, lo * S:hi * S].reshape(R, hi - lo, S).transpose(1, 0, 2),
                  out=y[lo:hi])
        if bias is not None:
            y[lo:hi] += bias

    products = C_out * R * N * S
    with blas_threads(products):
        by_samples(block, N, _split_work(products, N * (C_in * H * W + R * S)))
    return ConvForward(y=y.reshape(N, C_out, H_out, W_out).astype(x.dtype, copy=False),
                       cols=wide[:, :N * S], w_mat=w_mat)


def conv_backward(dy: np.ndarray, cols: np.ndarray, w_mat: np.ndarray,
                  x_shape: tuple[int, ...], window: tuple, *,
                  input_grad: bool = True, bias: bool = True) -> ConvGrads:
    """Equals :func:`refnorm.nn.conv.conv2d_backward`.

    Parameters
    ----------
    dy : array, (N, C_out, H_out, W_out)
    cols, w_mat : the arrays :func:`conv_forward` returned
    x_shape : (N, C_in, H, W)
    window : (kernel, stride, padding), pairs of int
    input_grad : bool
        False: no ``dx`` (its matrix product and col2im are skipped; ``dx`` is None).
    bias : bool
        False: no ``db`` (the forward added no bias; ``db`` is None).

    Returns
    -------
    ConvGrads : ``dx`` ((N, C_in, H, W), dtype of ``cols``; None without ``input_grad``),
        ``dw`` ((C_out, C_in, KH, KW)) and ``db`` ((C_out,); None without ``bias``)
    """
    kernel, stride, padding = window
    N, C_out = dy.shape[:2]
    R = cols.shape[0]
    S = math.prod(dy.shape[2:])
    dy3 = np.ascontiguousarray(dy, dtype=cols.dtype).reshape(N, C_out, S)
    # dw^T = sum over samples of cols_n (C_in KH KW, H_out W_out) x dy_n^T: one product per
    # sample on the cached columns as they lie, no transposed copy of dy (OpenBLAS is slow on
    # one long (C_out, N H_out W_out) x (N H_out W_out, C_in KH KW) product with so narrow an
    # output: 1.0 against 0.29 ms for the bench step's first layer); summed after the blocks
    per_sample = cols.reshape(R, N, S).transpose(1, 0, 2)
    dw_by_sample = np.empty((N, R, C_out), dtype=cols.dtype)
    # dcols by sample, (N, C_in KH KW, H_out W_out): each product's output stays in cache and
    # col2im reads one contiguous block per (n, c) plane
    dcols3 = np.empty((N, R, S), dtype=cols.dtype) if input_grad else None
    dx = np.empty(x_shape, dtype=cols.dtype) if input_grad else None
    plane = math.prod(x_shape[1:])
    H_out = out_size(x_shape[2], kernel[0], stride[0], padding[0])
    W_out = out_size(x_shape[3], kernel[1], stride[1], padding[1])

    def block(lo: int, hi: int) -> None:
        np.matmul(per_sample[lo:hi], dy3[lo:hi].transpose(0, 2, 1), out=dw_by_sample[lo:hi])
        if dcols3 is None or dx is None:
            return
        np.matmul(w_mat.T, dy3[lo:hi], out=dcols3[lo:hi])
        launch(loops().col2im, (hi - lo) * (R * S + plane), dcols3[lo:hi], kernel[0],
               kernel[1], stride[0], stride[1], padding[0], padding[1], H_out, W_out,
               dx[lo:hi])

    products = C_out * R * N * S
    with blas_threads(products):
        by_samples(block, N, _split_work(products, N * (R * S + plane)))
    dw_mat = dw_by_sample.sum(axis=0).T
    db = dy3.sum(axis=(0, 2)) if bias else None
    dw = np.ascontiguousarray(dw_mat).reshape((C_out, x_shape[1]) + tuple(kernel))
    return ConvGrads(dx=dx, dw=dw, db=db)


def max_pool_forward(x: np.ndarray, kernel: tuple[int, int],
                     stride: tuple[int, int]) -> MaxPooled:
    """Equals :func:`refnorm.nn.pooling.max_pool2d_forward` (no padding).

    Parameters
    ----------
    x : array, (N, C, H, W)
    kernel, stride : pairs of int

    Returns
    -------
    MaxPooled : ``y`` ((N, C, H_out, W_out), dtype of ``x``) and ``argmax``, the cache's
        int64 (C, N * H_out * W_out) index ``i KW + j`` of each window's first maximum
    """
    xc = compute_array(x)
    N, C, H, W = xc.shape
    H_out = out_size(H, kernel[0], stride[0], 0)
    W_out = out_size(W, kernel[1], stride[1], 0)
    y = np.empty((N, C, H_out, W_out), dtype=xc.dtype)
    argmax = np.empty((C, N * H_out * W_out), dtype=np.int64)
    launch(loops().max_pool, xc.size + 2 * y.size, xc, kernel[0], kernel[1], stride[0],
           stride[1], y, argmax)
    return MaxPooled(y=y.astype(x.dtype, copy=False), argmax=argmax)


def max_pool_backward(dy: np.ndarray, argmax: np.ndarray, x_shape: tuple[int, ...],
                      kernel: tuple[int, int], stride: tuple[int, int]) -> np.ndarray:
    """Equals :func:`refnorm.nn.pooling.max_pool2d_backward`.

    Parameters
    ----------
    dy : array, (N, C, H_out, W_out)
    argmax : int array, (C, N * H_out * W_out)
    x_shape : (N, C, H, W)
    kernel, stride : pairs of int

    Returns
    -------
    dx : array, (N, C, H, W), compute dtype of ``dy``
    """
    dyc = compute_array(dy)
    dx = np.empty(x_shape, dtype=dyc.dtype)
    launch(loops().max_pool_backward, dx.size + 2 * dyc.size, dyc, np.ascontiguousarray(argmax),
           kernel[0], kernel[1], stride[0], stride[1], dx)
    return dx


def relu_forward(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Equals :func:`refnorm.nn.activations.relu_forward`: ``y = max(x, 0)`` and the mask
    ``x > 0`` in one pass (float16, which numba does not type, by numpy's two).

    Returns
    -------
    y : array, ``x.shape``, dtype of ``x``
    positive : bool array, ``x.shape``
    """
    if x.dtype == np.float16:
        return np.maximum(x, np.zeros_like(x)), x > 0
    xc = np.asarray(x, order="C")  # C-contiguous; unlike ascontiguousarray, keeps a 0-d shape
    y = np.empty_like(xc)
    positive = np.empty(xc.shape, dtype=np.bool_)
    launch(loops().relu_forward, 3 * xc.size, xc.reshape(-1), y.reshape(-1),
           positive.reshape(-1))
    return y, positive


def relu_backward(dy: np.ndarray, positive: np.ndarray, *, out: np.ndarray | None = None
                  ) -> np.ndarray:
    """Equals :func:`refnorm.nn.activations.relu_backward`.

    Parameters
    ----------
    dy : array, any shape
    positive : bool array, ``dy.shape`` (the cache's ``x > 0``)
    out : array, ``dy.shape``, C-contiguous, dtype of ``dy``, optional
        Where to write ``dx``; may be ``dy`` itself when the caller owns that buffer.

    Returns
    -------
    dx : array, ``dy.shape``, dtype of ``dy``

    numba has no float16 type; a select moves values unchanged, so float16 runs the same loop
    on the values' bits (a uint16 view), bit-equal to the reference.
    """
    dyc = np.asarray(dy, order="C")
    if dyc.dtype == np.float16:
        bits = relu_backward(dyc.view(np.uint16), positive,
                             out=None if out is None else out.view(np.uint16))
        return bits.view(np.float16)
    if out is None:
        out = np.empty_like(dyc)
    elif not (out.flags.c_contiguous and out.shape == dyc.shape and out.dtype == dyc.dtype):
        raise ValueError("out must be a C-contiguous array of dy's shape and dtype")
    launch(loops().relu_backward, 3 * dyc.size, dyc.reshape(-1),
           np.asarray(positive, order="C").reshape(-1), out.reshape(-1))
    return out


def ws_forward(w: np.ndarray, eps: float, eps_mode: str, correction: int) -> WeightStandardized:
    """Equals :func:`refnorm.weights.standardization.weight_standardization_forward`.

    Parameters
    ----------
    w : array, (C_out, ...)
    eps : float
    eps_mode : "add" or "sqrt"
    correction : 0 or 1

    Returns
    -------
    WeightStandardized : ``w_hat`` (C_out, I), ``denom``, ``kappa`` (C_out, 1), in the
        compute dtype of ``w``
    """
    wc = compute_array(w).reshape(w.shape[0], math.prod(w.shape[1:]))
    w_hat = np.empty_like(wc)
    denom = np.empty((wc.shape[0], 1), dtype=wc.dtype)
    kappa = np.empty_like(denom)
    loops().ws_forward(wc, float(eps), eps_mode == "add", int(correction), w_hat, denom, kappa)
    # the reference's error where its sums overflow the dtype: of the squared deviations
    # (sigma^2 (I - correction)) and of the weights. sigma from denom and kappa, not denom
    # itself: a large eps (1e20 in float32) would overflow denom^2 where sigma^2 fits
    n = wc.shape[1] - correction
    d = denom.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if eps_mode == "add":  # kappa = denom / (sigma n), 0 where sigma = 0, NaN at inf / inf
            k = kappa.astype(np.float64)
            sigma = np.where(k > 0, d / (k * n), np.where(np.isnan(k), np.inf, 0.0))
        else:                  # denom^2 = sigma^2 + eps
            sigma = np.sqrt(np.maximum(d * d - eps, 0.0))
    refuse_overflow(wc, wc.dtype, sigma * sigma * n,
                    wc.sum(axis=1, dtype=np.float64, keepdims=True), name="w")
    return WeightStandardized(w_hat=w_hat, denom=denom, kappa=kappa)


def ws_backward(dw_hat: np.ndarray, w_hat: np.ndarray, denom: np.ndarray,
                kappa: np.ndarray) -> np.ndarray:
    """Equals :func:`refnorm.weights.standardization.weight_standardization_backward`.

    Parameters
    ----------
    dw_hat : array, ``w.shape``
    w_hat : array, (C_out, I)
    denom, kappa : arrays, (C_out, 1)

    Returns
    -------
    dw : array, (C_out, I), dtype of ``w_hat``
    """
    g = np.ascontiguousarray(dw_hat, dtype=w_hat.dtype).reshape(w_hat.shape)
    dw = np.empty_like(g)
    loops().ws_backward(g, np.ascontiguousarray(w_hat), denom, kappa, dw)
    return dw

"""Convolution, max pooling and ReLU backward kernels equal the reference (refnorm.nn).

im2col, col2im and the pooling kernels move values without arithmetic (col2im and the pooling
backward add up to KH KW of them), so float64 must agree to 1e-12 normwise and the argmax
exactly; the convolution's matrix products are numpy's, given the same matrices.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from refnorm import kernels
from refnorm.nn.activations import relu_backward, relu_forward
from refnorm.nn.conv import col2im, conv2d_backward, conv2d_forward, im2col
from refnorm.nn.pooling import max_pool2d_backward, max_pool2d_forward
from tests.kernels.helpers import assert_close, upstream
from tests.nn.strategies import as_pair, conv_configs, pool_configs


def _layout(draw, a: np.ndarray) -> np.ndarray:
    """``a`` as drawn: C-contiguous, a non-contiguous view, or with negative strides."""
    layout = draw(st.sampled_from(["contiguous", "strided", "reversed"]))
    if layout == "strided":
        return np.repeat(a, 2, axis=1)[:, ::2]
    if layout == "reversed":
        return np.flip(np.flip(a, (0, 3)).copy(), (0, 3))
    return a


@given(data=st.data())
def test_im2col_col2im_equal_reference(data):
    x_shape, w_shape, stride, padding, _ = data.draw(conv_configs(max_extra=4))
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    x = _layout(data.draw, data.draw(arrays(dtype, x_shape, elements=st.floats(-9, 9, width=32))))
    window = (tuple(w_shape[2:]), as_pair(stride), as_pair(padding))
    cols = kernels.im2col(x, *window)
    want = im2col(x, kernel_size=window[0], stride=stride, padding=padding)
    np.testing.assert_array_equal(cols, want)  # a pure copy: bit-equal
    c = upstream(want.shape, dtype, seed=x.size)
    got = kernels.col2im(c, x_shape, *window)
    assert_close("col2im", got, col2im(c, x_shape, kernel_size=window[0], stride=stride,
                                       padding=padding), np.dtype(dtype).type)


@given(data=st.data())
def test_conv_equals_reference(data):
    x_shape, w_shape, stride, padding, bias = data.draw(conv_configs(max_extra=4))
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(sum(x_shape) + sum(w_shape))
    x = _layout(data.draw, (rng.standard_normal(x_shape) + 3).astype(dtype))
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype) if bias else None
    y_ref, cache = conv2d_forward(x, w, b, stride=stride, padding=padding)
    window = (tuple(w_shape[2:]), as_pair(stride), as_pair(padding))
    y, cols, w_mat = kernels.conv_forward(x, w, b, window[1], window[2])
    t = np.dtype(dtype).type
    assert_close("y", y, y_ref, t)
    np.testing.assert_array_equal(cols, cache.cols)
    np.testing.assert_array_equal(w_mat, cache.w_mat)
    dy = upstream(y_ref.shape, dtype, seed=x.size)
    dx, dw, db = kernels.conv_backward(dy, cols, w_mat, x_shape, window, bias=bias)
    dx_ref, dw_ref, db_ref = conv2d_backward(dy, cache)
    assert_close("dx", dx, dx_ref, t)
    assert_close("dw", dw, dw_ref, t)
    if bias:
        assert_close("db", db, db_ref, t)
    else:
        assert db is None
    # the fast path's cache (columns with spaced rows) serves the reference backward too
    _, fast_cache = conv2d_forward(x, w, b, stride=stride, padding=padding, path="fast")
    for got, want in zip(conv2d_backward(dy, fast_cache, path="reference"),
                         (dx_ref, dw_ref, db_ref), strict=True):
        if want is None:
            assert got is None
        else:
            assert_close("reference backward on the fast cache", got, want, t)


@given(data=st.data())
def test_max_pool_equals_reference_with_ties_and_nan(data):
    x_shape, kernel_size, stride = data.draw(pool_configs(max_extra=4))
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    # values from a small set, so that windows hold ties often; NaN sometimes
    values = st.sampled_from([-1.0, 0.0, 0.5, 2.0]) | st.just(np.nan)
    x = _layout(data.draw, data.draw(arrays(dtype, x_shape, elements=values)))
    y_ref, cache = max_pool2d_forward(x, kernel_size=kernel_size, stride=stride)
    k = as_pair(kernel_size)
    s = k if stride is None else as_pair(stride)
    y, argmax = kernels.max_pool_forward(x, k, s)
    np.testing.assert_array_equal(y, y_ref)           # NaN where the reference has NaN
    np.testing.assert_array_equal(argmax, cache.argmax)
    dy = upstream(y_ref.shape, dtype, seed=x.size)
    dx = kernels.max_pool_backward(dy, argmax, x_shape, k, s)
    assert_close("dx", dx, max_pool2d_backward(dy, cache), np.dtype(dtype).type)


@given(x=arrays(st.sampled_from([np.float16, np.float32, np.float64]),
                st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 7)),
                elements=st.sampled_from([-1.5, -0.0, 0.0, 2.0, np.nan, -np.inf, np.inf])),
       data=st.data())
def test_relu_forward_is_bit_equal_to_reference(x, data):
    """y (NaN kept, -0 to +0) and the mask, bit for bit, on any layout."""
    x = _layout(data.draw, x[None])[0]
    y, positive = kernels.relu_forward(x)
    want, cache = relu_forward(x)
    assert y.dtype == want.dtype and positive.dtype == np.bool_
    np.testing.assert_array_equal(y.view(np.uint8), np.ascontiguousarray(want).view(np.uint8))
    np.testing.assert_array_equal(positive, cache.positive)


@given(x=arrays(np.float64, st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 7)),
                elements=st.sampled_from([-1.5, -0.0, 0.0, 2.0, np.nan])),
       in_place=st.booleans())
def test_relu_backward_equals_reference(x, in_place):
    _, cache = relu_forward(x)
    dy = upstream(x.shape, np.float64, seed=x.size)
    want = relu_backward(dy, cache)
    out = dy.copy() if in_place else None
    got = kernels.relu_backward(dy if out is None else out, cache.positive, out=out)
    np.testing.assert_array_equal(got, want)
    if in_place:
        assert got is out


@given(data=st.data())
def test_max_pool_2x2_equals_reference_with_ties_nan_and_infinities(data):
    """2x2 windows take the branch-free pass (with literal strides at stride 2; a plane
    holding a NaN or an infinity takes the exact loop; at stride 2 the backward stores once per
    window); drawn often here, with overlapping (stride 1), tiling (2) and skipping (3) windows."""
    N, C = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4))
    H, W = data.draw(st.integers(2, 9)), data.draw(st.integers(2, 9))
    stride = data.draw(st.sampled_from([(1, 1), (2, 2), (3, 3), (1, 2), (2, 1)]))
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    values = st.sampled_from([-np.inf, -1.0, 0.0, 0.5, 2.0, np.inf]) | st.just(np.nan)
    x = _layout(data.draw, data.draw(arrays(dtype, (N, C, H, W), elements=values)))
    y_ref, cache = max_pool2d_forward(x, kernel_size=2, stride=stride)
    y, argmax = kernels.max_pool_forward(x, (2, 2), stride)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(argmax, cache.argmax)
    dy = upstream(y_ref.shape, dtype, seed=x.size)
    dx = kernels.max_pool_backward(dy, argmax, (N, C, H, W), (2, 2), stride)
    assert_close("dx", dx, max_pool2d_backward(dy, cache), np.dtype(dtype).type)


@given(kernel=st.sampled_from([(2, 2), (3, 3)]), stride=st.sampled_from([(2, 2), (1, 1)]),
       index=st.sampled_from([-1, 4, 9, 2**40, -2**40]))
def test_max_pool_backward_places_nothing_for_an_index_outside_the_window(kernel, stride,
                                                                          index):
    """A hand-built cache whose argmax names no position of its window: the reference places
    nothing for it (the index matches no window position); the fast loop, which turns the
    index into an address, must do the same instead of writing outside dx."""
    import dataclasses

    x = np.random.default_rng(3).standard_normal((2, 3, 7, 8))
    y, cache = max_pool2d_forward(x, kernel_size=kernel, stride=stride)
    argmax = cache.argmax.copy()
    argmax[:, ::2] = index
    bad = dataclasses.replace(cache, argmax=argmax)
    dy = upstream(y.shape, np.float64, seed=1)
    want = max_pool2d_backward(dy, bad, path="reference")
    got = max_pool2d_backward(dy, bad, path="fast")
    assert_close("dx", got, want, np.float64)  # overlapping windows add in another order
    assert np.array_equal(got == 0, want == 0) and np.count_nonzero(want) > 0


@given(rows=st.integers(1, 5), length=st.integers(1, 70_000),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_spaced_rows_lie_an_odd_number_of_cache_lines_apart(rows, length, dtype):
    """The columns' rows never lie a power-of-two multiple of 128 bytes apart (which would
    put them in the same cache sets), and the wider array costs at most two lines a row."""
    from refnorm.kernels.nn import spaced_rows

    a = spaced_rows(rows, length, dtype)
    assert a.flags.c_contiguous and a.dtype == dtype and a.shape[0] == rows
    assert a.shape[1] >= length and a.strides[0] % 64 == 0 and (a.strides[0] // 64) % 2 == 1
    assert a.strides[0] - length * a.itemsize < 128
    cols = kernels.im2col(np.ones((2, 3, 16, 16), dtype), (3, 3), (1, 1), (1, 1))
    assert cols.shape == (27, 512) and (cols.strides[0] // 64) % 2 == 1


def test_a_small_convolution_puts_blas_thread_count_back():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from refnorm import kernels

    def counts():
        return [lib.num_threads for lib in threadpoolctl.ThreadpoolController().select(
            user_api="blas").lib_controllers]

    before = counts()
    if not before or max(before) == 1:
        pytest.skip("no multi-threaded BLAS to put back")
    rng = np.random.default_rng(0)
    out = kernels.conv_forward(rng.standard_normal((2, 3, 6, 6)),
                               rng.standard_normal((4, 3, 3, 3)), None, (1, 1), (1, 1))
    kernels.conv_backward(np.ones_like(out.y), out.cols, out.w_mat, (2, 3, 6, 6),
                          ((3, 3), (1, 1), (1, 1)))
    assert counts() == before


def test_float16_relu_backward_writes_into_out():
    from refnorm import kernels

    x = np.array([[-1.5, 2.0, 0.0, 3.0]], np.float16)
    positive = x > 0
    dy = np.array([[1.0, 2.0, 3.0, 4.0]], np.float16)
    out = dy.copy()
    got = kernels.relu_backward(out, positive, out=out)
    np.testing.assert_array_equal(out, [[0.0, 2.0, 0.0, 4.0]])
    assert np.shares_memory(got, out) and got.dtype == np.float16


def test_relu_backward_refuses_a_non_contiguous_out():
    """A strided out would be written through a reshaped copy and come back unwritten: it is
    refused."""
    from refnorm import kernels

    dy = np.arange(1.0, 13.0).reshape(4, 3)
    positive = dy > 4
    out = np.zeros((4, 6))[:, ::2]
    assert out.shape == dy.shape and not out.flags.c_contiguous
    with pytest.raises(ValueError, match="out must be a C-contiguous array"):
        kernels.relu_backward(dy, positive, out=out)


def test_split_work_is_one_block_when_blas_or_numba_has_the_threads():
    """One block (work 0) when either the products reach BLAS_PARALLEL_FROM or the loops
    SERIAL_BELOW; the products as work only when both are small."""
    from refnorm.kernels import nn as knn
    from refnorm.kernels import norms

    big_products, big_values = knn.BLAS_PARALLEL_FROM, norms.SERIAL_BELOW
    assert knn._split_work(big_products - 1, big_values - 1) == big_products - 1
    assert knn._split_work(big_products, 1) == 0
    assert knn._split_work(1, big_values) == 0


def test_blas_runs_small_products_on_one_thread_and_large_ones_on_refnorms_count():
    """Below BLAS_PARALLEL_FROM multiply-adds numpy's BLAS runs on one thread, from it on on
    refnorm's (numba's) thread count; its own setting comes back after either (read from
    the BLAS library itself through threadpoolctl)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from refnorm.kernels import nn as knn
    from refnorm.kernels.norms import threads

    def counts():
        return [lib.num_threads for lib in threadpoolctl.ThreadpoolController().select(
            user_api="blas").lib_controllers]

    before = counts()
    if not before or max(before) == 1 or threads() == 1:
        pytest.skip("one thread either way: nothing to tell apart")
    with knn.blas_threads(knn.BLAS_PARALLEL_FROM - 1):
        assert counts() == [1] * len(before)
    assert counts() == before
    with knn.blas_threads(knn.BLAS_PARALLEL_FROM):
        assert counts() == [threads()] * len(before)
    assert counts() == before


def test_col2im_refuses_columns_of_another_shape_than_x_shape_gives():
    """The loop reads the columns at the addresses x_shape gives: columns for a smaller input
    are refused, not read beyond their end."""
    cols = np.ones((2 * 3 * 3, 1 * 2 * 2))                        # x (1, 2, 4, 4), kernel 3
    with pytest.raises(ValueError, match=r"cols must have shape \(18, 9\)"):
        kernels.col2im(cols, (1, 2, 5, 5), (3, 3), (1, 1), (0, 0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_forward_of_a_fortran_order_input_is_bit_equal_to_reference(dtype):
    """A Fortran-order input (a transposed array): y and the mask come back in x's shape
    with every value written, bit-equal to the reference, as for C-order input."""
    x = np.asfortranarray(np.array([[-1.5, 0.0, 2.0], [np.nan, -0.0, 3.0]], dtype))
    y, positive = kernels.relu_forward(x)
    want, cache = relu_forward(x)
    np.testing.assert_array_equal(y.view(np.uint8), np.ascontiguousarray(want).view(np.uint8))
    np.testing.assert_array_equal(positive, cache.positive)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_max_pool_2x2_at_stride_2_takes_a_nan_anywhere_in_its_window(bad):
    """2x2 windows at stride 2 (the study's pooling) take a branch-free pass that a NaN
    cannot win by comparison; a plane holding a NaN is redone with the reference's rule: a
    NaN wins its window wherever it lies, the first NaN of two. Windows of one row (1, 1, 2,
    10) with a NaN at window positions 1, 2, 3, two NaNs, and an infinity; the expected
    maxima and argmax (i KW + j) are written out by hand."""
    x = np.array([[[[0.0, np.nan, 1.0, 2.0, 4.0, 3.0, 5.0, np.nan, 1.0, 2.0],
                    [-1.0, 0.5, np.nan, 0.0, 2.0, np.nan, 1.0, np.nan, 3.0, bad]]]])
    y, argmax = kernels.max_pool_forward(x, (2, 2), (2, 2))
    want = np.array([[[[np.nan, np.nan, np.nan, np.nan, bad]]]])
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(argmax, [[1, 2, 3, 1, 3]])
    want_ref, cache = max_pool2d_forward(x, kernel_size=2, stride=2)
    np.testing.assert_array_equal(want_ref, want)
    np.testing.assert_array_equal(cache.argmax, argmax)


def test_the_middle_convolution_runs_by_sample_blocks_at_32_samples_and_by_blas_at_64(
        monkeypatch):
    """docs/performance.md ("Threads"): convolutions whose products are below 2^26
    multiply-adds (and whose loops are below 2^22 values) are cut into sample blocks; larger
    ones run in one block on BLAS's and numba's threads. The study's middle convolution,
    16 -> 32 channels, 3x3, at 16 x 16: 32 x 144 x 256 = 1 179 648 multiply-adds a sample,
    37.7 M at 32 samples (blocks), 75.5 M at 64 (> 2^26 = 67.1 M: one block)."""
    from refnorm.kernels import nn as knn

    works = []

    def one_block(fn, n, work):
        works.append(work)
        fn(0, n)

    monkeypatch.setattr(knn, "by_samples", one_block)
    rng = np.random.default_rng(3)
    w = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
    for N in (32, 64):
        x = rng.standard_normal((N, 16, 16, 16)).astype(np.float32)
        knn.conv_forward(x, w, None, (1, 1), (1, 1))
    assert works == [32 * 1_179_648, 0]

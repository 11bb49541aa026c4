"""Max, average and global average pooling: forward against direct loops, backward against
finite differences (max pooling on inputs without ties), the tie rule, errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refnorm.backend import to_numpy
from refnorm.gradcheck import check_vjp, numerical_vjp
from refnorm.nn import (
    avg_pool2d_backward,
    avg_pool2d_forward,
    global_avg_pool_backward,
    global_avg_pool_forward,
    max_pool2d_backward,
    max_pool2d_forward,
)
from tests.nn.reference import max_pool2d_backward_loops, pool2d_loops
from tests.nn.strategies import (
    as_pair,
    distinct_values,
    float_arrays,
    pool_configs,
    small_integers,
)

U64 = np.finfo(np.float64).eps

# Average pooling is linear and max pooling piecewise linear with pieces at least 0.5 wide
# (distinct_values): a central difference with step 0.1 is exact up to rounding, ~1e-15 of
# the outputs' size (<= 20) against gradients of size ~1. A wrong term shows at 1e-2.
FD_STEP = 0.1
FD_TOLERANCE = 1e-8


def kernel_stride(kernel_size, stride):
    kernel = as_pair(kernel_size)
    return kernel, kernel if stride is None else as_pair(stride)


@given(st.data(), pool_configs())
def test_max_pool_forward_and_backward_match_direct_loops(xp, data, config):
    shape, kernel_size, stride = config
    # Small integers: ties are common, and the loops take the first maximum as well.
    x = data.draw(small_integers(shape), label="x")
    y, cache = max_pool2d_forward(xp.asarray(x), kernel_size=kernel_size, stride=stride)
    kernel, strides = kernel_stride(kernel_size, stride)
    np.testing.assert_array_equal(to_numpy(y), pool2d_loops(x, kernel, strides, np.max))
    dy = data.draw(float_arrays(tuple(y.shape)), label="dy")
    dx = max_pool2d_backward(xp.asarray(dy), cache)
    # Each dx is a sum of at most KH KW window gradients, maybe in another order: within
    # KH KW u of the sum of their sizes (the loops on |dy|).
    bound = kernel[0] * kernel[1] * U64 * max_pool2d_backward_loops(x, np.abs(dy), kernel, strides)
    np.testing.assert_array_less(
        np.abs(to_numpy(dx) - max_pool2d_backward_loops(x, dy, kernel, strides)),
        2 * bound + np.finfo(np.float64).tiny)


@given(st.data(), pool_configs())
def test_avg_pool_forward_matches_direct_loops(xp, data, config):
    shape, kernel_size, stride = config
    x = data.draw(float_arrays(shape), label="x")
    y, _ = avg_pool2d_forward(xp.asarray(x), kernel_size=kernel_size, stride=stride)
    kernel, strides = kernel_stride(kernel_size, stride)
    # A mean of KH KW values summed perhaps in another order: within (KH KW + 1) u of the
    # mean of their sizes.
    bound = (kernel[0] * kernel[1] + 1) * U64 * pool2d_loops(np.abs(x), kernel, strides, np.mean)
    np.testing.assert_array_less(np.abs(to_numpy(y) - pool2d_loops(x, kernel, strides, np.mean)),
                                 2 * bound + np.finfo(np.float64).tiny)


@pytest.mark.parametrize("pool", ["max", "avg"])
@given(st.data(), pool_configs())
def test_gradients_match_finite_differences(xp, pool, data, config):
    # Max pooling is differentiable only where each window's maximum is unique: the input
    # has no ties (tested separately below, where finite differences are invalid).
    shape, kernel_size, stride = config
    forward, backward = {"max": (max_pool2d_forward, max_pool2d_backward),
                         "avg": (avg_pool2d_forward, avg_pool2d_backward)}[pool]
    x = data.draw(distinct_values(shape), label="x")

    def f(x):
        return forward(xp.asarray(x), kernel_size=kernel_size, stride=stride)[0]

    def vjp(dy, x):
        _, cache = forward(xp.asarray(x), kernel_size=kernel_size, stride=stride)
        return {"x": backward(xp.asarray(dy), cache)}

    assert check_vjp(f, vjp, {"x": x}, seed=4, step=FD_STEP)["x"].max_rel_error < FD_TOLERANCE


def test_max_pool_ties_send_the_gradient_to_the_first_maximum_in_row_major_order(xp):
    # One 2x3 window per case; the maxima tie. The first in row-major order gets all of dy.
    x = np.array([[[[1.0, 3.0, 0.0],
                    [3.0, 2.0, 3.0]]],
                  [[[5.0, 5.0, 5.0],
                    [5.0, 5.0, 5.0]]]])                     # (2, 1, 2, 3)
    y, cache = max_pool2d_forward(xp.asarray(x), kernel_size=(2, 3))
    np.testing.assert_array_equal(to_numpy(y).ravel(), [3.0, 5.0])
    dx = to_numpy(max_pool2d_backward(xp.asarray(np.array([7.0, -2.0]).reshape(2, 1, 1, 1)),
                                      cache))
    expected = np.zeros_like(x)
    expected[0, 0, 0, 1] = 7.0     # not (1, 0) nor (1, 2): row 0 comes first
    expected[1, 0, 0, 0] = -2.0    # the very first entry of an all-equal window
    np.testing.assert_array_equal(dx, expected)


def test_max_pool_ties_in_overlapping_windows(xp):
    # A constant 3x3 input, 2x2 windows, stride 1: each window's first maximum is its own
    # top-left corner, so dx[p, q] = dy[p, q] on the top-left 2x2 block and 0 elsewhere.
    x = np.ones((1, 1, 3, 3))
    dy = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    _, cache = max_pool2d_forward(xp.asarray(x), kernel_size=2, stride=1)
    dx = to_numpy(max_pool2d_backward(xp.asarray(dy), cache))
    np.testing.assert_array_equal(dx[0, 0], [[1.0, 2.0, 0.0], [3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])


def test_finite_differences_are_invalid_at_a_tie():
    # Raising one tied entry by h raises the max by h; lowering it changes nothing. The
    # central difference is 1/2 for every tied entry, a split no backward should reproduce
    # (its sum, 2 here, is not even a subgradient of the max).
    x = np.full((1, 1, 2, 2), 5.0)
    numeric = numerical_vjp(lambda x: max_pool2d_forward(x, kernel_size=2)[0], {"x": x},
                            np.ones((1, 1, 1, 1)), "x")
    np.testing.assert_allclose(numeric, 0.5, rtol=1e-6)


def test_max_pool_propagates_nan():
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    x[0, 0, 0, 1] = np.nan
    y, _ = max_pool2d_forward(x, kernel_size=2)
    assert np.isnan(y[0, 0, 0, 0]) and np.isfinite(y[0, 0, 1:, :]).all()


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_max_pool_sends_dy_to_the_first_nan_where_pytorch_sends_it_to_the_last(path):
    """The conventions page: a window with two NaN (row-major positions 0 and 2) outputs NaN;
    refnorm's dy goes to the first, PyTorch's CPU kernel's to the last."""
    x = np.array([[[[np.nan, 1.0], [np.nan, 2.0]]]])
    y, cache = max_pool2d_forward(x, kernel_size=2, path=path)
    assert np.isnan(y).all()
    dx = max_pool2d_backward(np.full(y.shape, 3.0), cache, path=path)
    np.testing.assert_array_equal(dx, [[[[3.0, 0.0], [0.0, 0.0]]]])
    torch = pytest.importorskip("torch")
    xt = torch.tensor(x, requires_grad=True)
    torch.nn.functional.max_pool2d(xt, 2).backward(torch.full((1, 1, 1, 1), 3.0,
                                                               dtype=torch.float64))
    np.testing.assert_array_equal(xt.grad.numpy(), [[[[0.0, 0.0], [3.0, 0.0]]]])


def test_avg_pool_backward_spreads_dy_evenly():
    # 2x2 windows, stride 1, over a 3x3 input: position (p, q) is in as many windows as
    # col2im counts, each contributing dy / 4.
    _, cache = avg_pool2d_forward(np.zeros((1, 1, 3, 3)), kernel_size=2, stride=1)
    dx = avg_pool2d_backward(np.ones((1, 1, 2, 2)), cache)
    np.testing.assert_array_equal(dx[0, 0], np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]]) / 4)


@given(st.data(), st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4),
                            st.integers(1, 4)))
def test_global_avg_pool_matches_mean_and_finite_differences(xp, data, shape):
    x = data.draw(float_arrays(shape), label="x")
    y, _ = global_avg_pool_forward(xp.asarray(x))
    # Means of H W values, perhaps summed in another order: within (H W + 1) u of the mean
    # of their sizes.
    bound = (shape[2] * shape[3] + 1) * U64 * np.abs(x).mean(axis=(2, 3))
    np.testing.assert_array_less(np.abs(to_numpy(y) - x.mean(axis=(2, 3))),
                                 2 * bound + np.finfo(np.float64).tiny)

    def f(x):
        return global_avg_pool_forward(xp.asarray(x))[0]

    def vjp(dy, x):
        return {"x": global_avg_pool_backward(xp.asarray(dy),
                                              global_avg_pool_forward(xp.asarray(x))[1])}

    assert check_vjp(f, vjp, {"x": x}, seed=5, step=FD_STEP)["x"].max_rel_error < FD_TOLERANCE


def test_global_avg_pool_backward_is_dy_over_hw_and_writable():
    _, cache = global_avg_pool_forward(np.zeros((2, 3, 4, 5), np.float32))
    dy = np.arange(6.0, dtype=np.float32).reshape(2, 3)
    dx = global_avg_pool_backward(dy, cache)
    assert dx.shape == (2, 3, 4, 5) and dx.dtype == np.float32
    np.testing.assert_array_equal(dx, np.broadcast_to(dy[:, :, None, None] / 20, dx.shape))
    dx[0, 0, 0, 0] = 1.0  # a real array, not a read-only broadcast view


def test_inputs_are_not_modified(xp):
    rng = np.random.default_rng(6)
    for forward, backward in ((max_pool2d_forward, max_pool2d_backward),
                              (avg_pool2d_forward, avg_pool2d_backward)):
        x = xp.asarray(rng.standard_normal((2, 2, 4, 4)))
        dy = xp.asarray(rng.standard_normal((2, 2, 3, 3)))
        x0, dy0 = to_numpy(x).copy(), to_numpy(dy).copy()
        backward(dy, forward(x, kernel_size=2, stride=1)[1])
        np.testing.assert_array_equal(to_numpy(x), x0)
        np.testing.assert_array_equal(to_numpy(dy), dy0)


@pytest.mark.parametrize("forward", [max_pool2d_forward, avg_pool2d_forward])
def test_dtypes_are_kept(forward):
    for dtype in (np.float16, np.float32, np.float64):
        x = np.arange(16.0).reshape(1, 1, 4, 4).astype(dtype)
        y, cache = forward(x, kernel_size=2)
        backward = max_pool2d_backward if forward is max_pool2d_forward else avg_pool2d_backward
        assert y.dtype == dtype and backward(np.ones_like(y), cache).dtype == dtype


X = np.ones((2, 3, 4, 4))
MAX_CACHE = max_pool2d_forward(X, kernel_size=2)[1]


@pytest.mark.parametrize("forward", [max_pool2d_forward, avg_pool2d_forward])
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"kernel_size": 5}, ValueError,
         r"kernel \(KH, KW\) = \(5, 5\) must fit in the padded input .* = \(4, 4\)"),
        ({"kernel_size": (2, 0)}, ValueError, r"kernel_size must be >= 1.*got \(2, 0\)"),
        ({"kernel_size": 2, "stride": 0}, ValueError, r"stride must be >= 1.*got 0"),
        ({"kernel_size": 2.0}, TypeError, r"kernel_size must be an int or a pair of ints"),
    ],
)
def test_window_errors(forward, kwargs, error, match):
    with pytest.raises(error, match=match):
        forward(X, **kwargs)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: max_pool2d_forward(np.ones((3, 4, 4)), kernel_size=2), ValueError,
         r"x must have layout \(N, C, H, W\), 4 dimensions; got shape \(3, 4, 4\)"),
        (lambda: max_pool2d_forward(X, 2), TypeError, r"positional argument"),
        (lambda: max_pool2d_backward(np.ones((2, 3, 4, 4)), MAX_CACHE), ValueError,
         r"dy must have shape \(2, 3, 2, 2\); got \(2, 3, 4, 4\)"),
        (lambda: max_pool2d_backward([[1.0]], MAX_CACHE), TypeError,
         r"^dy must be an array; got list$"),
        (lambda: avg_pool2d_backward(np.ones((2, 3, 2, 2)), MAX_CACHE), TypeError,
         r"cache must be a PoolCache; got MaxPool2dCache"),
        (lambda: global_avg_pool_forward(np.ones((2, 3))), ValueError,
         r"x must have layout \(N, C, \*spatial\) with a spatial axis, at least 3 dimensions; "
         r"got shape \(2, 3\)"),
        (lambda: global_avg_pool_backward(np.ones((2, 4)), global_avg_pool_forward(X)[1]),
         ValueError, r"dy must have shape \(2, 3\); got \(2, 4\)"),
    ],
)
def test_errors_name_the_argument_expected_and_got(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_max_pool_layer_uses_its_own_stride():
    """MaxPool2d(2, stride=1) has overlapping windows: 3 x 3 outputs on a 4 x 4 input, equal
    to the pure function with stride 1 (the layer once passed its kernel size as the stride,
    and its gradient check still held: that forward and backward agree with each other)."""
    from refnorm.nn import MaxPool2d

    x = np.random.default_rng(0).permutation(32).astype(np.float64).reshape(2, 1, 4, 4)
    y = MaxPool2d(2, stride=1).forward(x, training=True)
    assert y.shape == (2, 1, 3, 3)
    np.testing.assert_array_equal(y, max_pool2d_forward(x, kernel_size=2, stride=1)[0])


@pytest.mark.parametrize("shape", [(2, 3, 5), (2, 3, 4, 5), (2, 3, 2, 3, 4)],
                         ids=["1d", "2d", "3d"])
def test_global_avg_pool_backward_spreads_dy_over_all_positions(shape):
    """dy / prod(spatial) at every position, for any number of spatial axes (the documented
    (N, C, *spatial)), not only H x W: every other test used 4-D inputs."""
    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal(shape), rng.standard_normal(shape[:2])
    y, cache = global_avg_pool_forward(x)
    np.testing.assert_allclose(y, x.reshape(shape[0], shape[1], -1).mean(axis=2))
    count = int(np.prod(shape[2:]))
    expected = np.broadcast_to(dy.reshape(shape[:2] + (1,) * (len(shape) - 2)) / count, shape)
    np.testing.assert_allclose(global_avg_pool_backward(dy, cache), expected, rtol=1e-15)


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_float16_avg_pool_backward_sums_overlapping_windows_in_float32(path):
    """3x3 windows at stride 1 overlap up to 9 times: dx is the float32 sum of dy / 9 rounded
    once to float16."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float16)
    y, cache = avg_pool2d_forward(x, kernel_size=3, stride=1, path=path)
    dy = rng.standard_normal(y.shape).astype(np.float16)
    dx = avg_pool2d_backward(dy, cache, path=path)
    _, cache32 = avg_pool2d_forward(x.astype(np.float32), kernel_size=3, stride=1, path=path)
    expected = avg_pool2d_backward(dy.astype(np.float32), cache32, path=path)
    assert dx.dtype == np.float16
    np.testing.assert_array_equal(dx, expected.astype(np.float16))


@pytest.mark.parametrize("shape", [(2, 3, 0, 4), (2, 3, 4, 0), (2, 3, 0), (2, 3, 2, 2, 0)])
def test_global_avg_pool_refuses_an_empty_spatial_axis(shape):
    with pytest.raises(ValueError, match="at least one position"):
        global_avg_pool_forward(np.ones(shape))


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_float16_max_pool_backward_sums_overlapping_windows_in_float32(path):
    """A peak that is the maximum of all nine 3x3 windows (stride 1) of a 5x5 input receives
    the sum of their nine dy, computed in float32 and rounded once to float16:
    1 + 8 * 2^-11 = 1 + 2^-8, a float16 value. Summed in float16 starting from the 1, each
    2^-11 is half a float16 spacing and rounds away (ties to even), leaving 1."""
    x = np.zeros((1, 1, 5, 5), np.float16)
    x[0, 0, 2, 2] = 1.0
    dy = np.full((1, 1, 3, 3), 2.0**-11, np.float16)
    dy[0, 0, 2, 2] = 1.0
    _, cache = max_pool2d_forward(x, kernel_size=3, stride=1, path=path)
    dx = max_pool2d_backward(dy, cache, path=path)
    expected = np.zeros((1, 1, 5, 5), np.float16)
    expected[0, 0, 2, 2] = 1.0 + 2.0**-8
    assert dx.dtype == np.float16
    np.testing.assert_array_equal(dx, expected)


def test_fast_max_pool_takes_the_stride_of_each_call():
    """The fast path checks an argument signature once and remembers the window; the stride
    is part of that signature, so calls that differ only in the stride each get their own
    windows, as on the reference path."""
    x = np.random.default_rng(2).permutation(50).astype(np.float64).reshape(1, 2, 5, 5)
    for stride in (2, 1, (1, 2), None, 1):
        y, _ = max_pool2d_forward(x, kernel_size=2, stride=stride, path="fast")
        expected, _ = max_pool2d_forward(x, kernel_size=2, stride=stride, path="reference")
        np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize("forward", [max_pool2d_forward, avg_pool2d_forward])
def test_fast_pooling_refuses_a_bool_window_after_the_equal_int(forward):
    """The fast path remembers an argument signature it has checked; True equals 1 and hashes
    like it, so the signature holds the types too: a bool stride or kernel size after the
    int one is refused as the reference refuses it."""
    x = np.random.default_rng(3).standard_normal((1, 2, 4, 4))
    forward(x, kernel_size=2, stride=1, path="fast")  # valid: checked and remembered
    with pytest.raises(TypeError, match=r"stride must be an int or a pair of ints; got True"):
        forward(x, kernel_size=2, stride=True, path="fast")
    forward(x, kernel_size=1, path="fast")
    with pytest.raises(TypeError, match=r"kernel_size must be an int or a pair of ints"):
        forward(x, kernel_size=True, path="fast")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_fast_max_pool_cache_equals_the_reference_cache(dtype):
    """Either backward can take either forward's cache: the fast forward records the same
    argmax, shapes and dtypes, float16 computing in float32."""
    x = np.random.default_rng(4).standard_normal((2, 3, 5, 6)).astype(dtype)
    _, fast = max_pool2d_forward(x, kernel_size=(2, 3), stride=(1, 2), path="fast")
    _, ref = max_pool2d_forward(x, kernel_size=(2, 3), stride=(1, 2), path="reference")
    assert fast.pool == ref.pool
    assert fast.pool.compute_dtype == (np.float32 if dtype == np.float16 else dtype)
    np.testing.assert_array_equal(fast.argmax, ref.argmax)


def test_global_avg_pool_backward_divides_in_the_precision_of_x():
    """x float64 over 3 positions, dy float32 = 1: every position gets 1/3 in float64 (dy is
    cast to x's compute dtype before the division), not float32's 1/3 widened."""
    _, cache = global_avg_pool_forward(np.zeros((1, 1, 3, 1)))
    dx = global_avg_pool_backward(np.ones((1, 1), np.float32), cache)
    assert dx.dtype == np.float64
    np.testing.assert_array_equal(dx, np.full((1, 1, 3, 1), 1.0 / 3.0))


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_avg_pool_backward_of_a_non_square_window_spreads_dy_over_its_kh_kw_entries(path):
    """Non-overlapping 2 x 3 windows tile a 4 x 6 input: each entry receives its window's dy
    divided by KH KW = 6 (not KH^2 or KW^2), i.e. dy repeated over each window, over 6."""
    dy = np.random.default_rng(12).standard_normal((2, 3, 2, 2))
    x = np.zeros((2, 3, 4, 6))
    _, cache = avg_pool2d_forward(x, kernel_size=(2, 3), path=path)
    dx = avg_pool2d_backward(dy, cache, path=path)
    expected = np.repeat(np.repeat(dy, 2, axis=2), 3, axis=3) / 6
    np.testing.assert_allclose(dx, expected, rtol=4 * U64, atol=0)  # one division each


@pytest.mark.parametrize("forward", [max_pool2d_forward, avg_pool2d_forward])
@pytest.mark.parametrize("path", ["reference", "fast"])
def test_pooling_refuses_an_input_without_four_axes_by_name(forward, path):
    with pytest.raises(ValueError, match=r"x must have layout \(N, C, H, W\), 4 dimensions; "
                                         r"got shape \(2, 4, 4\)"):
        forward(np.ones((2, 4, 4)), kernel_size=2, path=path)


def _pool_cache_edits():
    """Caches whose fields disagree, each made from a valid one by editing a field of its
    PoolCache (or the argmax)."""
    return [
        ("x_shape", lambda p: {"x_shape": (2, 3, 6)}),
        ("window", lambda p: {"window": p.window._replace(out=(3, 2))}),
        ("y_shape", lambda p: {"y_shape": (2, 3, 2, 3)}),
    ]


@pytest.mark.parametrize(("field", "edit"), _pool_cache_edits(),
                         ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("pool", ["max", "avg"])
def test_fast_pooling_backward_refuses_a_cache_whose_fields_disagree(pool, field, edit):
    """The fast backwards' loops turn the cache's shapes into addresses: a cache edited by
    hand so that a field no longer agrees with the others is refused by name, not read or
    written outside its arrays."""
    rng = np.random.default_rng(13)
    x = rng.standard_normal((2, 3, 5, 6))
    forward, backward = ((max_pool2d_forward, max_pool2d_backward) if pool == "max"
                         else (avg_pool2d_forward, avg_pool2d_backward))
    _, cache = forward(x, kernel_size=(2, 3), stride=(2, 1), path="fast")
    if pool == "max":
        bad = dataclasses.replace(cache, pool=dataclasses.replace(cache.pool, **edit(cache.pool)))
        y_shape = bad.pool.y_shape
    else:
        bad = dataclasses.replace(cache, **edit(cache))
        y_shape = bad.y_shape
    with pytest.raises(ValueError, match=r"the cache's fields disagree \(" + field):
        backward(rng.standard_normal(y_shape), bad, path="fast")


@pytest.mark.parametrize("argmax", [
    lambda a: a[:, :-1],                          # one window short
    lambda a: a.astype(np.float64),               # not indices
], ids=["shape", "dtype"])
def test_fast_max_pool_backward_refuses_an_argmax_the_forward_cannot_make(argmax):
    rng = np.random.default_rng(14)
    _, cache = max_pool2d_forward(rng.standard_normal((2, 3, 4, 6)), kernel_size=2, path="fast")
    bad = dataclasses.replace(cache, argmax=argmax(cache.argmax))
    with pytest.raises(ValueError, match=r"the cache's fields disagree \(argmax of shape"):
        max_pool2d_backward(rng.standard_normal(cache.pool.y_shape), bad, path="fast")


@pytest.mark.parametrize(("kernel_size", "stride"), [(2, None), ((2, 3), (1, 2)), (3, 4), (1, 1)])
def test_fast_avg_pool_forward_matches_direct_loops(kernel_size, stride):
    x = np.random.default_rng(16).standard_normal((2, 3, 7, 8)) * 5 + 12
    y, _ = avg_pool2d_forward(x, kernel_size=kernel_size, stride=stride, path="fast")
    kernel, strides = kernel_stride(kernel_size, stride)
    # as the reference: a mean of KH KW values, within (KH KW + 1) u of the mean of their sizes
    bound = (kernel[0] * kernel[1] + 1) * U64 * pool2d_loops(np.abs(x), kernel, strides, np.mean)
    np.testing.assert_array_less(np.abs(y - pool2d_loops(x, kernel, strides, np.mean)), 2 * bound)


@pytest.mark.parametrize("forward", [max_pool2d_forward, avg_pool2d_forward])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_fast_pooling_keeps_the_dtype(forward, dtype):
    x = np.arange(16.0).reshape(1, 1, 4, 4).astype(dtype)
    y, cache = forward(x, kernel_size=2, stride=1, path="fast")
    backward = max_pool2d_backward if forward is max_pool2d_forward else avg_pool2d_backward
    assert y.dtype == dtype and backward(np.ones_like(y), cache, path="fast").dtype == dtype


@pytest.mark.parametrize("bad", [(True, 2), (1.0, 2), (1, 2.0)])
@pytest.mark.parametrize("argument", ["kernel_size", "stride"])
def test_fast_max_pool_refuses_a_pair_with_a_bool_or_float_entry_after_the_equal_int_pair(
        argument, bad):
    """(True, 2) and (1.0, 2) equal (1, 2) and hash like it; the remembered signature tells
    them apart, so the fast path refuses them after (1, 2) as the reference does."""
    x = np.random.default_rng(18).standard_normal((1, 2, 4, 4))
    kwargs = {"kernel_size": 2, "stride": 2, argument: (1, 2)}
    max_pool2d_forward(x, **kwargs, path="fast")  # valid: checked and remembered
    with pytest.raises(TypeError, match=rf"{argument} must be an int or a pair of ints"):
        max_pool2d_forward(x, **{**kwargs, argument: bad}, path="fast")

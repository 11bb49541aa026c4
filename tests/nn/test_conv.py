"""conv2d by im2col: forward against direct loops, backward against finite differences,
im2col/col2im adjoint, errors, dtypes; over numpy and array_api_strict (the ``xp`` fixture)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refnorm.backend import to_numpy
from refnorm.gradcheck import check_vjp
from refnorm.nn import col2im, conv2d_backward, conv2d_forward, im2col, sliding_window
from tests.nn.reference import conv2d_loops
from tests.nn.strategies import as_pair, conv_arrays, conv_configs, float_arrays

U64 = np.finfo(np.float64).eps

# conv2d is linear in x and in w (and in b) separately, so the central difference along one
# element is exact for any step: with a step of 1 what is left is the rounding of the two
# sums L it subtracts, ~1e-16 of the outputs' size (<= 30 here) against gradients of size
# >= 1e-3 (no drawn value is smaller but 0), < 1e-11. A wrong or missing term shows at 1e-2.
FD_STEP = 1.0
FD_TOLERANCE = 1e-8


@given(data=st.data(), config=conv_configs())
def test_forward_matches_direct_loops(xp, data, config):
    x, w, b = data.draw(conv_arrays(config), label="x, w, b")
    _, (_, C_in, KH, KW), stride, padding, _ = config
    y, _ = conv2d_forward(xp.asarray(x), xp.asarray(w), None if b is None else xp.asarray(b),
                          stride=stride, padding=padding)
    expected = conv2d_loops(x, w, b, as_pair(stride), as_pair(padding))
    assert tuple(y.shape) == expected.shape
    # The same K + 1 terms (K = C_in KH KW products and the bias) summed in another order:
    # each sum is within K u of the sum of the terms' sizes, which the loops give on |x|, |w|.
    K = C_in * KH * KW
    sizes = conv2d_loops(np.abs(x), np.abs(w), None if b is None else np.abs(b),
                         as_pair(stride), as_pair(padding))
    np.testing.assert_array_less(np.abs(to_numpy(y) - expected), 2 * (K + 1) * U64 * sizes
                                 + np.finfo(np.float64).tiny)


@given(data=st.data(), config=conv_configs())
def test_gradients_match_finite_differences(xp, data, config):
    x, w, b = data.draw(conv_arrays(config), label="x, w, b")
    _, _, stride, padding, bias = config

    def f(x, w, b=None):
        b = None if b is None else xp.asarray(b)
        return conv2d_forward(xp.asarray(x), xp.asarray(w), b, stride=stride, padding=padding)[0]

    def vjp(dy, x, w, b=None):
        b = None if b is None else xp.asarray(b)
        _, cache = conv2d_forward(xp.asarray(x), xp.asarray(w), b, stride=stride,
                                  padding=padding)
        dx, dw, db = conv2d_backward(xp.asarray(dy), cache)
        return {"x": dx, "w": dw} | ({"b": db} if bias else {})

    inputs = {"x": x, "w": w} | ({"b": b} if bias else {})
    errors = check_vjp(f, vjp, inputs, seed=1, step=FD_STEP)
    assert set(errors) == set(inputs)
    for name, err in errors.items():
        assert err.max_rel_error < FD_TOLERANCE, (name, err)


@given(data=st.data(), config=conv_configs())
def test_col2im_is_the_adjoint_of_im2col(xp, data, config):
    x_shape, (_, _, KH, KW), stride, padding, _ = config
    x = data.draw(float_arrays(x_shape), label="x")
    kw = {"kernel_size": (KH, KW), "stride": stride, "padding": padding}
    cols = to_numpy(im2col(xp.asarray(x), **kw))
    c = data.draw(float_arrays(cols.shape), label="c")
    back = to_numpy(col2im(xp.asarray(c), x_shape, **kw))
    assert tuple(back.shape) == x_shape
    # <im2col(x), c> = <x, col2im(c)>: the same products (padding contributes zeros) summed
    # in another grouping; each side is within n u of the sum of the products' sizes.
    lhs = float(np.sum(cols * c))
    rhs = float(np.sum(x * back))
    assert abs(lhs - rhs) <= 2 * c.size * U64 * float(np.sum(np.abs(cols * c)))


def test_im2col_columns_are_the_zero_padded_windows():
    x = np.arange(1.0, 13.0).reshape(1, 1, 3, 4)   # 1..12
    cols = im2col(x, kernel_size=2, stride=(2, 3), padding=1)
    # Padded input (5, 6); windows at rows 0, 2 and columns 0, 3: H_out = 2, W_out = 2.
    assert cols.shape == (4, 4)
    x_pad = np.pad(x[0, 0], 1)
    expected = np.stack([x_pad[p:p + 2, q:q + 2].ravel() for p in (0, 2) for q in (0, 3)], 1)
    np.testing.assert_array_equal(cols, expected)


def test_col2im_adds_overlapping_windows_and_drops_the_padding():
    # A 3x3 input, 2x2 windows with stride 1 and no padding: the centre is in 4 windows,
    # edge centres in 2, corners in 1.
    ones = np.ones((4, 4))
    np.testing.assert_array_equal(
        col2im(ones, (1, 1, 3, 3), kernel_size=2)[0, 0], [[1, 2, 1], [2, 4, 2], [1, 2, 1]])
    # With padding 1 and stride 2 the windows tile the padded 4x4 exactly: every input
    # position once, the padding dropped.
    np.testing.assert_array_equal(
        col2im(np.ones((4, 4)), (1, 1, 2, 2), kernel_size=2, stride=2, padding=1)[0, 0],
        np.ones((2, 2)))


def test_rows_and_columns_no_window_reaches_get_zero_gradient():
    # H = 6, KH = 3, stride 2: windows start at rows 0 and 2, so row 5 is never read.
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((1, 1, 6, 6)), rng.standard_normal((1, 1, 3, 3))
    y, cache = conv2d_forward(x, w, stride=2)
    assert y.shape == (1, 1, 2, 2)
    dx, _, _ = conv2d_backward(rng.standard_normal(y.shape), cache)
    np.testing.assert_array_equal(dx[0, 0, 5, :], 0.0)
    np.testing.assert_array_equal(dx[0, 0, :, 5], 0.0)
    assert np.all(dx[0, 0, :5, :5] != 0.0)


def test_without_bias_db_is_none_and_with_zero_bias_the_output_is_equal():
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((2, 3, 4, 4)), rng.standard_normal((2, 3, 3, 3))
    y, cache = conv2d_forward(x, w, padding=1)
    y0, cache0 = conv2d_forward(x, w, np.zeros(2), padding=1)
    np.testing.assert_array_equal(y, y0)
    dy = rng.standard_normal(y.shape)
    dx, dw, db = conv2d_backward(dy, cache)
    dx0, dw0, db0 = conv2d_backward(dy, cache0)
    assert db is None
    np.testing.assert_array_equal(dx, dx0)
    np.testing.assert_array_equal(dw, dw0)
    np.testing.assert_allclose(db0, dy.sum(axis=(0, 2, 3)), rtol=1e-12)


def test_inputs_are_not_modified(xp):
    rng = np.random.default_rng(2)
    args = [xp.asarray(a) for a in (rng.standard_normal((2, 2, 5, 5)),
                                    rng.standard_normal((3, 2, 3, 2)), rng.standard_normal(3))]
    before = [to_numpy(a).copy() for a in args]
    y, cache = conv2d_forward(*args, stride=(2, 1), padding=1)
    dy = xp.asarray(rng.standard_normal(tuple(y.shape)))
    dy_before = to_numpy(dy).copy()
    conv2d_backward(dy, cache)
    for a, b in zip(args, before, strict=True):
        np.testing.assert_array_equal(to_numpy(a), b)
    np.testing.assert_array_equal(to_numpy(dy), dy_before)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float32_and_float64_keep_their_dtype(dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 2, 4, 4)).astype(dtype)
    w = rng.standard_normal((3, 2, 2, 2)).astype(dtype)
    y, cache = conv2d_forward(x, w, np.zeros(3, dtype))
    grads = conv2d_backward(np.ones_like(y), cache)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)


def test_float16_computes_in_float32_and_returns_float16():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 5, 5)).astype(np.float16)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float16)
    y, cache = conv2d_forward(x, w)
    y32, _ = conv2d_forward(x.astype(np.float32), w.astype(np.float32))
    assert y.dtype == np.float16 and cache.cols.dtype == np.float32
    # The float32 result rounded once to float16: equal to the rounding of y32.
    np.testing.assert_array_equal(y, y32.astype(np.float16))
    dx, dw, db = conv2d_backward(np.ones_like(y), cache)
    assert dx.dtype == dw.dtype == np.float16 and db is None


def test_sliding_window_counts_positions():
    win = sliding_window((1, 1, 7, 5), kernel_size=(3, 2), stride=(2, 3), padding=(0, 1))
    assert win.kernel == (3, 2) and win.stride == (2, 3) and win.padding == (0, 1)
    # Rows: windows of 3 start at 0, 2, 4 (one at 6 would need rows 6..8 of 7). Columns of
    # the padded width 7: windows of 2 start at 0 and 3 (6 would need columns 6..7).
    assert win.out == (3, 2)


X = np.ones((2, 3, 5, 5))
W = np.ones((4, 3, 3, 3))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: conv2d_forward(X, np.ones((4, 2, 3, 3))), ValueError,
         r"x must have C_in = w.shape\[1\] = 2 channels on axis 1.*got x of shape \(2, 3, 5, 5\)"),
        (lambda: conv2d_forward(X, np.ones((4, 3, 6, 3))), ValueError,
         r"kernel \(KH, KW\) = \(6, 3\) must fit in the padded input .* = \(5, 5\)"),
        (lambda: conv2d_forward(X, np.ones((4, 3, 6, 3)), padding=(0, 0)), ValueError,
         r"must fit in the padded input"),
        (lambda: conv2d_forward(X, W, stride=0), ValueError, r"stride must be >= 1.*got 0"),
        (lambda: conv2d_forward(X, W, stride=(1, -2)), ValueError,
         r"stride must be >= 1.*got \(1, -2\)"),
        (lambda: conv2d_forward(X, W, padding=-1), ValueError, r"padding must be >= 0.*got -1"),
        (lambda: conv2d_forward(X, W, stride=1.5), TypeError,
         r"stride must be an int or a pair of ints; got 1.5"),
        (lambda: conv2d_forward(X, W, padding=(1, 1, 1)), TypeError,
         r"padding must be an int or a pair of ints; got \(1, 1, 1\)"),
        (lambda: conv2d_forward(X, W, stride=True), TypeError, r"stride must be an int"),
        (lambda: conv2d_forward(np.ones((3, 5, 5)), W), ValueError,
         r"x must have layout \(N, C_in, H, W\), 4 dimensions; got shape \(3, 5, 5\)"),
        (lambda: conv2d_forward(X, np.ones((4, 3, 3))), ValueError,
         r"w must have layout \(C_out, C_in, KH, KW\), 4 dimensions; got shape \(4, 3, 3\)"),
        (lambda: conv2d_forward(X, W, np.ones(3)), ValueError,
         r"b must have shape \(C_out,\) = \(4,\).*got shape \(3,\)"),
        (lambda: conv2d_forward(X.astype(int), W), TypeError,
         r"x must have a real floating-point dtype; got int64"),
        (lambda: conv2d_forward(X, W.astype(np.complex128)), TypeError,
         r"w must have a real floating-point dtype; got complex128"),
        (lambda: conv2d_forward([[1.0]], W), TypeError, r"x must be an array; got list"),
        (lambda: conv2d_backward(np.ones((2, 4, 2, 2)), conv2d_forward(X, W)[1]), ValueError,
         r"dy must have shape \(2, 4, 3, 3\); got \(2, 4, 2, 2\)"),
        (lambda: conv2d_backward(np.ones((2, 4, 3, 3)), object()), TypeError,
         r"cache must be a Conv2dCache; got object"),
        (lambda: im2col(X, kernel_size=0), ValueError, r"kernel_size must be >= 1"),
        (lambda: col2im(np.ones((27, 5)), (2, 3, 5, 5), kernel_size=3), ValueError,
         r"cols must have shape \(C KH KW, N H_out W_out\) = \(27, 18\).*got \(27, 5\)"),
        (lambda: col2im(np.ones((27, 18)), (2, 3, 5), kernel_size=3), TypeError,
         r"x_shape must be a tuple of 4 ints"),
    ],
)
def test_errors_name_the_argument_expected_and_got(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_mixed_namespaces_are_refused():
    strict = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError, match=r"one array namespace"):
        conv2d_forward(X, strict.asarray(W))


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_without_input_grad_dx_is_none_and_dw_db_are_unchanged(path):
    rng = np.random.default_rng(5)
    x, w, b = rng.standard_normal((2, 3, 6, 5)), rng.standard_normal((4, 3, 3, 3)), np.ones(4)
    y, cache = conv2d_forward(x, w, b, stride=(2, 1), padding=1, path=path)
    dy = rng.standard_normal(y.shape)
    dx, dw, db = conv2d_backward(dy, cache, path=path)
    none, dw2, db2 = conv2d_backward(dy, cache, input_grad=False, path=path)
    assert dx is not None and none is None
    np.testing.assert_array_equal(dw2, dw)
    np.testing.assert_array_equal(db2, db)
    with pytest.raises(TypeError, match="input_grad must be a bool"):
        conv2d_backward(dy, cache, input_grad=1, path=path)


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_conv_gradients_have_the_dtypes_of_x_w_and_b(path):
    """dx in x's dtype, dw in w's, db in b's, with all three different."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 2, 5, 5)).astype(np.float32)
    w = rng.standard_normal((3, 2, 3, 3))                          # float64
    b = np.zeros(3, np.float16)
    y, cache = conv2d_forward(x, w, b, padding=1, path=path)
    assert y.dtype == np.float32
    dx, dw, db = conv2d_backward(np.ones_like(y), cache, path=path)
    assert (dx.dtype, dw.dtype, db.dtype) == (np.float32, np.float64, np.float16)


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_float16_conv_adds_a_float32_bias_in_float32(path):
    """x and w float16, b float32: the bias is added in the compute dtype (float32) and the sum
    rounded once to float16, as the whole computation in float32 rounded once."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float16)
    w = (0.3 * rng.standard_normal((4, 3, 3, 3))).astype(np.float16)
    b = (100 * rng.standard_normal(4)).astype(np.float32)          # not float16 values
    assert not np.array_equal(b.astype(np.float16).astype(np.float32), b)
    y, _ = conv2d_forward(x, w, b, path=path)
    y32, _ = conv2d_forward(x.astype(np.float32), w.astype(np.float32), b, path=path)
    assert y.dtype == np.float16
    np.testing.assert_array_equal(y, y32.astype(np.float16))


@pytest.mark.parametrize("x_shape", [(6, 6), (1, 3, 6), [1, 3, 6, 6], (1, 3, 6.0, 6)])
def test_sliding_window_refuses_an_x_shape_that_is_not_four_ints(x_shape):
    with pytest.raises(TypeError, match="x_shape must be a tuple of 4 ints"):
        sliding_window(x_shape, kernel_size=3)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_im2col_and_col2im_keep_the_dtype_with_padding_and_stride(dtype):
    """Both return their input's dtype (their docstrings): the zero rows and columns im2col
    pads with, and the sum col2im accumulates into, are made in that dtype, not in the
    namespace's default float64, so a float32 convolution with padding computes in float32
    as its cache says."""
    x = np.arange(24.0).reshape(1, 2, 3, 4).astype(dtype)
    kw = {"kernel_size": (2, 3), "stride": (2, 1), "padding": (1, 2)}
    cols = im2col(x, **kw)
    assert cols.dtype == dtype
    assert col2im(cols, x.shape, **kw).dtype == dtype
    w = np.ones((1, 2, 2, 3), dtype)
    _, cache = conv2d_forward(x, w, padding=1)
    assert cache.cols.dtype == (np.float32 if dtype == np.float16 else dtype)


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_a_float64_bias_is_added_to_a_float32_convolution_in_float32(path):
    """Like w, b is cast to the compute dtype of x and added there, the sum rounded once.
    With y = 1 and b = 2^-24 + 2^-50: b rounds to 2^-24 in float32, and 1 + 2^-24 is a tie
    that rounds to 1; added in float64 the sum lies just above the tie and the cast to
    float32 gives 1 + 2^-23."""
    x, w = np.ones((1, 1, 2, 2), np.float32), np.ones((1, 1, 2, 2), np.float32) / 4
    b = np.array([2.0**-24 + 2.0**-50])
    y, _ = conv2d_forward(x, w, b, path=path)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, [[[[1.0]]]])
    np.testing.assert_array_equal(y, conv2d_forward(x, w, b.astype(np.float32), path=path)[0])


def test_a_bias_from_another_namespace_is_refused():
    strict = pytest.importorskip("array_api_strict")
    x, w = np.ones((2, 3, 5, 5)), np.ones((4, 3, 3, 3))
    with pytest.raises(TypeError, match=r"one array namespace"):
        conv2d_forward(x, w, strict.asarray(np.ones(4)))


def test_backward_refuses_an_upstream_gradient_from_another_namespace():
    strict = pytest.importorskip("array_api_strict")
    x, w = np.ones((2, 3, 5, 5)), np.ones((4, 3, 3, 3))
    for xp_cache, xp_dy in ((np, strict), (strict, np)):
        _, cache = conv2d_forward(xp_cache.asarray(x), xp_cache.asarray(w))
        with pytest.raises(TypeError, match=r"one array namespace"):
            conv2d_backward(xp_dy.asarray(np.ones((2, 4, 3, 3))), cache)


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_backward_ignores_an_in_place_change_of_w_after_forward(path):
    """The cache holds its own copy of the weights (dcols = W^T dY): changing the caller's w
    in place between forward and backward (an optimizer step on a shared array) leaves dx
    as the forward's weights give it, on both paths."""
    rng = np.random.default_rng(8)
    x = 5 * rng.standard_normal((2, 2, 5, 4)) + 12
    w = rng.standard_normal((3, 2, 3, 2))
    y, cache = conv2d_forward(x, w, stride=(2, 1), padding=1, path=path)
    dy = rng.standard_normal(y.shape)
    _, fresh = conv2d_forward(x, w.copy(), stride=(2, 1), padding=1, path=path)
    dx_want, dw_want, _ = conv2d_backward(dy, fresh, path=path)
    w += 1.0
    dx, dw, _ = conv2d_backward(dy, cache, path=path)
    np.testing.assert_array_equal(dx, dx_want)
    np.testing.assert_array_equal(dw, dw_want)


def test_fast_conv_refuses_a_bias_of_another_shape_after_a_valid_one():
    """The fast path remembers the argument signature it has checked; b's shape is part of
    it, so a (1, C_out) or (C_out, 1) bias after a (C_out,) one is refused as the reference
    refuses it, not reshaped into place by the kernel."""
    rng = np.random.default_rng(9)
    x, w = rng.standard_normal((1, 2, 4, 4)), rng.standard_normal((3, 2, 2, 2))
    conv2d_forward(x, w, np.zeros(3), path="fast")  # valid: checked and remembered
    for b in (np.zeros((1, 3)), np.zeros((3, 1))):
        with pytest.raises(ValueError, match=r"b must have shape \(C_out,\) = \(3,\)"):
            conv2d_forward(x, w, b, path="fast")


def test_fast_conv_refuses_a_bool_padding_and_an_integer_bias_after_valid_ones():
    """The fast path remembers the argument signature it has checked; True equals 1 and an
    integer bias has the float bias's shape, so the signature holds the padding's type and
    b's dtype: each is refused after the valid call as the reference refuses it."""
    rng = np.random.default_rng(10)
    x, w = rng.standard_normal((1, 2, 4, 4)), rng.standard_normal((3, 2, 2, 2))
    conv2d_forward(x, w, np.zeros(3), padding=1, path="fast")  # valid: checked and remembered
    with pytest.raises(TypeError, match=r"padding must be an int or a pair of ints; got True"):
        conv2d_forward(x, w, np.zeros(3), padding=True, path="fast")
    with pytest.raises(TypeError, match=r"b must have a real floating-point dtype; got int64"):
        conv2d_forward(x, w, np.zeros(3, dtype=np.int64), padding=1, path="fast")


def _conv_cache_edits():
    """Caches whose fields disagree, each made from a valid one by editing a field."""
    return [
        ("x_shape", lambda c: {"x_shape": (2, 3, 5, 5)}),  # 3 channels for w's 2
        ("y_shape", lambda c: {"y_shape": (2, 4, 3, 4)}),  # dy of this shape passes its check
        ("cols", lambda c: {"cols": c.cols.astype(np.int64)}),
        ("w_mat", lambda c: {"w_mat": c.w_mat[:, :-1]}),
    ]


@pytest.mark.parametrize(("field", "edit"), _conv_cache_edits(), ids=lambda v: v
                         if isinstance(v, str) else "")
def test_fast_conv_backward_refuses_a_cache_whose_fields_disagree(field, edit):
    """The fast backward's loops turn the cache's shapes into addresses: a cache edited by
    hand so that a field no longer agrees with the others is refused by name, not read
    outside its arrays."""
    rng = np.random.default_rng(11)
    x, w = rng.standard_normal((2, 2, 5, 5)), rng.standard_normal((4, 2, 3, 2))
    _, cache = conv2d_forward(x, w, stride=(1, 2), padding=(0, 1), path="fast")
    bad = dataclasses.replace(cache, **edit(cache))
    dy = rng.standard_normal(bad.y_shape)
    with pytest.raises(ValueError, match=r"the cache's fields disagree \(" + field):
        conv2d_backward(dy, bad, path="fast")


@pytest.mark.parametrize("bad", [(True, 2), (1.0, 2), (1, 2.0)])
@pytest.mark.parametrize("argument", ["stride", "padding"])
def test_fast_conv_refuses_a_pair_with_a_bool_or_float_entry_after_the_equal_int_pair(argument,
                                                                                      bad):
    """(True, 2) and (1.0, 2) equal (1, 2) and hash like it; the remembered signature tells
    them apart, so the fast path refuses them after (1, 2) as the reference does."""
    rng = np.random.default_rng(17)
    x, w = rng.standard_normal((1, 2, 5, 5)), rng.standard_normal((3, 2, 2, 2))
    conv2d_forward(x, w, **{argument: (1, 2)}, path="fast")  # valid: checked and remembered
    with pytest.raises(TypeError, match=rf"{argument} must be an int or a pair of ints"):
        conv2d_forward(x, w, **{argument: bad}, path="fast")

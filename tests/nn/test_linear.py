"""linear: forward against x @ w.T + b, backward against finite differences, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refnorm.backend import to_numpy
from refnorm.gradcheck import check_vjp
from refnorm.nn import linear_backward, linear_forward
from tests.core.strategies import float_arrays

U64 = np.finfo(np.float64).eps

# As for conv: linear in x, in w and in b separately, so a central difference with step 1 is
# exact up to the rounding of L (~1e-16 of outputs of size <= 70) against gradients of size
# >= 1e-3 (no drawn value is smaller but 0): < 1e-11. A wrong term shows at 1e-2 or more.
FD_STEP = 1.0
FD_TOLERANCE = 1e-8

shapes = st.tuples(st.integers(1, 5), st.integers(1, 6), st.integers(1, 5), st.booleans())


@st.composite
def linear_arrays(draw, shape):
    """(x, w, b): x in [-10, 10], w and b in [-1, 1]; b None without a bias."""
    N, D_in, D_out, bias = shape
    x = draw(float_arrays((N, D_in)))
    w = draw(float_arrays((D_out, D_in), -1.0, 1.0))
    b = draw(float_arrays((D_out,), -1.0, 1.0)) if bias else None
    return x, w, b


@given(data=st.data(), shape=shapes)
def test_forward_is_x_wT_plus_b(xp, data, shape):
    x, w, b = data.draw(linear_arrays(shape), label="x, w, b")
    y, _ = linear_forward(xp.asarray(x), xp.asarray(w), None if b is None else xp.asarray(b))
    expected = x @ w.T + (0.0 if b is None else b)
    # The same D_in + 1 terms, possibly summed in another order by the BLAS: each sum is
    # within (D_in + 1) u of the sum of the terms' sizes.
    sizes = np.abs(x) @ np.abs(w).T + (0.0 if b is None else np.abs(b))
    D_in = x.shape[1]
    np.testing.assert_array_less(np.abs(to_numpy(y) - expected),
                                 2 * (D_in + 1) * U64 * sizes + np.finfo(np.float64).tiny)


@given(data=st.data(), shape=shapes)
def test_gradients_match_finite_differences(xp, data, shape):
    x, w, b = data.draw(linear_arrays(shape), label="x, w, b")
    bias = b is not None

    def f(x, w, b=None):
        return linear_forward(xp.asarray(x), xp.asarray(w), None if b is None else xp.asarray(b))[0]

    def vjp(dy, x, w, b=None):
        _, cache = linear_forward(xp.asarray(x), xp.asarray(w),
                                  None if b is None else xp.asarray(b))
        dx, dw, db = linear_backward(xp.asarray(dy), cache)
        return {"x": dx, "w": dw} | ({"b": db} if bias else {})

    inputs = {"x": x, "w": w} | ({"b": b} if bias else {})
    errors = check_vjp(f, vjp, inputs, seed=2, step=FD_STEP)
    assert set(errors) == set(inputs)
    for name, err in errors.items():
        assert err.max_rel_error < FD_TOLERANCE, (name, err)


def test_backward_closed_form_and_no_bias():
    rng = np.random.default_rng(0)
    x, w, dy = rng.standard_normal((4, 3)), rng.standard_normal((2, 3)), rng.standard_normal((4, 2))
    _, cache = linear_forward(x, w)
    dx, dw, db = linear_backward(dy, cache)
    assert db is None
    np.testing.assert_allclose(dx, dy @ w, rtol=1e-14)
    np.testing.assert_allclose(dw, dy.T @ x, rtol=1e-14)
    _, cache = linear_forward(x, w, np.zeros(2))
    np.testing.assert_allclose(linear_backward(dy, cache)[2], dy.sum(axis=0), rtol=1e-14)


def test_inputs_are_not_modified(xp):
    rng = np.random.default_rng(1)
    args = [xp.asarray(a) for a in (rng.standard_normal((3, 4)), rng.standard_normal((2, 4)),
                                    rng.standard_normal(2), rng.standard_normal((3, 2)))]
    before = [to_numpy(a).copy() for a in args]
    _, cache = linear_forward(*args[:3])
    linear_backward(args[3], cache)
    for a, b in zip(args, before, strict=True):
        np.testing.assert_array_equal(to_numpy(a), b)


def test_float16_computes_in_float32_and_returns_float16():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 40)).astype(np.float16)
    w = rng.standard_normal((3, 40)).astype(np.float16)
    y, cache = linear_forward(x, w)
    assert y.dtype == np.float16 and cache.x.dtype == np.float32
    y32 = x.astype(np.float32) @ w.astype(np.float32).T
    np.testing.assert_array_equal(y, y32.astype(np.float16))
    dx, dw, _ = linear_backward(np.ones_like(y), cache)
    assert dx.dtype == dw.dtype == np.float16


X, W = np.ones((4, 3)), np.ones((2, 3))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: linear_forward(X, np.ones((2, 5))), ValueError,
         r"x must have D_in = w.shape\[1\] = 5 features on axis 1.*got x of shape \(4, 3\)"),
        (lambda: linear_forward(np.ones((4, 3, 1)), W), ValueError,
         r"x must have layout \(N, D_in\), 2 dimensions; got shape \(4, 3, 1\)"),
        (lambda: linear_forward(X, np.ones(3)), ValueError,
         r"w must have layout \(D_out, D_in\), 2 dimensions; got shape \(3,\)"),
        (lambda: linear_forward(X, W, np.ones((1, 2))), ValueError,
         r"b must have shape \(D_out,\) = \(2,\).*got shape \(1, 2\)"),
        (lambda: linear_forward(X, W, np.ones(2, dtype=np.int32)), TypeError,
         r"b must have a real floating-point dtype; got int32"),
        (lambda: linear_backward(np.ones((4, 3)), linear_forward(X, W)[1]), ValueError,
         r"dy must have shape \(4, 2\); got \(4, 3\)"),
        (lambda: linear_backward(np.ones((4, 2)), "cache"), TypeError,
         r"cache must be a LinearCache; got str"),
    ],
)
def test_errors_name_the_argument_expected_and_got(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_linear_db_has_the_dtype_of_b():
    from refnorm.nn.linear import linear_backward, linear_forward

    x = np.ones((4, 3), np.float32)
    w = np.ones((2, 3), np.float32)
    b = np.zeros(2, np.float64)
    _, cache = linear_forward(x, w, b)
    dx, dw, db = linear_backward(np.ones((4, 2), np.float32), cache)
    assert (dx.dtype, dw.dtype, db.dtype) == (np.float32, np.float32, np.float64)


def test_linear_gradients_have_the_dtypes_of_x_w_and_b():
    """As for conv."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    w = rng.standard_normal((2, 3))                                # float64
    b = np.zeros(2, np.float16)
    y, cache = linear_forward(x, w, b)
    dx, dw, db = linear_backward(np.ones_like(y), cache)
    assert (y.dtype, dx.dtype, dw.dtype, db.dtype) == (np.float32, np.float32, np.float64,
                                                      np.float16)


def test_a_float64_bias_is_added_to_a_float32_product_in_float32():
    """As for conv: b is cast to the compute dtype and added there, the sum rounded once.
    y = 1 and b = 2^-24 + 2^-50: in float32 b is 2^-24 and 1 + 2^-24 ties to 1; added in
    float64 the sum is just above the tie and rounds to 1 + 2^-23."""
    x, w = np.ones((1, 4), np.float32), np.full((1, 4), 0.25, np.float32)
    b = np.array([2.0**-24 + 2.0**-50])
    y, _ = linear_forward(x, w, b)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, [[1.0]])
    np.testing.assert_array_equal(y, linear_forward(x, w, b.astype(np.float32))[0])


def test_arrays_from_two_namespaces_are_refused():
    strict = pytest.importorskip("array_api_strict")
    x, w, b = np.ones((4, 3)), np.ones((2, 3)), np.ones(2)
    s = strict.asarray
    for args in ((x, w, s(b)), (x, s(w), None), (s(x), s(w), b)):
        with pytest.raises(TypeError, match=r"one array namespace"):
            linear_forward(*args)


def test_linear_db_is_summed_in_the_compute_dtype():
    """float16 x and dy, float32 b: db sums dy in float32 (120000), beyond float16's largest
    value 65504, where a float16 sum would give inf."""
    x, w = np.full((2, 1), 0.5, np.float16), np.ones((1, 1), np.float16)
    b = np.zeros(1, np.float32)
    _, cache = linear_forward(x, w, b)
    _, _, db = linear_backward(np.full((2, 1), 60000.0, np.float16), cache)
    assert db.dtype == np.float32
    np.testing.assert_array_equal(db, [120000.0])


def test_backward_ignores_an_in_place_change_of_x_or_w_after_forward():
    """The cache holds copies: dw = dy^T x and dx = dy w use the x and w of the forward,
    even if the caller changes those arrays in place before the backward."""
    rng = np.random.default_rng(15)
    x, w, dy = rng.standard_normal((3, 4)), rng.standard_normal((2, 4)), rng.standard_normal((3, 2))
    expected_dx, expected_dw = dy @ w, dy.T @ x
    _, cache = linear_forward(x, w)
    x *= 2.0
    w += 1.0
    dx, dw, _ = linear_backward(dy, cache)
    np.testing.assert_array_equal(dx, expected_dx)  # the same products on the same values
    np.testing.assert_array_equal(dw, expected_dw)

"""relu: forward, backward against finite differences away from 0, the choice at 0, NaN."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refnorm.backend import to_numpy
from refnorm.gradcheck import check_vjp, numerical_vjp
from refnorm.nn import relu_backward, relu_forward
from tests.core.strategies import float_arrays, shapes
from tests.nn.strategies import away_from_zero


@given(st.data(), shapes())
def test_forward_is_max_x_0(xp, data, shape):
    x = data.draw(float_arrays(shape), label="x")
    y, _ = relu_forward(xp.asarray(x))
    np.testing.assert_array_equal(to_numpy(y), np.maximum(x, 0.0))


@given(st.data(), shapes())
def test_gradient_matches_finite_differences_away_from_zero(xp, data, shape):
    # Every value at least 0.1 from the kink: relu is linear on each side, so a central
    # difference with a step of 0.05 never crosses 0 and is exact up to rounding (~1e-15
    # of the outputs' size <= 10).
    x = data.draw(away_from_zero(shape, gap=0.1), label="x")

    def f(x):
        return relu_forward(xp.asarray(x))[0]

    def vjp(dy, x):
        return {"x": relu_backward(xp.asarray(dy), relu_forward(xp.asarray(x))[1])}

    assert check_vjp(f, vjp, {"x": x}, seed=3, step=0.05)["x"].max_rel_error < 1e-8


def test_derivative_at_zero_is_zero_though_finite_differences_say_one_half():
    x = np.array([-1.0, 0.0, 2.0])
    dy = np.array([5.0, 7.0, 11.0])
    _, cache = relu_forward(x)
    np.testing.assert_array_equal(relu_backward(dy, cache), [0.0, 0.0, 11.0])
    # No derivative exists at 0: the central difference averages the slopes 0 and 1.
    numeric = numerical_vjp(lambda x: relu_forward(x)[0], {"x": x}, dy, "x")
    np.testing.assert_allclose(numeric, [0.0, 3.5, 11.0], rtol=1e-9)


def test_nan_propagates_forward_and_upstream_nan_stays_where_x_is_positive(xp):
    x = xp.asarray(np.array([np.nan, -1.0, 1.0, -np.inf, np.inf]))
    y, cache = relu_forward(x)
    np.testing.assert_array_equal(to_numpy(y), [np.nan, 0.0, 1.0, 0.0, np.inf])
    dx = relu_backward(xp.asarray(np.array([1.0, np.nan, np.nan, np.nan, 2.0])), cache)
    np.testing.assert_array_equal(to_numpy(dx), [0.0, 0.0, np.nan, 0.0, 2.0])


def test_inputs_are_not_modified_and_dtype_is_kept():
    x = np.array([[-1.0, 2.0]], dtype=np.float32)
    dy = np.array([[3.0, 4.0]], dtype=np.float32)
    y, cache = relu_forward(x)
    dx = relu_backward(dy, cache)
    np.testing.assert_array_equal(x, [[-1.0, 2.0]])
    np.testing.assert_array_equal(dy, [[3.0, 4.0]])
    assert y.dtype == dx.dtype == np.float32


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: relu_forward(np.array([1, -1])), TypeError,
         r"x must have a real floating-point dtype; got int64"),
        (lambda: relu_forward(3.0), TypeError, r"x must be an array; got float"),
        (lambda: relu_backward(np.ones(3), relu_forward(np.ones(2))[1]), ValueError,
         r"dy must have shape \(2,\); got \(3,\)"),
        (lambda: relu_backward(np.ones(2), None), TypeError,
         r"cache must be a ReLUCache; got NoneType"),
    ],
)
def test_errors_name_the_argument_expected_and_got(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_a_nan_input_gets_dx_0_where_pytorch_passes_dy(path):
    """The conventions page: refnorm's dx = dy * [x > 0] is 0 at a NaN x; PyTorch passes dy."""
    x = np.array([np.nan, -1.0, 1.0])
    dy = np.array([5.0, 5.0, 5.0])
    _, cache = relu_forward(x)
    np.testing.assert_array_equal(relu_backward(dy, cache, path=path), [0.0, 0.0, 5.0])
    torch = pytest.importorskip("torch")
    xt = torch.tensor(x, requires_grad=True)
    torch.relu(xt).backward(torch.tensor(dy))
    np.testing.assert_array_equal(xt.grad.numpy(), [5.0, 0.0, 5.0])


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_a_0d_input_gives_0d_arrays_not_numpy_scalars(path):
    """The docstring promises arrays: numpy's maximum of a 0-d array is a numpy scalar."""
    y, cache = relu_forward(np.array(-1.5), path=path)
    dx = relu_backward(np.array(2.0), cache, path=path)
    for a in (y, dx):
        assert type(a) is np.ndarray and a.shape == () and a.dtype == np.float64
    assert float(y) == 0.0 and float(dx) == 0.0
    y, cache = relu_forward(np.array(3.0), path=path)
    assert type(y) is np.ndarray and float(y) == 3.0
    assert float(relu_backward(np.array(2.0), cache, path=path)) == 2.0


def test_fast_relu_backward_checks_every_new_upstream_shape():
    """The fast path checks an argument signature once; dy's shape is part of it, so a dy of
    another shape after a valid one is refused as the reference refuses it, not handed to
    the loop with a mask of another size."""
    _, cache = relu_forward(np.random.default_rng(0).standard_normal((4, 5)), path="fast")
    relu_backward(np.ones((4, 5)), cache, path="fast")  # valid: checked and remembered
    for shape in ((2, 5), (5, 4), (20,)):
        with pytest.raises(ValueError, match=r"dy must have shape \(4, 5\); got "
                                             + re.escape(str(shape))):
            relu_backward(np.ones(shape), cache, path="fast")


def test_fast_relu_backward_checks_dy_against_each_cache():
    """A dy of the shape an earlier cache accepted is checked again against a cache of another
    shape (here fewer elements, which the loop would read past), as the reference checks it."""
    rng = np.random.default_rng(1)
    _, cache = relu_forward(rng.standard_normal((4, 5)), path="fast")
    relu_backward(np.ones((4, 5)), cache, path="fast")  # valid: checked and remembered
    _, small = relu_forward(rng.standard_normal((2, 5)), path="fast")
    with pytest.raises(ValueError, match=r"dy must have shape \(2, 5\); got \(4, 5\)"):
        relu_backward(np.ones((4, 5)), small, path="fast")

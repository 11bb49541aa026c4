"""Inputs that used to crash with a raw traceback (a reliability audit's finds): each is now one
clear ValueError or TypeError naming the argument."""

from __future__ import annotations

import warnings
from fractions import Fraction

import numpy as np
import pytest

import refnorm
from refnorm.weights import translated_relu_forward, weight_norm_forward

pytestmark = pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
X = np.random.default_rng(0).standard_normal((4, 3))
G, B = np.ones(3), np.zeros(3)


@pytest.mark.parametrize("path", ["reference", "fast"])
@pytest.mark.parametrize("forward", [refnorm.batch_norm_forward, refnorm.layer_norm_forward])
def test_a_numpy_matrix_is_refused_by_name(forward, path):
    with pytest.raises(TypeError, match=r"^x must be an array, not a numpy.matrix .*pass "
                                        r"numpy.asarray\(x\)$"):
        forward(np.matrix(X), G, B, path=path)


def test_a_numpy_matrix_parameter_is_refused_by_name():
    with pytest.raises(TypeError, match=r"^gamma must be an array, not a numpy.matrix"):
        refnorm.batch_norm_forward(X, np.matrix(G), B)


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_a_fraction_eps_is_refused_with_the_remedy(path):
    with pytest.raises(TypeError, match=r"^eps must be a float; got Fraction \(pass "
                                        r"float\(eps\)\)$"):
        refnorm.batch_norm_forward(X, G, B, eps=Fraction(1, 10**5), path=path)


def test_weight_norm_with_no_output_channel_is_refused():
    with pytest.raises(ValueError, match=r"^v must have at least one output channel \(C_out "
                                         r">= 1\); got shape \(0, 3, 3, 3\)$"):
        weight_norm_forward(np.zeros((0, 3, 3, 3)), np.ones(0))


@pytest.mark.parametrize("z", [np.array(1.0), np.array([1.0, -2.0])])
def test_translated_relu_needs_a_channel_axis(z):
    with pytest.raises(ValueError, match=r"^z must have layout \(N, C, \*spatial\), at least 2 "
                                         r"dimensions"):
        translated_relu_forward(z, np.zeros(2))


OVERFLOWING = {
    "bn": lambda x, g, b, path: refnorm.batch_norm_forward(x, g, b, path=path),
    "in": lambda x, g, b, path: refnorm.instance_norm_forward(x, g, b, path=path),
    "ln": lambda x, g, b, path: refnorm.layer_norm_forward(x, g, b, path=path),
    "gn": lambda x, g, b, path: refnorm.group_norm_forward(x, g, b, num_groups=2, path=path),
    "sn": lambda x, g, b, path: refnorm.switchable_norm_forward(
        x, g, b, np.zeros(3, x.dtype), np.zeros(3, x.dtype), path=path),
}


@pytest.mark.parametrize(("dtype", "remedy"), [(np.float64, "rescale x$"),
                                               (np.float32, "compute in float64 or rescale x$")])
@pytest.mark.parametrize("path", ["reference", "fast"])
def test_an_overflowing_variance_advises_what_helps(dtype, remedy, path):
    big = 1e200 if dtype == np.float64 else 1e20
    x = (np.array([[big], [-big]]) * np.ones((2, 3))).astype(dtype)
    with np.errstate(over="ignore"), pytest.raises(ValueError, match=f"overflows {np.dtype(dtype)}"
                                                                     f".*; {remedy}"):
        refnorm.batch_norm_forward(x, G.astype(dtype), B.astype(dtype), path=path)


@pytest.mark.parametrize("method", sorted(OVERFLOWING))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("path", ["reference", "fast"])
def test_every_normalizer_refuses_an_overflowing_variance(method, dtype, path):
    """Means beyond sqrt(max) in every statistic (the fast path's first segment of a unit
    included: its merge once made NaN of 0 * inf, and so no error), signs mixed within each."""
    big = 1e200 if dtype == np.float64 else 1e20
    x = np.full((2, 4, 2, 2), big)
    x[1] *= -1
    x[:, :, 0, 0] *= -1
    g, b = np.ones(4, dtype), np.zeros(4, dtype)
    with np.errstate(over="ignore", invalid="ignore"), \
            pytest.raises(ValueError, match=f"overflows {np.dtype(dtype)}"):
        OVERFLOWING[method](x.astype(dtype), g, b, path)


def _empty_cases():
    from refnorm.nn import activations, conv, pooling
    from refnorm.norms import batch_norm, group_norm, instance_norm, layer_norm, switchable_norm
    from refnorm.weights import standardization

    def fb(forward, backward, x, *args, **kw):
        def run(path):
            y, cache = forward(x, *args, path=path, **kw)
            return (y, *_as_tuple(backward(np.ones_like(y), cache, path=path)))
        return run

    def norm(forward, backward, shape, **kw):
        C = shape[1]
        return fb(forward, backward, np.ones(shape), np.ones(C), np.zeros(C), **kw)

    yield "in N=0", norm(instance_norm.instance_norm_forward, instance_norm.instance_norm_backward,
                         (0, 16, 4, 4))
    yield "in C=0", norm(instance_norm.instance_norm_forward, instance_norm.instance_norm_backward,
                         (8, 0, 4, 4))
    yield "ln N=0", norm(layer_norm.layer_norm_forward, layer_norm.layer_norm_backward,
                         (0, 16, 4, 4))
    yield "gn N=0", norm(group_norm.group_norm_forward, group_norm.group_norm_backward,
                         (0, 16, 4, 4), num_groups=4)
    yield "bn C=0", norm(batch_norm.batch_norm_forward, batch_norm.batch_norm_backward,
                         (8, 0, 4, 4))
    yield "bn eval N=0", lambda path: batch_norm.batch_norm_eval_forward(
        np.ones((0, 16, 4, 4)), np.ones(16), np.zeros(16), np.zeros(16), np.ones(16),
        path=path)[:1]
    yield "sn eval N=0", lambda path: switchable_norm.switchable_norm_eval_forward(
        np.ones((0, 4, 2, 2)), np.ones(4), np.zeros(4), np.zeros(3), np.zeros(3), np.zeros(4),
        np.ones(4), path=path)[:1]
    yield "conv N=0", fb(conv.conv2d_forward, conv.conv2d_backward, np.ones((0, 3, 5, 5)),
                         np.ones((2, 3, 3, 3)))
    yield "conv C_out=0", fb(conv.conv2d_forward, conv.conv2d_backward, np.ones((2, 3, 5, 5)),
                             np.ones((0, 3, 3, 3)))
    yield "avg-pool C=0", fb(pooling.avg_pool2d_forward, pooling.avg_pool2d_backward,
                             np.ones((2, 0, 4, 4)), kernel_size=2)
    yield "ws C_out=0", fb(standardization.weight_standardization_forward,
                           standardization.weight_standardization_backward,
                           np.ones((0, 3, 3, 3)))
    yield "relu 0-d", fb(activations.relu_forward, activations.relu_backward, np.array(-2.0))


def _as_tuple(result):
    return tuple(result) if isinstance(result, tuple) else (result,)


EMPTY = list(_empty_cases())


@pytest.mark.parametrize(("name", "run"), EMPTY, ids=[c[0] for c in EMPTY])
def test_empty_axes_and_0d_arrays_give_the_references_shapes_on_the_fast_path(name, run):
    """An empty batch or channel axis (which the reference normalizes into empty outputs and
    zero parameter gradients) and a 0-d ReLU input: the fast path used to divide by zero,
    fail to reshape a size-0 array with -1, or return shape (1,) for ()."""
    want, got = run("reference"), run("fast")
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None
            continue
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)


def test_switchable_norm_with_an_eps_beyond_float32_is_refused_on_both_paths():
    """eps = 1e300 with float32 data would be inf in the compute dtype: rstd 0, every output
    beta (and the fast backward's x_hat coefficient c2 / rstd once made 0 / 0 = NaN of it).
    Refused like an eps that rounds to 0; the largest float32 eps still gives finite
    gradients on both paths."""
    from refnorm.norms import switchable_norm

    x = np.random.default_rng(0).standard_normal((4, 4, 3, 3)).astype(np.float32)
    args = (np.ones(4, np.float32), np.zeros(4, np.float32), np.zeros(3, np.float32),
            np.zeros(3, np.float32))
    for path in ("reference", "fast"):
        with pytest.raises(ValueError, match=r"eps=1e\+300 overflows float32, the compute dtype"):
            switchable_norm.switchable_norm_forward(x, *args, eps=1e300, path=path)
        eps = float(np.finfo(np.float32).max)
        y, cache = switchable_norm.switchable_norm_forward(x, *args, eps=eps, path=path)
        grads = switchable_norm.switchable_norm_backward(np.ones_like(y), cache, path=path)
        assert all(np.isfinite(g).all() for g in grads)


def test_switchable_norm_backward_where_rstd_rounds_to_zero_is_finite_on_both_paths():
    """var + eps overflows float64 (var 6.4e307, eps 1.5e308), so rstd is 0, x_hat 0 and
    y = beta; the reference's dx is 0 there, and the fast path's must not be 0 / 0."""
    from refnorm.norms import switchable_norm as sn

    d = 8e153
    x = np.array([[[d, -d], [-d, d]], [[-d, d], [d, -d]]])
    g, b, logits = np.ones(2), np.zeros(2), np.zeros(3)
    dy = np.random.default_rng(0).standard_normal(x.shape)
    grads = {}
    for path in ("reference", "fast"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # var + eps overflows, on purpose
            _, cache = sn.switchable_norm_forward(x, g, b, logits, logits, eps=1.5e308,
                                                  path=path)
            assert np.all(np.asarray(cache.rstd) == 0)
            grads[path] = sn.switchable_norm_backward(dy, cache, path=path)
    for ref, fast in zip(grads["reference"], grads["fast"], strict=True):
        assert np.all(np.isfinite(fast))
        np.testing.assert_allclose(np.reshape(fast, np.shape(ref)), ref, rtol=1e-12, atol=0)

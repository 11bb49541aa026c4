"""refnorm/weights/base.py: the layers' geometry, its checks, and the op they run."""

from __future__ import annotations

import numpy as np
import pytest

import refnorm
from refnorm.nn.conv import conv2d_backward, conv2d_forward
from refnorm.nn.linear import linear_backward, linear_forward
from refnorm.weights import weight_norm_forward, weight_standardization_forward
from refnorm.weights.base import (
    apply_weights,
    apply_weights_backward,
    per_output_view,
    weight_geometry,
)

WEIGHT_LAYERS = ["wn", "np", "trelu", "ws"]


@pytest.mark.parametrize(
    ("args", "kwargs", "shape", "fan_in"),
    [
        ((3, 4, 3), {}, (4, 3, 3, 3), 27),
        ((2, 5, (3, 1)), {"stride": (2, 1), "padding": 1}, (5, 2, 3, 1), 6),
        ((6, 2, None), {}, (2, 6), 6),
        ((np.int64(3), np.int32(4), np.int16(2)), {}, (4, 3, 2, 2), 12),
    ],
)
def test_geometry(args, kwargs, shape, fan_in):
    g = weight_geometry(*args, **kwargs)
    assert g.weight_shape == shape and g.fan_in == fan_in
    assert all(type(n) is int for n in g.weight_shape)


def test_per_output_view():
    w = np.arange(24.0).reshape(2, 3, 2, 2)
    np.testing.assert_array_equal(per_output_view(np, w), [np.arange(12.0), np.arange(12.0, 24.0)])


@pytest.mark.parametrize("kernel_size", [None, 2])
def test_apply_weights_is_the_conv_or_linear_pair(kernel_size):
    rng = np.random.default_rng(24)
    geometry = weight_geometry(3, 2, kernel_size, stride=2, padding=1)
    x = rng.standard_normal((2, 3, 5, 5) if kernel_size else (4, 3))
    w, b = rng.standard_normal(geometry.weight_shape), rng.standard_normal(2)
    y, cache = apply_weights(x, w, b, geometry)
    if kernel_size:
        y_ref, cache_ref = conv2d_forward(x, w, b, stride=2, padding=1)
        backward = conv2d_backward
    else:
        y_ref, cache_ref = linear_forward(x, w, b)
        backward = linear_backward
    np.testing.assert_array_equal(y, y_ref)
    dy = rng.standard_normal(y.shape)
    got_all, ref_all = apply_weights_backward(dy, cache, geometry), backward(dy, cache_ref)
    for got, ref in zip(got_all, ref_all, strict=True):
        np.testing.assert_array_equal(got, ref)


def test_apply_weights_backward_refuses_the_other_ops_cache():
    geometry = weight_geometry(3, 2, None)
    _, cache = apply_weights(np.ones((4, 3)), np.ones((2, 3)), None, geometry)
    conv = weight_geometry(3, 2, 1)
    with pytest.raises(TypeError, match=r"cache must be a Conv2dCache; got LinearCache"):
        apply_weights_backward(np.ones((4, 2, 1, 1)), cache, conv)


# One error type for one kind of mistake: every weight-side layer raises what Conv2d raises
# for the same bad constructor argument (a non-int count is a TypeError, a non-positive one a
# ValueError, ...).
BAD_ARGUMENTS = [
    pytest.param((2.0, 3, 3), {}, TypeError, r"in_channels must be an int", id="float in_channels"),
    pytest.param(("2", 3, 3), {}, TypeError, r"in_channels must be an int", id="str in_channels"),
    pytest.param((True, 3, 3), {}, TypeError, r"in_channels must be an int", id="bool in_channels"),
    pytest.param((0, 3, 3), {}, ValueError, r"in_channels must be >= 1", id="zero in_channels"),
    pytest.param((2, -1, 3), {}, ValueError,
                 r"out_channels must be >= 1", id="negative out_channels"),
    pytest.param((2, 3, "3"), {}, TypeError,
                 r"kernel_size must be an int or a pair", id="str kernel"),
    pytest.param((2, 3, (3, 3, 3)), {}, TypeError,
                 r"kernel_size must be an int or a pair", id="triple kernel"),
    pytest.param((2, 3, 0), {}, ValueError, r"kernel_size must be >= 1", id="zero kernel"),
    pytest.param((2, 3, 3), {"stride": 0}, ValueError, r"stride must be >= 1", id="zero stride"),
    pytest.param((2, 3, 3), {"padding": -1}, ValueError,
                 r"padding must be >= 0", id="negative padding"),
    pytest.param((2, 3, 3), {"padding": 0.5}, TypeError,
                 r"padding must be an int or a pair", id="float padding"),
    pytest.param((2, 3, 3), {"dtype": np.int32}, TypeError,
                 r"dtype must be a real floating", id="int dtype"),
    pytest.param((2, 3, 3), {"seed": 1.5}, TypeError, r"seed must be an int", id="float seed"),
]


@pytest.mark.parametrize("name", WEIGHT_LAYERS)
@pytest.mark.parametrize(("args", "kwargs", "error", "message"), BAD_ARGUMENTS)
def test_bad_constructor_arguments_raise_what_conv_raises(name, args, kwargs, error, message):
    with pytest.raises(error, match=message):
        refnorm.build("conv", *args, **kwargs)
    with pytest.raises(error, match=message):
        refnorm.build(name, *args, **kwargs)


@pytest.mark.parametrize("name", ["wn", "np", "ws"])
def test_bias_must_be_a_bool(name):
    with pytest.raises(TypeError, match=r"bias must be a bool; got int"):
        refnorm.build(name, 2, 3, 3, bias=1)
    with pytest.raises(TypeError, match=r"bias must be a bool; got int"):
        refnorm.build("conv", 2, 3, 3, bias=1)


@pytest.mark.parametrize("name", WEIGHT_LAYERS)
def test_numpy_integers_are_accepted_wherever_an_int_is(name):
    plain = refnorm.build(name, 2, 3, 3, stride=1, padding=1, seed=7)
    numpy_ints = refnorm.build(name, np.int64(2), np.int32(3), np.int8(3), stride=np.int64(1),
                               padding=(np.int16(1), 1), seed=np.int64(7))
    assert plain.params.keys() == numpy_ints.params.keys()
    for k in plain.params:
        np.testing.assert_array_equal(plain.params[k], numpy_ints.params[k])


@pytest.mark.parametrize("name", WEIGHT_LAYERS)
def test_he_initialization_is_the_conv_layers(name):
    # The raw weights are drawn as Conv2d draws its w: one seed, one He-normal draw.
    conv = refnorm.build("conv", 3, 4, 3, seed=8)
    layer = refnorm.build(name, 3, 4, 3, seed=8)
    raw = layer.params["w" if name == "ws" else "v"]
    np.testing.assert_array_equal(raw, conv.params["w"])


def test_apply_weights_backward_passes_input_grad_on():
    from refnorm.weights.base import apply_weights, apply_weights_backward, weight_geometry

    geometry = weight_geometry(3, 2, 3, padding=1)
    rng = np.random.default_rng(13)
    x = rng.standard_normal((2, 3, 4, 4))
    w = rng.standard_normal(geometry.weight_shape)
    y, cache = apply_weights(x, w, None, geometry)
    dy = rng.standard_normal(y.shape)
    dx, dw, _ = apply_weights_backward(dy, cache, geometry, input_grad=False)
    assert dx is None
    _, dw_full, _ = apply_weights_backward(dy, cache, geometry)
    np.testing.assert_allclose(dw, dw_full, rtol=1e-12)


@pytest.mark.parametrize("name", WEIGHT_LAYERS)
def test_default_eps_is_the_documented_1e_5(name):
    # Every weight-side layer documents eps = 1e-5 by default: building without eps gives
    # the layer built with eps=1e-5, bit for bit.
    x = np.random.default_rng(35).standard_normal((2, 3, 5, 5))
    default = refnorm.build(name, 3, 4, 3, dtype=np.float64, seed=1)
    explicit = refnorm.build(name, 3, 4, 3, dtype=np.float64, seed=1, eps=1e-5)
    assert default.eps == 1e-5
    np.testing.assert_array_equal(default.forward(x, training=True),
                                  explicit.forward(x, training=True))


@pytest.mark.parametrize("eps", [np.float64(1e-5), np.int64(1)])
@pytest.mark.parametrize("method", ["wn", "ws"])
def test_a_numpy_scalar_eps_keeps_float32_and_is_accepted_on_array_api_strict(method, eps):
    """Weight Normalization and Weight Standardization accept numpy's scalars as eps (as
    check_eps does): a float32 weight stays float32, and array_api_strict, which refuses a
    numpy scalar in arithmetic, gets the same result."""
    strict = pytest.importorskip("array_api_strict")
    w = np.random.default_rng(2).standard_normal((4, 3, 3, 3)).astype(np.float32)

    def forward(w):
        if method == "wn":
            out, cache = weight_norm_forward(w, w[:, 0, 0, 0] * 0 + 1, eps=eps)
            return out, cache.norm
        out, cache = weight_standardization_forward(w, eps=eps)
        return out, cache.denom

    out, kept = forward(w)
    assert out.dtype == kept.dtype == np.float32
    out_strict, _ = forward(strict.asarray(w))
    np.testing.assert_array_equal(np.asarray(out_strict), out)

"""A layer on the GPU: outputs, gradients and state stay CuPy arrays, gradients check in
float64 on the GPU, and to_device moves a layer there and back unchanged."""

from __future__ import annotations

import numpy as np
import pytest

import refnorm
from refnorm.backend import to_numpy
from refnorm.gradcheck import check_layer
from refnorm.layer import to_device
from tests.conftest import gpu_skip

pytestmark = [pytest.mark.gpu, gpu_skip()]

METHODS = ["bn", "in", "ln", "gn", "sn"]


def _layer(method):
    kwargs = {"num_groups": 2} if method == "gn" else {}
    return refnorm.build(method, 4, dtype=np.float64, **kwargs)


@pytest.mark.parametrize("method", METHODS)
def test_layer_stays_on_the_gpu(method):
    import cupy

    layer = to_device(_layer(method), "gpu")
    x = cupy.asarray(5 * np.random.default_rng(0).standard_normal((3, 4, 5, 5)) + 12)
    y = layer.forward(x, training=True)
    dx = layer.backward(cupy.ones_like(y))
    arrays = [y, dx, *layer.params.values(), *layer.grads.values(), *layer.state.values()]
    assert all(isinstance(a, cupy.ndarray) for a in arrays), [type(a) for a in arrays]


@pytest.mark.parametrize("method", METHODS)
def test_layer_gradients_in_float64_on_the_gpu(method):
    import cupy

    layer = to_device(_layer(method), "gpu")
    x = cupy.asarray(5 * np.random.default_rng(1).standard_normal((3, 4, 3, 3)) + 12)
    for name, err in check_layer(layer, x).items():
        assert err.max_rel_error < 1e-6, (name, err)  # the suite's gradcheck tolerance


def test_to_gpu_and_back_keeps_every_value():
    layer = _layer("bn")
    layer.forward(np.random.default_rng(2).standard_normal((3, 4, 2)), training=True)
    before = {k: v.copy() for k, v in layer.state.items()}
    to_device(to_device(layer, "gpu"), "cpu")
    for k, v in layer.state.items():
        assert type(v) is np.ndarray
        np.testing.assert_array_equal(to_numpy(v), before[k])

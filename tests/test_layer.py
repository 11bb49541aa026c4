"""The layer interface every refnorm layer shares (refnorm/layer.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import refnorm
from refnorm import registry
from refnorm.gradcheck import _random_state
from refnorm.layer import iter_layers
from refnorm.nn import AvgPool2d, GlobalAvgPool, MaxPool2d, ReLU


def _cases():
    for name in registry.names():
        for i, case in enumerate(registry.layer_class(name).check_cases):
            yield pytest.param(name, case, id=f"{name}-{i}")


def _build(name, case):
    layer = refnorm.build(name, case.shape[1], dtype=np.float64, **case.options)
    rng = np.random.default_rng(0)
    layer.params = {k: rng.standard_normal(v.shape) * 0.5 + 1.0 for k, v in layer.params.items()}
    if layer.state:
        layer.state = _random_state(layer.state, rng)
    return layer


def _backward_after(layer, x, dy, training, mutate):
    layer = copy.deepcopy(layer)
    x = x.copy()
    layer.forward(x, training=training)
    mutate(layer, x)
    dx = layer.backward(dy)
    return dx, {k: np.array(v) for k, v in layer.grads.items()}


def _mutate_input(layer, x):
    x += 1.0 + np.abs(x)  # in place, in every element


def _mutate_params(layer, x):
    for p in layer.params.values():
        p *= -3.0         # in place, as an optimizer's update would be


def _nothing(layer, x):
    pass


@pytest.mark.parametrize(("name", "case"), list(_cases()))
@pytest.mark.parametrize("mutate", [_mutate_input, _mutate_params], ids=["x", "params"])
def test_backward_ignores_in_place_changes_made_after_forward(name, case, mutate):
    """A cache holds refnorm-owned arrays: changing the caller's x (or the layer's parameter
    arrays) in place between forward and backward leaves dx and every gradient unchanged."""
    layer = _build(name, case)
    rng = np.random.default_rng(1)
    x = 5 * rng.standard_normal(case.shape) + 2
    y = layer.forward(x.copy(), training=case.training)
    dy = rng.standard_normal(y.shape)
    dx_ref, grads_ref = _backward_after(layer, x, dy, case.training, _nothing)
    dx, grads = _backward_after(layer, x, dy, case.training, mutate)
    np.testing.assert_array_equal(dx, dx_ref)
    for k in grads_ref:
        np.testing.assert_array_equal(grads[k], grads_ref[k], err_msg=k)


@pytest.mark.parametrize("layer", [ReLU(), MaxPool2d(2), AvgPool2d(2), GlobalAvgPool()],
                         ids=["relu", "maxpool", "avgpool", "globalavgpool"])
def test_parameter_free_layers_ignore_in_place_changes_of_x(layer):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 4, 4))
    dy = rng.standard_normal(layer.forward(x.copy(), training=True).shape)
    dx_ref, _ = _backward_after(layer, x, dy, True, _nothing)
    dx, _ = _backward_after(layer, x, dy, True, _mutate_input)
    np.testing.assert_array_equal(dx, dx_ref)


def test_reset_drops_the_cache():
    layer = refnorm.build("bn", 3)
    layer.forward(np.ones((4, 3), np.float32) * np.arange(4, dtype=np.float32)[:, None],
                  training=True)
    layer.reset()
    with pytest.raises(RuntimeError, match=r"backward\(\) called before forward\(\)"):
        layer.backward(np.ones((4, 3), np.float32))


def test_numpy_bool_is_accepted_for_training():
    layer = refnorm.build("bn", 3, dtype=np.float64)
    x = np.random.default_rng(3).standard_normal((4, 3))
    y_np = layer.forward(x, training=np.bool_(True))
    y = refnorm.build("bn", 3, dtype=np.float64).forward(x, training=True)
    np.testing.assert_array_equal(y_np, y)
    with pytest.raises(TypeError, match="training must be a bool; got int"):
        layer.forward(x, training=1)


def test_iter_layers_walks_lists_and_models_in_order():
    a, b, c = refnorm.build("bn", 2), refnorm.build("sn", 2), refnorm.build("ln", 2)

    class Model:
        def layers(self):
            return [b, [c]]

    assert list(iter_layers([a, Model()])) == [a, b, c]

"""Data-parallel steps (refnorm/sync/data_parallel.py): one reduction keeps every device equal."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import refnorm
from refnorm.sync import InProcessGroup, SingleProcess, allreduce_gradients
from tests.sync.helpers import split

GROUP_TIMEOUT_S = 5.0  # as tests/sync/test_comm.py: groups that end at once end in ms


def test_data_parallel_step_keeps_parameters_identical_and_equal_to_one_device():
    rng = np.random.default_rng(2)
    x = 2 * rng.standard_normal((8, 3, 4, 4)) + 1
    dy = rng.standard_normal(x.shape)
    sizes, lr = [2, 5, 1], 0.1
    template = [refnorm.build("syncbn", 3, dtype=np.float64),
                refnorm.build("syncsn", 3, dtype=np.float64)]
    for layer in template:
        layer.params = {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in layer.params.items()}

    def step(comm, layers, xs, dys):
        for layer in layers:
            layer.comm = comm
        h = xs
        for layer in layers:
            h = layer.forward(h, training=True)
        g = dys
        for layer in reversed(layers):
            g = layer.backward(g)
        # The loss is sum(y * dy) over the whole batch: device gradients add (weight 1).
        allreduce_gradients(layers, comm, weight=1.0)
        for layer in layers:
            layer.params = {k: v - lr * layer.grads[k] for k, v in layer.params.items()}
        return layers

    copies = [copy.deepcopy(template) for _ in sizes]
    ranks = InProcessGroup.run(3, step, copies, split(x, sizes), split(dy, sizes))
    single = step(SingleProcess(), copy.deepcopy(template), x, dy)
    for layers in ranks:
        for mine, first, ref in zip(layers, ranks[0], single, strict=True):
            for key in mine.params:
                np.testing.assert_array_equal(mine.params[key], first.params[key])  # bitwise
                np.testing.assert_allclose(mine.params[key], ref.params[key], atol=1e-12)


def test_default_weight_is_the_mean_over_devices():
    def device(comm, value):
        layer = refnorm.build("bn", 1, dtype=np.float64)
        layer.grads = {"gamma": np.array([value]), "beta": np.array([2 * value])}
        allreduce_gradients([layer], comm)
        return layer.grads

    for grads in InProcessGroup.run(2, device, [1.0, 3.0]):
        np.testing.assert_allclose(grads["gamma"], [2.0])
        np.testing.assert_allclose(grads["beta"], [4.0])


@pytest.mark.parametrize("weights", [(0.25, 0.75), (0.0, 1.0)])
def test_each_device_weight_applies_to_its_own_gradients(weights):
    """The result is sum_p w_p g_p, the same on every device: each weight applies to its own
    device's gradients before the sum, and a weight of 0 (an empty shard) stays 0."""
    values = (1.0, 3.0)

    def device(comm, value, weight):
        layer = refnorm.build("bn", 1, dtype=np.float64)
        layer.grads = {"gamma": np.array([value]), "beta": np.array([2 * value])}
        allreduce_gradients([layer], comm, weight=weight)
        return layer.grads

    expected = sum(w * v for w, v in zip(weights, values, strict=True))
    for grads in InProcessGroup.run(2, device, values, weights, timeout=GROUP_TIMEOUT_S):
        np.testing.assert_allclose(grads["gamma"], [expected], rtol=1e-15)
        np.testing.assert_allclose(grads["beta"], [2 * expected], rtol=1e-15)


def test_allreduce_gradients_refuses_a_missing_communicator():
    with pytest.raises(TypeError, match="comm must be a communicator"):
        allreduce_gradients([refnorm.build("bn", 3)], None)


@pytest.mark.parametrize("layers", [[1], [None], [refnorm.build("bn", 2), "bn"]])
def test_allreduce_gradients_refuses_what_is_not_a_layer_by_name(layers):
    """Anything without a grads dict (a number, None, a name) is refused before any
    all-reduce, not met by an AttributeError on its missing grads."""
    with pytest.raises(TypeError, match="layers must be layers, each with its grads dict; got "):
        allreduce_gradients(layers, SingleProcess())

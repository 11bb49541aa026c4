"""Data-parallel steps (refnorm/sync/data_parallel.py): one reduction keeps every device equal."""

from __future__ import annotations

import copy

import numpy as np

import refnorm
from refnorm.sync import InProcessGroup, SingleProcess, allreduce_gradients
from tests.sync.helpers import split


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

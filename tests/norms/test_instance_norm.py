"""Instance Normalization: optional running statistics."""

from __future__ import annotations

import numpy as np

import refnorm


def test_without_running_stats_inference_equals_training():
    layer = refnorm.build("in", 3, dtype=np.float64)
    assert layer.state == {}
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4))
    np.testing.assert_array_equal(layer.forward(x, training=False),
                                  layer.forward(x, training=True))
    assert layer.state == {}


def test_running_stats_average_the_instance_statistics():
    layer = refnorm.build("in", 2, track_running_stats=True, momentum=0.5, dtype=np.float64)
    rng = np.random.default_rng(1)
    x = 3 * rng.standard_normal((4, 2, 5, 5)) + 1
    layer.forward(x, training=True)
    inst_mean = x.mean(axis=(2, 3))                                   # (N, C)
    inst_var = x.reshape(4, 2, 25).var(axis=2, ddof=1)                # (N, C), unbiased
    np.testing.assert_allclose(layer.state["running_mean"], 0.5 * inst_mean.mean(axis=0),
                               rtol=1e-13)
    np.testing.assert_allclose(layer.state["running_var"], 0.5 + 0.5 * inst_var.mean(axis=0),
                               rtol=1e-13)
    y = layer.forward(x, training=False)
    m, v = layer.state["running_mean"], layer.state["running_var"]
    np.testing.assert_allclose(y, (x - m[:, None, None]) / np.sqrt(v[:, None, None] + 1e-5),
                               rtol=1e-12)

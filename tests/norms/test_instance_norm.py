"""Instance Normalization: optional running statistics."""

from __future__ import annotations

import numpy as np
import pytest

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


def test_tracked_statistics_change_in_training_only_and_serve_even_a_single_sample():
    layer = refnorm.build("in", 2, track_running_stats=True, momentum=0.5, dtype=np.float64)
    rng = np.random.default_rng(2)
    layer.forward(3 * rng.standard_normal((4, 2, 5)) + 1, training=True)
    before = {k: v.copy() for k, v in layer.state.items()}
    x = 2 * rng.standard_normal((1, 2, 5)) - 4       # one sample, far from the running mean
    y = layer.forward(x, training=False)
    for k, v in before.items():
        np.testing.assert_array_equal(layer.state[k], v)   # inference leaves the state
    m, v = before["running_mean"], before["running_var"]
    np.testing.assert_allclose(y, (x - m[:, None]) / np.sqrt(v[:, None] + 1e-5), rtol=1e-12)


@pytest.mark.parametrize("track_running_stats", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 1.5])
def test_momentum_is_refused_at_construction(momentum, track_running_stats):
    with pytest.raises(ValueError, match=r"momentum must be in \(0, 1\]; got"):
        refnorm.InstanceNorm(3, momentum=momentum, track_running_stats=track_running_stats)


def test_running_stats_follow_the_moving_average_over_several_steps():
    """PyTorch's InstanceNorm2d(track_running_stats=True): at every training step
    r <- (1 - m) r + m s, with s the batch mean of the instance means (of the unbiased
    instance variances), starting from 0 (1); each step starts from the last one's result."""
    momentum = 0.3
    layer = refnorm.build("in", 2, track_running_stats=True, momentum=momentum,
                          dtype=np.float64)
    rng = np.random.default_rng(3)
    mean, var = np.zeros(2), np.ones(2)
    for step in range(3):
        x = (2 + step) * rng.standard_normal((3, 2, 4, 5)) + 4 * step - 1
        layer.forward(x, training=True)
        flat = x.reshape(3, 2, 20)                                      # (N, C, H*W)
        mean = (1 - momentum) * mean + momentum * flat.mean(axis=2).mean(axis=0)
        var = (1 - momentum) * var + momentum * flat.var(axis=2, ddof=1).mean(axis=0)
        np.testing.assert_allclose(layer.state["running_mean"], mean, rtol=1e-13)
        np.testing.assert_allclose(layer.state["running_var"], var, rtol=1e-13)
    x = 3 * rng.standard_normal((2, 2, 4, 5))
    np.testing.assert_allclose(
        layer.forward(x, training=False),
        (x - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5), rtol=1e-12)

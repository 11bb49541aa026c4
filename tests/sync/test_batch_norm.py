"""Synchronized BN (refnorm/sync/batch_norm.py): P devices give what one device gives."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import refnorm
from refnorm.dispatch import record_paths
from refnorm.gradcheck import check_layer
from refnorm.sync import (
    InProcessGroup,
    SingleProcess,
    sync_batch_norm_backward,
    sync_batch_norm_forward,
)
from tests.sync.helpers import ATOL, channel_params, combine, sharded_batches, split


@given(sharded_batches(), st.data())
@settings(max_examples=15)
def test_sync_batch_norm_equals_one_device(case, data):
    sizes, x, dy = case
    gamma, beta = channel_params(data.draw, x.shape[1])

    def device(comm, xs, dys):
        y, cache = sync_batch_norm_forward(xs, gamma, beta, comm=comm)
        return (y, *sync_batch_norm_backward(dys, cache))

    results = InProcessGroup.run(len(sizes), device, split(x, sizes), split(dy, sizes))
    y, cache = refnorm.batch_norm_forward(x, gamma, beta)
    reference = (y, *refnorm.batch_norm_backward(dy, cache))
    for i, ref in enumerate(reference):
        np.testing.assert_allclose(combine(results, i, concat=i < 2), ref, rtol=0,
                                   atol=ATOL * max(1.0, np.abs(ref).max()))


def test_single_process_communicator_is_plain_bn():
    rng = np.random.default_rng(0)
    x, g, b = rng.standard_normal((4, 3, 2)), rng.standard_normal(3), rng.standard_normal(3)
    y, _ = sync_batch_norm_forward(x, g, b, comm=SingleProcess())
    np.testing.assert_allclose(y, refnorm.batch_norm_forward(x, g, b)[0], atol=1e-14)


@pytest.mark.parametrize("training", [True, False])
def test_layer_gradients_in_training_and_at_inference(training):
    # The layer runs the synchronized pair in training and BN's eval pair at inference;
    # both must match finite differences (1e-6: the suite's gradcheck tolerance).
    rng = np.random.default_rng(4)
    layer = refnorm.build("syncbn", 3, dtype=np.float64)
    layer.state = {"running_mean": rng.standard_normal(3), "running_var": rng.uniform(1, 2, 3)}
    x = 5 * rng.standard_normal((4, 3, 2, 2)) + 12
    for name, err in check_layer(layer, x, training=training).items():
        assert err.max_rel_error < 1e-6, (name, err)


def test_layer_updates_running_statistics_with_the_global_batch():
    rng = np.random.default_rng(1)
    x = 3 * rng.standard_normal((7, 2, 3, 3)) + 4
    sizes = [3, 0, 4]

    def device(comm, xs):
        bn = refnorm.build("syncbn", 2, dtype=np.float64, comm=comm)
        bn.forward(xs, training=True)
        return bn.state

    states = InProcessGroup.run(3, device, split(x, sizes))
    bn = refnorm.build("bn", 2, dtype=np.float64)
    bn.forward(x, training=True)
    for state in states:
        for key in ("running_mean", "running_var"):
            np.testing.assert_allclose(state[key], bn.state[key], rtol=1e-13)


# -- failures end, never hang ------------------------------------------------------------------


def test_disagreeing_shapes_raise_on_every_device():
    def device(comm, C):
        return sync_batch_norm_forward(np.ones((2, C)), np.ones(C), np.zeros(C), comm=comm)

    with pytest.raises(ValueError, match=r"ranks passed different arrays"):
        InProcessGroup.run(2, device, [3, 4], timeout=10)


def test_a_failing_device_stops_the_group():
    def device(comm, fail):
        if fail:
            raise RuntimeError("device 1 breaks")
        return sync_batch_norm_forward(np.ones((2, 3)) * np.arange(2)[:, None], np.ones(3),
                                       np.zeros(3), comm=comm)

    before = threading.active_count()
    with pytest.raises(RuntimeError, match="device 1 breaks"):
        InProcessGroup.run(3, device, [False, True, False], timeout=10)
    assert threading.active_count() == before  # every device thread ended


def test_empty_global_batch_is_an_error():
    def device(comm, n):
        return sync_batch_norm_forward(np.ones((n, 3)), np.ones(3), np.zeros(3), comm=comm)

    with pytest.raises(ValueError, match=r"more than 1 value per channel over all devices; got 1"):
        InProcessGroup.run(2, device, [1, 0])


def test_float16_shards_count_every_value_of_the_whole_batch():
    # The count of values per channel is communicated in float64, with the sums of the values.
    # In x's float16 it would stop being exact above 2048 (2049 rounds to 2048), and the mean
    # would be the sum over a wrong n.
    rng = np.random.default_rng(0)
    x = (3 * rng.standard_normal((2, 1, 2049)) + 5).astype(np.float16)
    gamma, beta = np.ones(1, np.float32), np.zeros(1, np.float32)

    def device(comm, xs):
        _, cache = sync_batch_norm_forward(xs, gamma, beta, comm=comm)
        return cache.count, cache.mean

    _, one = refnorm.batch_norm_forward(x, gamma, beta)
    for count, mean in InProcessGroup.run(2, device, split(x, [1, 1])):
        assert count == 2 * 2049
        np.testing.assert_allclose(mean, one.mean.reshape(1), rtol=1e-6)


@pytest.mark.parametrize(("x_dtype", "param_dtype"), [(np.float16, np.float32),
                                                      (np.float32, np.float64),
                                                      (np.float64, np.float32)])
def test_gradients_come_back_in_the_dtypes_of_x_and_gamma(x_dtype, param_dtype):
    # The conventions page: dx in the dtype of x, dgamma and dbeta in the dtype of gamma,
    # as the single-device pair returns them.
    rng = np.random.default_rng(2)
    x = (5 * rng.standard_normal((4, 3, 2, 2)) + 12).astype(x_dtype)
    dy = rng.standard_normal(x.shape).astype(x_dtype)
    gamma, beta = np.ones(3, param_dtype), np.zeros(3, param_dtype)

    def device(comm, xs, dys):
        _, cache = sync_batch_norm_forward(xs, gamma, beta, comm=comm)
        return sync_batch_norm_backward(dys, cache)

    for dx, dgamma, dbeta in InProcessGroup.run(2, device, split(x, [1, 3]), split(dy, [1, 3])):
        assert dx.dtype == x_dtype
        assert dgamma.dtype == dbeta.dtype == param_dtype


def test_a_merged_variance_that_overflows_is_refused_on_every_device():
    # Each device's own sums fit float32 (values near +1e19 on one, -1e19 on the other, little
    # spread within a device), but the merged M2 = sum_p [M2_p + n_p (mean_p - mean)^2] reaches
    # 8e38: one device holding the whole batch refuses it, and so must the two devices, rather
    # than normalize by 1/sqrt(inf) and return beta everywhere.
    x = np.ones((4, 2, 2), np.float32)
    x[:, :, 0] = 2.0
    x[:2] *= 1e19
    x[2:] *= -1e19
    gamma, beta = np.ones(2, np.float32), np.zeros(2, np.float32)
    with pytest.raises(ValueError, match="the variance of x overflows float32"):
        refnorm.batch_norm_forward(x, gamma, beta)

    def device(comm, xs):
        return sync_batch_norm_forward(xs, gamma, beta, comm=comm)[0]

    with pytest.raises(ValueError, match="the variance of x overflows float32"):
        InProcessGroup.run(2, device, split(x, [2, 2]), timeout=10)


def test_a_merged_overflow_is_refused_beside_a_nan_channel_on_every_device():
    # Channel 1 as in the test above (device 0 at +1e19, device 1 at -1e19: the merged M2
    # reaches 8e38); channel 0 holds a NaN on each device. A device's NaN excuses its own
    # channel only: before, it excused channel 1's overflow on both devices, whose outputs
    # came out as beta.
    x = np.ones((4, 2, 2), np.float32)
    x[:, 1, 0] = 2.0
    x[:2, 1] *= 1e19
    x[2:, 1] *= -1e19
    x[0, 0, 0] = x[2, 0, 0] = np.nan
    gamma, beta = np.ones(2, np.float32), np.zeros(2, np.float32)

    def device(comm, xs):
        return sync_batch_norm_forward(xs, gamma, beta, comm=comm)[0]

    with pytest.raises(ValueError, match="the variance of x overflows float32"):
        InProcessGroup.run(2, device, split(x, [2, 2]), timeout=10)


def test_a_devices_own_overflow_is_refused_beside_its_nan_channel():
    # Device 0: a NaN in channel 0, float32 values of 1e20 in channel 1, whose own squared
    # deviations overflow (about 1e40); device 1: a NaN in channel 1, which makes the merged
    # M2 of channel 1 NaN rather than inf. Device 0 refuses its own overflow, as one device
    # holding its shard does; its NaN channel excuses no other channel.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 2, 3))
    x[:2, 1] *= 1e20
    x[0, 0, 0] = x[2, 1, 0] = np.nan
    x = x.astype(np.float32)
    gamma, beta = np.ones(2, np.float32), np.zeros(2, np.float32)
    with pytest.raises(ValueError, match="the variance of x overflows float32"):
        refnorm.batch_norm_forward(x[:2], gamma, beta)

    def device(comm, xs):
        return sync_batch_norm_forward(xs, gamma, beta, comm=comm)[0]

    with pytest.raises(ValueError, match="the variance of x overflows float32"):
        InProcessGroup.run(2, device, split(x, [2, 2]), timeout=10)


def test_a_nan_on_one_device_is_nan_everywhere_not_an_overflow():
    # A NaN input makes its channel's statistics NaN, as on one device; the devices whose own
    # x is finite must not mistake the merged NaN for an overflow of their data.
    rng = np.random.default_rng(3)
    x = 5 * rng.standard_normal((4, 2, 3)) + 12
    x[3, 1, 0] = np.nan
    gamma, beta = np.ones(2), np.zeros(2)

    def device(comm, xs):
        return sync_batch_norm_forward(xs, gamma, beta, comm=comm)[0]

    y = np.concatenate(InProcessGroup.run(2, device, split(x, [2, 2]), timeout=10))
    reference = refnorm.batch_norm_forward(x, gamma, beta)[0]
    np.testing.assert_array_equal(np.isnan(y), np.isnan(reference))
    assert np.isnan(y[:, 1]).all() and np.isfinite(y[:, 0]).all()
    np.testing.assert_allclose(y[:, 0], reference[:, 0], atol=1e-12)


def test_sync_bn_refuses_a_missing_communicator():
    x = np.random.default_rng(0).standard_normal((4, 3, 2, 2))
    with pytest.raises(TypeError, match="comm must be a communicator.*SingleProcess"):
        sync_batch_norm_forward(x, np.ones(3), np.zeros(3), comm=None)


def test_layer_running_statistics_follow_its_momentum():
    # PyTorch's convention (docs/conventions.md): momentum weights the new batch, whose
    # variance enters unbiased over the values of every device; the averages by hand.
    rng = np.random.default_rng(5)
    batches = [3 * rng.standard_normal((7, 2, 3)) + 4 for _ in range(2)]
    sizes, momentum = [3, 0, 4], 0.25

    def device(comm, *shards):
        bn = refnorm.build("syncbn", 2, dtype=np.float64, comm=comm, momentum=momentum)
        for xs in shards:
            bn.forward(xs, training=True)
        return bn.state

    mean, var = np.zeros(2), np.ones(2)
    for x in batches:
        mean = (1 - momentum) * mean + momentum * x.mean(axis=(0, 2))
        var = (1 - momentum) * var + momentum * x.var(axis=(0, 2), ddof=1)
    for state in InProcessGroup.run(3, device, *(split(x, sizes) for x in batches)):
        np.testing.assert_allclose(state["running_mean"], mean, rtol=1e-13)
        np.testing.assert_allclose(state["running_var"], var, rtol=1e-13)


def test_a_shard_whose_float64_sums_overflow_is_refused_as_on_one_device():
    # Device 1's values, 1e308 and 1.5e308, add up beyond float64: its mean is inf, and the
    # merge would turn that into NaN on every device. One device holding the whole batch
    # refuses it, and so must the devices, rather than return NaN everywhere.
    x = np.ones((4, 2, 2))
    x[:, :, 1] = 1.5
    x[2:] *= 1e308
    gamma, beta = np.ones(2), np.zeros(2)
    with pytest.raises(ValueError, match="the variance of x overflows float64"), \
            np.errstate(over="ignore", invalid="ignore"):
        refnorm.batch_norm_forward(x, gamma, beta)

    def device(comm, xs):
        with np.errstate(over="ignore", invalid="ignore"):  # each device thread's own state
            return sync_batch_norm_forward(xs, gamma, beta, comm=comm)[0]

    with pytest.raises(ValueError, match="the variance of x overflows float64"):
        InProcessGroup.run(2, device, split(x, [2, 2]), timeout=10)


def test_sync_backward_refuses_a_dy_of_another_shape():
    # A (1, C) dy would broadcast against this device's (N_p, C) shard without a word.
    x = 5 * np.random.default_rng(0).standard_normal((4, 3)) + 12
    _, cache = sync_batch_norm_forward(x, np.ones(3), np.zeros(3), comm=SingleProcess())
    with pytest.raises(ValueError, match=r"dy must have shape \(4, 3\); got \(1, 3\)"):
        sync_batch_norm_backward(np.ones((1, 3)), cache)


@pytest.mark.parametrize("norm", ["syncbn", "syncsn"])
def test_a_layer_refuses_a_communicator_class_or_non_communicator_when_built(norm):
    # `comm=SingleProcess` (the class: its rank and size are class attributes) failed at the
    # first training forward with "allreduce_sum() missing 1 required positional argument";
    # comm=42 was accepted, and worked in eval mode, until a training forward.
    with pytest.raises(TypeError, match=r"got the class SingleProcess \(call it: "
                                        r"SingleProcess\(\)\)"):
        refnorm.build(norm, 3, comm=SingleProcess)
    with pytest.raises(TypeError, match="comm must be a communicator.*got int"):
        refnorm.build(norm, 3, comm=42)
    x = np.random.default_rng(0).standard_normal((4, 3, 2))
    with pytest.raises(TypeError, match="got the class SingleProcess"):
        sync_batch_norm_forward(x, np.ones(3), np.zeros(3), comm=SingleProcess)


def test_inference_takes_the_layers_path():
    # In eval mode the layer runs the single-device pair (no collective) on its own path
    # (Layer.path, which the trainer sets to "fast"), as BatchNorm does.
    x = 5 * np.random.default_rng(2).standard_normal((4, 3, 2, 2)) + 12
    layer = refnorm.build("syncbn", 3, dtype=np.float64)
    layer.path = "fast"
    with record_paths() as calls:
        layer.forward(x, training=False)
        layer.backward(np.ones_like(x))
    assert calls == [("batch_norm_eval_forward", "fast"), ("batch_norm_backward", "fast")]


def test_the_mean_of_float32_shards_is_the_exact_mean_rounded_once():
    # The module docstring: the sums of the values are float64 and the mean is rounded once,
    # as moments() does on one device. Summed in float32, 5000 values near 1000 per device
    # lose low bits (about 5e6 in a 24-bit significand), and the mean moves by an ulp.
    x = (np.random.default_rng(3).standard_normal((2, 3, 5000)) + 1000).astype(np.float32)
    gamma, beta = np.ones(3, np.float32), np.zeros(3, np.float32)

    def device(comm, xs):
        return sync_batch_norm_forward(xs, gamma, beta, comm=comm)[1].mean

    exact = x.astype(np.float64).mean(axis=(0, 2)).astype(np.float32)   # one rounding
    for mean in InProcessGroup.run(2, device, split(x, [1, 1])):
        np.testing.assert_array_equal(mean, exact)


def test_float16_gradients_are_summed_in_float32():
    # float16 inputs compute in float32 (the conventions page), dy too: dbeta summed in
    # float16 over 4096 values near 0.5 rounds each partial sum to 11 bits (4150.16 -> 4152).
    rng = np.random.default_rng(0)
    x = (3 * rng.standard_normal((2, 1, 4096)) + 5).astype(np.float16)
    dy = rng.uniform(0, 1, x.shape).astype(np.float16)
    gamma, beta = np.ones(1, np.float32), np.zeros(1, np.float32)

    def device(comm, xs, dys):
        _, cache = sync_batch_norm_forward(xs, gamma, beta, comm=comm)
        return sync_batch_norm_backward(dys, cache)

    results = InProcessGroup.run(2, device, split(x, [1, 1]), split(dy, [1, 1]))
    dbeta = combine(results, 2, concat=False)
    # float32's rounding of a sum of 4096 values, relative: well below 1e-5
    np.testing.assert_allclose(dbeta, dy.astype(np.float64).sum(axis=(0, 2)), rtol=1e-5)


@pytest.mark.parametrize("sizes", [[1, 0], [0, 2, 3]])
def test_layer_follows_pytorch_batch_norm_on_the_concatenated_batch(sizes):
    # torch.nn.SyncBatchNorm's documented semantics, in one process: BatchNorm2d on the
    # whole batch. Its running variance is unbiased over the N*H*W values of all devices
    # (one sample in all is enough with H*W > 1), momentum 0.3 weighting the new batch,
    # over three steps; y and dx (autograd, random upstream gradient) on the way.
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    batches = [3 * rng.standard_normal((sum(sizes), 2, 3, 2)) + 4 for _ in range(3)]
    dys = [rng.standard_normal(x.shape) for x in batches]

    def device(comm, *shards):
        bn = refnorm.build("syncbn", 2, dtype=np.float64, comm=comm, momentum=0.3)
        out = [(bn.forward(xs, training=True), bn.backward(dy))
               for xs, dy in zip(shards[:3], shards[3:], strict=True)]
        return out, bn.state

    results = InProcessGroup.run(len(sizes), device, *(split(x, sizes) for x in batches),
                                 *(split(dy, sizes) for dy in dys))
    ref = torch.nn.BatchNorm2d(2, momentum=0.3, dtype=torch.float64)
    for step, (x, dy) in enumerate(zip(batches, dys, strict=True)):
        xt = torch.tensor(x, requires_grad=True)
        yt = ref(xt)
        yt.backward(torch.tensor(dy))
        for i, want in ((0, yt.detach().numpy()), (1, xt.grad.numpy())):
            got = np.concatenate([out[step][i] for out, _ in results])
            # float64 rounding on values of size <= ~10
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    for _, state in results:
        np.testing.assert_allclose(state["running_mean"], ref.running_mean.numpy(), rtol=1e-13)
        np.testing.assert_allclose(state["running_var"], ref.running_var.numpy(), rtol=1e-13)

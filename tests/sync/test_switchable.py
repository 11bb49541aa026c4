"""Synchronized SN (refnorm/sync/switchable.py): P devices give what one device gives."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import refnorm
from refnorm.dispatch import record_paths
from refnorm.gradcheck import check_layer, check_vjp
from refnorm.norms.switchable_norm import (
    SwitchableOptions,
    switchable_norm_backward,
    switchable_norm_forward,
)
from refnorm.sync import (
    InProcessGroup,
    SingleProcess,
    allreduce_gradients,
    sync_switchable_norm_backward,
    sync_switchable_norm_forward,
)
from tests.norms import large_mean
from tests.sync.helpers import ATOL, channel_params, combine, sharded_batches, split


@st.composite
def sn_options(draw):
    # (in_correction, scope_correction): biased, SwitchNorm2d's, SwitchNorm1d's variances
    corrections = draw(st.sampled_from([(0, 0), (1, 0), (0, 1)]))
    return SwitchableOptions(
        draw(st.sampled_from([("in", "ln", "bn"), ("ln", "bn"), ("bn", "in"), ("in", "ln")])),
        in_correction=corrections[0], hard=draw(st.booleans()),
        scope_correction=corrections[1])


@given(sharded_batches(), sn_options(), st.data())
@settings(max_examples=15)
def test_sync_switchable_norm_equals_one_device(case, options, data):
    sizes, x, dy = case
    S = int(np.prod(x.shape[2:]))
    # configurations single-device SN refuses (tests/norms/test_switchable_norm.py)
    assume("in" not in options.scopes or S >= 2)
    assume(options.in_correction == 0 or S >= 2)
    assume("ln" not in options.scopes or x.shape[1] * S >= 2)
    params = channel_params(data.draw, x.shape[1], K=len(options.scopes))

    def device(comm, xs, dys):
        y, cache = sync_switchable_norm_forward(xs, *params, comm=comm, options=options)
        return (y, *sync_switchable_norm_backward(dys, cache))

    results = InProcessGroup.run(len(sizes), device, split(x, sizes), split(dy, sizes))
    y, cache = switchable_norm_forward(x, *params, options=options)
    reference = (y, *switchable_norm_backward(dy, cache))
    for i, ref in enumerate(reference):
        # y and dx are concatenated; gamma, beta and both control-parameter gradients are
        # per-device contributions whose sum over devices is the one-device gradient.
        np.testing.assert_allclose(combine(results, i, concat=i < 2), ref, rtol=0,
                                   atol=ATOL * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("options", [SwitchableOptions(), SwitchableOptions(in_correction=1)])
def test_float32_at_a_large_mean_is_as_accurate_as_the_kernels(options):
    # As single-device SN (tests/norms/test_switchable_norm.py, the bound derived in
    # tests/norms/large_mean.py): mean 1e4, spread 1e-3, three devices holding 1, 0 and 3
    # samples; the synchronized BN mean is rounded to float32 once and what it lost summed
    # across the devices with the spread of the IN means.
    x, deviations, params, dy = large_mean.case((4, 7, 5, 3), np.float32, 3)
    sizes = [1, 0, 3]

    def device(comm, xs, dys):
        y, cache = sync_switchable_norm_forward(xs, *params, comm=comm, options=options)
        return (y, *sync_switchable_norm_backward(dys, cache))

    def synchronized(data):
        results = InProcessGroup.run(len(sizes), device, split(data, sizes), split(dy, sizes))
        got = {q: combine(results, i, concat=i < 2) for i, q in enumerate(large_mean.OUTPUTS)}
        return large_mean.errors(got, deviations, params, dy, options)

    errors, at_zero = synchronized(x), synchronized(deviations)
    limits = large_mean.bound(large_mean.kernels_error(x, deviations, params, dy), at_zero,
                              np.float32)
    assert not large_mean.failures(errors, limits), large_mean.failures(errors, limits)


@pytest.mark.parametrize("training", [True, False])
def test_layer_gradients_in_training_and_at_inference(training):
    # Training runs the synchronized pair, inference the single-device eval pair.
    rng = np.random.default_rng(5)
    layer = refnorm.build("syncsn", 3, dtype=np.float64)
    layer.params = {k: v + 0.5 * rng.standard_normal(v.shape) for k, v in layer.params.items()}
    layer.set_population(12 + rng.standard_normal(3), rng.uniform(20, 30, 3))
    x = 5 * rng.standard_normal((4, 3, 2, 2)) + 12
    for name, err in check_layer(layer, x, training=training).items():
        assert err.max_rel_error < 1e-6, (name, err)  # the suite's gradcheck tolerance


def test_layer_at_inference_normalizes_by_its_population_statistics():
    # Inference with the BN scope alone is BN's: y = gamma (x - mean) / sqrt(var + eps) + beta
    # with the population statistics set on the layer, not this batch's statistics.
    rng = np.random.default_rng(15)
    x = 5 * rng.standard_normal((4, 3, 2, 2)) + 12
    mean, var = 12 + rng.standard_normal(3), rng.uniform(20, 30, 3)
    layer = refnorm.build("syncsn", 3, scopes=("bn",), dtype=np.float64)
    layer.set_population(mean, var)
    layer.params = {**layer.params, "gamma": np.array([1.5, 0.5, 1.0]),
                    "beta": np.array([0.1, -0.2, 0.3])}
    want = (layer.params["gamma"][:, None, None] * (x - mean[:, None, None])
            / np.sqrt(var[:, None, None] + 1e-5) + layer.params["beta"][:, None, None])
    # a few float64 operations on values of size <= 1e2
    np.testing.assert_allclose(layer.forward(x, training=False), want, rtol=0, atol=1e-12)


def test_layer_updates_running_statistics_with_the_global_batch():
    rng = np.random.default_rng(1)
    x = 3 * rng.standard_normal((7, 2, 3, 3)) + 4
    sizes = [3, 0, 4]

    def device(comm, xs):
        sn = refnorm.build("syncsn", 2, dtype=np.float64, comm=comm)
        sn.forward(xs, training=True)
        return sn.state, sn.batch_statistics().count

    results = InProcessGroup.run(3, device, split(x, sizes))
    bn = refnorm.build("bn", 2, dtype=np.float64)
    bn.forward(x, training=True)
    for state, count in results:
        assert count == 7 * 9  # every device's values
        for key in ("running_mean", "running_var"):
            np.testing.assert_allclose(state[key], bn.state[key], rtol=1e-13)


@pytest.mark.parametrize(("scopes", "training"), [
    (("in", "ln", "bn"), False), (("in", "ln"), True), (("in", "ln"), False)])
def test_the_single_device_pair_takes_the_layers_path(scopes, training):
    # Where the layer runs single-device SN (inference, or no BN scope to synchronize) it
    # calls the pure pair on its own path (Layer.path, which the trainer sets to "fast"), as
    # SwitchableNorm does.
    x = 5 * np.random.default_rng(2).standard_normal((4, 3, 2, 2)) + 12
    layer = refnorm.build("syncsn", 3, scopes=scopes, dtype=np.float64)
    layer.path = "fast"
    with record_paths() as calls:
        layer.forward(x, training=training)
        layer.backward(np.ones_like(x))
    forward = "switchable_norm_eval_forward" if "bn" in scopes else "switchable_norm_forward"
    assert calls == [(forward, "fast"), ("switchable_norm_backward", "fast")]


def test_control_parameter_gradients_are_reduced_once():
    # Each device returns its own contribution; allreduce_gradients adds them once. Had the
    # layer reduced them too, the step would use P times the gradient.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 2, 3, 3))
    dy = rng.standard_normal(x.shape)
    logits = rng.standard_normal(3), rng.standard_normal(3)
    params = (np.ones(2), np.zeros(2), *logits)

    def device(comm, xs, dys):
        _, cache = sync_switchable_norm_forward(xs, *params, comm=comm)
        local = sync_switchable_norm_backward(dys, cache)[3]
        layer = refnorm.build("syncsn", 2, dtype=np.float64, comm=comm)
        layer.grads = {"mean_logits": local}
        allreduce_gradients([layer], comm, weight=1.0)
        return local, layer.grads["mean_logits"]

    results = InProcessGroup.run(3, device, split(x, [2, 2, 2]), split(dy, [2, 2, 2]))
    _, cache = switchable_norm_forward(x, *params)
    reference = switchable_norm_backward(dy, cache)[3]
    assert not np.allclose(results[0][0], reference)           # a contribution, not the total
    for _, reduced in results:
        np.testing.assert_allclose(reduced, reference, atol=1e-13)


def test_no_samples_on_any_device_is_an_error():
    def device(comm, n):
        x = np.ones((n, 3, 2, 2))
        return sync_switchable_norm_forward(x, np.ones(3), np.zeros(3), np.zeros(3),
                                            np.zeros(3), comm=comm)

    with pytest.raises(ValueError, match="no samples on any device"):
        InProcessGroup.run(2, device, [0, 0])


def test_single_device_cache_holds_no_communicator():
    _, cache = switchable_norm_forward(np.arange(24.0).reshape(2, 3, 2, 2), np.ones(3),
                                       np.zeros(3), np.zeros(3), np.zeros(3))
    assert not any("comm" in name for name in vars(cache))


def _synchronized_and_one_device(x, dy, params, sizes, options):
    def device(comm, xs, dys):
        y, cache = sync_switchable_norm_forward(xs, *params, comm=comm, options=options)
        return (y, *sync_switchable_norm_backward(dys, cache))

    results = InProcessGroup.run(len(sizes), device, split(x, sizes), split(dy, sizes),
                                 timeout=10)
    y, cache = switchable_norm_forward(x, *params, options=options)
    return results, (y, *switchable_norm_backward(dy, cache))


@pytest.mark.parametrize("sizes", [[0, 1], [1, 0, 0]])
def test_a_global_batch_of_one_sample_is_enough_for_the_bn_scope(sizes):
    # The BN scope of Eq. (15) needs more than one value per channel over all devices: one
    # sample of 2 x 2 positions gives four, as on one device, even though N is 1.
    rng = np.random.default_rng(6)
    x = 5 * rng.standard_normal((1, 3, 2, 2)) + 12
    dy = rng.standard_normal(x.shape)
    params = (1 + 0.5 * rng.standard_normal(3), rng.standard_normal(3),
              rng.standard_normal(3), rng.standard_normal(3))
    results, reference = _synchronized_and_one_device(x, dy, params, sizes,
                                                      SwitchableOptions())
    for i, ref in enumerate(reference):
        np.testing.assert_allclose(combine(results, i, concat=i < 2), ref, rtol=0,
                                   atol=ATOL * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("sizes", [[0, 1], [1, 0, 0]])
def test_a_global_batch_of_one_value_per_channel_is_refused_for_the_bn_scope(sizes):
    # (N, C) input, one sample over all devices: the BN statistic of each channel covers one
    # value, which one device holding the batch refuses; so do the devices, after pooling.
    x = np.array([[3.0, 5.0, 8.0]])
    params = (np.ones(3), np.zeros(3), np.zeros(2), np.zeros(2))
    options = SwitchableOptions(("ln", "bn"))
    with pytest.raises(ValueError, match="the BN scope needs more than 1 value per statistic"):
        switchable_norm_forward(x, *params, options=options)

    def device(comm, xs):
        return sync_switchable_norm_forward(xs, *params, comm=comm, options=options)[0]

    with pytest.raises(ValueError, match="the synchronized BN scope needs more than 1 value "
                                         "per statistic over all devices; got 1"):
        InProcessGroup.run(len(sizes), device, split(x, sizes), timeout=10)


@pytest.mark.parametrize("sizes", [[1, 4], [3, 0, 2]])
def test_unbiased_scopes_count_the_whole_batch_with_unequal_shards(sizes):
    # scope_correction=1 (SwitchNorm1d's convention) makes the BN variance unbiased over the
    # m_bn = N S values of the whole batch, N summed over every device; in the forward and in
    # the backward's d sigma_bn^2 / dh (Eq. 24), not the N_p of one shard.
    rng = np.random.default_rng(7)
    x = 5 * rng.standard_normal((sum(sizes), 3)) + 12
    dy = rng.standard_normal(x.shape)
    params = (1 + 0.5 * rng.standard_normal(3), rng.standard_normal(3),
              rng.standard_normal(2), rng.standard_normal(2))
    options = SwitchableOptions(("ln", "bn"), scope_correction=1)
    results, reference = _synchronized_and_one_device(x, dy, params, sizes, options)
    for i, ref in enumerate(reference):
        np.testing.assert_allclose(combine(results, i, concat=i < 2), ref, rtol=0,
                                   atol=ATOL * max(1.0, np.abs(ref).max()))


def test_the_device_count_is_exact_for_float32_planes_of_more_than_4096_positions():
    # The devices check they share one spatial size S by summing S and S^2 over the ranks:
    # that sum is float64, exact far beyond S^2 = 2^24 where float32 would round it and
    # refuse a 1-sample-per-device batch of 17 x 241 planes (S = 4097).
    rng = np.random.default_rng(8)
    x = (3 * rng.standard_normal((2, 2, 17, 241)) + 5).astype(np.float32)
    params = tuple(np.asarray(p, np.float32) for p in (np.ones(2), np.zeros(2), np.zeros(3),
                                                       np.zeros(3)))

    def device(comm, xs):
        return sync_switchable_norm_forward(xs, *params, comm=comm)[0]

    y = np.concatenate(InProcessGroup.run(2, device, split(x, [1, 1]), timeout=10))
    np.testing.assert_allclose(y, switchable_norm_forward(x, *params)[0], atol=1e-5)


def test_a_spread_of_in_means_beyond_float32_is_refused_as_on_one_device():
    # BN scope only, (N, C) input: the IN means are the values, -3e38, 3e38, 3e38. Their sum
    # fits float32 but their squared spread about the BN mean does not: one device refuses,
    # and the synchronized forward must too instead of returning NaN.
    x = np.array([[-3e38], [3e38], [3e38]], np.float32)
    params = (np.ones(1, np.float32), np.zeros(1, np.float32), np.zeros(1, np.float32),
              np.zeros(1, np.float32))
    options = SwitchableOptions(("bn",))
    with pytest.raises(ValueError, match="the variance of x overflows float32"):
        switchable_norm_forward(x, *params, options=options)
    with pytest.raises(ValueError, match="the variance of x overflows float32"):
        sync_switchable_norm_forward(x, *params, comm=SingleProcess(), options=options)


def test_a_layer_without_a_bn_scope_trains_as_plain_sn_on_each_device():
    # With scopes ("in", "ln") nothing is synchronized: each device's layer is SN on its own
    # shard, keeps no running statistics and makes no collective.
    rng = np.random.default_rng(9)
    x = 5 * rng.standard_normal((4, 3, 2, 2)) + 12
    dy = rng.standard_normal(x.shape)

    def device(comm, xs, dys):
        layer = refnorm.build("syncsn", 3, dtype=np.float64, comm=comm, scopes=("in", "ln"))
        y = layer.forward(xs, training=True)
        return y, layer.backward(dys), layer.grads

    results = InProcessGroup.run(2, device, split(x, [1, 3]), split(dy, [1, 3]), timeout=10)
    for (y, dx, grads), xs, dys in zip(results, split(x, [1, 3]), split(dy, [1, 3]),
                                       strict=True):
        plain = refnorm.build("sn", 3, dtype=np.float64, scopes=("in", "ln"))
        np.testing.assert_array_equal(y, plain.forward(xs, training=True))
        np.testing.assert_array_equal(dx, plain.backward(dys))
        for key, grad in plain.grads.items():
            np.testing.assert_array_equal(grads[key], grad)


@pytest.mark.parametrize("options", [None, {"scopes": ("ln", "bn")}])
def test_sync_sn_refuses_options_that_are_not_switchable_options(options):
    x = np.random.default_rng(0).standard_normal((4, 3, 2, 2))
    g, b, logits = np.ones(3), np.zeros(3), np.zeros(3)
    with pytest.raises(TypeError, match="options must be a SwitchableOptions"):
        sync_switchable_norm_forward(x, g, b, logits, logits, comm=SingleProcess(),
                                     options=options)


@pytest.mark.parametrize("scopes", [("in", "ln", "bn"), ("in", "ln")])
def test_sync_sn_refuses_a_missing_communicator(scopes):
    # Without a BN scope nothing is synchronized, but comm is still a required argument.
    x = np.random.default_rng(0).standard_normal((4, 3, 2, 2))
    g, b, logits = np.ones(3), np.zeros(3), np.zeros(len(scopes))
    with pytest.raises(TypeError, match="comm must be a communicator.*SingleProcess"):
        sync_switchable_norm_forward(x, g, b, logits, logits, comm=None,
                                     options=SwitchableOptions(scopes))


def test_a_merged_spread_of_in_means_is_refused_beside_a_nan_channel_on_every_device():
    # Channel 1's IN means: 1.2e19 on device 0, -1.2e19 on device 1. Each device's own squares
    # sum to 2.9e38, all four to 5.8e38: the BN scope's merged spread overflows float32 (each
    # sample's LN pool, 7.2e37, fits). Channel 0 holds a NaN on each device, which excuses
    # its own channel only: before, it excused channel 1 on both devices.
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 2, 3))
    x[:, 1] += np.array([1.0, 1.0, -1.0, -1.0])[:, None] * 1.2e19
    x[0, 0, 0] = x[2, 0, 0] = np.nan
    x = x.astype(np.float32)
    params = (np.ones(2, np.float32), np.zeros(2, np.float32), np.zeros(3, np.float32),
              np.zeros(3, np.float32))

    def device(comm, xs):
        return sync_switchable_norm_forward(xs, *params, comm=comm)[0]

    with pytest.raises(ValueError, match="the variance of x overflows float32"):
        InProcessGroup.run(2, device, split(x, [2, 2]), timeout=10)


def test_a_nan_on_one_device_is_nan_everywhere_not_an_overflow():
    # One NaN at (n=3, c=1) makes NaN the BN-scope statistics of channel 1 (every sample) and
    # the LN-scope statistics of sample 3, as on one device holding the whole batch; the
    # devices whose own x is finite must not take the merged NaN for an overflow of theirs.
    rng = np.random.default_rng(3)
    x = 5 * rng.standard_normal((4, 2, 3)) + 12
    x[3, 1, 0] = np.nan
    params = (np.ones(2), np.zeros(2), rng.standard_normal(3), rng.standard_normal(3))

    def device(comm, xs):
        return sync_switchable_norm_forward(xs, *params, comm=comm)[0]

    y = np.concatenate(InProcessGroup.run(2, device, split(x, [2, 2]), timeout=10))
    assert np.isnan(y[:, 1]).all() and np.isnan(y[3]).all()
    assert np.isfinite(y[:3, 0]).all()
    np.testing.assert_allclose(y[:3, 0], switchable_norm_forward(x, *params)[0][:3, 0],
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize(("shape", "options", "message"), [
    ((4, 3), SwitchableOptions(), "the IN scope needs more than 1 value per statistic"),
    ((4, 1), SwitchableOptions(("ln", "bn")), "the LN scope needs more than 1 value"),
    ((4, 3, 1), SwitchableOptions(("ln", "bn"), in_correction=1),
     "in_correction=1 .* needs more than one spatial position"),
])
def test_scopes_one_device_refuses_are_refused_by_the_devices(shape, options, message):
    # The IN and LN scopes are per device (Eq. 15): a statistic over one value is refused
    # before any collective, as single-device SN refuses it.
    x = 5 * np.random.default_rng(0).standard_normal(shape) + 12
    C, K = shape[1], len(options.scopes)
    params = (np.ones(C), np.zeros(C), np.zeros(K), np.zeros(K))
    with pytest.raises(ValueError, match=message):
        switchable_norm_forward(x, *params, options=options)

    def device(comm, xs):
        return sync_switchable_norm_forward(xs, *params, comm=comm, options=options)[0]

    with pytest.raises(ValueError, match=message):
        InProcessGroup.run(2, device, split(x, [1, 3]), timeout=10)


@pytest.mark.parametrize("value", [np.inf, -np.inf])
def test_an_infinite_value_on_one_device_is_nan_everywhere_not_an_overflow(value):
    # As a NaN (the test above): one device holding the whole batch returns NaN for the BN
    # scope of channel 1 and the LN scope of sample 3, and no error; the device whose own x
    # is finite must not take the other's infinite IN mean, summed, for an overflow of its x.
    rng = np.random.default_rng(3)
    x = 5 * rng.standard_normal((4, 2, 3)) + 12
    x[3, 1, 0] = value
    params = (np.ones(2), np.zeros(2), rng.standard_normal(3), rng.standard_normal(3))

    def device(comm, xs):
        with np.errstate(invalid="ignore"):  # inf - inf in the statistics, as on one device
            return sync_switchable_norm_forward(xs, *params, comm=comm)[0]

    y = np.concatenate(InProcessGroup.run(2, device, split(x, [2, 2]), timeout=10))
    with np.errstate(invalid="ignore"):
        reference = switchable_norm_forward(x, *params)[0]
    assert np.isnan(y[:, 1]).all() and np.isnan(y[3]).all()
    assert np.isfinite(y[:3, 0]).all()
    np.testing.assert_allclose(y[:3, 0], reference[:3, 0], rtol=0, atol=1e-12)


def test_a_sum_of_in_means_beyond_float32_is_refused_as_on_one_device():
    # BN scope only, (N, C) input: the IN means 3e38 and 3e38 are finite, their sum is not.
    x = np.array([[3e38], [3e38], [1.0]], np.float32)
    params = (np.ones(1, np.float32), np.zeros(1, np.float32), np.zeros(1, np.float32),
              np.zeros(1, np.float32))
    options = SwitchableOptions(("bn",))
    with pytest.raises(ValueError, match="the variance of x overflows float32"), \
            np.errstate(over="ignore", invalid="ignore"):
        switchable_norm_forward(x, *params, options=options)

    def device(comm, xs):
        with np.errstate(over="ignore", invalid="ignore"):  # each device thread's own state
            return sync_switchable_norm_forward(xs, *params, comm=comm, options=options)[0]

    with pytest.raises(ValueError, match="the variance of x overflows float32"):
        InProcessGroup.run(2, device, split(x, [1, 2]), timeout=10)


@pytest.mark.parametrize("options", [SwitchableOptions(), SwitchableOptions(scope_correction=1)])
def test_gradients_over_unequal_shards_match_finite_differences_of_the_whole_batch(options):
    # The concatenated dx and the summed gamma, beta and control-parameter gradients of
    # devices holding 0, 2 and 3 samples are the gradients of one SN over the whole batch
    # (Luo et al., SN journal version, Eq. 22-25 with Eq. 16-20), checked against central
    # finite differences of that SN in float64 with a random upstream gradient.
    rng = np.random.default_rng(8)
    sizes = [0, 2, 3]
    inputs = {"x": 5 * rng.standard_normal((5, 2, 2, 2)) + 12,
              "gamma": 1 + 0.5 * rng.standard_normal(2), "beta": rng.standard_normal(2),
              "mean_logits": rng.standard_normal(3), "var_logits": rng.standard_normal(3)}

    def whole_batch(x, gamma, beta, mean_logits, var_logits):
        return switchable_norm_forward(x, gamma, beta, mean_logits, var_logits,
                                       options=options)[0]

    def synchronized(dy, x, gamma, beta, mean_logits, var_logits):
        def device(comm, xs, dys):
            _, cache = sync_switchable_norm_forward(xs, gamma, beta, mean_logits, var_logits,
                                                    comm=comm, options=options)
            return sync_switchable_norm_backward(dys, cache)

        results = InProcessGroup.run(3, device, split(x, sizes), split(dy, sizes))
        names = ("x", "gamma", "beta", "mean_logits", "var_logits")
        return {name: combine(results, i, concat=i == 0) for i, name in enumerate(names)}

    for name, err in check_vjp(whole_batch, synchronized, inputs, seed=3).items():
        assert err.max_rel_error < 1e-6, (name, err)  # the suite's gradcheck tolerance

"""SN's batch average (refnorm/inference.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import refnorm
from refnorm.core.running import BatchStatistics
from refnorm.inference import batch_average, merge_batch_statistics
from refnorm.sync.comm import InProcessGroup


def test_batch_average_is_exported_at_the_top_level():
    assert refnorm.batch_average is batch_average


def test_batch_average_equals_the_population_of_the_batches_fed():
    rng = np.random.default_rng(9)
    sn = refnorm.build("sn", 3, dtype=np.float64, inference="batch_average")
    with pytest.raises(RuntimeError, match=r"no population statistics yet.*batch_average"):
        sn.forward(np.ones((2, 3, 2, 2)), training=False)
    batches = [3 * rng.standard_normal((n, 3, 4, 4)) + 7 for n in (2, 5, 3)]  # unequal sizes
    params = copy.deepcopy(sn.params)
    assert batch_average(sn, batches) == 3
    assert bool(sn.state["population_ready"])
    everything = np.concatenate(batches).transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(sn.state["running_mean"], everything.mean(axis=1), rtol=1e-13)
    np.testing.assert_allclose(sn.state["running_var"], everything.var(axis=1), rtol=1e-12)
    for key in params:
        np.testing.assert_array_equal(sn.params[key], params[key])
    with pytest.raises(RuntimeError, match=r"backward\(\) called before forward\(\)"):
        sn.backward(np.ones((3, 3, 4, 4)))  # the caches of the fed batches are dropped
    x = rng.standard_normal((4, 3, 4, 4))
    np.testing.assert_array_equal(sn.forward(x[:1], training=False),
                                  sn.forward(x, training=False)[:1])


def test_batch_average_freezes_the_rest_of_the_network():
    rng = np.random.default_rng(10)
    bn = refnorm.build("bn", 3, dtype=np.float64)
    sn = refnorm.build("sn", 3, dtype=np.float64)  # moving average: set all the same
    model = [bn, sn]
    bn_state, sn_state = copy.deepcopy(bn.state), copy.deepcopy(sn.state)
    batches = [rng.standard_normal((4, 3, 2, 2)) + 5 for _ in range(3)]
    batch_average(model, batches)
    for key in bn_state:
        np.testing.assert_array_equal(bn.state[key], bn_state[key])
    # The SN input is BN's training-mode output of each batch (BN statistics of that batch).
    fed = np.concatenate([copy.deepcopy(bn).forward(b, training=True) for b in batches])
    fed = fed.transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(sn.state["running_mean"], fed.mean(axis=1), atol=1e-13)
    np.testing.assert_allclose(sn.state["running_var"], fed.var(axis=1), rtol=1e-12)
    assert not np.allclose(sn.state["running_var"], sn_state["running_var"])


def test_batch_average_runs_a_tuple_of_layers_in_order():
    """A tuple model, as a list: BN's training-mode output of each batch feeds SN."""
    rng = np.random.default_rng(13)
    bn = refnorm.build("bn", 3, dtype=np.float64)
    sn = refnorm.build("sn", 3, dtype=np.float64)
    batches = [rng.standard_normal((4, 3, 2, 2)) + 5 for _ in range(2)]
    fed = np.concatenate([copy.deepcopy(bn).forward(b, training=True) for b in batches])
    assert batch_average((bn, sn), batches) == 2
    fed = fed.transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(sn.state["running_mean"], fed.mean(axis=1), atol=1e-13)
    np.testing.assert_allclose(sn.state["running_var"], fed.var(axis=1), rtol=1e-12)


def test_a_failing_batch_restores_every_state():
    sn = refnorm.build("sn", 3, dtype=np.float64, inference="batch_average")
    state = copy.deepcopy(sn.state)
    good = np.random.default_rng(0).standard_normal((2, 3, 2, 2))
    with pytest.raises(ValueError):
        batch_average(sn, [good, np.ones((2, 4, 2, 2))])  # wrong channel count
    for key in state:
        np.testing.assert_array_equal(sn.state[key], state[key])


def test_batch_average_needs_an_sn_layer_and_a_batch():
    with pytest.raises(ValueError, match="no SwitchableNorm layer"):
        batch_average([refnorm.build("bn", 2)], [np.ones((2, 2))])
    with pytest.raises(ValueError, match="no SwitchableNorm layer"):
        batch_average(refnorm.build("sn", 2, scopes=("in", "ln")), [np.ones((2, 2, 2, 2))])
    with pytest.raises(ValueError, match="at least one batch"):
        batch_average(refnorm.build("sn", 2), [])


def test_merge_is_the_law_of_total_variance():
    rng = np.random.default_rng(11)
    parts = [rng.standard_normal((n, 2)) * 3 + 1 for n in (1, 4, 7)]
    records = [BatchStatistics(len(p), p.mean(axis=0), p.var(axis=0)) for p in parts]
    mean, var = merge_batch_statistics(records)
    everything = np.concatenate(parts)
    np.testing.assert_allclose(mean, everything.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(var, everything.var(axis=0), rtol=1e-12)


def _records(parts):
    return [BatchStatistics(len(p), p.mean(axis=0), p.var(axis=0)) for p in parts]


def test_merge_over_devices_with_unequal_counts_is_the_population_of_all_values():
    """Device 0 fed batches of 2 and 5 values per channel, device 1 one batch of 9: the
    merged statistics are those of all 16 values, on both devices (the counts are summed
    over the devices, not assumed equal)."""
    rng = np.random.default_rng(5)
    parts = [rng.standard_normal((n, 3)) * 2 + 4 for n in (2, 5, 9)]
    per_device = [_records(parts[:2]), _records(parts[2:])]
    results = InProcessGroup.run(2, lambda comm, records: merge_batch_statistics(records,
                                                                                comm=comm),
                                 per_device)
    everything = np.concatenate(parts)
    for mean, var in results:
        np.testing.assert_allclose(mean, everything.mean(axis=0), rtol=1e-13)
        np.testing.assert_allclose(var, everything.var(axis=0), rtol=1e-12)


def test_merge_is_in_float64_whatever_the_records_dtype():
    """float32 batch means far from 0 (about 1000, 0.003 apart): the merge, and the spread of
    the batch means in it, are float64, as documented, not the records' float32."""
    rng = np.random.default_rng(6)
    parts = [(rng.standard_normal((64, 2)) * 0.01 + 1000 + 0.003 * i) for i in range(4)]
    records = [BatchStatistics(len(p), p.mean(axis=0).astype(np.float32),
                               p.var(axis=0).astype(np.float32)) for p in parts]
    mean, var = merge_batch_statistics(records)
    assert mean.dtype == np.float64 and var.dtype == np.float64
    exact = np.mean([np.asarray(r.var, np.float64) for r in records], axis=0) + np.var(
        [np.asarray(r.mean, np.float64) for r in records], axis=0)
    np.testing.assert_allclose(var, exact, rtol=1e-9)


def test_merge_batch_statistics_refuses_no_records():
    with pytest.raises(ValueError, match="at least one record"):
        merge_batch_statistics([])


def test_merge_batch_statistics_refuses_a_zero_count():
    # used to return NaN for every channel
    with pytest.raises(ValueError, match="count must be an int >= 1"):
        merge_batch_statistics([BatchStatistics(0, np.zeros(3), np.ones(3))])


def test_merge_batch_statistics_refuses_records_of_different_channels():
    records = [BatchStatistics(2, np.zeros(3), np.ones(3)),
               BatchStatistics(2, np.zeros(4), np.ones(4))]
    with pytest.raises(ValueError, match="one shape"):
        merge_batch_statistics(records)


def test_population_statistics_keep_the_layers_dtype():
    # The merge is in float64; a float32 layer stores its population in float32, as its
    # running statistics were, so that checkpoints and the eval forward see one dtype.
    rng = np.random.default_rng(10)
    sn = refnorm.build("sn", 3, inference="batch_average")         # float32 parameters
    batches = [(3 * rng.standard_normal((4, 3, 4, 4)) + 7).astype(np.float32) for _ in range(2)]
    assert batch_average(sn, batches) == 2
    assert sn.state["running_mean"].dtype == np.float32
    assert sn.state["running_var"].dtype == np.float32
    sn.set_population(np.zeros(3, np.float64), np.ones(3, np.float64))
    assert sn.state["running_mean"].dtype == sn.state["running_var"].dtype == np.float32


def test_merge_batch_statistics_refuses_a_count_that_is_not_an_int():
    # A count of 2.5 values is a mistake upstream (a mean taken where a count was meant).
    with pytest.raises(TypeError, match="count must be an int >= 1; got 2.5"):
        merge_batch_statistics([BatchStatistics(2.5, np.zeros(3), np.ones(3))])
    with pytest.raises(TypeError, match="count must be an int >= 1; got True"):
        merge_batch_statistics([BatchStatistics(True, np.zeros(3), np.ones(3))])


def test_a_failing_batch_restores_the_moving_averages_it_had_moved():
    # A moving-average SN layer updates its running statistics in every training forward:
    # the good batch fed before the failing one moved them, and they are put back, as are a
    # BN layer's beside it.
    rng = np.random.default_rng(12)
    bn = refnorm.build("bn", 3, dtype=np.float64)
    sn = refnorm.build("sn", 3, dtype=np.float64)          # inference="moving_average"
    states = [copy.deepcopy(bn.state), copy.deepcopy(sn.state)]
    good = 3 * rng.standard_normal((2, 3, 2, 2)) + 5
    with pytest.raises(ValueError):
        batch_average([bn, sn], [good, np.ones((2, 4, 2, 2))])   # wrong channel count
    for layer, state in zip((bn, sn), states, strict=True):
        assert layer.state.keys() == state.keys()
        for key in state:
            np.testing.assert_array_equal(layer.state[key], state[key])


@pytest.mark.parametrize(
    ("record", "match"),
    [(BatchStatistics(2, np.zeros(3), np.ones(4)), "one shape"),
     (BatchStatistics(2, np.zeros((3, 1)), np.ones((3, 1))), r"one shape \(C,\)"),
     (BatchStatistics(2, np.zeros(()), np.ones(())), r"one shape \(C,\)")],
    ids=["var of another length", "2-D", "0-d"],
)
def test_merge_batch_statistics_refuses_a_record_that_is_not_per_channel(record, match):
    with pytest.raises(ValueError, match=match):
        merge_batch_statistics([record])


def test_merge_batch_statistics_refuses_a_record_that_is_not_batch_statistics():
    with pytest.raises(TypeError, match="records must be BatchStatistics; got tuple"):
        merge_batch_statistics([(2, np.zeros(3), np.ones(3))])


@pytest.mark.parametrize(("shape", "batches"), [((4, 3, 3, 5), 1), ((2, 4, 3, 3, 5), 2)])
def test_batch_average_refuses_one_array_for_its_batches(shape, batches):
    """Iterating one (4, 3, 3, 5) batch would feed its samples, each a valid (N, C, L) input
    for C = 3, as four batches and set wrong statistics without a word; a stacked array is
    refused too, with the two ways to say what is meant, which both work."""
    layer = refnorm.SwitchableNorm(3, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal(shape)
    with pytest.raises(TypeError, match=r"not one array: got an array of shape .*"
                                        r"pass \[x\] for one batch, or list\(stacked\)"):
        batch_average(layer, x)
    assert batch_average(layer, [x] if batches == 1 else list(x)) == batches

"""Communicators (refnorm/sync/comm.py): sums on every rank, and clear errors instead of hangs:
ranks that disagree (steps, modes, layers) or get stuck end the group at once, saying where
each rank was."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import refnorm
from refnorm.sync import (
    InProcessGroup,
    SingleProcess,
    sync_batch_norm_backward,
    sync_batch_norm_forward,
    sync_switchable_norm_backward,
    sync_switchable_norm_forward,
)
from refnorm.sync.comm import MeteredCommunicator


def test_in_process_sum_is_bitwise_the_same_on_every_rank():
    parts = [np.array([0.1, 1e16]), np.array([0.2, -1e16]), np.array([0.3, 1.0])]

    def device(comm, a):
        return comm.allreduce_sum([a])[0]

    results = InProcessGroup.run(3, device, parts)
    expected = (parts[0] + parts[1]) + parts[2]  # rank order
    for r in results:
        np.testing.assert_array_equal(r, expected)


def test_single_process_returns_its_input():
    a = np.arange(3.0)
    (out,) = SingleProcess().allreduce_sum([a])
    np.testing.assert_array_equal(out, a)


def test_one_array_for_the_list_of_arrays_is_refused():
    """allreduce_sum takes a list: one (2, 3) array iterated would be summed as two arrays of
    3 values (SingleProcess returned its rows, a list, without a word)."""
    a = np.arange(6.0).reshape(2, 3)
    says = r"allreduce_sum takes a list of arrays; got one array of shape \(2, 3\) \(pass \[a\]\)"
    for comm in (SingleProcess(), MeteredCommunicator(SingleProcess())):
        with pytest.raises(TypeError, match=says):
            comm.allreduce_sum(a)

    def device(comm):
        return comm.allreduce_sum(a)

    with pytest.raises(TypeError, match=says):
        InProcessGroup.run(2, device, timeout=10)


def test_group_size_and_per_rank_arguments_are_checked():
    with pytest.raises(ValueError, match="size must be a positive int"):
        InProcessGroup.run(0, lambda comm: None)
    with pytest.raises(ValueError, match="each per-rank argument needs 2 entries; got 3"):
        InProcessGroup.run(2, lambda comm, a: None, [1, 2, 3])


def test_using_a_device_after_its_group_finished_is_a_clear_error():
    def forward(comm, xs):
        return sync_batch_norm_forward(xs, np.ones(3), np.zeros(3), comm=comm)[1]

    caches = InProcessGroup.run(2, forward, [np.ones((2, 3)) * [[1], [2]]] * 2)
    with pytest.raises(RuntimeError, match=r"run\(\) has returned"):
        sync_batch_norm_backward(np.ones((2, 3)), caches[0])


# -- ranks that disagree end at once, with where each was ----------------------------------------

# These groups end in milliseconds; the group's own timeout is well above that. A group that
# waited it out would end with the watchdog's TimeoutError (before the leave protocol, with a
# BrokenBarrierError): the ValueError naming the ranks is the sign that it ended at once.
GROUP_TIMEOUT_S = 5.0


def _train(comm, steps, training):
    layer = refnorm.build("syncbn", 3, dtype=np.float64, comm=comm)
    x = 5 * np.random.default_rng(comm.rank).standard_normal((2, 3)) + 12
    for _ in range(steps):
        layer.forward(x, training=training)
        layer.backward(np.ones_like(x))


def test_uneven_steps_fail_at_once_naming_both_ranks():
    with pytest.raises(ValueError) as info:
        InProcessGroup.run(2, _train, [3, 2], [True, True], timeout=GROUP_TIMEOUT_S)
    message = str(info.value)
    assert "rank 1 left while rank 0 entered a collective that can never complete" in message
    assert ("rank 0 entered collective #7: syncbn forward (count, sum) of layer syncbn#0, "
            "step 3") in message
    assert ("rank 1 left (its function returned, after 6 collectives) after collective #6 "
            "(syncbn backward (two sums) of layer syncbn#0, step 2)") in message


def test_mixed_modes_fail_at_once_naming_the_eval_call():
    with pytest.raises(ValueError) as info:
        InProcessGroup.run(2, _train, [2, 2], [True, False], timeout=GROUP_TIMEOUT_S)
    assert ("rank 1 left (its function returned, after 0 collectives) before any collective; "
            "its last call without a collective: forward in eval mode (no collective) of layer "
            "syncbn#0, call 2") in str(info.value)


def test_ranks_in_different_layers_fail_on_every_rank():
    def device(comm, order):
        layers = {k: refnorm.build(k, 3, dtype=np.float64, comm=comm) for k in order}
        x = 5 * np.random.default_rng(comm.rank).standard_normal((2, 3, 2)) + 12
        for name in order:
            layers[name].forward(x, training=True)

    with pytest.raises(ValueError) as info:
        InProcessGroup.run(2, device, [("syncbn", "syncsn"), ("syncsn", "syncbn")],
                           timeout=GROUP_TIMEOUT_S)
    message = str(info.value)
    assert "ranks entered different collectives" in message
    assert "rank 0 entered collective #1: syncbn forward (count, sum) of layer syncbn#0" in message
    assert ("rank 1 entered collective #1: syncsn forward (count, IN moments) of layer syncsn#0"
            in message)


def test_a_stuck_device_ends_the_group_by_the_watchdog():
    release, released = threading.Event(), threading.Event()

    def device(comm):
        if comm.rank == 1:
            release.wait(60)  # stuck outside any collective until the test lets it go
            released.set()
        return comm.allreduce_sum([np.ones(2)], op="probe")

    try:
        with pytest.raises(TimeoutError) as info:
            InProcessGroup.run(2, device, timeout=0.5)
        # the group ended while rank 1 was still stuck: it did not wait for that device
        assert not released.is_set()
    finally:
        release.set()
    assert ("refnorm.sync watchdog: rank 0 waited 0.5 s in collective #1: probe, step 1, "
            "arrays [(2,) float64]; the others were: rank 1 has not made a collective yet"
            ) in str(info.value)


def test_an_all_reduce_after_finish_is_a_clear_error():
    def device(comm):
        comm.finish()
        comm.allreduce_sum([np.ones(1)], op="late")

    with pytest.raises(RuntimeError, match=r"rank 0 called finish\(\) and then an all-reduce "
                                           r"\(late\)"):
        InProcessGroup.run(1, device)


def test_one_device_refuses_an_all_reduce_after_finish_as_a_group_does():
    comm = SingleProcess()
    with comm:
        (out,) = comm.allreduce_sum([np.ones(1)])
    np.testing.assert_array_equal(out, [1.0])
    with pytest.raises(RuntimeError, match=r"rank 0 called finish\(\) and then an all-reduce "
                                           r"\(late of layer bn1\)"):
        comm.allreduce_sum([np.ones(1)], op="late", layer="bn1")
    (fresh,) = SingleProcess().allreduce_sum([np.ones(1)])  # each instance its own state
    np.testing.assert_array_equal(fresh, [1.0])


def test_every_device_finishing_is_no_error():
    def device(comm):
        out = comm.allreduce_sum([np.full(2, comm.rank + 1.0)])[0]
        comm.finish()
        return out

    for out in InProcessGroup.run(3, device):
        np.testing.assert_array_equal(out, [6.0, 6.0])


def test_synchronized_sn_refuses_devices_of_different_spatial_sizes():
    """Ranks at (4, 3, 2, 2) and (4, 3, 4, 4) were accepted, and ended with different running
    variances: SN's IN and LN scopes count each device's own S."""
    def device(comm, hw):
        layer = refnorm.build("syncsn", 3, dtype=np.float64, comm=comm)
        layer.forward(np.random.default_rng(comm.rank).standard_normal((4, 3, hw, hw)),
                      training=True)

    with pytest.raises(ValueError, match="needs the same spatial size on every device"):
        InProcessGroup.run(2, device, [2, 4], timeout=GROUP_TIMEOUT_S)


@pytest.mark.parametrize(("layer", "values"), [("syncbn", lambda C: 1 + 4 * C),
                                               ("syncsn", lambda C: 3 + 6 * C)])
def test_a_synchronized_layer_makes_three_all_reduces_of_the_documented_size(layer, values):
    """docs/data-parallel.md's table: a forward and a backward of one layer, metered."""
    C = 7

    def device(comm):
        metered = MeteredCommunicator(comm)
        norm = refnorm.build(layer, C, dtype=np.float64, comm=metered)
        y = norm.forward(np.random.default_rng(comm.rank).standard_normal((3, C, 4, 4)),
                         training=True)
        norm.backward(np.ones_like(y))
        return metered.calls, metered.bytes // 8

    for calls, count in InProcessGroup.run(2, device, timeout=GROUP_TIMEOUT_S):
        assert (calls, count) == (3, values(C))


def test_every_device_gets_its_own_copy_of_the_sums():
    """The devices shared one result array, so a device updating its sums in place (``g *= lr``)
    changed every other device's; with one device the result was the caller's own input array."""
    def device(comm, a):
        (out,) = comm.allreduce_sum([a])
        comm.allreduce_sum([])  # every device holds its sums
        if comm.rank == 0:
            out *= 0.0  # in place, as an optimizer does
        comm.allreduce_sum([])  # rank 0 has written
        return a, out

    parts = [np.ones(2), np.full(2, 2.0)]
    (_, zeroed), (_, kept) = InProcessGroup.run(2, device, [p.copy() for p in parts],
                                                timeout=GROUP_TIMEOUT_S)
    np.testing.assert_array_equal(zeroed, [0.0, 0.0])
    np.testing.assert_array_equal(kept, parts[0] + parts[1])
    ((given, out),) = InProcessGroup.run(1, device, [np.ones(2)], timeout=GROUP_TIMEOUT_S)
    assert not np.shares_memory(given, out)
    np.testing.assert_array_equal(given, [1.0, 1.0])  # the caller's array is left alone


def test_ranks_passing_different_dtypes_fail_on_every_rank():
    """A float32 rank and a float64 rank were summed into float64 on both, silently."""
    def device(comm):
        dtype = np.float32 if comm.rank == 0 else np.float64
        comm.allreduce_sum([np.ones(3, dtype)], op="probe")

    with pytest.raises(ValueError) as info:
        InProcessGroup.run(2, device, timeout=GROUP_TIMEOUT_S)
    message = str(info.value)
    assert "ranks passed different arrays (shapes, dtypes)" in message
    assert "arrays [(3,) float32]" in message and "arrays [(3,) float64]" in message


def test_a_device_that_left_fails_every_later_collective_at_once():
    # A device that left keeps its leave header for good: a peer that catches the error and
    # tries again gets the same error again, not a wait that only the watchdog ends.
    def device(comm):
        if comm.rank == 1:
            return []
        messages = []
        for _ in range(2):
            with pytest.raises(ValueError) as info:
                comm.allreduce_sum([np.ones(1)], op="probe")
            messages.append(str(info.value))
        return messages

    messages, _ = InProcessGroup.run(2, device, timeout=GROUP_TIMEOUT_S)
    for i, message in enumerate(messages, start=1):
        assert "rank 1 left while rank 0 entered a collective that can never complete" in message
        assert f"rank 0 entered collective #{i}: probe, step {i}" in message


def test_a_metered_communicator_still_records_calls_without_a_collective():
    # Metering must not hide what a rank did: the eval-mode call of a synchronized layer is
    # recorded on the communicator underneath, so the leave message still names it.
    def device(comm, training):
        layer = refnorm.build("syncbn", 3, dtype=np.float64, comm=MeteredCommunicator(comm))
        layer.forward(5 * np.random.default_rng(comm.rank).standard_normal((2, 3)) + 12,
                      training=training)

    with pytest.raises(ValueError) as info:
        InProcessGroup.run(2, device, [True, False], timeout=GROUP_TIMEOUT_S)
    assert ("rank 1 left (its function returned, after 0 collectives) before any collective; "
            "its last call without a collective: forward in eval mode (no collective) of layer "
            "syncbn#0, call 1") in str(info.value)


@pytest.mark.parametrize("C", [1, 5])
def test_each_synchronized_layer_makes_three_all_reduces_of_the_documented_sizes(C):
    """docs/data-parallel.md, "what is synchronized when": per micro-batch, a syncbn layer
    makes 3 all-reduces of 1 + 4C values in all, a syncsn layer 3 of 3 + 6C (float64)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, C, 3, 3))
    dy = rng.standard_normal(x.shape)
    ones, zeros, logits = np.ones(C), np.zeros(C), np.zeros(3)

    def syncbn(comm, xs, dys):
        metered = MeteredCommunicator(comm)
        _, cache = sync_batch_norm_forward(xs, ones, zeros, comm=metered)
        sync_batch_norm_backward(dys, cache)
        return metered.calls, metered.bytes

    def syncsn(comm, xs, dys):
        metered = MeteredCommunicator(comm)
        _, cache = sync_switchable_norm_forward(xs, ones, zeros, logits, logits, comm=metered)
        sync_switchable_norm_backward(dys, cache)
        return metered.calls, metered.bytes

    shards = ([x[:2], x[2:]], [dy[:2], dy[2:]])
    for device, values in ((syncbn, 1 + 4 * C), (syncsn, 3 + 6 * C)):
        for calls, nbytes in InProcessGroup.run(2, device, *shards):
            assert (calls, nbytes) == (3, 8 * values), device.__name__


def test_a_switchable_layer_in_eval_mode_is_named_when_its_peer_waits():
    # As for syncbn: synchronized SN with a BN scope makes no collective at inference and
    # records the call, so the leave message says where the rank in eval mode was.
    def device(comm, training):
        layer = refnorm.build("syncsn", 3, dtype=np.float64, comm=comm)
        layer.forward(5 * np.random.default_rng(comm.rank).standard_normal((2, 3, 2)) + 12,
                      training=training)

    with pytest.raises(ValueError) as info:
        InProcessGroup.run(2, device, [True, False], timeout=GROUP_TIMEOUT_S)
    assert ("rank 1 left (its function returned, after 0 collectives) before any collective; "
            "its last call without a collective: forward in eval mode (no collective) of layer "
            "syncsn#0, call 1") in str(info.value)


def test_a_bool_size_and_a_short_per_rank_argument_are_refused():
    with pytest.raises(ValueError, match="size must be a positive int; got True"):
        InProcessGroup.run(True, lambda comm: None)
    with pytest.raises(ValueError, match="each per-rank argument needs 3 entries; got 2"):
        InProcessGroup.run(3, lambda comm, a: None, [1, 2])


def test_the_group_raises_the_failing_device_own_exception():
    # The other devices stop with an error of their own at their next all-reduce; the caller
    # gets the exception the failing device raised, of its type.
    def device(comm):
        if comm.rank == 1:
            raise KeyError("device 1 breaks")
        return comm.allreduce_sum([np.ones(1)], op="probe")

    with pytest.raises(KeyError, match="device 1 breaks"):
        InProcessGroup.run(3, device, timeout=GROUP_TIMEOUT_S)


def test_a_metered_report_is_per_step_in_each_array_own_bytes():
    # Two all-reduces of 3 float32 and 2 float64 values: 2 x (12 + 16) bytes.
    metered = MeteredCommunicator(SingleProcess())
    for _ in range(2):
        metered.allreduce_sum([np.ones(3, np.float32), np.ones(2)])
    report = metered.report(seconds=0.5, steps=4)
    assert (report["allreduce_calls_per_step"], report["allreduce_bytes_per_step"],
            report["step_ms"]) == (0.5, 14.0, 125.0)
    assert report["collective_share"] == metered.seconds / 0.5
    # no steps and no time (an empty epoch): counted as one step, no share
    empty = metered.report(seconds=0.0, steps=0)
    assert (empty["allreduce_calls_per_step"], empty["allreduce_bytes_per_step"],
            empty["step_ms"], empty["collective_share"]) == (2.0, 56.0, 0.0, 0.0)


def test_a_numpy_integer_is_a_group_size():
    # As every int argument of refnorm (refnorm.core.checks.is_int): np.int64 from an array
    # of sizes is a size; the devices see a Python int.
    sizes = InProcessGroup.run(np.int64(2), lambda comm: (comm.size, type(comm.size)))
    assert sizes == [(2, int), (2, int)]


@pytest.mark.parametrize("inner", [SingleProcess, 42])
def test_a_metered_communicator_refuses_what_is_not_a_communicator_when_built(inner):
    # MeteredCommunicator(SingleProcess) (the class) was accepted, and a synchronized layer
    # built on it failed at its first training forward with "allreduce_sum() missing 1
    # required positional argument"; MeteredCommunicator(42) with an AttributeError.
    with pytest.raises(TypeError, match="comm must be a communicator"):
        MeteredCommunicator(inner)

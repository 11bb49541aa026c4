"""Synchronized BN and SN: P devices give what one device holding the whole batch gives.

In-process (simulated devices, one thread each) for P = 1..4 and unequal shards, a device
with no sample included; with real processes under ``mpiexec -n 2`` at the end.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import refnorm
from refnorm.norms.switchable import switchable_norm_backward, switchable_norm_forward
from refnorm.sync import (
    InProcessGroup,
    SingleProcess,
    allreduce_gradients,
    sync_batch_norm_backward,
    sync_batch_norm_forward,
)

# Sums over devices reorder float64 additions of values of size <= ~100: rounding only.
ATOL = 1e-11


@st.composite
def sharded_batches(draw):
    P = draw(st.integers(1, 4))
    sizes = draw(st.lists(st.integers(0, 3), min_size=P, max_size=P))
    if sum(sizes) < 2:
        sizes[0] += 2
    C = draw(st.integers(1, 3))
    spatial = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = 5 * rng.standard_normal((sum(sizes), C) + spatial) + 12
    return sizes, x, rng


def split(a, sizes):
    edges = np.cumsum([0] + list(sizes))
    return [a[edges[i]:edges[i + 1]] for i in range(len(sizes))]


def combine(results, index, concat):
    parts = [r[index] for r in results]
    return np.concatenate(parts) if concat else sum(parts)


@given(sharded_batches())
@settings(max_examples=15)
def test_sync_batch_norm_equals_one_device(case):
    sizes, x, rng = case
    C = x.shape[1]
    gamma, beta, dy = rng.standard_normal(C), rng.standard_normal(C), rng.standard_normal(x.shape)

    def device(comm, xs, dys):
        y, cache = sync_batch_norm_forward(xs, gamma, beta, comm=comm)
        return (y, *sync_batch_norm_backward(dys, cache))

    results = InProcessGroup.run(len(sizes), device, split(x, sizes), split(dy, sizes))
    y, cache = refnorm.batch_norm_forward(x, gamma, beta)
    reference = (y, *refnorm.batch_norm_backward(dy, cache))
    for i, ref in enumerate(reference):
        np.testing.assert_allclose(combine(results, i, concat=i < 2), ref, rtol=0, atol=ATOL)


@st.composite
def sn_options(draw):
    return {"scopes": draw(st.sampled_from([("in", "ln", "bn"), ("ln", "bn"), ("bn", "in")])),
            "stats": draw(st.sampled_from(["stable", "paper"])),
            "in_correction": draw(st.sampled_from([0, 1]))}


@given(sharded_batches(), sn_options())
@settings(max_examples=15)
def test_sync_switchable_norm_equals_one_device(case, options):
    sizes, x, rng = case
    S = int(np.prod(x.shape[2:]))
    # configurations single-device SN refuses (tests/norms/test_switchable.py)
    assume("in" not in options["scopes"] or S >= 2)
    assume(options["in_correction"] == 0 or S >= 2)
    assume("ln" not in options["scopes"] or x.shape[1] * S >= 2)
    C, K = x.shape[1], len(options["scopes"])
    params = (rng.standard_normal(C), rng.standard_normal(C), rng.standard_normal(K),
              rng.standard_normal(K))
    dy = rng.standard_normal(x.shape)

    def device(comm, xs, dys):
        y, cache = switchable_norm_forward(xs, *params, comm=comm, **options)
        return (y, *switchable_norm_backward(dys, cache))

    results = InProcessGroup.run(len(sizes), device, split(x, sizes), split(dy, sizes))
    y, cache = switchable_norm_forward(x, *params, **options)
    reference = (y, *switchable_norm_backward(dy, cache))
    for i, ref in enumerate(reference):
        # y and dx are concatenated; gamma, beta and both control-parameter gradients are
        # per-device contributions whose sum over devices is the one-device gradient.
        np.testing.assert_allclose(combine(results, i, concat=i < 2), ref, rtol=0,
                                   atol=ATOL * max(1.0, np.abs(ref).max()))


def test_single_process_communicator_is_plain_bn():
    rng = np.random.default_rng(0)
    x, g, b = rng.standard_normal((4, 3, 2)), rng.standard_normal(3), rng.standard_normal(3)
    y, _ = sync_batch_norm_forward(x, g, b, comm=SingleProcess())
    np.testing.assert_allclose(y, refnorm.batch_norm_forward(x, g, b)[0], atol=1e-14)


def test_sync_layers_update_running_statistics_with_the_global_batch():
    rng = np.random.default_rng(1)
    x = 3 * rng.standard_normal((7, 2, 3, 3)) + 4
    sizes = [3, 0, 4]

    def device(comm, xs):
        bn = refnorm.build("syncbn", 2, dtype=np.float64, comm=comm)
        sn = refnorm.build("syncsn", 2, dtype=np.float64, comm=comm)
        bn.forward(xs, training=True)
        sn.forward(xs, training=True)
        return bn.state, sn.state

    states = InProcessGroup.run(3, device, split(x, sizes))
    bn = refnorm.build("bn", 2, dtype=np.float64)
    bn.forward(x, training=True)
    for bn_state, sn_state in states:
        for key in ("running_mean", "running_var"):
            np.testing.assert_allclose(bn_state[key], bn.state[key], rtol=1e-13)
            np.testing.assert_allclose(sn_state[key], bn.state[key], rtol=1e-13)


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
        for mine, first, ref in zip(layers, ranks[0], single):
            for key in mine.params:
                np.testing.assert_array_equal(mine.params[key], first.params[key])  # bitwise
                np.testing.assert_allclose(mine.params[key], ref.params[key], atol=1e-12)


def test_control_parameter_gradients_are_reduced_once():
    # Each device returns its own contribution; allreduce_gradients adds them once. Had the
    # layer reduced them too, the step would use P times the gradient.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 2, 3, 3))
    dy = rng.standard_normal(x.shape)
    logits = rng.standard_normal(3), rng.standard_normal(3)
    params = (np.ones(2), np.zeros(2)) + logits

    def device(comm, xs, dys):
        _, cache = switchable_norm_forward(xs, *params, comm=comm)
        local = switchable_norm_backward(dys, cache)[3]
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


# -- real processes ------------------------------------------------------------------------------


def _mpiexec() -> str | None:
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def _require_mpi():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        if os.environ.get("REFNORM_REQUIRE_MPI"):
            pytest.fail("REFNORM_REQUIRE_MPI is set but mpi4py is not installed (the mpi extra)")
        pytest.skip("mpi4py not installed (pip install -e '.[mpi]')")
    exe = _mpiexec()
    if exe is None:
        pytest.fail("mpi4py is installed but no mpiexec was found")
    return exe


def _run_mpi(*args, timeout=120):
    exe = _require_mpi()
    return subprocess.run([exe, "-n", "2", sys.executable, "-m", "refnorm.sync.mpi_check", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_mpi_two_processes_equal_one_device():
    proc = _run_mpi()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "OK"
    assert proc.stdout.count("max abs diff") == 10


def test_mpi_failing_rank_ends_the_job():
    proc = _run_mpi("--fail-rank", "1", timeout=60)
    assert proc.returncode != 0
    assert "rank 1 fails on purpose" in proc.stderr


def test_mpi_disagreeing_shapes_end_the_job():
    proc = _run_mpi("--mismatch", timeout=60)
    assert proc.returncode != 0
    assert "ranks passed different arrays" in proc.stderr


def test_using_a_device_after_its_group_finished_is_a_clear_error():
    def forward(comm, xs):
        return sync_batch_norm_forward(xs, np.ones(3), np.zeros(3), comm=comm)[1]

    caches = InProcessGroup.run(2, forward, [np.ones((2, 3)) * [[1], [2]]] * 2)
    with pytest.raises(RuntimeError, match=r"run\(\) has returned"):
        sync_batch_norm_backward(np.ones((2, 3)), caches[0])

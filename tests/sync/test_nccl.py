"""NCCLCommunicator (refnorm/sync/nccl.py): two GPUs give what one device gives.

The sync equivalence tests of test_batch_norm.py and test_switchable.py, parametrized over a
*runner*: ``in-process`` (InProcessGroup, numpy arrays: runs everywhere, and proves this file's
harness) and ``nccl`` (one thread per GPU, CuPy arrays on each rank's GPU, NCCLCommunicator
built by ``NCCLCommunicator.group``), marked ``gpu`` and skipped without two GPUs. The
tolerance is the other sync tests' ATOL: sums over devices reorder float64 additions only.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import refnorm
from refnorm.backend import to_numpy
from refnorm.norms.switchable_norm import (
    SwitchableOptions,
    switchable_norm_backward,
    switchable_norm_forward,
)
from refnorm.sync import (
    InProcessGroup,
    NCCLCommunicator,
    sync_batch_norm_backward,
    sync_batch_norm_forward,
    sync_switchable_norm_backward,
    sync_switchable_norm_forward,
)
from tests.conftest import gpu_skip
from tests.sync.helpers import ATOL, channel_params, combine, sharded_batches, split

DEVICES = 2


def nccl_run(size, fn, *per_rank):
    """``InProcessGroup.run`` on GPUs: ``fn(comm, *args)`` per GPU, each in its own thread with
    its arguments copied to its GPU; the results come back as numpy arrays, by rank."""
    import cupy

    comms = NCCLCommunicator.group(list(range(size)), timeout=60)
    results = [None] * size
    errors: list[BaseException | None] = [None] * size

    def device(rank):
        try:
            with cupy.cuda.Device(comms[rank].device), comms[rank] as comm:
                args = [cupy.asarray(seq[rank]) for seq in per_rank]
                results[rank] = tuple(to_numpy(a) for a in fn(comm, *args))
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors[rank] = exc

    threads = [threading.Thread(target=device, args=(r,), daemon=True) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results


RUNNERS = [
    pytest.param(InProcessGroup.run, id="in-process"),
    pytest.param(nccl_run, id="nccl", marks=[pytest.mark.gpu, gpu_skip(DEVICES)]),
]


def two_devices(case):
    """A drawn case regrouped onto two devices (each keeps whole shards, in order)."""
    sizes, x, dy = case
    half = (len(sizes) + 1) // 2
    return [sum(sizes[:half]), sum(sizes[half:])], x, dy


@pytest.mark.parametrize("run", RUNNERS)
@given(case=sharded_batches(), data=st.data())
@settings(max_examples=10)
def test_sync_batch_norm_equals_one_device(run, case, data):
    sizes, x, dy = two_devices(case)
    gamma, beta = channel_params(data.draw, x.shape[1])

    def device(comm, xs, dys):
        xp = refnorm.backend.array_namespace(xs)
        y, cache = sync_batch_norm_forward(xs, xp.asarray(gamma), xp.asarray(beta), comm=comm)
        return (y, *sync_batch_norm_backward(dys, cache))

    results = run(DEVICES, device, split(x, sizes), split(dy, sizes))
    y, cache = refnorm.batch_norm_forward(x, gamma, beta)
    for i, ref in enumerate((y, *refnorm.batch_norm_backward(dy, cache))):
        got = combine([tuple(to_numpy(a) for a in r) for r in results], i, concat=i < 2)
        np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("run", RUNNERS)
@given(case=sharded_batches(), data=st.data())
@settings(max_examples=10)
def test_sync_switchable_norm_equals_one_device(run, case, data):
    sizes, x, dy = two_devices(case)
    options = SwitchableOptions(("in", "ln", "bn"), in_correction=0, hard=False)
    assume(np.prod(x.shape[2:]) >= 2)  # IN needs two values per plane (sync/test_switchable.py)
    params = channel_params(data.draw, x.shape[1], K=3)

    def device(comm, xs, dys):
        xp = refnorm.backend.array_namespace(xs)
        y, cache = sync_switchable_norm_forward(xs, *(xp.asarray(p) for p in params),
                                                comm=comm, options=options)
        return (y, *sync_switchable_norm_backward(dys, cache))

    results = run(DEVICES, device, split(x, sizes), split(dy, sizes))
    y, cache = switchable_norm_forward(x, *params, options=options)
    for i, ref in enumerate((y, *switchable_norm_backward(dy, cache))):
        got = combine([tuple(to_numpy(a) for a in r) for r in results], i, concat=i < 2)
        np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("run", RUNNERS)
def test_disagreeing_shapes_raise_the_same_error_on_every_rank(run):
    def device(comm, n):
        return comm.allreduce_sum([np.ones(int(n))], op="test")

    with pytest.raises(ValueError, match="different arrays"):
        run(DEVICES, device, [np.asarray(2), np.asarray(3)])

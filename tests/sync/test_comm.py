"""Communicators (refnorm/sync/comm.py): sums on every rank, and clear errors instead of hangs."""

from __future__ import annotations

import numpy as np
import pytest

from refnorm.sync import (
    InProcessGroup,
    SingleProcess,
    sync_batch_norm_backward,
    sync_batch_norm_forward,
)


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

"""The two process-wide settings the fast path makes, each in a fresh interpreter: idle
OpenMP threads sleep (``OMP_WAIT_POLICY=PASSIVE`` unless the environment chose), and glibc
keeps freed blocks once the first kernel runs, unless ``REFNORM_MALLOC`` or glibc's own
variables are set (README, docs/performance.md)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest


def run(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("OMP_WAIT_POLICY", "REFNORM_MALLOC", "MALLOC_MMAP_THRESHOLD_",
                          "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX")}
    done = subprocess.run([sys.executable, "-c", code], env={**clean, **env},
                          capture_output=True, text=True, timeout=300, check=True)
    return done.stdout.strip()


@pytest.mark.parametrize(("given", "seen"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_idle_openmp_threads_sleep_unless_the_environment_chose(given, seen):
    code = "import os, refnorm.kernels; print(os.environ['OMP_WAIT_POLICY'])"
    env = {} if given is None else {"OMP_WAIT_POLICY": given}
    assert run(code, **env) == seen


def _glibc() -> bool:
    try:
        return sys.platform == "linux" and os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (AttributeError, ValueError, OSError):  # no confstr, or no such name (musl)
        return False


GLIBC = _glibc()


@pytest.mark.skipif(not GLIBC, reason="the allocator setting is glibc's")
@pytest.mark.parametrize(("env", "kept"), [
    ({}, "True"), ({"REFNORM_MALLOC": "0"}, "False"),
    ({"MALLOC_MMAP_THRESHOLD_": "131072"}, "False"),
])
def test_glibc_keeps_freed_blocks_unless_told_to_leave_it(env, kept):
    code = "from refnorm.kernels.norms import keep_freed_memory; print(keep_freed_memory())"
    assert run(code, **env) == kept


def test_import_refnorm_sets_nothing_and_the_reference_path_loads_no_kernel():
    """``import refnorm`` leaves the environment alone; a reference call loads the methods
    (and with them refnorm.kernels' thread policy) but never numba's loops, so the allocator
    stays as it was until a fast call."""
    code = ("import os, sys, numpy as np, refnorm; print('OMP_WAIT_POLICY' in os.environ); "
            "refnorm.batch_norm_forward(np.ones((2, 3)), np.ones(3), np.zeros(3)); "
            "print(os.environ.get('OMP_WAIT_POLICY'), 'refnorm.kernels._loops' in sys.modules)")
    assert run(code).split() == ["False", "PASSIVE", "False"]


def test_a_small_kernel_call_leaves_numbas_thread_count_as_it_was():
    """launch() runs a small loop on the calling thread alone and puts numba's thread count
    back: later large loops (and the user's own numba code) keep every thread."""
    import numba

    from refnorm import kernels
    from refnorm.kernels import norms

    norms.loops()
    before = numba.get_num_threads()
    if before == 1:
        pytest.skip("numba runs on one thread here: nothing to put back")
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4))
    kernels.bn_forward(x, np.ones(3), np.zeros(3), 1e-5)   # far below SERIAL_BELOW
    assert numba.get_num_threads() == before
    assert norms.threads() == before


def _pool_or_skip():
    """numba's thread count once the kernels are loaded; skip where it is 1 (a serial and a
    parallel launch then look the same)."""
    import numba

    from refnorm.kernels import norms

    norms.loops()
    pool = numba.get_num_threads()
    if pool == 1:
        pytest.skip("numba runs on one thread here: serial and parallel look the same")
    return pool


def test_launch_runs_a_small_loop_on_the_calling_thread_and_a_large_one_on_every_thread():
    """launch(): a loop that moves fewer than SERIAL_BELOW values runs on the calling thread
    alone (waking the pool costs more than it saves), a larger one on numba's whole pool."""
    import numba

    from refnorm.kernels import norms

    pool = _pool_or_skip()

    def threads_seen():
        return numba.get_num_threads()

    assert norms.launch(threads_seen, norms.SERIAL_BELOW - 1) == 1
    assert norms.launch(threads_seen, norms.SERIAL_BELOW) == pool
    assert numba.get_num_threads() == pool


def test_a_small_loop_that_raises_leaves_numbas_thread_count_as_it_was():
    """The thread count launch() lowers for a small loop is put back even when the loop
    raises: the next large loop (and the user's own numba code) still gets every thread."""
    import numba

    from refnorm.kernels import norms

    pool = _pool_or_skip()

    def failing_loop():
        raise ZeroDivisionError("raised inside the loop")

    with pytest.raises(ZeroDivisionError, match="raised inside the loop"):
        norms.launch(failing_loop, 10)
    assert numba.get_num_threads() == pool


@pytest.mark.skipif(not GLIBC, reason="the allocator setting is glibc's")
@pytest.mark.parametrize("variable", ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                                      "MALLOC_ARENA_MAX"])
def test_any_of_glibcs_own_malloc_variables_leaves_the_allocator_alone(variable):
    """A user who tunes glibc's allocator through its environment variables keeps that
    tuning: keep_freed_memory() changes nothing when any of them is set."""
    code = "from refnorm.kernels.norms import keep_freed_memory; print(keep_freed_memory())"
    assert run(code, **{variable: "2"}) == "False"

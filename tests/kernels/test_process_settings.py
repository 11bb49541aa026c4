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


class _FakeGlibc:
    """A stand-in for glibc that records what mallopt() is asked."""

    def __init__(self):
        self.calls = []

    def gnu_get_libc_version(self):
        return b"2.36"

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1


def test_glibc_is_asked_to_keep_freed_blocks_of_up_to_32_mib_and_trim_from_256_mib(monkeypatch):
    """keep_freed_memory() sets glibc's M_MMAP_THRESHOLD (mallopt parameter -3, malloc.h) to
    32 MiB and M_TRIM_THRESHOLD (-1) to 256 MiB, as docs/performance.md ("Memory") says."""
    from refnorm.kernels import norms

    for name in norms.MALLOC_ENV:
        monkeypatch.delenv(name, raising=False)
    libc = _FakeGlibc()
    monkeypatch.setattr(norms.ctypes, "CDLL", lambda name: libc)
    monkeypatch.setattr(norms.sys, "platform", "linux")
    assert norms.keep_freed_memory() is True
    assert sorted(libc.calls) == [(-3, 32 * 2**20), (-1, 256 * 2**20)]


def test_a_libc_without_mallopt_is_left_alone(monkeypatch):
    """Off glibc (a C library without gnu_get_libc_version and mallopt, such as musl) the
    allocator is not touched and keep_freed_memory() says so."""
    from refnorm.kernels import norms

    for name in norms.MALLOC_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(norms.ctypes, "CDLL", lambda name: object())
    monkeypatch.setattr(norms.sys, "platform", "linux")
    assert norms.keep_freed_memory() is False


ANNOUNCE = """
import sys, numpy as np
from refnorm import kernels
from refnorm.kernels import norms
cold = ["relu_forward"] + ["other"] * (int(sys.argv[1]) - 1)
norms.cold_kernels = lambda module=None: cold
kernels.relu_forward(np.ones(3))
kernels.relu_forward(np.ones(3, dtype=np.float32))
"""


@pytest.mark.parametrize(("cold", "message"), [
    (5, None),                                                       # 5 x 1.5 s = 7.5 s < 8 s
    (6, "compiling fast kernels (first run only, about 9 s)\n"),     # 6 x 1.5 s = 9 s
])
def test_the_first_compilation_is_announced_once_when_it_takes_8_s_or_more(cold, message,
                                                                          tmp_path):
    """docs/performance.md ("First run"): the message, once on stderr, gives the kernels not
    cached times 1.5 s, and is said only if that is 8 s or more."""
    clean = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    done = subprocess.run([sys.executable, "-c", ANNOUNCE, str(cold)],
                          env={**clean, "NUMBA_CACHE_DIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=300, check=True)
    said = [line + "\n" for line in done.stderr.splitlines() if "compiling" in line]
    assert said == ([] if message is None else [message])


def _serial_launches(monkeypatch, call) -> list[int]:
    """The thread counts launch() set around the loops of ``call`` (1: run serially)."""
    from refnorm.kernels import norms

    compiled = norms.loops()
    real = compiled.set_threads
    counts: list[int] = []

    def noted(n):
        counts.append(n)
        return real(n)

    monkeypatch.setattr(compiled, "set_threads", noted)
    call()
    monkeypatch.undo()
    return counts[::2]  # each serial launch sets 1, then puts the pool back


@pytest.mark.parametrize("method", ["bn", "gn"])
def test_the_bench_sizes_run_on_every_thread_at_32_samples_and_serially_at_2(method,
                                                                            monkeypatch):
    """docs/performance.md ("Threads"): a loop that moves fewer than 2^22 values runs on the
    calling thread alone. The bench's (32, 64, 32, 32) forward loops read x and write y and
    x_hat, 6.3 M values: every thread; at (2, 64, 32, 32), 0.39 M values: one thread."""
    from refnorm import kernels

    _pool_or_skip()
    rng = np.random.default_rng(0)
    gamma, beta = np.ones(64, np.float32), np.zeros(64, np.float32)

    def forward(N):
        x = rng.standard_normal((N, 64, 32, 32)).astype(np.float32)
        if method == "bn":
            return lambda: kernels.bn_forward(x, gamma, beta, 1e-5)
        return lambda: kernels.gn_forward(x, gamma, beta, 1e-5, 32)

    assert _serial_launches(monkeypatch, forward(32)) == []
    assert _serial_launches(monkeypatch, forward(2)) == [1]


def test_switchables_moments_of_the_bench_size_run_on_one_thread(monkeypatch):
    """docs/performance.md ("Threads"): SN's moments loop at (32, 64, 32, 32) reads x alone,
    2.1 M values (< 2^22), and runs on one thread; its normalize+affine, 6.3 M, on all."""
    from refnorm import kernels

    _pool_or_skip()
    x = np.random.default_rng(1).standard_normal((32, 64, 1024)).astype(np.float32)
    one, w = np.ones(64, np.float32), np.full(3, 1 / 3, np.float32)
    assert _serial_launches(monkeypatch, lambda: kernels.sn_forward(
        x, one, 0 * one, w, w, eps=1e-5, scopes=("in", "ln", "bn"))) == [1]

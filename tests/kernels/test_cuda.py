"""The GPU kernels (refnorm/kernels/cuda.py) equal the reference, run under numba's CUDA simulator.

numba reads ``NUMBA_ENABLE_CUDASIM`` when it is imported, and the CPU kernel tests of the same
pytest run import numba without it; so in an ordinary run this file holds one test that runs
this file again in a subprocess with ``NUMBA_ENABLE_CUDASIM=1``, where the tests below the
``else:`` run (on numpy arrays, in Python threads: one CUDA thread each). Nothing here runs
on a GPU; ``tests/gpu/`` holds the real-GPU checks.

Comparison, as in tests/kernels/test_norms.py: the kernel on ``x`` (float32 or float64, any
layout) against the reference in float64 on the same values; the backward is given the
reference cache's fields. Tolerances are those of tests/kernels/helpers.py (float64
``1e-12 * kappa``; float32 ``2e-6``, because the kernels widen to float64 and round once on
store, as the CPU kernels do). The simulator is slow (about 10 ms per block), so the shapes
are small and each property draws a fixed, small number of examples; the block size, chunk
length and grid cap are drawn too, so that tree merges of several threads, several chunks per
plane and grid-stride loops are all exercised.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
ROOT = Path(__file__).resolve().parents[2]

if not SIMULATOR:

    def test_kernels_under_the_cuda_simulator():
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
             str(Path(__file__).relative_to(ROOT))],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]

    def test_numpy_arrays_need_the_simulator():
        from refnorm.kernels import cuda as gpu

        x = np.ones((2, 3, 4))
        with pytest.raises(TypeError, match="only under the CUDA simulator"):
            gpu.bn_forward(x, np.ones(3), np.zeros(3), 1e-5)

    def test_every_kernel_compiles_for_a_gpu(monkeypatch):
        """The simulator runs the kernels as Python and never types them: compile each to PTX
        for an H100 (compute capability 9.0) with the argument types ``_launch`` gives it,
        which needs NVVM (a CUDA toolkit), not a GPU. The built-in two-argument ``min`` passed
        the simulator and failed here (numba >= 0.66)."""
        from numba import cuda
        from numba import types as T

        try:
            from numba.cuda.cudadrv.nvvm import NVVM

            NVVM()
        except Exception as exc:  # no CUDA toolkit on this machine
            pytest.skip(f"no NVVM to compile with ({type(exc).__name__}: {exc})")
        import types

        import numba.cuda.dispatcher

        from refnorm.kernels import _cuda_loops

        # A device function called from a kernel asks the current device for its compute
        # capability; without a GPU, answer the one compiled for.
        monkeypatch.setattr(numba.cuda.dispatcher, "get_current_device",
                            lambda: types.SimpleNamespace(compute_capability=(9, 0)))
        k = _cuda_loops.kernels(128)
        f64_1, f64_2 = T.Array(T.float64, 1, "C"), T.Array(T.float64, 2, "C")
        i64, f64 = T.int64, T.float64
        for dtype in (T.float32, T.float64):
            a2 = T.Array(dtype, 2, "C")
            signatures = {
                "moments": (a2, i64, f64_2, f64_2),
                "merge_units": (f64_2, f64_2, i64, i64, i64, i64, f64, f64, f64_2),
                "normalize": (a2, i64, i64, f64_1, f64_1, f64_1, f64_1, a2, a2),
                "grad_sums": (a2, a2, i64, f64_2, f64_2),
                "coefficients": (f64_1, f64_1, f64_1, f64_1, i64, i64, f64, f64_2),
                "combine": (a2, a2, f64_2, a2),
            }
            assert set(signatures) == set(k)
            for name, signature in signatures.items():
                ptx, _ = cuda.compile_ptx(k[name].py_func, signature, cc=(9, 0))
                assert ".entry" in ptx, (name, dtype)

    def test_importing_refnorm_imports_no_numba_cuda():
        code = ("import sys, refnorm, refnorm.kernels, refnorm.kernels.cuda, refnorm.sync; "
                "sys.exit('numba.cuda' in sys.modules or 'cupy' in sys.modules)")
        assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0

else:
    from contextlib import ExitStack
    from unittest import mock

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from refnorm import kernels as cpu
    from refnorm.kernels import cuda as gpu
    from refnorm.norms.batch_norm import batch_norm_backward, batch_norm_forward
    from refnorm.norms.group_norm import group_norm_backward, group_norm_forward
    from refnorm.norms.instance_norm import instance_norm_backward, instance_norm_forward
    from refnorm.norms.layer_norm import layer_norm_backward, layer_norm_forward
    from tests.kernels.helpers import (
        activations,
        assert_close,
        kappa_of,
        params,
        rel_err,
        sn_reference,
        upstream,
    )

    # Simulated threads hand over the GIL at every step; the default 5 ms switch interval
    # makes each syncthreads() cost milliseconds.
    sys.setswitchinterval(1e-5)

    def _patch_simulator_shared_arrays() -> None:
        """numba 0.68's simulated ``cuda.shared.array`` looks up and creates a block's array
        without a lock, so two threads of a block can each create their own and the block's
        reduction reads the wrong one (seen here as a rare dx error of O(1), more often with
        the short switch interval above). The same function, with the lookup under a lock."""
        import threading
        import traceback

        from numba.core import types
        from numba.cuda.simulator import kernelapi
        from numba.np import numpy_support

        lock = threading.Lock()
        original = kernelapi.FakeCUDAShared.array

        def array(self, shape, dtype):
            if shape == 0:  # dynamic shared memory: no lookup (refnorm's kernels use none)
                return original(self, shape, dtype)
            if isinstance(dtype, types.Type):
                dtype = numpy_support.as_dtype(dtype)
            caller = tuple(traceback.extract_stack(sys._getframe())[-2][0:2])
            with lock:
                if caller not in self._allocations:
                    self._allocations[caller] = np.empty(shape, dtype)
                return self._allocations[caller]

        kernelapi.FakeCUDAShared.array = array

    _patch_simulator_shared_arrays()

    def _create_the_kernels_warning_registry() -> None:
        """Each simulated thread that calls a device function reads through the kernels'
        module globals (numba 0.68's ``swapped_cuda_module`` iterates them), while the first
        warning a kernel's arithmetic raises (an overflow in a scalar multiply, as the means
        beyond 1e154 below do) makes Python add ``__warningregistry__`` to those same
        globals: a thread iterating them then failed, rarely, with "dictionary changed size
        during iteration". The registry Python would create, made before any kernel runs."""
        import refnorm.kernels._cuda_loops as loops

        vars(loops).setdefault("__warningregistry__", {})

    _create_the_kernels_warning_registry()

    class _Recording:
        """A kernel whose launches record their number of blocks in ``grids``."""

        def __init__(self, kernel, grids):
            self.kernel, self.grids = kernel, grids

        def __getitem__(self, config):
            self.grids.append(config[0])
            return self.kernel[config]

    EPS = 1e-5
    EXAMPLES = 10  # per property: the simulator costs 0.1-0.3 s per forward+backward

    # name: (reference forward, reference backward, kernel forward, kernel backward, min ndim)
    METHODS: dict[str, tuple[Any, ...]] = {
        "bn": (lambda x, g, b, G: batch_norm_forward(x, g, b, eps=EPS), batch_norm_backward,
               lambda x, g, b, G: gpu.bn_forward(x, g, b, EPS), gpu.bn_backward, 2),
        "in": (lambda x, g, b, G: instance_norm_forward(x, g, b, eps=EPS),
               instance_norm_backward,
               lambda x, g, b, G: gpu.in_forward(x, g, b, EPS), gpu.in_backward, 3),
        "ln": (lambda x, g, b, G: layer_norm_forward(x, g, b, eps=EPS), layer_norm_backward,
               lambda x, g, b, G: gpu.ln_forward(x, g, b, EPS), gpu.ln_backward, 2),
        "gn": (lambda x, g, b, G: group_norm_forward(x, g, b, num_groups=G, eps=EPS),
               group_norm_backward,
               lambda x, g, b, G: gpu.gn_forward(x, g, b, EPS, G), gpu.gn_backward, 2),
    }

    # (threads per block, values per reduction block, grid cap of element-wise kernels)
    LAUNCHES = st.sampled_from([(1, 4096, 4096), (2, 3, 1), (4, 5, 3), (8, 7, 2),
                                (8, 4096, 4096)])

    def launch(config) -> ExitStack:
        stack = ExitStack()
        for name, value in zip(("THREADS", "CHUNK", "MAX_BLOCKS"), config, strict=True):
            stack.enter_context(mock.patch.object(gpu, name, value))
        return stack

    @st.composite
    def norm_cases(draw, method):
        """(x, groups): N in 1..3, C up to 4, spatial rank 0..2 (>= 1 for IN), <= 60 values."""
        min_ndim = METHODS[method][4]
        N = draw(st.integers(1, 3))
        G = draw(st.integers(1, 2)) if method == "gn" else 1
        C = G * draw(st.integers(1, 2))
        spatial = tuple(draw(st.lists(st.integers(1, 5), min_size=min_ndim - 2, max_size=2)))
        count = {"bn": N * math.prod(spatial), "in": math.prod(spatial),
                 "ln": C * math.prod(spatial), "gn": C // G * math.prod(spatial)}[method]
        if count < 2:  # the reference refuses a statistic of one value
            spatial = spatial + (2,)
        return draw(activations(shape=(N, C) + spatial)), G

    def _term_scale(dy, gamma, rstd) -> float:
        """A bound on the size of dx's terms (tests/kernels/helpers.rel_err's ``scale``)."""
        return float(np.max(np.abs(gamma)) * np.max(rstd) * np.max(np.abs(dy)))

    @pytest.mark.parametrize("method", sorted(METHODS))
    @settings(max_examples=EXAMPLES, deadline=None)
    @given(data=st.data())
    def test_forward_and_backward_equal_reference(method, data):
        ref_fwd, ref_bwd, fwd, bwd, _ = METHODS[method]
        x, G = data.draw(norm_cases(method))
        dtype = x.dtype.type
        gamma, beta = params(x.shape[1], np.float64, seed=x.size)
        want_y, cache = ref_fwd(x.astype(np.float64), gamma, beta, G)
        with launch(data.draw(LAUNCHES)):
            y, x_hat, mean, var, rstd = fwd(x, gamma.astype(dtype), beta.astype(dtype), G)
        kappa = kappa_of(cache.mean, cache.var, EPS)
        for name, got, want in (("y", y, want_y), ("x_hat", x_hat, cache.x_hat),
                                ("mean", mean, cache.mean), ("var", var, cache.var),
                                ("rstd", rstd, cache.rstd)):
            assert got.shape == want.shape and got.dtype == dtype, (name, got.shape, got.dtype)
            assert_close(name, got, want, dtype, kappa)
        dy = upstream(x.shape, np.float64, seed=x.size + 1)
        want = ref_bwd(dy, cache)
        with launch(data.draw(LAUNCHES)):
            got = bwd(dy.astype(dtype)[::-1][::-1], cache.x_hat.astype(dtype),
                      cache.rstd.astype(dtype), gamma.astype(dtype))
        for name, g, w in zip(("dx", "dgamma", "dbeta"), got, want, strict=True):
            assert g.shape == w.shape and g.dtype == dtype, (name, g.shape, g.dtype)
            scale = _term_scale(dy, gamma, cache.rstd) if name == "dx" else 0.0
            assert_close(name, g, w, dtype, scale=scale)

    @st.composite
    def sn_cases(draw):
        N, C = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        spatial = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
        if math.prod(spatial) < 2:
            spatial = spatial + (2,)
        scopes = tuple(draw(st.permutations(["in", "ln", "bn"]))[:draw(st.integers(1, 3))])
        x = draw(activations(shape=(N, C) + spatial))
        logits = [np.array(draw(st.lists(st.floats(-2, 2), min_size=len(scopes),
                                         max_size=len(scopes)))) for _ in range(2)]
        # (in_correction, scope_correction), as in tests/kernels/test_norms.py
        corrections = draw(st.sampled_from([(0, 0), (1, 0), (0, 1)]))
        return x, scopes, corrections, draw(st.booleans()), logits

    @settings(max_examples=2 * EXAMPLES, deadline=None)
    @given(case=sn_cases(), config=LAUNCHES)
    def test_switchable_equals_reference(case, config):
        x, scopes, (corr, scope_corr), hard, logits = case
        dtype = x.dtype.type
        gamma, beta = params(x.shape[1], np.float64, seed=x.size)
        want_y, cache, backward, logit_scale = sn_reference(
            x.astype(np.float64), gamma, beta, logits, eps=EPS, scopes=scopes,
            in_correction=corr, hard=hard, scope_correction=scope_corr)
        ratios = (cache.w_mean, cache.w_var)
        with launch(config):
            got_forward = gpu.sn_forward(
                x, gamma.astype(dtype), beta.astype(dtype), *ratios, eps=EPS, scopes=scopes,
                in_correction=corr, scope_correction=scope_corr)
        kappa = kappa_of(cache.mu["in"], cache.var["in"], EPS)
        for name in ("y", "h", "x_hat", "rstd"):
            got, want = getattr(got_forward, name), want_y if name == "y" else getattr(cache, name)
            assert got.shape == want.shape, (name, got.shape, want.shape)
            assert_close(name, got, want, dtype, kappa)
        for k in cache.mu:
            assert_close(f"mu[{k}]", got_forward.mu[k], cache.mu[k], dtype, kappa)
            assert_close(f"var[{k}]", got_forward.var[k], cache.var[k], dtype, kappa)
            # as in tests/kernels/test_norms.py: mu_k - mu_in from each side's own offsets
            assert_close(f"offset[{k}] - offset[in]",
                         np.asarray(got_forward.offset[k], np.float64) - got_forward.offset["in"],
                         cache.offset[k] - cache.offset["in"], dtype,
                         scale=float(np.max(np.sqrt(cache.var["in"] + EPS))))
        dy = upstream(x.shape, np.float64, seed=x.size + 1)
        want = backward(dy)
        stats = ({k: v.astype(dtype) for k, v in cache.offset.items()},
                 {k: v.astype(dtype) for k, v in cache.var.items()})
        with launch(config):
            got = gpu.sn_backward(
                dy.astype(dtype), cache.x_hat.astype(dtype), cache.rstd.astype(dtype),
                gamma.astype(dtype), stats, ratios, scopes=scopes, in_correction=corr,
                scope_correction=scope_corr, hard=hard)
        scales = dict(zip(("dmean_logits", "dvar_logits"), logit_scale(dy), strict=True),
                      dx=_term_scale(dy, gamma, cache.rstd))
        names = ("dx", "dgamma", "dbeta", "dmean_logits", "dvar_logits")
        for name, g, w in zip(names, got, want, strict=True):
            # as in tests/kernels/test_norms.py: the cached offsets keep the differences of
            # means in float32 (no kappa there); float64 is conditioned by kappa
            k = 1.0 if name in ("dgamma", "dbeta") else kappa
            assert_close(name, np.reshape(g, np.shape(w)), w, dtype, k,
                         scale=scales.get(name, 0.0))

    def test_float32_large_offset_beats_the_one_pass_formula():
        """1e4 + randn in float32 over several threads and chunks: the merged variance agrees
        with float64 to float32 rounding, where E[x^2] - E[x]^2 loses every digit."""
        rng = np.random.default_rng(0)
        x = (1e4 + rng.standard_normal((2, 2, 61))).astype(np.float32)
        with launch((8, 16, 4)):
            var = gpu.bn_forward(x, np.ones(2, np.float32), np.zeros(2, np.float32), EPS)[3]
        want = x.astype(np.float64).var(axis=(0, 2))
        assert rel_err(var.ravel(), want) < 1e-6  # float32 rounding of the result, 2^-23
        one_pass = (x * x).mean(axis=(0, 2)) - x.mean(axis=(0, 2)) ** 2
        assert rel_err(one_pass, want) > 1e-2  # the failure the kernels avoid

    def test_means_beyond_1e154_merge_as_on_the_cpu():
        """Threads and units that start empty merged by Chan's formula gave d^2 * 0 =
        inf * 0 = NaN statistics for float64 means beyond 1e154; the CPU kernel's are
        finite there, and both refuse 1e200, whose squared deviations overflow float64."""
        rng = np.random.default_rng(0)
        g, b = np.ones(2), np.zeros(2)
        x = 1e155 * (1 + 1e-3 * rng.standard_normal((4, 2, 3)))
        with launch((8, 16, 4)):  # 8 threads for 12 values per channel: some start empty
            got = gpu.bn_forward(x, g, b, EPS)
        want = cpu.bn_forward(x, g, b, EPS)
        assert np.all(np.isfinite(got.var)) and rel_err(got.var, want.var) < 1e-12
        with launch((8, 16, 4)), pytest.raises(ValueError, match="overflows float64"):
            gpu.bn_forward(1e200 * (1 + rng.standard_normal((4, 2, 3))), g, b, EPS)

    def test_statistics_that_fit_but_whose_sums_overflow_are_refused_as_on_the_cpu():
        """float32 data of 1e19: each variance (~1e38) fits float32, the sum of squares of a
        channel's 12 values does not; the reference and the CPU kernel refuse it, and so does
        the GPU path (it tested the statistics, not the sums behind them)."""
        x = (1e19 * np.random.default_rng(0).standard_normal((4, 2, 3))).astype(np.float32)
        g, b = np.ones(2, np.float32), np.zeros(2, np.float32)
        for forward in (cpu.bn_forward, gpu.bn_forward):
            with launch((8, 16, 4)), pytest.raises(ValueError, match="overflows float32"):
                forward(x, g, b, EPS)

    def test_an_overflow_beside_a_nan_statistic_is_refused_as_on_the_cpu():
        """float32 data of 1e20 in channel 1 only (squares of 1e40), with a NaN in channel 0
        (BN) or in sample 0's group 0 (GN): the NaN statistic excuses no other statistic's
        overflow, on the GPU path as on the CPU kernel; beside ordinary values, no error."""
        x = np.random.default_rng(0).standard_normal((4, 2, 3))
        x[:, 1] *= 1e20
        x[0, 0, 0] = np.nan
        x = x.astype(np.float32)
        g, b = np.ones(2, np.float32), np.zeros(2, np.float32)
        for device in (cpu, gpu):
            with launch((8, 16, 4)), pytest.raises(ValueError, match="overflows float32"):
                device.bn_forward(x, g, b, EPS)
            with launch((8, 16, 4)), pytest.raises(ValueError, match="overflows float32"):
                device.gn_forward(x, g, b, EPS, 2)
            x1 = x.copy()
            x1[:, 1] /= np.float32(1e20)
            with launch((8, 16, 4)):
                y = device.bn_forward(x1, g, b, EPS).y
            assert np.isnan(y[:, 0]).all() and np.isfinite(y[:, 1]).all()

    def test_dtypes_follow_the_cpu_kernels_for_float16():
        """float16 computes in float32: y float16, cache fields float32, like refnorm.kernels."""
        x = np.random.default_rng(1).standard_normal((2, 2, 3)).astype(np.float16)
        g, b = np.ones(2, np.float16), np.zeros(2, np.float16)
        got, want = gpu.gn_forward(x, g, b, EPS, 2), cpu.gn_forward(x, g, b, EPS, 2)
        assert [a.dtype for a in got] == [a.dtype for a in want]
        for a, w in zip(got, want, strict=True):
            # float16 y: both round the same float64 value, at most one float16 ulp apart
            np.testing.assert_allclose(a.astype(np.float64), w.astype(np.float64),
                                       rtol=2e-3, atol=2e-3)

    def test_non_arrays_are_a_type_error():
        with pytest.raises(TypeError, match="__cuda_array_interface__"):
            gpu.ln_forward([[1.0, 2.0]], np.ones(2), np.zeros(2), EPS)


if SIMULATOR:
    import warnings
    from fractions import Fraction

    def test_the_backward_sums_float32_upstream_gradients_in_float64():
        """``sum(dy)`` and ``sum(dy x_hat)`` widen float32 to float64 before adding (the
        module docstring: arithmetic is float64 inside every kernel): 2^24 followed by ones
        keeps every one, where a float32 running sum stays at 2^24 (its spacing there is 2)."""
        dy = np.ones((1, 2, 64), np.float32)
        dy[:, :, 0] = 2.0 ** 24
        x_hat = np.ones_like(dy)
        rstd, gamma = np.ones((1, 2, 1), np.float32), np.ones(2, np.float32)
        want = np.float32(2.0 ** 24 + 63)  # the exact sum, rounded once
        for config in ((1, 4096, 4096), (8, 4096, 4096), (4, 5, 3)):
            with launch(config):
                _, dgamma, dbeta = gpu.bn_backward(dy, x_hat, rstd, gamma)
            np.testing.assert_array_equal(dbeta, [want, want], err_msg=str(config))
            np.testing.assert_array_equal(dgamma, [want, want], err_msg=str(config))

    @pytest.mark.parametrize("method", sorted(METHODS))
    def test_backward_dtypes_follow_the_cpu_kernels_for_float16(method):
        """float16 parameters and upstream gradient: dx in float32 (x_hat's dtype), dgamma and
        dbeta in float16 (gamma's), as refnorm.kernels returns them."""
        rng = np.random.default_rng(2)
        x = rng.standard_normal((2, 2, 3)).astype(np.float16)
        dy = rng.standard_normal((2, 2, 3)).astype(np.float16)
        g, b = np.ones(2, np.float16), np.zeros(2, np.float16)
        groups = (2,) if method == "gn" else ()
        got_f = getattr(gpu, f"{method}_forward")(x, g, b, EPS, *groups)
        want_f = getattr(cpu, f"{method}_forward")(x, g, b, EPS, *groups)
        got = getattr(gpu, f"{method}_backward")(dy, got_f.x_hat, got_f.rstd, g)
        want = getattr(cpu, f"{method}_backward")(dy, want_f.x_hat, want_f.rstd, g)
        assert [a.dtype for a in got] == [a.dtype for a in want] == [
            np.float32, np.float16, np.float16]
        for a, w in zip(got, want, strict=True):
            np.testing.assert_allclose(a.astype(np.float64), w.astype(np.float64),
                                       rtol=2e-3, atol=2e-3)

    def test_float64_switchable_offsets_keep_what_rounding_the_means_lost():
        """float64 data at 1e8 whose plane means differ by about 1e-3: a mean rounded to
        float64 is off by up to half a spacing (7.5e-9 there), 1e-5 of the differences between
        the scopes' means; the offsets mu_k - mu_in (what SN's mean ratios multiply, Luo et al.
        2019, Eq. (3)) add back what that rounding lost, as refnorm.kernels.sn_forward does,
        and agree with the exact differences to float64 rounding."""
        rng = np.random.default_rng(0)
        N, C, S = 2, 3, 8
        x = 1e8 + 1e-3 * rng.standard_normal((N, C, S))
        exact = [[sum(map(Fraction, x[n, c])) / S for c in range(C)] for n in range(N)]
        pooled = {"ln": [[sum(exact[n]) / C] * C for n in range(N)],
                  "bn": [[sum(exact[i][c] for i in range(N)) / N for c in range(C)]] * N}
        w = np.full(3, 1.0 / 3.0)
        for config in ((1, 4096, 4096), (4, 5, 3), (8, 7, 2)):
            with launch(config):
                got = gpu.sn_forward(x, np.ones(C), np.zeros(C), w, w, eps=EPS,
                                     scopes=("in", "ln", "bn"))
            for k, mu_k in pooled.items():
                want = np.array([[float(mu_k[n][c] - exact[n][c]) for c in range(C)]
                                 for n in range(N)])
                diff = (got.offset[k] - got.offset["in"])[..., 0]
                assert rel_err(diff, want) < 1e-13, (config, k, rel_err(diff, want))

    @pytest.mark.parametrize(("method", "shape"), [("bn", (2, 0, 3)), ("in", (0, 3, 4)),
                                                   ("ln", (0, 3, 4)), ("gn", (0, 4, 3))])
    def test_an_empty_batch_or_channel_axis_gives_empty_outputs_and_zero_sums(method, shape):
        """BN over no channels, IN, LN and GN over no samples: no statistic is empty, so the
        reference and the CPU kernels accept them; the outputs are empty and dgamma, dbeta are
        sums over nothing, 0. No kernel is launched on a grid of 0 blocks (CUDA refuses
        one; the simulator runs it as nothing)."""
        C = shape[1]
        x, g, b = np.zeros(shape), np.ones(C), np.zeros(C)
        groups = (2,) if method == "gn" else ()
        grids = []
        kernels = gpu._kernels

        def recording(threads):
            return {name: _Recording(kernel, grids) for name, kernel in kernels(threads).items()}

        with mock.patch.object(gpu, "_kernels", recording):
            fwd = getattr(gpu, f"{method}_forward")(x, g, b, EPS, *groups)
            got = getattr(gpu, f"{method}_backward")(x, fwd.x_hat, fwd.rstd, g)
        assert fwd.y.shape == fwd.x_hat.shape == got.dx.shape == shape
        np.testing.assert_array_equal(got.dgamma, np.zeros(C))
        np.testing.assert_array_equal(got.dbeta, np.zeros(C))
        assert grids and all(blocks >= 1 for blocks in grids), grids

    def test_switchable_on_an_empty_batch_launches_no_empty_grid():
        """SN (IN and LN scopes) over no samples: empty outputs, dgamma, dbeta and the logit
        gradients sums over nothing, 0, as the CPU kernel gives; no grid of 0 blocks."""
        x, g, b, w = np.zeros((0, 3, 4)), np.ones(3), np.zeros(3), np.full(2, 0.5)
        scopes = ("in", "ln")
        grids = []
        kernels = gpu._kernels

        def recording(threads):
            return {name: _Recording(kernel, grids) for name, kernel in kernels(threads).items()}

        with mock.patch.object(gpu, "_kernels", recording):
            fwd = gpu.sn_forward(x, g, b, w, w, eps=EPS, scopes=scopes)
            got = gpu.sn_backward(x, fwd.x_hat, fwd.rstd, g, (fwd.offset, fwd.var), (w, w),
                                  scopes=scopes)
        assert fwd.y.shape == got.dx.shape == x.shape
        for name in ("dgamma", "dbeta", "dmean_logits", "dvar_logits"):
            np.testing.assert_array_equal(getattr(got, name), 0.0, err_msg=name)
        assert grids and all(blocks >= 1 for blocks in grids), grids

    def test_switchable_refuses_an_ln_pool_that_overflows_with_more_channels_than_samples():
        """One sample of four channels with means of +-1.5e19 in float32: each IN statistic
        fits, but the LN scope's sum of the squared spread of the channel means over C = 4
        channels (9e38) does not; the reference refuses it, and so do both kernels (the GPU's
        pooled sums are C times the LN and N times the BN statistics, not the other way)."""
        rng = np.random.default_rng(0)
        means = np.array([1.5e19, -1.5e19, 1.5e19, -1.5e19]).reshape(1, 4, 1)
        x = (rng.standard_normal((1, 4, 3)) + means).astype(np.float32)
        g, b = np.ones(4, np.float32), np.zeros(4, np.float32)
        w = np.full(3, 1.0 / 3.0, np.float32)
        for forward in (cpu.sn_forward, gpu.sn_forward):
            with launch((4, 5, 3)), pytest.raises(ValueError, match="overflows float32"):
                forward(x, g, b, w, w, eps=EPS, scopes=("in", "ln", "bn"))

    def test_switchable_refuses_float32_planes_whose_sum_overflows_as_on_the_cpu():
        """float32 planes of 20 values of 3e37: every statistic (mean 3e37, variance 0) fits
        float32, but each plane's sum of values (6e38) does not; the reference forms that sum
        in float32 and refuses, and so do both kernels, which sum in float64."""
        x = np.full((2, 3, 20), 3e37, np.float32)
        g, b = np.ones(3, np.float32), np.zeros(3, np.float32)
        w = np.ones(1, np.float32)
        for forward in (cpu.sn_forward, gpu.sn_forward):
            with launch((4, 5, 3)), pytest.raises(ValueError, match="overflows float32"):
                forward(x, g, b, w, w, eps=EPS, scopes=("in",))

    def test_switchable_backward_where_rstd_rounds_to_zero_is_finite():
        """var + eps overflows float64 (var 6.4e307, eps 1.5e308): rstd is 0, x_hat 0, and the
        x_hat term of dx is 0 (not c2 / 0 times 0, a NaN), as the CPU kernel has it
        (tests/test_obscure_inputs.py)."""
        d = 8e153
        x = np.array([[[d, -d], [-d, d]], [[-d, d], [d, -d]]])
        g, b, w = np.ones(2), np.zeros(2), np.full(3, 1.0 / 3.0)
        dy = np.random.default_rng(0).standard_normal(x.shape)
        scopes = ("in", "ln", "bn")
        grads = []
        for kernels in (cpu, gpu):
            # one thread per plane: Welford's update, no merge of one-value parts (Chan's
            # d^2 would overflow here: the fast path's limit in docs/conventions.md)
            with launch((1, 4096, 4096)), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # var + eps overflows
                fwd = kernels.sn_forward(x, g, b, w, w, eps=1.5e308, scopes=scopes)
                assert np.all(fwd.rstd == 0)
                grads.append(kernels.sn_backward(dy, fwd.x_hat, fwd.rstd, g,
                                                 (fwd.offset, fwd.var), (w, w), scopes=scopes))
        for got, want in zip(*grads, strict=True):
            assert np.all(np.isfinite(got))
            np.testing.assert_allclose(np.reshape(got, np.shape(want)), want, rtol=1e-12, atol=0)

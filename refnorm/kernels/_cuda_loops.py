"""The numba.cuda kernels of :mod:`refnorm.kernels.cuda`: loops only, the math is the
reference's (see that module's docstring for what each kernel computes).

``numba.cuda`` is imported at this module's top because the CUDA simulator replaces the
module-level name ``cuda`` of a kernel's globals while it runs it; :mod:`refnorm.kernels.cuda`
imports this module on first use only, so importing refnorm never imports ``numba.cuda``.
Kernels are built per block size (:func:`kernels`), a compile-time constant for the shared
arrays of the block reductions. They take the smaller of two values with :func:`smaller`:
numba's CUDA target does not type the built-in two-argument ``min`` (numba >= 0.66), which
the simulator, running the kernels as Python, never notices
(``tests/kernels/test_cuda.py::test_every_kernel_compiles_for_a_gpu`` compiles them).
"""

# numba.cuda's intrinsics (cuda.grid, cuda.shared.array) are typed for its compiler, not for
# the Python calls mypy sees:
# mypy: disable-error-code="call-arg, var-annotated"

from __future__ import annotations

import functools
import math
from typing import Any

from numba import cuda, float64

# -- the kernels --------------------------------------------------------------------------------


@functools.cache
def kernels(threads: int) -> dict[str, Any]:  # noqa: C901 - one closure per kernel
    """The kernels for blocks of ``threads`` threads (each compiled on its first launch)."""

    @cuda.jit(device=True)
    def chan(na, ma, m2a, nb, mb, m2b):  # pragma: no cover - runs in a kernel
        # An empty part is taken as the other: the formula's d^2 na nb / n would be
        # inf * 0 = NaN for means beyond 1e154, where the variance must come out infinite (the
        # caller's overflow error), as on the CPU (refnorm.kernels._loops._chan).
        if na == 0:
            return nb, mb, m2b
        if nb == 0:
            return na, ma, m2a
        n = na + nb
        d = mb - ma
        return n, ma + d * nb / n, m2a + m2b + d * d * na * nb / n

    @cuda.jit(device=True)
    def smaller(a, b):  # pragma: no cover - runs in a kernel
        return a if a < b else b

    @cuda.jit(device=True)
    def unit_of(n, c, C, G):  # pragma: no cover - the unit of plane (n, c); G = 0: BN
        if G == 0:
            return c
        return n * G + c // (C // G)

    @cuda.jit(device=True)
    def plane_of(u, k, C, G):  # pragma: no cover - the k-th plane of unit u
        if G == 0:
            return k * C + u
        cpg = C // G
        return (u // G) * C + (u % G) * cpg + k

    @cuda.jit
    def moments(x, chunk, mean, m2):  # pragma: no cover - kernel
        P = mean.shape[1]
        r = cuda.blockIdx.x // P
        p = cuda.blockIdx.x - r * P
        t = cuda.threadIdx.x
        stop = smaller(x.shape[1], (p + 1) * chunk)
        n, mu, M2 = 0.0, 0.0, 0.0
        for j in range(p * chunk + t, stop, threads):       # Welford
            v = float64(x[r, j])
            n += 1.0
            d = v - mu
            mu += d / n
            M2 += d * (v - mu)
        sn = cuda.shared.array(threads, float64)
        smu = cuda.shared.array(threads, float64)
        sm2 = cuda.shared.array(threads, float64)
        sn[t], smu[t], sm2[t] = n, mu, M2
        cuda.syncthreads()
        half = threads // 2
        while half > 0:                                      # Chan, in a tree
            if t < half:
                sn[t], smu[t], sm2[t] = chan(sn[t], smu[t], sm2[t],
                                             sn[t + half], smu[t + half], sm2[t + half])
            cuda.syncthreads()
            half //= 2
        if t == 0:
            mean[r, p] = smu[0]
            m2[r, p] = sm2[0]

    @cuda.jit
    def merge_units(mean_p, m2_p, S, chunk, C, G, eps, correction, out):  # pragma: no cover
        u = cuda.grid(1)
        if u >= out.shape[1]:
            return
        P = mean_p.shape[1]
        planes = mean_p.shape[0] // C if G == 0 else C // G
        n, mu, M2 = 0.0, 0.0, 0.0
        for k in range(planes):
            r = plane_of(u, k, C, G)
            for p in range(P):
                count = float64(smaller(chunk, S - p * chunk))
                n, mu, M2 = chan(n, mu, M2, count, mean_p[r, p], m2_p[r, p])
        var = M2 / (n - correction)
        out[0, u] = mu
        out[1, u] = var
        out[2, u] = 1.0 / math.sqrt(var + eps)

    @cuda.jit
    def normalize(x, C, G, mean_u, rstd_u, gamma, beta, y, x_hat):  # pragma: no cover
        R, S = x.shape
        for i in range(cuda.grid(1), R * S, cuda.gridsize(1)):
            r = i // S
            j = i - r * S
            c = r % C
            u = unit_of(r // C, c, C, G)
            h = (float64(x[r, j]) - mean_u[u]) * rstd_u[u]
            x_hat[r, j] = h
            y[r, j] = h * gamma[c] + beta[c]

    @cuda.jit
    def grad_sums(dy, x_hat, chunk, s_dy, s_dyx):  # pragma: no cover - kernel
        P = s_dy.shape[1]
        r = cuda.blockIdx.x // P
        p = cuda.blockIdx.x - r * P
        t = cuda.threadIdx.x
        stop = smaller(dy.shape[1], (p + 1) * chunk)
        a, b = 0.0, 0.0
        for j in range(p * chunk + t, stop, threads):
            g = float64(dy[r, j])
            a += g
            b += g * float64(x_hat[r, j])
        sa = cuda.shared.array(threads, float64)
        sb = cuda.shared.array(threads, float64)
        sa[t], sb[t] = a, b
        cuda.syncthreads()
        half = threads // 2
        while half > 0:
            if t < half:
                sa[t] += sa[t + half]
                sb[t] += sb[t + half]
            cuda.syncthreads()
            half //= 2
        if t == 0:
            s_dy[r, p] = sa[0]
            s_dyx[r, p] = sb[0]

    @cuda.jit
    def coefficients(s_dy, s_dyx, gamma, rstd_u, C, G, m, k):  # pragma: no cover - kernel
        u = cuda.grid(1)
        if u >= rstd_u.shape[0]:
            return
        planes = s_dy.shape[0] // C if G == 0 else C // G
        a, b = 0.0, 0.0
        for q in range(planes):                              # sum(gamma dy), sum(gamma dy x_hat)
            r = plane_of(u, q, C, G)
            a += gamma[r % C] * s_dy[r]
            b += gamma[r % C] * s_dyx[r]
        rs = rstd_u[u]
        for q in range(planes):
            r = plane_of(u, q, C, G)
            k[0, r] = rs * gamma[r % C]
            k[1, r] = -rs * a / m
            k[2, r] = -rs * b / m

    @cuda.jit
    def combine(dy, x_hat, k, dx):  # pragma: no cover - kernel
        R, S = dy.shape
        for i in range(cuda.grid(1), R * S, cuda.gridsize(1)):
            r = i // S
            j = i - r * S
            dx[r, j] = k[0, r] * float64(dy[r, j]) + k[1, r] + k[2, r] * float64(x_hat[r, j])

    return {"moments": moments, "merge_units": merge_units, "normalize": normalize,
            "grad_sums": grad_sums, "coefficients": coefficients, "combine": combine}

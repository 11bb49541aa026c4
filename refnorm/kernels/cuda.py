"""GPU kernels for BN, IN, LN, GN and SN forward and backward, written with ``numba.cuda``.

The same functions, signatures and outputs as :mod:`refnorm.kernels.norms` (the CPU kernels),
each equal to the same reference in :mod:`refnorm.norms`. They take CuPy arrays, or any object
with ``__cuda_array_interface__`` (viewed as CuPy arrays, zero-copy), and return CuPy arrays
on the same device, launched on CuPy's current stream. Under the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, set before numba is imported) they take numpy arrays instead and
run the same kernel code in Python threads: that is how CI tests them without a GPU.

Every activation normalizer works on the ``(n, c)`` planes of its input (``x`` viewed as
``(N * C, S)``, ``S = prod(spatial)``) and on *units*, the sets of planes one statistic
covers: channel ``c`` for BN (the planes ``n * C + c``), the ``C / G`` consecutive planes of
sample ``n``, group ``g`` for GN (LN: ``G = 1``; IN: ``G = C``). Kernels, one pass each:

- ``moments`` — one block per (plane, chunk of :data:`CHUNK` values): each thread runs
  Welford's update over its values, the block merges its threads by Chan's formula in a tree
  (``n = n_a + n_b``, ``mean = mean_a + d n_b / n``, ``M2 = M2_a + M2_b + d^2 n_a n_b / n``
  with ``d = mean_b - mean_a``), never ``E[x^2] - E[x]^2``;
- ``merge_units`` — one thread per unit merges its partials by the same formula and writes
  ``mean``, ``var = M2 / (n - correction)``, ``rstd = 1 / sqrt(var + eps)``;
- ``normalize`` — ``x_hat = (x - mean) rstd``, ``y = gamma x_hat + beta`` (grid-stride);
- ``grad_sums`` — one block per (plane, chunk): ``sum(dy)`` and ``sum(dy x_hat)``, the two
  backward reductions, in one read of ``dy`` and ``x_hat``;
- ``coefficients`` — one thread per unit: ``dx = rstd (gamma dy - mean(gamma dy)
  - x_hat mean(gamma dy x_hat))`` as ``dx = k_dy dy + k_one + k_xhat x_hat`` per plane;
- ``combine`` — that ``dx`` (grid-stride).

Arithmetic is float64 inside every kernel (float32 data widened on load, rounded once on
store), as on the CPU. The small per-plane glue (summing a plane's chunk partials, SN's scope
statistics and mixing on ``(N, C)`` arrays) is done with the arrays' own namespace (CuPy on the
device, numpy under the simulator), never on the host.

None of this has been run on a GPU yet: the tests run it under the simulator only, and the
``gpu``-marked tests in ``tests/gpu/`` are the ones a GPU session runs (docs/gpu.md).
``numba.cuda`` and CuPy are imported on first use, so importing this module needs neither.
"""

from __future__ import annotations

import math
import os
from types import ModuleType
from typing import Any

import numpy as np

from refnorm.kernels.records import AffineGrads, Normalized, SwitchableGrads, SwitchableNormalized

THREADS = 128       # threads per block (a power of two: the block reductions halve it)
CHUNK = 4096        # values of one plane per reduction block
MAX_BLOCKS = 4096   # blocks of the element-wise kernels; grid-stride loops cover the rest

Array = Any


def simulator() -> bool:
    """Whether numba runs CUDA kernels in its simulator (``NUMBA_ENABLE_CUDASIM=1``)."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


# -- arrays: CuPy on a GPU, numpy under the simulator -----------------------------------------


def _namespace(*arrays: Array) -> ModuleType:
    """numpy (simulator only) or cupy; ``TypeError`` for anything else."""
    if all(isinstance(a, np.ndarray) for a in arrays):
        if not simulator():
            raise TypeError("refnorm.kernels.cuda takes numpy arrays only under the CUDA "
                            "simulator (NUMBA_ENABLE_CUDASIM=1); on the CPU use "
                            "refnorm.kernels.norms")
        return np
    for a in arrays:
        if not hasattr(a, "__cuda_array_interface__"):
            raise TypeError("refnorm.kernels.cuda takes arrays with __cuda_array_interface__ "
                            f"(CuPy arrays); got {type(a).__name__}")
    import cupy

    return cupy


def _as_xp(xp: ModuleType, a: Array) -> Array:
    """``a`` as an array of ``xp`` (zero-copy for ``__cuda_array_interface__`` objects)."""
    return a if xp is np else xp.asarray(a)


def _compute(xp: ModuleType, a: Array) -> Array:
    """``a`` C-contiguous in its compute dtype: float32 (from float16 or float32) or float64."""
    dtype = xp.float64 if a.dtype == xp.float64 else xp.float32
    return xp.ascontiguousarray(a, dtype=dtype)


def _f64(xp: ModuleType, a: Array, size: int | None = None) -> Array:
    """``a`` as a contiguous float64 vector (of ``size`` values, broadcast if given)."""
    v = xp.asarray(a, dtype=xp.float64)
    if size is not None:
        v = xp.broadcast_to(v.reshape(-1) if v.ndim else v, (size,))
    return xp.ascontiguousarray(v.reshape(-1))


def _launch(xp: ModuleType, kernel: Any, blocks: int, threads: int, *args: Array) -> None:
    """Run ``kernel[blocks, threads](*args)``: CuPy arrays zero-copy on CuPy's current stream,
    numpy arrays as the simulator takes them. No blocks (an empty N or C axis): nothing to
    compute, and no launch, which CUDA refuses for a grid of 0 blocks."""
    if blocks == 0:
        return
    if xp is np:  # the simulator copies every array argument back: none may be read-only
        kernel[blocks, threads](*(a.copy() if isinstance(a, np.ndarray) and not
                                   a.flags.writeable else a for a in args))
        return
    from numba import cuda

    stream = cuda.external_stream(xp.cuda.get_current_stream().ptr)
    device_args = [cuda.as_cuda_array(a, sync=False) if hasattr(a, "__cuda_array_interface__")
                   else a for a in args]
    kernel[blocks, threads, stream](*device_args)


def _kernels(threads: int) -> dict[str, Any]:
    from refnorm.kernels import _cuda_loops  # numba.cuda on first use only

    return _cuda_loops.kernels(threads)


def _blocks(work: int, threads: int) -> int:
    """Blocks of an element-wise kernel (grid-stride loops: capped at :data:`MAX_BLOCKS`)."""
    return max(1, min(MAX_BLOCKS, -(-work // threads)))


def _unit_blocks(units: int, threads: int) -> int:
    """Blocks of a kernel with one thread per unit (no grid-stride loop: never capped)."""
    return max(1, -(-units // threads))


# -- the passes, on (R, S) planes -------------------------------------------------------------


def _chunking(S: int) -> tuple[int, int]:
    chunk = max(1, min(CHUNK, S))
    return chunk, -(-S // chunk)


def _statistics(xp: ModuleType, x2: Array, C: int, G: int, eps: float,
                correction: int = 0) -> Array:
    """(3, U) float64: mean, var, rstd of every unit of the planes ``x2`` (R, S)."""
    R, S = x2.shape
    chunk, P = _chunking(S)
    k = _kernels(THREADS)
    mean_p = xp.empty((R, P), dtype=xp.float64)
    m2_p = xp.empty((R, P), dtype=xp.float64)
    _launch(xp, k["moments"], R * P, THREADS, x2, chunk, mean_p, m2_p)
    U = C if G == 0 else (R // C) * G
    stats = xp.empty((3, U), dtype=xp.float64)
    _launch(xp, k["merge_units"], _unit_blocks(U, THREADS), THREADS, mean_p, m2_p, S, chunk, C, G,
            float(eps), float(correction), stats)
    return stats


def _normalize(xp: ModuleType, x2: Array, C: int, G: int, mean_u: Array, rstd_u: Array,
               params: tuple[Array, Array]) -> tuple[Array, Array]:
    """y and x_hat (R, S), compute dtype, from per-unit float64 statistics."""
    gamma, beta = (_f64(xp, p, C) for p in params)
    y, x_hat = xp.empty_like(x2), xp.empty_like(x2)
    _launch(xp, _kernels(THREADS)["normalize"], _blocks(x2.size, THREADS), THREADS, x2, C, G,
            mean_u, rstd_u, gamma, beta, y, x_hat)
    return y, x_hat


def _grad_sums(xp: ModuleType, dy2: Array, xh2: Array) -> tuple[Array, Array]:
    """Per-plane ``sum(dy)`` and ``sum(dy x_hat)``, (R,) float64 each."""
    R, S = xh2.shape
    chunk, P = _chunking(S)
    s_dy = xp.empty((R, P), dtype=xp.float64)
    s_dyx = xp.empty((R, P), dtype=xp.float64)
    _launch(xp, _kernels(THREADS)["grad_sums"], R * P, THREADS, dy2, xh2, chunk, s_dy, s_dyx)
    return s_dy.sum(axis=1), s_dyx.sum(axis=1)


def _combine(xp: ModuleType, dy2: Array, xh2: Array, k: Array) -> Array:
    """``dx = k[0] dy + k[1] + k[2] x_hat`` with (3, R) per-plane coefficients."""
    dx = xp.empty_like(xh2)
    _launch(xp, _kernels(THREADS)["combine"], _blocks(xh2.size, THREADS), THREADS, dy2, xh2,
            xp.ascontiguousarray(k), dx)
    return dx


def _planes(xp: ModuleType, a: Array) -> Array:
    N, C = a.shape[:2]
    return _compute(xp, a).reshape(N * C, math.prod(a.shape[2:]))


def _forward(x: Array, gamma: Array, beta: Array, eps: float, G: int) -> tuple:
    """y, x_hat (``x.shape``) and the (3, U) float64 statistics; ``G = 0`` for BN."""
    from refnorm.kernels.norms import refuse_overflow  # shared, as in sn_forward

    xp = _namespace(x, gamma, beta)
    x, gamma, beta = (_as_xp(xp, a) for a in (x, gamma, beta))
    C = x.shape[1]
    x2 = _planes(xp, x)
    stats = _statistics(xp, x2, C, G, eps)
    n = x2.size // max(stats.shape[1], 1)  # values per statistic
    N, S = x.shape[0], x2.shape[1]
    units = x2.reshape(N, C, S) if G == 0 else x2.reshape(N, G, C // G * S)
    sums = n * stats[1].reshape((1, C, 1) if G == 0 else (N, G, 1))
    refuse_overflow(units, x2.dtype, sums)  # the reference's overflow error (its m2's)
    y, x_hat = _normalize(xp, x2, C, G, stats[0], stats[2], (gamma, beta))
    return y.reshape(x.shape).astype(x.dtype, copy=False), x_hat.reshape(x.shape), stats


def _backward(dy: Array, x_hat: Array, rstd: Array, gamma: Array, G: int) -> AffineGrads:
    """dx, dgamma, dbeta for statistics per unit (``rstd`` holds one value per unit)."""
    xp = _namespace(dy, x_hat, rstd, gamma)
    dy, x_hat, rstd, gamma = (_as_xp(xp, a) for a in (dy, x_hat, rstd, gamma))
    N, C = x_hat.shape[:2]
    xh2 = _planes(xp, x_hat)
    dy2 = xp.ascontiguousarray(dy, dtype=xh2.dtype).reshape(xh2.shape)
    s_dy, s_dyx = _grad_sums(xp, dy2, xh2)
    rstd_u = _f64(xp, rstd)
    k = xp.empty((3, N * C), dtype=xp.float64)
    m = xh2.size // max(rstd_u.size, 1)  # values per statistic
    _launch(xp, _kernels(THREADS)["coefficients"], _unit_blocks(rstd_u.size, THREADS), THREADS,
            s_dy, s_dyx, _f64(xp, gamma, C), rstd_u, C, G, float(m), k)
    dx = _combine(xp, dy2, xh2, k).reshape(x_hat.shape)
    dgamma = s_dyx.reshape(N, C).sum(axis=0).astype(gamma.dtype)
    dbeta = s_dy.reshape(N, C).sum(axis=0).astype(gamma.dtype)
    return AffineGrads(dx=dx, dgamma=dgamma, dbeta=dbeta)


def _normalized(y: Array, x_hat: Array, stats: Array, shape: tuple[int, ...]) -> Normalized:
    """The record, the (3, U) statistics as mean, var, rstd in ``shape`` and x_hat's dtype."""
    mean, var, rstd = (s.astype(x_hat.dtype).reshape(shape) for s in stats)
    return Normalized(y=y, x_hat=x_hat, mean=mean, var=var, rstd=rstd)


def _stat_shape(x: Array, lead: tuple[int, ...], extra: int = 0) -> tuple[int, ...]:
    return lead + (1,) * (x.ndim - len(lead) + extra)


# -- BN, GN, LN, IN -------------------------------------------------------------------------------


def bn_forward(x: Array, gamma: Array, beta: Array, eps: float) -> Normalized:
    """Batch Normalization in training; equals :func:`refnorm.norms.batch_norm.batch_norm_forward`
    and :func:`refnorm.kernels.norms.bn_forward` (same arguments and record; statistics
    (1, C, 1, ...))."""
    y, x_hat, stats = _forward(x, gamma, beta, eps, 0)
    return _normalized(y, x_hat, stats, _stat_shape(x, (1, x.shape[1])))


def bn_backward(dy: Array, x_hat: Array, rstd: Array, gamma: Array) -> AffineGrads:
    """Backward of :func:`bn_forward` (``rstd`` (1, C, 1, ...)); equals
    :func:`refnorm.norms.batch_norm.batch_norm_backward` and
    :func:`refnorm.kernels.norms.bn_backward`."""
    return _backward(dy, x_hat, rstd, gamma, 0)


def gn_forward(x: Array, gamma: Array, beta: Array, eps: float, num_groups: int) -> Normalized:
    """Group Normalization; equals :func:`refnorm.norms.group_norm.group_norm_forward`.

    Returns ``y``, ``x_hat`` (``x.shape``) and ``mean``, ``var``, ``rstd``
    (N, G, 1, 1, ...), the grouped view's ``x.ndim + 1`` axes.
    """
    y, x_hat, stats = _forward(x, gamma, beta, eps, num_groups)
    return _normalized(y, x_hat, stats, _stat_shape(x, (x.shape[0], num_groups), extra=1))


def gn_backward(dy: Array, x_hat: Array, rstd: Array, gamma: Array) -> AffineGrads:
    """Backward of :func:`gn_forward` (``rstd`` (N, G, 1, 1, ...)); equals
    :func:`refnorm.norms.group_norm.group_norm_backward`. Returns ``dx``, ``dgamma``, ``dbeta``."""
    return _backward(dy, x_hat, rstd, gamma, rstd.shape[1])


def ln_forward(x: Array, gamma: Array, beta: Array, eps: float) -> Normalized:
    """Layer Normalization; equals :func:`refnorm.norms.layer_norm.layer_norm_forward`.

    Returns ``y``, ``x_hat`` (``x.shape``) and ``mean``, ``var``, ``rstd`` (N, 1, 1, ...).
    """
    y, x_hat, stats = _forward(x, gamma, beta, eps, 1)
    return _normalized(y, x_hat, stats, _stat_shape(x, (x.shape[0],)))


def ln_backward(dy: Array, x_hat: Array, rstd: Array, gamma: Array) -> AffineGrads:
    """Backward of :func:`ln_forward` (``rstd`` (N, 1, 1, ...)); equals
    :func:`refnorm.norms.layer_norm.layer_norm_backward`. Returns ``dx``, ``dgamma``, ``dbeta``."""
    return _backward(dy, x_hat, rstd, gamma, 1)


def in_forward(x: Array, gamma: Array, beta: Array, eps: float) -> Normalized:
    """Instance Normalization in training; equals
    :func:`refnorm.norms.instance_norm.instance_norm_forward`.

    Returns ``y``, ``x_hat`` (``x.shape``) and ``mean``, ``var``, ``rstd`` (N, C, 1, ...).
    """
    y, x_hat, stats = _forward(x, gamma, beta, eps, x.shape[1])
    return _normalized(y, x_hat, stats, _stat_shape(x, x.shape[:2]))


def in_backward(dy: Array, x_hat: Array, rstd: Array, gamma: Array) -> AffineGrads:
    """Backward of :func:`in_forward` (``rstd`` (N, C, 1, ...)); equals
    :func:`refnorm.norms.instance_norm.instance_norm_backward`. Returns ``dx``, ``dgamma``,
    ``dbeta``."""
    return _backward(dy, x_hat, rstd, gamma, x_hat.shape[1])


# -- SN ---------------------------------------------------------------------------------------


def sn_forward(x: Array, gamma: Array, beta: Array, w_mean: Array, w_var: Array, *,
               eps: float, scopes: tuple[str, ...], in_correction: int = 0,
               scope_correction: int = 0) -> SwitchableNormalized:
    """Switchable Normalization in training; equals
    :func:`refnorm.norms.switchable_norm.switchable_norm_forward` and
    :func:`refnorm.kernels.norms.sn_forward` (same arguments and outputs, but for its ``bn``:
    no given BN-scope statistics, so no inference form).

    The IN statistics come from the kernels (per-plane Welford, Chan merge); the LN and BN
    scopes pool them by the law of total variance on (N, C) arrays, then the mixed statistics
    normalize in one more kernel pass.
    """
    from refnorm.kernels.norms import (  # shared
        refuse_overflow,
        sn_scope_statistics,
        variance_factors,
    )

    xp = _namespace(x, gamma, beta)
    x, gamma, beta = (_as_xp(xp, a) for a in (x, gamma, beta))
    N, C = x.shape[:2]
    x2 = _planes(xp, x)
    S = x2.shape[1]
    stats = _statistics(xp, x2, C, C, eps, in_correction)
    mu_in, var_in = stats[0].reshape(N, C, 1), stats[1].reshape(N, C, 1)
    dtype = x2.dtype
    # float64 data: what rounding the mean to float64 lost (as kernels.norms.sn_forward)
    lost_in = (xp.mean(x2 - mu_in.reshape(N * C, 1), axis=1).reshape(N, C, 1)
               if dtype == xp.float64 else xp.zeros_like(mu_in))
    mu, offset, var = sn_scope_statistics(xp, (mu_in, lost_in, var_in), dtype,
                                          factors=variance_factors(x.shape, scope_correction))
    # the reference's overflow error, for the sums it forms (as kernels.norms.sn_forward)
    refuse_overflow(x2.reshape(N, C, S), dtype, var_in * (S - in_correction), S * mu_in,
                    *(n * mu_or_var for k, n in (("ln", C), ("bn", N))
                      for mu_or_var in (var[k], mu[k])))
    shift = mu["in"].astype(dtype).astype(xp.float64)            # mu["in"] as returned
    w_m, w_v = _f64(xp, w_mean), _f64(xp, w_var)
    # the mixture relative to the shift, as kernels.norms.sn_forward forms it
    mu_mix = shift + sum(w_m[i] * offset[k] for i, k in enumerate(scopes))
    var_mix = sum(w_v[i] * var[k] for i, k in enumerate(scopes))
    rstd = 1.0 / xp.sqrt(var_mix + eps)
    y, x_hat = _normalize(xp, x2, C, C, _f64(xp, mu_mix),
                          _f64(xp, rstd * xp.ones((N, C, 1))), (gamma, beta))
    return SwitchableNormalized(y=y.reshape(x.shape).astype(x.dtype, copy=False),
                                h=x2.reshape(N, C, S), x_hat=x_hat.reshape(N, C, S),
                                rstd=rstd.astype(dtype),
                                mu={k: v.astype(dtype) for k, v in mu.items()},
                                offset={k: v.astype(dtype) for k, v in offset.items()},
                                var={k: v.astype(dtype) for k, v in var.items()})


def sn_backward(dy: Array, x_hat: Array, rstd: Array, gamma: Array, stats: tuple[dict, dict],
                ratios: tuple[Array, Array], *, scopes: tuple[str, ...], in_correction: int = 0,
                scope_correction: int = 0, hard: bool = False) -> SwitchableGrads:
    """Backward of :func:`sn_forward`; equals
    :func:`refnorm.norms.switchable_norm.switchable_norm_backward_compact` (training) and
    :func:`refnorm.kernels.norms.sn_backward` (same arguments and outputs, but for its
    ``frozen``: every scope's statistics depend on ``x``, as :func:`sn_forward` computes them).

    The two reductions over S and ``dx`` are kernels; the scope sums (SN Eq. 7, 8 and their
    pooling over channels and samples) are on (N, C) arrays.
    """
    from refnorm.kernels.norms import sn_backward_terms, variance_factors  # shared

    xp = _namespace(dy, x_hat, rstd, gamma)
    dy, x_hat, rstd, gamma = (_as_xp(xp, a) for a in (dy, x_hat, rstd, gamma))
    N, C, S = x_hat.shape
    offset, var = ({k: xp.asarray(v, dtype=xp.float64)[..., 0] for k, v in d.items()}
                   for d in stats)
    w_m, w_v = (_f64(xp, w) for w in ratios)
    xh2 = _compute(xp, x_hat).reshape(N * C, S)
    dy2 = xp.ascontiguousarray(xp.reshape(dy, x_hat.shape), dtype=xh2.dtype).reshape(N * C, S)
    s_dy, s_dyx = (s.reshape(N, C) for s in _grad_sums(xp, dy2, xh2))
    g = _f64(xp, gamma)
    r = xp.broadcast_to(xp.asarray(rstd, dtype=xp.float64), (N, C, 1)).reshape(N, C)
    k_one, c2, dml, dvl = sn_backward_terms(xp, (r, g, s_dy, s_dyx), (offset, var), (w_m, w_v),
                                            scopes=scopes, S=S, in_correction=in_correction,
                                            factors=variance_factors(x_hat.shape,
                                                                     scope_correction),
                                            hard=hard)
    c_xhat = xp.where(r != 0, c2 / xp.where(r != 0, r, 1.0), 0.0)  # as in kernels.norms
    k = xp.stack([xp.broadcast_to(c, (N, C)).reshape(N * C) for c in (r * g, k_one, c_xhat)])
    dx = _combine(xp, dy2, xh2, k).reshape(N, C, S)
    return SwitchableGrads(dx=dx, dgamma=s_dyx.sum(axis=0).astype(gamma.dtype),
                           dbeta=s_dy.sum(axis=0).astype(gamma.dtype), dmean_logits=dml,
                           dvar_logits=dvl)


__all__ = ["bn_backward", "bn_forward", "gn_backward", "gn_forward", "in_backward",
           "in_forward", "ln_backward", "ln_forward", "simulator", "sn_backward", "sn_forward"]

"""The numba loops of the fast path: loops only, the math lives in the reference.

Every kernel here is one pass over memory. The normalizers share four of them, because
every activation normalizer in :mod:`refnorm.norms` works on the (n, c) planes of its input
(the ``S = prod(spatial)`` contiguous values of sample n, channel c): statistics are merges of
per-plane partials, normalization and the backward's ``dx`` apply a per-plane scale and shift.
Each plane may be cut into chunks so that the ``prange`` over (plane, chunk) tasks keeps every
thread busy when N is 1 or 2.

Arithmetic is float64 inside every kernel whatever the storage dtype (float32 data is widened
on load and rounded once on store): the sums then lose nothing measurable, and the cost is
hidden behind the memory traffic. ``fastmath`` allows only reassociation and contraction, so
that reductions vectorize while NaN and infinities still propagate as in the reference.

Statistics are never the one-pass ``E[x^2] - E[x]^2``: each chunk is summed in two passes
with a shift (its first value) so that large offsets cancel exactly before any sum, and the
chunks are merged by Chan's formula in :mod:`refnorm.kernels.norms`.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from refnorm.kernels._simd import ALIGN, LANES, address, stream_combine, stream_normalize

FASTMATH = {"reassoc", "contract"}
L1_VALUES = 2048  # values per moments segment: its second pass reads the L1 cache (16 KiB f64)


@njit  # not cached: it holds the address of numba's thread-pool functions
def num_threads():  # pragma: no cover - compiled
    """``numba.get_num_threads()`` without the lock the Python function takes on every call."""
    return numba.get_num_threads()


@njit  # not cached, as num_threads
def set_threads(n):  # pragma: no cover - compiled
    """``numba.set_num_threads(n)``, compiled (see :func:`num_threads`)."""
    numba.set_num_threads(n)


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _normalize_plain(xr, yr, hr, m, r, g, c):  # pragma: no cover - compiled
    for i in range(xr.shape[0]):
        h = (np.float64(xr[i]) - m) * r
        hr[i] = h
        yr[i] = h * g + c


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _normalize_row(xr, yr, hr, m, r, g, c, stream):  # pragma: no cover - compiled
    """``hr = (xr - m) r`` and ``yr = hr g + c`` over one row; with ``stream``, the aligned
    middle by non-temporal vector stores (``yr`` and ``hr`` equally aligned)."""
    n = xr.shape[0]
    i = 0
    if stream:
        i = min(n, (ALIGN - address(yr) % ALIGN) % ALIGN // yr.itemsize)  # type: ignore[call-arg]
        _normalize_plain(xr[:i], yr[:i], hr[:i], m, r, g, c)
        while i + LANES <= n:
            stream_normalize(xr, i, yr, hr, m, r, g, c)
            i += LANES
    _normalize_plain(xr[i:], yr[i:], hr[i:], m, r, g, c)


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _combine_plain(dr, hr, out, a, c, e):  # pragma: no cover - compiled
    for i in range(dr.shape[0]):
        out[i] = a * np.float64(dr[i]) + c + e * np.float64(hr[i])


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _combine_row(dr, hr, out, a, c, e, stream):  # pragma: no cover - compiled
    """``out = a dr + c + e hr`` over one row; with ``stream``, the aligned middle by
    non-temporal vector stores."""
    n = dr.shape[0]
    i = 0
    if stream:
        i = min(n, (ALIGN - address(out) % ALIGN) % ALIGN // out.itemsize)  # type: ignore[call-arg]
        _combine_plain(dr[:i], hr[:i], out[:i], a, c, e)
        while i + LANES <= n:
            stream_combine(dr, hr, i, out, a, c, e)
            i += LANES
    _combine_plain(dr[i:], hr[i:], out[i:], a, c, e)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def chunk_moments(x, chunk):  # pragma: no cover - compiled
    """Mean and sum of squared deviations of every chunk of every plane.

    Equals the two passes of :func:`refnorm.core.moments.moments` restricted to one chunk;
    the merge of chunks into a statistic is :func:`refnorm.kernels.norms._merge`.

    Parameters
    ----------
    x : array, (B, S), C-contiguous, float32 or float64
        B planes of S values.
    chunk : int
        Values per chunk; plane b's chunk p is ``x[b, p * chunk:(p + 1) * chunk]``.

    Returns
    -------
    mean, m2 : float64 arrays, (B, P) with P = ceil(S / chunk)
    """
    B, S = x.shape
    P = (S + chunk - 1) // chunk
    mean = np.empty((B, P), dtype=np.float64)
    m2 = np.empty((B, P), dtype=np.float64)
    for t in prange(B * P):
        b = t // P
        lo = (t % P) * chunk
        hi = min(lo + chunk, S)
        row = x[b, lo:hi]
        shift = np.float64(row[0])
        s = 0.0
        for i in range(row.shape[0]):
            s += np.float64(row[i]) - shift
        mu = shift + s / (hi - lo)
        q = 0.0
        for i in range(row.shape[0]):
            d = np.float64(row[i]) - mu
            q += d * d
        mean[b, t % P] = mu
        m2[b, t % P] = q
    return mean, m2


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def normalize_affine(x, mean, rstd, gamma, beta, chunk, y, x_hat, stream):  # pragma: no cover
    """``x_hat = (x - mean) * rstd`` and ``y = x_hat * gamma + beta`` in one pass.

    Equals :func:`refnorm.core.standardize.standardize` followed by
    :func:`refnorm.core.affine.affine_forward`, with every statistic and parameter given
    per plane.

    Parameters
    ----------
    x : array, (B, S), C-contiguous
    mean, rstd, gamma, beta : float64 arrays, (B,)
        The statistics of each plane's statistic and the parameters of its channel.
    chunk : int
        Values per parallel task.
    y, x_hat : arrays, (B, S), written; 64-byte aligned alike when ``stream``
    stream : bool
        Write ``y`` and ``x_hat`` with non-temporal stores (:mod:`refnorm.kernels._simd`).
    """
    B, S = x.shape
    P = (S + chunk - 1) // chunk
    for t in prange(B * P):
        b = t // P
        lo = (t % P) * chunk
        hi = min(lo + chunk, S)
        _normalize_row(x[b, lo:hi], y[b, lo:hi], x_hat[b, lo:hi], mean[b], rstd[b], gamma[b],
                       beta[b], stream)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def chunk_grad_sums(dy, x_hat, chunk):  # pragma: no cover - compiled
    """``sum(dy)`` and ``sum(dy * x_hat)`` of every chunk of every plane, in one pass.

    These are the two reductions of :func:`refnorm.core.affine.affine_backward` and
    :func:`refnorm.core.standardize.standardize_backward` (``dbeta``, ``dgamma`` and, times
    ``gamma``, ``sum(dx_hat)`` and ``sum(dx_hat * x_hat)``).

    Parameters
    ----------
    dy, x_hat : arrays, (B, S), C-contiguous, one dtype
    chunk : int

    Returns
    -------
    sum_dy, sum_dy_xhat : float64 arrays, (B, P)
    """
    B, S = dy.shape
    P = (S + chunk - 1) // chunk
    s1 = np.empty((B, P), dtype=np.float64)
    s2 = np.empty((B, P), dtype=np.float64)
    for t in prange(B * P):
        b = t // P
        lo = (t % P) * chunk
        hi = min(lo + chunk, S)
        a = 0.0
        c = 0.0
        dr = dy[b, lo:hi]
        hr = x_hat[b, lo:hi]
        for i in range(dr.shape[0]):
            d = np.float64(dr[i])
            a += d
            c += d * np.float64(hr[i])
        s1[b, t % P] = a
        s2[b, t % P] = c
    return s1, s2


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def combine(dy, x_hat, k_dy, k_one, k_xhat, chunk, dx, stream):  # pragma: no cover - compiled
    """``dx = k_dy * dy + k_one + k_xhat * x_hat`` with per-plane coefficients.

    The closed-form backward of :func:`refnorm.core.standardize.standardize_backward` after
    :func:`refnorm.core.affine.affine_backward` (``k_dy = gamma * rstd``,
    ``k_one = -rstd * mean(dx_hat)``, ``k_xhat = -rstd * mean(dx_hat * x_hat)``), and the
    ``dh`` of :func:`refnorm.norms.switchable_norm.switchable_norm_backward_compact`.

    Parameters
    ----------
    dy, x_hat : arrays, (B, S), C-contiguous
    k_dy, k_one, k_xhat : float64 arrays, (B,)
    chunk : int
    dx : array, (B, S), written; 64-byte aligned when ``stream``
    stream : bool
        Write ``dx`` with non-temporal stores.
    """
    B, S = dy.shape
    P = (S + chunk - 1) // chunk
    for t in prange(B * P):
        b = t // P
        lo = (t % P) * chunk
        hi = min(lo + chunk, S)
        _combine_row(dy[b, lo:hi], x_hat[b, lo:hi], dx[b, lo:hi], k_dy[b], k_one[b], k_xhat[b],
                     stream)


@njit(cache=True, inline="always")
def _valid_range(n_out, stride, offset, size):  # pragma: no cover - compiled
    """The output positions ``o`` in ``[lo, hi)`` whose input ``o * stride + offset`` lies in
    ``[0, size)`` (``offset`` = kernel offset minus padding): the padding's zeros are then
    written or skipped outside the inner loop, which stays branch-free."""
    lo = 0
    if offset < 0:
        lo = (-offset + stride - 1) // stride
    hi = 0
    if size - 1 - offset >= 0:
        hi = (size - 1 - offset) // stride + 1
    return min(lo, n_out), max(min(hi, n_out), min(lo, n_out))


@njit(cache=True, parallel=True, nogil=True)
def im2col(x, KH, KW, sh, sw, ph, pw, H_out, W_out, cols, n0):  # pragma: no cover - compiled
    """Copy every window of the zero-padded ``x`` into a column; equals
    :func:`refnorm.nn.conv.im2col`.

    Parameters
    ----------
    x : array, (N, C, H, W), C-contiguous
    KH, KW, sh, sw, ph, pw, H_out, W_out : int
        Kernel, stride, padding and output size.
    cols : array, (C * KH * KW, (n0 + N) * H_out * W_out) or wider, written
        ``cols[(c, i, j), (n0 + n, p, q)] = x_pad[n, c, sh p + i, sw q + j]``.
    n0 : int
        The first sample's place in ``cols`` (``x`` is a block of samples of a larger batch:
        :func:`refnorm.kernels.blocks.by_samples`).
    """
    N, C, H, W = x.shape
    for r in prange(C * KH * KW):
        c = r // (KH * KW)
        i = (r // KW) % KH
        j = r % KW
        for n in range(N):
            for p in range(H_out):
                hh = p * sh + i - ph
                # clamped non-negative, so that numba drops its negative-index test and the
                # copies vectorize (with n0 unclamped the loop took 2.5-4x as long)
                base = max(((n0 + n) * H_out + p) * W_out, 0)
                if hh < 0 or hh >= H:
                    for q in range(W_out):
                        cols[r, base + q] = 0
                    continue
                for q in range(W_out):
                    ww = q * sw + j - pw
                    if 0 <= ww < W:
                        cols[r, base + q] = x[n, c, hh, ww]
                    else:
                        cols[r, base + q] = 0


@njit(cache=True, parallel=True, nogil=True)
def col2im(cols, KH, KW, sh, sw, ph, pw, H_out, W_out, dx):  # pragma: no cover - compiled
    """Add every column entry back onto the input position it was copied from; equals
    :func:`refnorm.nn.conv.col2im` (padding positions are dropped).

    One task per (n, c) plane of ``dx``: it sums the plane's ``KH KW`` column rows into it,
    kernel offset by kernel offset (the reference's order), the inner loop free of bounds
    tests (indices clamped non-negative, as in :func:`im2col`).

    Parameters
    ----------
    cols : array, (N, C * KH * KW, H_out * W_out)
        The columns by sample: ``cols[n, r, k]`` is the reference's ``cols[r, n H_out W_out
        + k]`` (a transposed view of it, or the batched products of the backward).
    KH, KW, sh, sw, ph, pw, H_out, W_out : int
    dx : array, (N, C, H, W), written (zeroed here first)
    """
    N, C, H, W = dx.shape
    s = max(sw, 1)
    for t in prange(N * C):
        n = t // C
        c = t % C
        for hh in range(H):
            for ww in range(W):
                dx[n, c, hh, ww] = 0
        for i in range(KH):
            p_lo, p_hi = _valid_range(H_out, sh, i - ph, H)
            for j in range(KW):
                q_lo, q_hi = _valid_range(W_out, sw, j - pw, W)
                r = max((c * KH + i) * KW + j, 0)
                w0 = max(q_lo * sw + j - pw, 0)
                for p in range(p_lo, p_hi):
                    hh = max(p * sh + i - ph, 0)
                    o = max(p * W_out + q_lo, 0)
                    if sw == 1:                        # contiguous: vectorizes
                        for k in range(q_hi - q_lo):
                            dx[n, c, hh, w0 + k] += cols[n, r, o + k]
                    else:
                        for k in range(q_hi - q_lo):
                            dx[n, c, hh, w0 + k * s] += cols[n, r, o + k]


@njit(cache=True, inline="always")
def _pool_plane_exact(plane, KH, KW, sh, sw, yp, ap):  # pragma: no cover - compiled
    """Max pooling of one plane, window by window, with the reference's NaN rule."""
    H_out, W_out = yp.shape
    for p in range(H_out):
        for q in range(W_out):
            best = plane[p * sh, q * sw]
            k_best = 0
            for i in range(KH):
                for j in range(KW):
                    v = plane[p * sh + i, q * sw + j]
                    if v > best or (v != v and best == best):
                        best = v
                        k_best = i * KW + j
            yp[p, q] = best
            ap[p * W_out + q] = k_best


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _pool_row_2x2(r0, r1, yr, ar, sw):  # pragma: no cover - compiled
    """One output row of 2x2 windows at column stride ``sw`` (rows ``r0`` and ``r1`` of the
    input), branch-free (it vectorizes), ignoring the NaN rule. Returns the sum of ``v - v``
    over the row's values: 0 for finite values, NaN if the row holds a NaN or an infinity (a
    sum, unlike a test per value, vectorizes; ``fastmath`` here allows no folding of
    ``v - v``). Called with a literal ``sw`` (2) the loads vectorize best."""
    spread = r0[0] - r0[0]
    for q in range(yr.shape[0]):
        a = r0[q * sw]
        b = r0[q * sw + 1]
        c = r1[q * sw]
        d = r1[q * sw + 1]
        spread += (a - a) + (b - b) + (c - c) + (d - d)
        best = a
        k = 0
        take = b > best
        best = b if take else best
        k = 1 if take else k
        take = c > best
        best = c if take else best
        k = 2 if take else k
        take = d > best
        best = d if take else best
        k = 3 if take else k
        yr[q] = best
        ar[q] = k
    return spread


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def max_pool(x, KH, KW, sh, sw, y, argmax):  # pragma: no cover - compiled
    """The maximum of each window and the index ``k = i KW + j`` of its first maximum in
    row-major window order (a NaN wins, the first NaN), as ``max``/``argmax`` in
    :func:`refnorm.nn.pooling.max_pool2d_forward`.

    One task per (n, c) plane. 2x2 windows take a branch-free pass with a strict ``>`` (the
    first maximum wins ties, as in the reference) that also notes whether the plane holds a
    NaN or an infinity; such a plane, and every plane of other windows, is done by the exact
    window-by-window loop with the NaN rule. (The NaN test inside the compare kept the loop
    from vectorizing: 2.5 ms instead of 0.15 ms for (32, 16, 32, 32).) At stride 2 (the
    study's) the pass runs with literal strides: 0.09 ms against 0.33 with the strides as
    variables.

    Parameters
    ----------
    x : array, (N, C, H, W), C-contiguous
    KH, KW, sh, sw : int
    y : array, (N, C, H_out, W_out), written
    argmax : int64 array, (C, N * H_out * W_out), written
    """
    N, C = x.shape[0], x.shape[1]
    H_out, W_out = y.shape[2], y.shape[3]
    P = H_out * W_out
    for t in prange(N * C):
        n = t // C
        c = t % C
        plane = x[n, c]
        yp = y[n, c]
        ap = argmax[c, n * P:(n + 1) * P]
        redo = True
        if KH == 2 and KW == 2 and sh == 2 and sw == 2:
            spread = 0.0
            for p in range(H_out):
                spread += _pool_row_2x2(plane[2 * p], plane[2 * p + 1], yp[p],
                                        ap[p * W_out:(p + 1) * W_out], 2)
            redo = spread != 0.0
        elif KH == 2 and KW == 2:
            spread = 0.0
            for p in range(H_out):
                spread += _pool_row_2x2(plane[p * sh], plane[p * sh + 1], yp[p],
                                        ap[p * W_out:(p + 1) * W_out], sw)
            redo = spread != 0.0
        if redo:
            _pool_plane_exact(plane, KH, KW, sh, sw, yp, ap)


@njit(cache=True, parallel=True)
def max_pool_backward(dy, argmax, KH, KW, sh, sw, dx):  # pragma: no cover - compiled
    """Each window's ``dy`` onto its recorded maximum, summed where windows overlap; equals
    :func:`refnorm.nn.pooling.max_pool2d_backward`.

    One task per (n, c) plane; the plane is zeroed then written row by row (2x2 windows at
    stride 2, which tile the plane, by one store per window). An index outside the window
    (only a cache built by hand holds one) places nothing, as in the reference, where it
    matches no position of the window: no store lands outside ``dx``.

    Parameters
    ----------
    dy : array, (N, C, H_out, W_out), C-contiguous
    argmax : int array, (C, N * H_out * W_out)
    KH, KW, sh, sw : int
    dx : array, (N, C, H, W), written (zeroed here first)
    """
    N, C, H_out, W_out = dy.shape
    H, W = dx.shape[2], dx.shape[3]
    for t in prange(N * C):
        n = t // C
        c = t % C
        plane = dx[n, c]
        dp = dy[n, c]
        ap = argmax[c, n * H_out * W_out:(n + 1) * H_out * W_out]
        for hh in range(H):
            for ww in range(W):
                plane[hh, ww] = 0
        if KH == 2 and KW == 2 and sh == 2 and sw == 2:
            # one store per window, its position by shifts (0.20 against 0.40 ms for dx of
            # (32, 16, 32, 32) with the general loop's division)
            for p in range(H_out):
                base = p * W_out
                dr = dp[p]
                for q in range(W_out):
                    k = ap[base + q]
                    if 0 <= k < 4:
                        plane[2 * p + (k >> 1), 2 * q + (k & 1)] = dr[q]
        else:
            for p in range(H_out):
                base = p * W_out
                dr = dp[p]
                for q in range(W_out):
                    k = ap[base + q]
                    if 0 <= k < KH * KW:
                        plane[p * sh + k // KW, q * sw + k % KW] += dr[q]


@njit(cache=True, parallel=True)
def relu_forward(x, y, positive):  # pragma: no cover - compiled
    """``y = max(x, 0)`` (NaN stays NaN, -0 becomes +0, as numpy's ``maximum(x, 0)``) and the
    mask ``x > 0`` in one pass; equals :func:`refnorm.nn.activations.relu_forward`.

    Parameters
    ----------
    x : array, (L,), C-contiguous
    y : array, (L,), written
    positive : bool array, (L,), written
    """
    for i in prange(x.shape[0]):
        v = x[i]
        p = v > 0
        positive[i] = p
        y[i] = v if (p or v != v) else 0


@njit(cache=True, parallel=True)
def relu_backward(dy, positive, dx):  # pragma: no cover - compiled
    """``dx = dy`` where ``positive``, else 0; equals :func:`refnorm.nn.activations.relu_backward`.

    Parameters
    ----------
    dy : array, (L,), C-contiguous
    positive : bool array, (L,)
    dx : array, (L,), written (may be ``dy`` itself)
    """
    for i in prange(dy.shape[0]):
        dx[i] = dy[i] if positive[i] else 0


@njit(cache=True, inline="always")
def unit_plane(u, k, C, G):  # pragma: no cover - compiled
    """Plane index (n C + c) of the k-th plane of unit u: BN channel u (``G == 0``, k = n)
    or GN row u = (n, g) (k the channel within the group)."""
    if G == 0:
        return u + k * C
    return (u // G) * C + (u % G) * (C // G) + k


@njit(cache=True, inline="always")
def plane_unit(b, C, G):  # pragma: no cover - compiled
    """The unit (statistic) plane b = n C + c belongs to: channel c for BN (``G == 0``), row
    (n, g) for GN; the inverse of :func:`unit_plane`."""
    if G == 0:
        return b % C
    return (b // C) * G + (b % C) // (C // G)


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _segment_moments(seg):  # pragma: no cover - compiled
    """Mean and sum of squared deviations of one segment of at most :data:`L1_VALUES` values
    (it stays in the L1 cache between the two passes): a sum shifted by the first value, then
    the squared deviations from the mean."""
    n = seg.shape[0]
    shift = np.float64(seg[0])
    s = 0.0
    for i in range(n):
        s += np.float64(seg[i]) - shift
    mu = shift + s / n
    q = 0.0
    for i in range(n):
        d = np.float64(seg[i]) - mu
        q += d * d
    return mu, q


@njit(cache=True, inline="always")
def _chan(count, mean, m2, n, mu, q):  # pragma: no cover - compiled
    """Merge the moments ``(n, mu, q)`` of a segment into ``(count, mean, m2)``: Chan's formula
    (the law of total variance). The first segment is taken as it is: the formula's
    ``delta^2 count n / total`` would be ``inf * 0 = NaN`` for a mean beyond 1e154, where the
    variance must come out infinite (the caller's overflow error) and not NaN."""
    if count == 0:
        return n, mu, q
    total = count + n
    delta = mu - mean
    return total, mean + delta * (n / total), m2 + q + delta * delta * (count * n / total)


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _row_moments(row, count, mean, m2):  # pragma: no cover - compiled
    """Merge the moments of ``row`` into ``(count, mean, m2)``, one L1-sized segment at a
    time: one read of ``row`` from memory, the second pass over each segment from L1."""
    S = row.shape[0]
    for lo in range(0, S, L1_VALUES):
        seg = row[lo:min(lo + L1_VALUES, S)]
        mu, q = _segment_moments(seg)
        count, mean, m2 = _chan(count, mean, m2, np.float64(seg.shape[0]), mu, q)
    return count, mean, m2


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _grad_sums(dr, hr):  # pragma: no cover - compiled
    """``sum(dr)`` and ``sum(dr hr)`` in one pass."""
    a = 0.0
    c = 0.0
    for i in range(dr.shape[0]):
        d = np.float64(dr[i])
        a += d
        c += d * np.float64(hr[i])
    return a, c


@njit(cache=True, inline="always")
def _finish_stats(u, count, mean, m2, eps, stats):  # pragma: no cover - compiled
    """Write the mean, biased variance and rstd of unit u; return (rstd, 1 if the sum that
    the reference forms in the dtype of ``stats`` overflows that dtype, else 0): the sum of
    the squared deviations (``m2``), whose overflow makes the reference's
    ``mean((x - mu)**2)`` infinite (its mean's sum is float64, as here); its variance is then
    left inf, as the reference's, and the caller raises the reference's error where the unit's
    values are finite (:func:`refnorm.kernels.norms.refuse_overflow`)."""
    v = m2 / count
    r = 1.0 / np.sqrt(v + eps)
    stats[1, u] = m2                  # rounded to the dtype of stats: inf where it overflows
    big = np.isinf(stats[1, u])
    stats[0, u] = mean
    if not big:
        stats[1, u] = v
    stats[2, u] = r
    return r, 1 if big else 0


@njit(cache=True, inline="always")
def _sum_per_channel(sums, C, grads):  # pragma: no cover - compiled
    """``grads[:, c] = sum over n of sums[:, n C + c]``."""
    B = sums.shape[1]
    for j in range(2):
        for c in range(C):
            grads[j, c] = 0.0
        for b in range(B):
            grads[j, b % C] += sums[j, b]


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def unit_forward(x, C, G, gamma, beta, eps, y, x_hat, stats, stream):  # pragma: no cover
    """Statistics of a whole unit and its normalize+affine, in one task while it is cached.

    A *unit* is the set of planes one statistic covers: for BN (``G = 0``) channel c, the
    planes ``n C + c``; for GN row (n, g), the C/G planes of the group's channels (LN and IN
    are G = 1 and G = C). Moments: each L1-sized segment in two passes (shifted sum, squared
    deviations), merged by Chan's formula, which equals :func:`refnorm.core.moments.moments`
    up to rounding; then :func:`refnorm.core.standardize.standardize` and
    :func:`refnorm.core.affine.affine_forward` in one pass over the (cached) unit.

    Parameters
    ----------
    x : array, (N * C, S), C-contiguous planes
    C, G : int
        Channels, and groups (0 for BN).
    gamma, beta : arrays, (C,)
    eps : float
    y, x_hat : arrays, (N * C, S), written; 64-byte aligned alike when ``stream``
    stats : array, (3, U), written
        Mean, biased variance and rstd of each unit (U = C for BN, N G for GN).
    stream : bool
        Write ``y`` and ``x_hat`` with non-temporal stores (:mod:`refnorm.kernels._simd`).

    Returns
    -------
    int : the number of units whose sums overflow the dtype of ``stats`` (:func:`_finish_stats`)
    """
    B, S = x.shape
    U = stats.shape[1]
    K = B // U
    bad = 0
    for u in prange(U):
        count, mean, m2 = 0.0, 0.0, 0.0
        for k in range(K):
            count, mean, m2 = _row_moments(x[unit_plane(u, k, C, G)], count, mean, m2)
        r, inf = _finish_stats(u, count, mean, m2, eps, stats)
        bad += inf
        for k in range(K):
            b = unit_plane(u, k, C, G)
            _normalize_row(x[b], y[b], x_hat[b], mean, r, np.float64(gamma[b % C]),
                           np.float64(beta[b % C]), stream)
    return bad


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def unit_backward(dy, x_hat, C, G, gamma, rstd, dx, grads, stream):  # pragma: no cover
    """The closed-form backward of a whole unit (see :func:`unit_forward`) in one task.

    Equals :func:`refnorm.core.affine.affine_backward` then
    :func:`refnorm.core.standardize.standardize_backward` over the unit:
    ``dx = rstd (gamma dy - mean(gamma dy) - x_hat mean(gamma dy x_hat))``; the per-plane sums
    of ``dy`` and ``dy x_hat`` come out of the same first pass and are added up per channel
    into ``dbeta`` and ``dgamma``.

    Parameters
    ----------
    dy, x_hat : arrays, (N * C, S), C-contiguous
    C, G : int
    gamma : array, (C,)
    rstd : array, (U,)
    dx : array, (N * C, S), written; 64-byte aligned when ``stream``
    grads : float64 array, (2, C), written: ``dbeta = sum(dy)``, ``dgamma = sum(dy x_hat)``
    stream : bool
    """
    B, S = dy.shape
    U = rstd.shape[0]
    K = B // U
    m = K * S
    sums = np.empty((2, B))
    for u in prange(U):
        a = 0.0
        c = 0.0
        for k in range(K):
            b = unit_plane(u, k, C, G)
            s1, s2 = _grad_sums(dy[b], x_hat[b])
            sums[0, b] = s1
            sums[1, b] = s2
            g = np.float64(gamma[b % C])
            a += g * s1
            c += g * s2
        r = np.float64(rstd[u])
        k_one = -r * a / m
        k_xhat = -r * c / m
        for k in range(K):
            b = unit_plane(u, k, C, G)
            _combine_row(dy[b], x_hat[b], dx[b], r * np.float64(gamma[b % C]), k_one, k_xhat,
                         stream)
    _sum_per_channel(sums, C, grads)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def tasks_forward(x, C, G, gamma, beta, eps, chunk, y, x_hat, stats, stream):  # pragma: no cover
    """:func:`unit_forward` with the work cut into (plane, chunk) tasks instead of units: for
    BN, whose channel's planes lie a sample apart in memory, and for units that are too few
    to keep every thread busy or too large for the cache.

    Three steps in one call: the moments of every task (its L1-sized segments merged by Chan's
    formula) in parallel; their merge into each unit's statistics, in plane order; then the
    normalize+affine of every task in parallel. ``x`` is read twice, in memory order.

    Parameters
    ----------
    As :func:`unit_forward`, and ``chunk`` (int): values per task (plane b's task p covers
    ``x[b, p * chunk:(p + 1) * chunk]``).

    Returns
    -------
    int : the number of units whose sums overflow the dtype of ``stats`` (:func:`_finish_stats`)
    """
    B, S = x.shape
    P = (S + chunk - 1) // chunk
    U = stats.shape[1]
    part = np.empty((3, B * P))
    for t in prange(B * P):
        b = t // P
        lo = (t % P) * chunk
        count, mean, m2 = _row_moments(x[b, lo:min(lo + chunk, S)], 0.0, 0.0, 0.0)
        part[0, t] = count
        part[1, t] = mean
        part[2, t] = m2
    acc = np.zeros((3, U))
    for t in range(B * P):
        u = plane_unit(t // P, C, G)
        acc[0, u], acc[1, u], acc[2, u] = _chan(acc[0, u], acc[1, u], acc[2, u], part[0, t],
                                                part[1, t], part[2, t])
    bad = 0
    rstd = np.empty(U)
    for u in range(U):
        rstd[u], inf = _finish_stats(u, acc[0, u], acc[1, u], acc[2, u], eps, stats)
        bad += inf
    for t in prange(B * P):
        b = t // P
        lo = (t % P) * chunk
        hi = min(lo + chunk, S)
        u = plane_unit(b, C, G)
        _normalize_row(x[b, lo:hi], y[b, lo:hi], x_hat[b, lo:hi], acc[1, u], rstd[u],
                       np.float64(gamma[b % C]), np.float64(beta[b % C]), stream)
    return bad


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def tasks_backward(dy, x_hat, C, G, gamma, rstd, chunk, dx, grads, stream):  # pragma: no cover
    """:func:`unit_backward` with the work cut into (plane, chunk) tasks (see
    :func:`tasks_forward`): both sums of every task in parallel, their totals per unit and per
    channel, then ``dx`` of every task in parallel. ``dy`` and ``x_hat`` are read twice.

    Parameters
    ----------
    As :func:`unit_backward`, and ``chunk`` (int).
    """
    B, S = dy.shape
    P = (S + chunk - 1) // chunk
    U = rstd.shape[0]
    m = (B // U) * S
    part = np.empty((2, B * P))
    for t in prange(B * P):
        b = t // P
        lo = (t % P) * chunk
        hi = min(lo + chunk, S)
        part[0, t], part[1, t] = _grad_sums(dy[b, lo:hi], x_hat[b, lo:hi])
    sums = np.zeros((2, B))
    for t in range(B * P):
        sums[0, t // P] += part[0, t]
        sums[1, t // P] += part[1, t]
    a = np.zeros(U)
    c = np.zeros(U)
    for b in range(B):
        u = plane_unit(b, C, G)
        g = np.float64(gamma[b % C])
        a[u] += g * sums[0, b]
        c[u] += g * sums[1, b]
    for t in prange(B * P):
        b = t // P
        lo = (t % P) * chunk
        hi = min(lo + chunk, S)
        u = plane_unit(b, C, G)
        r = np.float64(rstd[u])
        _combine_row(dy[b, lo:hi], x_hat[b, lo:hi], dx[b, lo:hi], r * np.float64(gamma[b % C]),
                     -r * a[u] / m, -r * c[u] / m, stream)
    _sum_per_channel(sums, C, grads)


@njit(cache=True, fastmath=FASTMATH)
def ws_forward(w, eps, add, correction, w_hat, denom, kappa):  # pragma: no cover - compiled
    """Weight Standardization of every output channel's row: Eq. (2), (4)-(6) of Qiao et al.
    as :func:`refnorm.weights.standardization.weight_standardization_forward` computes them.

    Per row of I weights: the mean and the sum of squared deviations by two passes (the row is
    cached), ``sigma = sqrt(M2 / (I - correction))``, ``d = sigma + eps`` (``add``) or
    ``sqrt(sigma^2 + eps)``, ``kappa = d / (sigma (I - correction))`` (0 where ``sigma = 0``)
    or ``1 / (I - correction)``, and ``w_hat = (w - mean) / d``.

    Parameters
    ----------
    w : array, (C_out, I), C-contiguous
    eps : float
    add : bool
        ``eps_mode == "add"``.
    correction : int, 0 or 1
    w_hat : array, (C_out, I), written
    denom, kappa : arrays, (C_out, 1), written
    """
    C, I = w.shape
    n = I - correction
    for o in range(C):
        row = w[o]
        mu, q = _segment_moments(row)
        sigma = np.sqrt(q / n)
        if add:
            d = sigma + eps
            k = d / (sigma * n) if sigma > 0 else 0.0
        else:
            d = np.sqrt(sigma * sigma + eps)
            k = 1.0 / n
        denom[o, 0] = d
        kappa[o, 0] = k
        out = w_hat[o]
        for i in range(I):
            out[i] = (np.float64(row[i]) - mu) / d


@njit(cache=True, fastmath=FASTMATH)
def ws_backward(g, w_hat, denom, kappa, dw):  # pragma: no cover - compiled
    """Eq. (8)-(9) of Qiao et al., generalized to the forward's ``d`` and ``kappa``, as
    :func:`refnorm.weights.standardization.weight_standardization_backward`:
    ``dw = dw_dot - mean(dw_dot)``, ``dw_dot = (g - kappa <w_hat, g> w_hat) / d``, the mean
    formed from the row sums of ``g`` and ``w_hat`` in the same pass as ``<w_hat, g>``.

    Parameters
    ----------
    g : array, (C_out, I), C-contiguous: the gradient with respect to ``w_hat``
    w_hat : array, (C_out, I)
    denom, kappa : arrays, (C_out, 1)
    dw : array, (C_out, I), written
    """
    C, I = g.shape
    for o in range(C):
        gr = g[o]
        hr = w_hat[o]
        along = 0.0
        s_g = 0.0
        s_h = 0.0
        for i in range(I):
            a = np.float64(gr[i])
            b = np.float64(hr[i])
            along += a * b
            s_g += a
            s_h += b
        d = np.float64(denom[o, 0])
        k = np.float64(kappa[o, 0]) * along
        mean = (s_g - k * s_h) / (I * d)
        out = dw[o]
        for i in range(I):
            out[i] = (np.float64(gr[i]) - k * np.float64(hr[i])) / d - mean

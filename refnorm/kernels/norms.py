"""Fast forward and backward of BN, IN, LN, GN and SN on numpy arrays (numba loops).

Every function returns a named record (:mod:`refnorm.kernels.records`) holding exactly the
fields the reference caches hold, in the reference's shapes and under their names, so that the
caller builds the reference cache by keyword:

=========  ====================================  ==========================================
method     reference                             statistics shape
=========  ====================================  ==========================================
BN         refnorm.norms.batch_norm              (1, C, 1, ...)
IN         refnorm.norms.instance_norm           (N, C, 1, ...)
LN         refnorm.norms.layer_norm              (N, 1, 1, ...)
GN         refnorm.norms.group_norm              (N, G, 1, 1, ...) (the grouped view)
SN         refnorm.norms.switchable_norm         (N, C, 1) and one dict entry per scope
=========  ====================================  ==========================================

How the work is laid out (bytes for an input of ``n`` values of ``b`` bytes each):

- BN, IN, LN, GN: one compiled call per direction. A *unit* is the planes one statistic covers
  (BN: a channel's N planes; GN: the C/G planes of row (n, g)). Where units are many enough
  for the threads and small enough for the L2 cache,
  :func:`~refnorm.kernels._loops.unit_forward` takes one unit per task: its moments (L1-sized
  segments in two passes, merged by Chan's formula) read ``x`` from memory once, and its
  normalize+affine reads the unit again from the cache and writes ``y`` and ``x_hat``: n b
  read, 2 n b written. :func:`~refnorm.kernels._loops.unit_backward` reads ``dy`` and ``x_hat``
  for both sums and again (cached) for ``dx``: 2 n b read, n b written. Otherwise (BN beyond
  :data:`BN_UNITS_UP_TO` samples, whose channel's planes lie a sample apart; too few or too
  large units) :func:`~refnorm.kernels._loops.tasks_forward` and
  :func:`~refnorm.kernels._loops.tasks_backward` cut the planes into tasks in memory order,
  merge the tasks' partial results per unit in the same call, and read the input a second
  time (from the last-level cache where it fits). Outputs of :data:`STREAM_FROM` bytes or more
  are written with non-temporal stores (:mod:`refnorm.kernels._simd`);
- SN (and the inference forwards): :func:`~refnorm.kernels._loops.chunk_moments` reads ``x``,
  the chunks are merged per statistic by Chan's formula (:func:`_merge`, on arrays of
  (N, C, chunks) values), then :func:`~refnorm.kernels._loops.normalize_affine` reads ``x``
  and writes ``y`` and ``x_hat``; the backward's
  :func:`~refnorm.kernels._loops.chunk_grad_sums` reads ``dy`` and ``x_hat`` once for both
  reductions, the coefficients are formed on (N, C) arrays, then
  :func:`~refnorm.kernels._loops.combine` reads them again and writes ``dx``.

A loop that moves fewer than :data:`SERIAL_BELOW` values runs on the calling thread alone
(:func:`launch`); larger ones on numba's threads.

Arguments are numpy arrays of any strides (a non-contiguous or negative-stride view is copied
to C order first); float16 computes in float32. Outputs: ``y`` in the dtype of ``x``, the cache
fields in the compute dtype, ``dx`` in the dtype of ``x_hat``, parameter gradients in the dtype
of ``gamma``. Arguments are not checked here beyond what the loops need: the public functions
of :mod:`refnorm.norms` check them before dispatching.
"""

from __future__ import annotations

import ctypes
import math
import os
import stat
import sys
import tempfile
from types import ModuleType
from typing import Any

import numpy as np

from refnorm.backend import array_namespace
from refnorm.core.moments import check_variance_finite
from refnorm.kernels.records import AffineGrads, Normalized, SwitchableGrads, SwitchableNormalized

MIN_CHUNK = 2048     # values per task below which a task costs more than it computes
MAX_CHUNK = 16384    # values per task above which its second pass falls out of the L1/L2 cache
MAX_UNIT = 1 << 18   # values per statistic above which its later passes fall out of L2
UNIT_PATH = "auto"   # "auto" | "always" | "never": whole-statistic tasks (the tests force each)
BN_UNITS_UP_TO = 4   # samples up to which BN runs by channel units; beyond, tasks in memory order
# bytes of an output array from which the kernels write it with non-temporal stores
# (refnorm.kernels._simd): an array this large leaves the cache before anyone reads it
STREAM_FROM = 4 << 20
# values a loop moves below which it runs on the calling thread alone: waking the pool costs
# more than it saves for such a call, and far more on a loaded machine, where a descheduled
# worker holds up the end of the parallel loop (the training step's kernels are all this size)
SERIAL_BELOW = 1 << 22


# -- the loops, and the threads that run them ---------------------------------------------------


_loops_module: ModuleType | None = None


def loops() -> ModuleType:
    """:mod:`refnorm.kernels._loops`, imported (with numba) on the first kernel call."""
    global _loops_module
    if _loops_module is None:
        import numba

        _loops = _import_loops(numba)
        numba.get_num_threads()  # starts numba's thread pool before any loop asks its size
        keep_freed_memory()
        _announce_compilation(_loops)
        _loops_module = _loops
    return _loops_module


def _import_loops(numba: ModuleType) -> ModuleType:
    """:mod:`refnorm.kernels._loops`, whose kernels numba caches on disk. Where it can keep
    them neither beside refnorm (a read-only install) nor in the user's cache folder (no
    writable home: a service account, a container's user), numba refuses to compile; the
    cache then goes to a private folder of this user's in the temporary directory."""
    try:
        from refnorm.kernels import _loops
    except RuntimeError as exc:
        if "no locator available" not in str(exc) or numba.config.CACHE_DIR:
            raise  # another failure, or $NUMBA_CACHE_DIR given and not writable: the user's
        numba.config.CACHE_DIR = private_cache_folder()
        from refnorm.kernels import _loops
    return _loops


def private_cache_folder() -> str:
    """``refnorm-numba-cache-<uid>`` in the temporary directory, made (mode 0700) if needed
    and kept across runs; a fresh folder instead where that name is not a folder of this
    user's that no one else can write: numba loads the files of its cache as code."""
    path = os.path.join(tempfile.gettempdir(), f"refnorm-numba-cache-{os.getuid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022:
        return path
    return tempfile.mkdtemp(prefix="refnorm-numba-cache-")


# CPU seconds numba takes to compile one kernel of refnorm.kernels._loops on the machine of
# docs/performance.md (the quick study's 15 kernels: 18-20 s of CPU; the wall time is longer
# on a loaded machine), and the expected compilation from which the first run says so
COMPILE_SECONDS = 1.5
ANNOUNCE_FROM = 8.0


def cold_kernels(module: ModuleType | None = None) -> list[str]:
    """The kernels of :mod:`refnorm.kernels._loops` that numba has not compiled into its disk
    cache yet (a fresh clone, a new numba, or an edited ``_loops.py``): each costs a
    compilation on its first call. Inlined helpers and uncached functions are not counted."""
    from numba.core.registry import CPUDispatcher

    module = module or loops()
    cold = []
    for name, obj in vars(module).items():
        if not isinstance(obj, CPUDispatcher) or obj.targetoptions.get("inline") == "always":
            continue
        cache_file = getattr(getattr(obj, "_cache", None), "_cache_file", None)
        index = getattr(cache_file, "_index_path", None)
        if index is not None and not os.path.exists(index):
            cold.append(name)
    return cold


def _announce_compilation(module: ModuleType) -> None:
    """Say once, when numba starts compiling the first kernel of ``module``, that it does so
    and for about how long, if that is :data:`ANNOUNCE_FROM` seconds or more (the cold kernels
    times :data:`COMPILE_SECONDS`): on a fresh clone the first run is otherwise silent for half
    a minute. Said on stderr; nothing when every kernel loads from numba's cache."""
    from numba.core import event

    class Announce(event.Listener):
        said = False

        def on_start(self, ev: event.Event) -> None:
            py_func = getattr((ev.data or {}).get("dispatcher"), "py_func", None)
            if self.said or getattr(py_func, "__module__", None) != module.__name__:
                return
            cold = cold_kernels(module)
            if getattr(py_func, "__name__", None) not in cold:  # uncached, or a new signature
                return
            self.said = True
            seconds = len(cold) * COMPILE_SECONDS
            if seconds >= ANNOUNCE_FROM:
                print(f"compiling fast kernels (first run only, about {seconds:.0f} s)",
                      file=sys.stderr, flush=True)

        def on_end(self, ev: event.Event) -> None:
            pass

    event.register("numba:compile", Announce())


MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX",
              "REFNORM_MALLOC")


def keep_freed_memory() -> bool:
    """Let glibc keep freed blocks of up to 32 MiB for the next allocation instead of handing
    them back to the system; return whether it was set.

    By default glibc maps a block of 128 KiB or more afresh on each allocation and unmaps it
    on release (the threshold grows with the blocks freed, but trimming the heap's top gives
    the pages back again): every large output array then costs a page fault per 4 KiB page
    and the kernel's zeroing of the page, a write of the whole array before the loop writes
    it. In ``refnorm bench`` that was up to ~1800 faults per forward+backward at
    (32, 64, 32, 32) for PyTorch and ~900 for the fast path, at random (it depends on the
    order of frees). Setting ``M_MMAP_THRESHOLD`` to 32 MiB (glibc's maximum on 64-bit) and
    ``M_TRIM_THRESHOLD`` to 256 MiB removes them: freed memory is reused by the next
    allocation, at the price of the process holding up to 256 MiB it no longer uses.

    Done once, when the first kernel runs (never on ``import refnorm``), for the whole process
    (PyTorch in the same process benefits alike). Skipped off glibc, and where the environment
    sets glibc's own variables (``MALLOC_MMAP_THRESHOLD_``, ...) or ``REFNORM_MALLOC`` (any
    value: leave the allocator alone).
    """
    if sys.platform != "linux" or any(k in os.environ for k in MALLOC_ENV):
        return False
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):  # not glibc
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, 256 << 20))


def threads() -> int:
    """The number of threads numba runs a parallel loop on (a compiled call: numba's own
    ``get_num_threads`` takes a lock on every call)."""
    return int(loops().num_threads())


# -- layout helpers ---------------------------------------------------------------------------


def compute_array(a: np.ndarray) -> np.ndarray:
    """``a`` as a C-contiguous float32 (from float16 or float32) or float64 array."""
    dtype = np.float64 if a.dtype == np.float64 else np.float32
    return np.ascontiguousarray(a, dtype=dtype)


def launch(loop, work: int, *args):
    """Run the numba ``loop`` on ``args``; on the calling thread alone when it moves fewer
    than :data:`SERIAL_BELOW` values (``work``), else on numba's threads."""
    if work >= SERIAL_BELOW:
        return loop(*args)
    compiled = loops()
    pool = compiled.num_threads()
    if pool == 1:
        return loop(*args)
    compiled.set_threads(1)
    try:
        return loop(*args)
    finally:
        compiled.set_threads(pool)


def planes(x: np.ndarray) -> np.ndarray:
    """``x``, ``(N, C, *spatial)``, as ``(N * C, S)`` planes, S = prod(spatial), C-contiguous."""
    N, C = x.shape[:2]
    return compute_array(x).reshape(N * C, math.prod(x.shape[2:]))


def chunk_size(num_planes: int, S: int) -> int:
    """Values per parallel task: whole planes when there are enough of them to keep every
    thread busy, else planes cut into chunks (N = 1 or 2 with few channels)."""
    if num_planes == 0 or S == 0:  # nothing to cut (an empty batch or channel axis)
        return 1
    wanted_tasks = 4 * threads()
    pieces = max(1, min(-(-wanted_tasks // num_planes), S // MIN_CHUNK))
    pieces = max(pieces, -(-S // MAX_CHUNK))
    return max(1, -(-S // pieces))


def chunk_counts(S: int, chunk: int) -> np.ndarray:
    """The number of values in each chunk of a plane: (P,) float64."""
    P = -(-S // chunk)
    counts = np.full(P, float(chunk))
    counts[-1] = S - chunk * (P - 1)
    return counts


def _merge(mean: np.ndarray, m2: np.ndarray, count: np.ndarray, axes: tuple[int, ...]):
    """Chan's merge of partial (count, mean, M2) over ``axes``, dimensions kept.

    ``mean = sum(n_i mean_i) / n`` and ``M2 = sum(M2_i) + sum(n_i (mean_i - mean)^2)``: the
    law of total variance, stable for any offset. Returns ``(mean, M2, n)``.
    """
    count = np.broadcast_to(count, mean.shape)
    n = np.sum(count, axis=axes, keepdims=True)
    mu = np.sum(count * mean, axis=axes, keepdims=True) / n
    d = mean - mu
    M2 = np.sum(m2, axis=axes, keepdims=True) + np.sum(count * d * d, axis=axes, keepdims=True)
    return mu, M2, n


def _plane_moments(x: np.ndarray):
    """Per-chunk moments of ``x`` (N, C, *spatial): mean, M2 (N, C, P) and counts (P,)."""
    N, C = x.shape[:2]
    xp2 = planes(x)
    chunk = chunk_size(xp2.shape[0], xp2.shape[1])
    mean, m2 = launch(loops().chunk_moments, xp2.size, xp2, chunk)
    P = mean.shape[1]
    return xp2, mean.reshape(N, C, P), m2.reshape(N, C, P), chunk_counts(xp2.shape[1], chunk)


def per_plane(value: Any, shape: tuple[int, int]) -> np.ndarray:
    """``value`` broadcast to (N, C) as a fresh, writable float64 array of N * C values, one
    per plane: always the same array type, so that numba compiles a loop once (a read-only
    view, which broadcasting may return, is another type to numba and another compilation)."""
    return np.array(np.broadcast_to(np.asarray(value, dtype=np.float64), shape)).reshape(-1)


def _normalize(xp2: np.ndarray, x: np.ndarray, mu_nc, rstd_nc, params) -> tuple:
    """Run the fused normalize+affine over planes; statistics broadcastable to (N, C)."""
    N, C = x.shape[:2]
    g, b = (per_plane(p, (N, C)) for p in params)
    stream = streams(xp2.nbytes)
    y = empty(xp2.shape, xp2.dtype, aligned=stream)
    x_hat = empty(xp2.shape, xp2.dtype, aligned=stream)
    chunk = chunk_size(xp2.shape[0], xp2.shape[1])
    mu_b, rstd_b = (per_plane(s, (N, C)) for s in (mu_nc, rstd_nc))
    launch(loops().normalize_affine, 3 * xp2.size, xp2, mu_b, rstd_b, g, b, chunk, y, x_hat,
           stream)
    return y.reshape(x.shape).astype(x.dtype, copy=False), x_hat.reshape(x.shape)


def _grad_sums(dy: np.ndarray, x_hat: np.ndarray):
    """Per-(n, c) ``sum(dy)`` and ``sum(dy * x_hat)``, (N, C) float64 each, and the planes."""
    N, C = x_hat.shape[:2]
    xh2 = planes(x_hat)
    dy2 = np.ascontiguousarray(dy, dtype=xh2.dtype).reshape(xh2.shape)
    chunk = chunk_size(xh2.shape[0], xh2.shape[1])
    s1, s2 = launch(loops().chunk_grad_sums, 2 * xh2.size, dy2, xh2, chunk)
    return dy2, xh2, s1.sum(axis=1).reshape(N, C), s2.sum(axis=1).reshape(N, C)


def _combine(dy2, xh2, coefficients, shape) -> np.ndarray:
    """``dx = k_dy dy + k_one + k_xhat x_hat`` with (N, C) coefficients."""
    k_dy, k_one, k_xhat = (per_plane(k, shape[:2]) for k in coefficients)
    stream = streams(xh2.nbytes)
    dx = empty(xh2.shape, xh2.dtype, aligned=stream)
    launch(loops().combine, 3 * xh2.size, dy2, xh2, k_dy, k_one, k_xhat,
           chunk_size(*xh2.shape), dx, stream)
    return dx.reshape(shape)


def refuse_overflow(x: np.ndarray, dtype: Any, *sums: np.ndarray, name: str = "x") -> None:
    """Raise the reference's error (``refnorm.core.moments.check_variance_finite``) where one
    of ``sums`` (float64, or the kernel's variance, inf where its sum overflowed) exceeds the
    largest value of ``dtype``, the compute dtype, and its group of ``x`` is finite. Each sum
    has ``x``'s number of dimensions, length 1 along the axes it sums over (a NaN or inf in
    one group excuses no other group). ``x`` and ``sums``: numpy or CuPy arrays
    (:mod:`refnorm.kernels.cuda` shares it).

    The sums are those the reference forms in the compute dtype: of the squared deviations
    (BN, IN, LN and GN sum the values in float64: ``refnorm.core.moments.moments``), and
    for SN also of the values, of the IN variances and of the spread of the IN means pooled
    into LN and BN. Where one overflows, the reference's statistic is infinite and it
    refuses, even when the statistic itself would fit (float32 inputs of 1e19: squares of
    1e38 and more); the fast path, which sums in float64, refuses the same inputs.
    """
    xp = np if isinstance(x, np.ndarray) else array_namespace(x)
    for s in sums:  # each on its own (a NaN in one hides no overflow in another)
        over = xp.abs(s) > float(np.finfo(dtype).max)
        check_variance_finite(xp.where(over, xp.full_like(s, xp.inf), xp.zeros_like(s)), x,
                              name=name)


def _stat_shape(x: np.ndarray, lead: tuple[int, ...], extra: int = 0) -> tuple[int, ...]:
    return lead + (1,) * (x.ndim - len(lead) + extra)


def empty(shape: tuple[int, ...], dtype: Any, *, aligned: bool = False) -> np.ndarray:
    """``numpy.empty(shape, dtype)``; ``aligned``: its first element on a 64-byte boundary,
    as the non-temporal stores of :mod:`refnorm.kernels._simd` need (a view of a slightly
    larger array)."""
    if not aligned:
        return np.empty(shape, dtype=dtype)
    itemsize = np.dtype(dtype).itemsize
    n = math.prod(shape)
    buffer = np.empty(n + 64 // itemsize, dtype=dtype)
    start = (-buffer.ctypes.data % 64) // itemsize
    return buffer[start:start + n].reshape(shape)


def streams(nbytes: int) -> bool:
    """Whether an output of ``nbytes`` is written with non-temporal stores
    (:data:`STREAM_FROM`)."""
    return nbytes >= STREAM_FROM


def _use_units(num_units: int, unit_size: int, G: int, N: int) -> bool:
    """Whether one task per statistic (:func:`~refnorm.kernels._loops.unit_forward`) keeps
    every thread busy and its data in cache; else (plane, chunk) tasks
    (:func:`~refnorm.kernels._loops.tasks_forward`). BN's units are strided (a channel's
    planes lie a sample apart): beyond :data:`BN_UNITS_UP_TO` samples, tasks in memory order
    are faster."""
    if UNIT_PATH != "auto":
        return UNIT_PATH == "always"
    pool = threads()
    if G == 0 and N > BN_UNITS_UP_TO:
        return False
    return unit_size <= MAX_UNIT and (num_units >= 4 * pool or num_units % pool == 0)


def _forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float, G: int,
             stat_shape: tuple[int, ...]) -> Normalized:
    """The training forward with statistics per unit (``G = 0``: BN channels, else (n, g)
    rows); mean, var and rstd in ``stat_shape`` and the compute dtype."""
    N, C = x.shape[:2]
    xp2 = planes(x)
    B, S = xp2.shape
    U = C if G == 0 else N * G
    stream = streams(xp2.nbytes)
    y = empty(xp2.shape, xp2.dtype, aligned=stream)
    x_hat = empty(xp2.shape, xp2.dtype, aligned=stream)
    stats = np.empty((3, U), dtype=xp2.dtype)
    gamma_c, beta_c = (np.ascontiguousarray(p, dtype=xp2.dtype) for p in (gamma, beta))
    if xp2.size == 0:  # an empty N or C axis (the checks refuse an empty statistic): no loop
        bad = 0
    elif _use_units(U, xp2.size // U, G, N):
        bad = launch(loops().unit_forward, 3 * xp2.size, xp2, C, G, gamma_c, beta_c,
                     float(eps), y, x_hat, stats, stream)
    else:
        bad = launch(loops().tasks_forward, 3 * xp2.size, xp2, C, G, gamma_c, beta_c,
                     float(eps), chunk_size(B, S), y, x_hat, stats, stream)
    if bad:  # the reference's error for the units whose statistics overflow (inf variance)
        units = xp2.reshape(N, C, S) if G == 0 else xp2.reshape(N, G, C // G * S)
        refuse_overflow(units, xp2.dtype, stats[1].reshape((1, C, 1) if G == 0 else (N, G, 1)))
    y_out = y.reshape(x.shape)
    if x.dtype != y_out.dtype:
        y_out = y_out.astype(x.dtype)
    mean, var, rstd = (s.reshape(stat_shape) for s in stats)
    return Normalized(y_out, x_hat.reshape(x.shape), mean, var, rstd)


def _backward(dy: np.ndarray, x_hat: np.ndarray, rstd: np.ndarray, gamma: np.ndarray,
              G: int) -> AffineGrads:
    """The training backward with statistics per unit; ``rstd`` holds the U values."""
    N, C = x_hat.shape[:2]
    xh2 = planes(x_hat)
    B, S = xh2.shape
    dy2 = np.ascontiguousarray(dy, dtype=xh2.dtype).reshape(B, S)
    stream = streams(xh2.nbytes)
    dx = empty(xh2.shape, xh2.dtype, aligned=stream)
    grads = np.empty((2, C))
    gamma_c = np.ascontiguousarray(gamma, dtype=xh2.dtype)
    rstd_u = np.ascontiguousarray(rstd, dtype=xh2.dtype).reshape(-1)
    U = rstd_u.shape[0]
    if xh2.size == 0:  # an empty N or C axis: no loop; the sums over nothing are 0
        grads[:] = 0.0
    elif _use_units(U, xh2.size // U, G, N):
        launch(loops().unit_backward, 3 * xh2.size, dy2, xh2, C, G, gamma_c, rstd_u, dx, grads,
               stream)
    else:
        launch(loops().tasks_backward, 3 * xh2.size, dy2, xh2, C, G, gamma_c, rstd_u,
               chunk_size(B, S), dx, grads, stream)
    return AffineGrads(dx=dx.reshape(x_hat.shape), dgamma=grads[1].astype(gamma.dtype),
                       dbeta=grads[0].astype(gamma.dtype))


# -- BN ---------------------------------------------------------------------------------------


def bn_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> Normalized:
    """Batch Normalization in training; equals
    :func:`refnorm.norms.batch_norm.batch_norm_forward`.

    Parameters
    ----------
    x : array, (N, C, *spatial)
    gamma, beta : arrays, (C,)
    eps : float

    Returns
    -------
    Normalized : ``y`` (``x.shape``, dtype of ``x``), ``x_hat`` (``x.shape``), ``mean``,
        ``var``, ``rstd`` ((1, C, 1, ...)), all but ``y`` in the compute dtype
    """
    return _forward(x, gamma, beta, eps, 0, _stat_shape(x, (1, x.shape[1])))


def bn_backward(dy: np.ndarray, x_hat: np.ndarray, rstd: np.ndarray,
                gamma: np.ndarray) -> AffineGrads:
    """Backward of :func:`bn_forward`; equals
    :func:`refnorm.norms.batch_norm.batch_norm_backward`.

    Parameters
    ----------
    dy, x_hat : arrays, (N, C, *spatial)
    rstd : array, (1, C, 1, ...)
    gamma : array, (C,)

    Returns
    -------
    AffineGrads : ``dx`` ((N, C, *spatial), dtype of ``x_hat``), ``dgamma``, ``dbeta``
        ((C,), dtype of ``gamma``)
    """
    return _backward(dy, x_hat, rstd, gamma, 0)


# -- BN and IN at inference: per-channel running statistics ----------------------------------


def eval_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray,
                 var: np.ndarray, eps: float) -> Normalized:
    """Normalization with given per-channel statistics; equals
    :func:`refnorm.norms.batch_norm.batch_norm_eval_forward` and
    :func:`refnorm.norms.instance_norm.instance_norm_eval_forward`.

    Parameters
    ----------
    x : array, (N, C, *spatial)
    gamma, beta : arrays, (C,)
    mean, var : arrays, (1, C, 1, ...), compute dtype
        The running statistics, returned in the record as they came.
    eps : float

    Returns
    -------
    Normalized : ``y`` (dtype of ``x``), ``x_hat``, and ``mean``, ``var``, ``rstd``
        (1, C, 1, ...) in the compute dtype
    """
    C = x.shape[1]
    xp2 = planes(x)
    mu = np.asarray(mean, dtype=np.float64).reshape(1, C)
    rstd = 1.0 / np.sqrt(np.asarray(var, dtype=np.float64).reshape(1, C) + eps)
    y, x_hat = _normalize(xp2, x, mu, rstd, (gamma, beta))
    return Normalized(y=y, x_hat=x_hat, mean=mean, var=var,
                      rstd=rstd.astype(xp2.dtype).reshape(mean.shape))


def eval_backward(dy: np.ndarray, x_hat: np.ndarray, rstd: np.ndarray,
                  gamma: np.ndarray) -> AffineGrads:
    """Backward of :func:`eval_forward`: ``dx = gamma rstd dy`` (the statistics are constants),
    ``dgamma = sum(dy x_hat)``, ``dbeta = sum(dy)`` over (N, *spatial); equals the backward of
    BN or IN on an inference cache.

    Parameters
    ----------
    dy, x_hat : arrays, (N, C, *spatial)
    rstd : array, (1, C, 1, ...)
    gamma : array, (C,)
    """
    N, C = x_hat.shape[:2]
    dy2, xh2, s_dy, s_dyx = _grad_sums(dy, x_hat)                # (N, C) each
    k_dy = np.asarray(gamma, dtype=np.float64) * np.asarray(rstd, dtype=np.float64).reshape(C)
    # one multiply per value, no x_hat term: a NaN input leaves its dx finite, as in the reference
    k = np.broadcast_to(k_dy.astype(dy2.dtype), (N, C)).reshape(N * C, 1)
    dx = np.multiply(dy2, k).reshape(x_hat.shape)
    return AffineGrads(dx=dx, dgamma=s_dyx.sum(axis=0).astype(gamma.dtype),
                       dbeta=s_dy.sum(axis=0).astype(gamma.dtype))


# -- GN, LN, IN: statistics per (n, group) ------------------------------------------------------


def gn_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float,
               num_groups: int) -> Normalized:
    """Group Normalization; equals :func:`refnorm.norms.group_norm.group_norm_forward`.

    Parameters
    ----------
    x : array, (N, C, *spatial)
    gamma, beta : arrays, (C,)
    eps : float
    num_groups : int
        G, a divisor of C.

    Returns
    -------
    Normalized : ``y``, ``x_hat`` (``x.shape``) and ``mean``, ``var``, ``rstd``
        (N, G, 1, 1, ...) (the grouped view's ``x.ndim + 1`` axes)
    """
    shape = _stat_shape(x, (x.shape[0], num_groups), extra=1)
    return _forward(x, gamma, beta, eps, num_groups, shape)


def gn_backward(dy: np.ndarray, x_hat: np.ndarray, rstd: np.ndarray,
                gamma: np.ndarray) -> AffineGrads:
    """Backward of :func:`gn_forward`; equals :func:`refnorm.norms.group_norm.group_norm_backward`.

    Parameters
    ----------
    dy, x_hat : arrays, (N, C, *spatial)
    rstd : array, (N, G, 1, 1, ...)
    gamma : array, (C,)

    Returns
    -------
    AffineGrads : ``dx`` (N, C, *spatial), ``dgamma``, ``dbeta`` (C,)
    """
    return _backward(dy, x_hat, rstd, gamma, rstd.shape[1])


def ln_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> Normalized:
    """Layer Normalization; equals :func:`refnorm.norms.layer_norm.layer_norm_forward`.

    Returns ``y``, ``x_hat`` (``x.shape``) and ``mean``, ``var``, ``rstd`` (N, 1, 1, ...).
    """
    return _forward(x, gamma, beta, eps, 1, _stat_shape(x, (x.shape[0],)))


def ln_backward(dy: np.ndarray, x_hat: np.ndarray, rstd: np.ndarray,
                gamma: np.ndarray) -> AffineGrads:
    """Backward of :func:`ln_forward` (``rstd`` (N, 1, 1, ...)); equals
    :func:`refnorm.norms.layer_norm.layer_norm_backward`. Returns ``dx``, ``dgamma``, ``dbeta``."""
    return _backward(dy, x_hat, rstd, gamma, 1)


def in_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> Normalized:
    """Instance Normalization in training; equals
    :func:`refnorm.norms.instance_norm.instance_norm_forward`.

    Returns ``y``, ``x_hat`` (``x.shape``) and ``mean``, ``var``, ``rstd`` (N, C, 1, ...).
    """
    return _forward(x, gamma, beta, eps, x.shape[1], _stat_shape(x, x.shape[:2]))


def in_backward(dy: np.ndarray, x_hat: np.ndarray, rstd: np.ndarray,
                gamma: np.ndarray) -> AffineGrads:
    """Backward of :func:`in_forward` (``rstd`` (N, C, 1, ...)); equals
    :func:`refnorm.norms.instance_norm.instance_norm_backward`. Returns ``dx``, ``dgamma``,
    ``dbeta``."""
    return _backward(dy, x_hat, rstd, gamma, x_hat.shape[1])


# -- SN ---------------------------------------------------------------------------------------


def sn_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, w_mean: np.ndarray,
               w_var: np.ndarray, *, eps: float, scopes: tuple[str, ...],
               in_correction: int = 0, scope_correction: int = 0,
               bn: tuple[np.ndarray, np.ndarray] | None = None) -> SwitchableNormalized:
    """Switchable Normalization; equals
    :func:`refnorm.norms.switchable_norm.switchable_norm_forward` (training) and, with ``bn``,
    :func:`refnorm.norms.switchable_norm.switchable_norm_eval_forward`.

    Parameters
    ----------
    x : array, (N, C, *spatial)
    gamma, beta : arrays, (C,)
    w_mean, w_var : arrays, (K,)
        The ratios (softmax of the control parameters), one per scope.
    eps : float
    scopes : tuple of str, a subset of ("in", "ln", "bn") in the ratios' order
    in_correction, scope_correction : 0 or 1, as in
        :class:`refnorm.norms.switchable_norm.SwitchableOptions`
    bn : tuple of two arrays, (1, C, 1) each, compute dtype, optional
        ``(mean, var)``: given BN-scope statistics (the population's, at inference),
        returned in the record as they came; without them the BN scope pools this batch's IN
        moments.

    Returns
    -------
    SwitchableNormalized : ``y`` (``x.shape``); ``h``, ``x_hat`` (N, C, S); ``rstd`` (N, C, 1),
        or the broadcast shape of the mixed variances as the reference has it ((1, C, 1) with
        the BN scope alone, (N, 1, 1) with LN alone); ``mu``, ``var``: dicts of every scope
        ("in", "ln", "bn") to arrays (N, C, 1), (N, 1, 1), (1, C, 1), as
        :func:`refnorm.norms.switchable_norm.scope_moments` returns them; ``offset``: every
        scope's mean minus the stored ``mu["in"]``, (N, C, 1) each, as
        :func:`refnorm.norms.switchable_norm.scope_statistics` returns them

    The statistics are float64 from the merged plane moments (:func:`sn_scope_statistics`),
    and the mixture is formed relative to the IN mean as stored
    (``mu_in + sum_k w_k (mu_k - mu_in)``, as the reference's
    :func:`~refnorm.norms.switchable_norm.mix_and_normalize`), so that the rounding of the
    ratios is not multiplied by a large mean.
    """
    N, C = x.shape[:2]
    S = math.prod(x.shape[2:])
    xp2, mean, m2, counts = _plane_moments(x)
    dtype = xp2.dtype
    mu_in, M2_in, _ = _merge(mean, m2, counts, (2,))             # (N, C, 1)
    var_in = M2_in / (S - in_correction)
    # float64 data: the merged mean is rounded to float64, the data's own precision; what that
    # rounding lost is the mean of x - mu_in (one more pass, for float64 only: a float64 mean
    # of float32 data keeps 29 bits more than they have)
    lost_in = (np.mean(xp2 - mu_in.reshape(N * C, 1), axis=1).reshape(N, C, 1)
               if dtype == np.float64 else np.zeros_like(mu_in))
    given = None if bn is None else tuple(np.asarray(s, dtype=np.float64) for s in bn)
    mu, offset, var = sn_scope_statistics(np, (mu_in, lost_in, var_in), dtype, bn=given,
                                          factors=variance_factors(x.shape, scope_correction))
    w_m = np.asarray(w_mean, dtype=np.float64)
    w_v = np.asarray(w_var, dtype=np.float64)
    shift = mu["in"].astype(dtype).astype(np.float64)            # mu["in"] as returned
    mu_mix = shift + sum(w_m[i] * offset[k] for i, k in enumerate(scopes))  # (N, C, 1)
    var_mix = sum(w_v[i] * var[k] for i, k in enumerate(scopes))
    rstd = 1.0 / np.sqrt(var_mix + eps)                          # (N, C, 1)
    y, x_hat = _normalize(xp2, x, mu_mix[:, :, 0],
                          np.broadcast_to(rstd, (N, C, 1))[:, :, 0], (gamma, beta))
    # the reference's error where a sum it forms in the dtype overflows: of the values and of
    # their squared deviations per plane (in_moments), of the IN variances and the squared
    # spread of the IN means per pooled scope (pool_in_moments), and of the IN means pooled
    refuse_overflow(xp2.reshape(N, C, S), dtype, M2_in, S * mu_in,
                    *(n * s for k, n in (("ln", C), ("bn", N)) if bn is None or k == "ln"
                      for s in (var[k], mu[k])))
    return SwitchableNormalized(y=y, h=xp2.reshape(N, C, S), x_hat=x_hat.reshape(N, C, S),
                                rstd=rstd.astype(dtype),
                                mu={k: v.astype(dtype) for k, v in mu.items()},
                                offset={k: v.astype(dtype) for k, v in offset.items()},
                                var={k: v.astype(dtype) for k, v in var.items()})


def variance_factors(shape: tuple[int, ...], scope_correction: int) -> dict[str, float]:
    """m_k / (m_k - scope_correction) per scope, m_k = S, C S, N S values for IN, LN, BN;
    equals :func:`refnorm.norms.switchable_norm.variance_factors`."""
    N, C = shape[:2]
    S = math.prod(shape[2:])
    counts = {"in": S, "ln": C * S, "bn": N * S}
    return {k: m / (m - scope_correction) if m > scope_correction else 1.0
            for k, m in counts.items()}


def sn_scope_statistics(xp: Any, moments: tuple, dtype: Any, *, bn: tuple | None = None,
                        factors: dict[str, float] | None = None) -> tuple[dict, dict, dict]:
    """Every scope's mean, mean offset and variance from the IN moments, float64, shared by
    the CPU and GPU wrappers (``xp``: numpy or CuPy); equals
    :func:`refnorm.norms.switchable_norm.scope_statistics` in the same order of operations.

    Parameters
    ----------
    xp : module
        numpy or CuPy, the arrays' namespace.
    moments : tuple of three float64 arrays, (N, C, 1) each
        ``(mu_in, lost_in, var_in)``: the IN means, what their rounding to float64 lost
        (zeros for float32 data), the IN variances.
    dtype : the compute dtype, which ``mu["in"]`` is returned in: the offsets are taken from
        that stored value.
    bn : tuple of two float64 arrays, (1, C, 1), optional
        Given BN-scope ``(mean, var)``, used as they come.
    factors : dict of scope to float, optional
        What each computed variance is multiplied by (:func:`variance_factors`).

    Returns
    -------
    mu, offset, var : dicts of scope to float64 arrays; ``offset`` (N, C, 1) each
    """
    mu_in, lost_in, var_in = moments
    shift = mu_in.astype(dtype).astype(xp.float64)               # mu["in"] as returned
    mu, var = {"in": mu_in}, {"in": var_in}
    offset = {"in": (mu_in - shift) + lost_in}
    computed = (("ln", 1), ("bn", 0)) if bn is None else (("ln", 1),)   # given BN: not computed
    with np.errstate(over="ignore"):  # the callers refuse an overflowing variance
        for scope, axis in computed:                             # law of total variance
            if mu_in.shape[axis] == 0:  # nothing to pool (an unused BN scope of an empty
                # batch): NaN, as a mean over nothing, without numpy's warning
                shape = tuple(1 if a == axis else n for a, n in enumerate(mu_in.shape))
                mu[scope] = var[scope] = xp.full(shape, xp.nan)
                offset[scope] = xp.zeros_like(shift)
                continue
            mu[scope] = xp.mean(mu_in, axis=axis, keepdims=True)
            lost = (xp.mean(mu_in - mu[scope], axis=axis, keepdims=True)
                    + xp.mean(lost_in, axis=axis, keepdims=True))
            offset[scope] = (mu[scope] - shift) + lost
            between = offset["in"] - offset[scope]               # mu_in - mu_k
            var[scope] = (xp.mean(var_in, axis=axis, keepdims=True)
                          + xp.mean(between * between, axis=axis, keepdims=True))
    if factors is not None:
        var = {k: v * factors[k] for k, v in var.items()}
    if bn is not None:
        mu["bn"], var["bn"] = bn
        offset["bn"] = (mu["bn"] - shift) * xp.ones_like(shift)
    return mu, offset, var


def sn_backward(dy: np.ndarray, x_hat: np.ndarray, rstd: np.ndarray, gamma: np.ndarray,
                stats: tuple[dict, dict], ratios: tuple[np.ndarray, np.ndarray], *,
                scopes: tuple[str, ...], in_correction: int = 0, scope_correction: int = 0,
                hard: bool = False, frozen: tuple[str, ...] = ()) -> SwitchableGrads:
    """Backward of :func:`sn_forward`; equals
    :func:`refnorm.norms.switchable_norm.switchable_norm_backward_compact` (training).

    Parameters
    ----------
    dy : array, (N, C, *spatial) or (N, C, S)
    x_hat : array, (N, C, S)
    rstd : array, broadcastable to (N, C, 1)
        Where it is 0 (an infinite mixed variance) ``x_hat`` is 0 and holds no ``h - mu_in``:
        the term of it is taken as 0, which is exact only where no other plane's statistics
        pool this plane (:func:`refnorm.norms.switchable_norm.switchable_norm_backward` runs
        the compact reference for such a cache).
    gamma : array, (C,)
    stats : tuple of two dicts
        ``(offset, var)``, the dicts :func:`sn_forward` returned: the backward takes the
        means only through their differences, which the offsets hold unrounded.
    ratios : tuple of two arrays, (K,) each
        ``(w_mean, w_var)``.
    scopes, in_correction, scope_correction : as in :func:`sn_forward`
    hard : bool
        One-hot ratios: the logit gradients are zero.
    frozen : tuple of str
        Scopes whose statistics were given (``("bn",)`` at inference): constants, with no
        path to ``x``.

    Returns
    -------
    SwitchableGrads : ``dx`` (N, C, S), ``dgamma``, ``dbeta`` (C,), ``dmean_logits``,
        ``dvar_logits`` (K,), float64
    """
    N, C, S = x_hat.shape
    offset, var = ({k: np.asarray(v, dtype=np.float64)[..., 0] for k, v in d.items()}
                   for d in stats)
    w_m, w_v = (np.asarray(w, dtype=np.float64) for w in ratios)
    dy2, xh2, s_dy, s_dyx = _grad_sums(np.reshape(dy, x_hat.shape), x_hat)   # (N, C)
    g = np.asarray(gamma, dtype=np.float64)
    r = np.broadcast_to(np.asarray(rstd, dtype=np.float64), (N, C, 1)).reshape(N, C)
    k_one, c2, dml, dvl = sn_backward_terms(np, (r, g, s_dy, s_dyx), (offset, var), (w_m, w_v),
                                            scopes=scopes, S=S, in_correction=in_correction,
                                            factors=variance_factors(x_hat.shape,
                                                                     scope_correction),
                                            hard=hard, frozen=frozen)
    if all(k in frozen for k in scopes):
        # every statistic given: dx = gamma rstd dy, one multiply per value with no x_hat term,
        # so that a NaN input leaves its dx finite, as in the reference (as eval_backward)
        k_dy = np.broadcast_to(r * g, (N, C)).astype(xh2.dtype).reshape(N * C, 1)
        dx = np.multiply(dy2, k_dy).reshape(x_hat.shape)
    else:
        # the x_hat term is c2 (h - mu) = (c2 / r) x_hat; where rstd rounded to 0 (eps beyond
        # the dtype), x_hat is 0 and so is the term (not c2 / 0 times 0, a NaN)
        dx = _combine(dy2, xh2, (r * g, k_one,
                                 np.where(r != 0, c2 / np.where(r != 0, r, 1.0), 0.0)),
                      x_hat.shape)
    return SwitchableGrads(dx=dx, dgamma=s_dyx.sum(axis=0).astype(gamma.dtype),
                           dbeta=s_dy.sum(axis=0).astype(gamma.dtype), dmean_logits=dml,
                           dvar_logits=dvl)


def sn_backward_terms(xp: Any, sums: tuple, stats: tuple[dict, dict], ratios: tuple, *,
                      scopes: tuple[str, ...], S: int, in_correction: int,
                      factors: dict[str, float], hard: bool,
                      frozen: tuple[str, ...] = ()) -> tuple:
    """The per-(n, c) arithmetic of the compact SN backward, shared by the CPU and GPU
    wrappers (``xp``: numpy or CuPy); equals
    :func:`refnorm.norms.switchable_norm.switchable_norm_backward_compact`.

    Parameters
    ----------
    xp : module
        numpy or CuPy, the arrays' namespace.
    sums : tuple of four float64 arrays
        ``(r, g, s_dy, s_dyx)``: rstd (N, C), gamma (C,), and per (n, c) the sums of dy and
        of dy * x_hat, float64
    stats : tuple of two dicts
        ``(offset, var)``, of scope to float64 arrays broadcastable to (N, C): each scope's
        mean minus the IN mean as stored, and its variance.
    ratios : tuple of two float64 arrays, (K,) each
        ``(w_mean, w_var)``.
    scopes : tuple of str
        The scopes mixed, in the order of the ratios.
    S : int
        Values per (n, c) plane.
    in_correction : {0, 1}
        1: the IN variance is unbiased (``S - 1``).
    factors : dict of str to float
        What each scope's biased variance was multiplied by (:func:`variance_factors`).
    hard : bool
        One-hot ratios: the control parameters get zero gradients.
    frozen : tuple of str
        The scopes whose statistics are constants (see :func:`sn_backward`).

    Returns
    -------
    k_one, c2 : arrays broadcastable to (N, C)
        ``dh = r g dy + k_one + (c2 / r) x_hat`` per (n, c).
    dmean_logits, dvar_logits : float64 arrays, (K,)
    """
    r, g, s_dy, s_dyx = sums
    (offset, var), (w_m, w_v) = stats, ratios
    N, C = r.shape
    dvar = -0.5 * r * r * g * s_dyx                              # (N, C)  SN's Eq. 7
    dmu = -r * g * s_dy                                          # (N, C)  SN's Eq. 8
    dmu_in = xp.zeros((N, C))
    dvar_in = xp.zeros((N, C))
    axis = {"in": None, "ln": 1, "bn": 0}
    count = {"in": 1, "ln": C, "bn": N}
    for i, k in enumerate(scopes):
        if k in frozen:
            continue
        a = axis[k]
        dvar_k = dvar if a is None else dvar.sum(axis=a, keepdims=True)
        dmu_k = dmu if a is None else dmu.sum(axis=a, keepdims=True)
        g_var = w_v[i] * factors[k] * dvar_k / count[k]
        dvar_in = dvar_in + g_var
        dmu_in = dmu_in + w_m[i] * dmu_k / count[k] + g_var * 2.0 * (offset["in"] - offset[k])
    mu_mix = sum(w_m[i] * offset[k] for i, k in enumerate(scopes))    # relative to the shift
    c2 = 2.0 * dvar_in / (S - in_correction)
    # dh = dx_hat rstd + dmu_in / S + c2 (h - mu_in), with h - mu_in = x_hat / rstd + mu_mix - mu_in
    k_one = dmu_in / S + c2 * (mu_mix - offset["in"])
    if hard:
        return k_one, c2, xp.zeros(len(scopes)), xp.zeros(len(scopes))
    # S_k relative to the shift: the same gradients (switchable_norm_backward's comment)
    s_mean = xp.stack([xp.sum(dmu * offset[k]) for k in scopes])
    s_var = xp.stack([xp.sum(dvar * var[k]) for k in scopes])
    return (k_one, c2, w_m * (s_mean - xp.sum(w_m * s_mean)),
            w_v * (s_var - xp.sum(w_v * s_var)))

"""``refnorm bench``: time the normalizers' reference path, fast path and PyTorch CPU.

What is timed, for each normalizer (bn, in, ln, gn with G = 32, sn) at (32, 64, 32, 32) and
(2, 64, 32, 32) in float32: one forward and one backward with a random upstream gradient,

- ``reference``: the pure functions of :mod:`refnorm.norms` (what lessons show);
- ``fast``: the same pure functions with ``path="fast"``, which run the numba kernels of
  :mod:`refnorm.kernels` after the same argument checks;
- ``kernel``: the kernels of :mod:`refnorm.kernels` alone, called with the arguments the fast
  variant passes them (what a fast call costs without its dispatch, checks and cache):
  ``fast/kernel`` is what the Python of the public function around them costs (the
  kernels' own layout code, allocation and thread switching count in ``kernel``);
- ``torch``: ``torch.nn.functional`` in the same process, when ``import torch`` works
  (torch is never a dependency of refnorm); SN has no PyTorch counterpart.

Method: every implementation runs once untimed (compilation, allocation), then the
repetitions are *interleaved* (one of each implementation per round, in a random order), so
that a slow spell
of the machine falls on all of them alike; the report gives the median and the spread (min,
max, quartiles) of the wall time, the median CPU time of the process (``cpu ms``: the time it
ran, which waiting for a core while other processes run does not inflate) and the page faults
per call (allocations the system had to map afresh: work no timing noise changes). Threads are
set before timing and reported: numba, torch and numpy's BLAS get the same count (all cores by
default, ``--threads``; BLAS through threadpoolctl). ``OMP_WAIT_POLICY=PASSIVE`` (refnorm's
setting, :mod:`refnorm.kernels`) is in force before torch is imported, so that no idle OpenMP
thread of either spins on a core the other needs. The implementations never run at the same
time.

Bandwidth: a fused forward+backward must at least read x, write y, read dy, read x (or the
saved x_hat) and write dx: ``5 n b`` bytes for n values of b bytes. ``GB/s`` is that count over
the median time, and ``of copy`` that figure over the machine's copy bandwidth (a 64 MiB
``numpy.copyto``, read plus write), the ceiling of any pass over memory. Arrays of 8 MiB fit
this machine's last-level cache, so the figures can exceed the copy bandwidth.

Training steps: one forward, loss and backward (no optimizer update) of the study's model
(:class:`refnorm.train.model.ConvNet`, widths 16/32/32) with BN, GN (G = 4), SN and GN+WS, on a
batch of 32 images 3x32x32, without the gradient with respect to the images (as the trainer;
PyTorch skips it too, for an input that does not require one), on each path (every layer's
``path``), the same networks in
PyTorch when available, and, when the bench runs more than one thread, the fast step on one
thread in the same rounds (``fast 1t``): whether the threads help. The reference steps are
timed in rounds of their own (their BLAS threads spin after each product). The report says
which dispatched function of which layer ran which path in the fast steps.

The cases and the interleaved rounds are :mod:`refnorm.bench_cases`'s, shared with
``--device gpu`` (:mod:`refnorm.bench_gpu`); ``--data-parallel`` is
:mod:`refnorm.bench_parallel`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np

from refnorm.argtypes import int_at_least
from refnorm.bench_cases import (
    EPS,
    GROUPS,
    METHODS,
    STEP_MODELS,
    Timing,
    _interleaved,
    _pure,
    _quiet,
    _summary,
    _torch_case,
    _train_step,
    _train_step_torch,
)
from refnorm.dispatch import fast_applies

SHAPES = ((32, 64, 32, 32), (2, 64, 32, 32))
BLAS_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# how idle OpenMP threads wait (numba's and torch's pools): matters on an oversubscribed machine
OMP_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "NUMBA_THREADING_LAYER")


# -- the implementations ----------------------------------------------------------------------


def _kernel(method: str, x, gamma, beta, dy) -> Callable[[], Any]:
    """Forward+backward by the kernels of refnorm.kernels alone, given what the fast variants
    give them (parameters in the compute dtype; SN: the (N, C, S) copy of x it caches, made
    here too, and the ratios of zero logits)."""
    from refnorm import kernels

    if method == "sn":
        N, C = x.shape[:2]
        w = np.full(3, 1.0 / 3.0, dtype=x.dtype)
        scopes = ("in", "ln", "bn")

        def sn():
            h = x.reshape(N, C, -1).copy()
            k = kernels.sn_forward(h, gamma, beta, w, w, eps=EPS, scopes=scopes)
            return kernels.sn_backward(dy, k.x_hat, k.rstd, gamma, (k.offset, k.var), (w, w),
                                       scopes=scopes)
        return sn
    forward, backward = {
        "bn": (lambda: kernels.bn_forward(x, gamma, beta, EPS), kernels.bn_backward),
        "in": (lambda: kernels.in_forward(x, gamma, beta, EPS), kernels.in_backward),
        "ln": (lambda: kernels.ln_forward(x, gamma, beta, EPS), kernels.ln_backward),
        "gn": (lambda: kernels.gn_forward(x, gamma, beta, EPS, GROUPS), kernels.gn_backward),
    }[method]

    def run():
        k = forward()
        return backward(dy, k.x_hat, k.rstd, gamma)
    return run


# -- the training steps -----------------------------------------------------------------------


def _on_threads(n: int, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run with numba and BLAS on ``n`` threads, the previous counts restored after."""
    import numba

    from refnorm.kernels.nn import _blas

    def run():
        before = numba.get_num_threads()
        blas = [(lib, lib.num_threads) for lib in _blas()]
        numba.set_num_threads(n)
        for lib, _ in blas:
            lib.set_num_threads(n)
        try:
            return fn()
        finally:
            numba.set_num_threads(before)
            for lib, m in blas:
                lib.set_num_threads(m)
    return run


def layer_paths(step: Callable[[], Any]) -> list[dict[str, Any]]:
    """Run ``step`` (made by :func:`_train_step`) once and return, per layer in forward order,
    its type and the dispatched functions it called with the path each ran (an empty list:
    the layer's functions have no fast variant, numpy alone)."""
    from refnorm.dispatch import record_paths

    net = step.model  # type: ignore[attr-defined]
    rows: list[dict[str, Any]] = []
    originals = []
    with record_paths() as calls:
        for layer in net.layers():
            row: dict[str, Any] = {"layer": type(layer).__name__, "calls": []}
            rows.append(row)

            def wrap(method, row=row):
                def run(*args, **kwargs):
                    start = len(calls)
                    try:
                        return method(*args, **kwargs)
                    finally:
                        row["calls"] += [list(c) for c in calls[start:]
                                         if list(c) not in row["calls"]]
                return run
            originals.append(layer)
            layer.forward, layer.backward = wrap(layer.forward), wrap(layer.backward)
        try:
            step()
        finally:
            for layer in originals:
                del layer.forward, layer.backward
    return rows


# -- measuring --------------------------------------------------------------------------------


def _set_threads(threads: int | None, torch) -> dict[str, Any]:
    """Give numba, torch and (if threadpoolctl is installed) BLAS the same thread count."""
    import numba

    n = threads or numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
    numba.set_num_threads(n)
    layer = numba.config.THREADING_LAYER  # type: ignore[attr-defined]
    info: dict[str, Any] = {"numba_threads": numba.get_num_threads(),
                            "numba_threading_layer": layer,
                            "openmp_env": {k: os.environ.get(k, "unset") for k in OMP_ENV}}
    if torch is not None:
        torch.set_num_threads(n)
        info["torch_threads"] = torch.get_num_threads()
    from refnorm.kernels.nn import _blas

    libs = _blas()
    if libs:
        for lib in libs:
            lib.set_num_threads(n)
        info["blas_threads"] = n
    else:
        info["blas_threads"] = ("not set (threadpoolctl not installed); environment: "
                                + ", ".join(f"{k}={os.environ.get(k, 'unset')}"
                                            for k in BLAS_ENV))
    return info


def copy_bandwidth(repeats: int, mib: int = 64) -> float:
    """The machine's copy bandwidth in GB/s: a ``mib`` MiB float32 copy, read plus write,
    median over ``repeats`` copies."""
    a = np.ones(mib * 2**20 // 4, dtype=np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - t0)
    return 2 * a.nbytes / float(np.median(times)) / 1e9


def _import_torch(enabled: bool):
    if not enabled:
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch


def _load_average() -> list[float] | None:
    try:
        return [float(v) for v in os.getloadavg()]
    except OSError:
        return None


def run(*, quick: bool = False, repeats: int | None = None, threads: int | None = None,
        use_torch: bool = True, progress: Callable[[str], None] | None = None,
        step_models: tuple[str, ...] = STEP_MODELS) -> dict[str, Any]:
    """Run every case; return the report as a JSON-ready dict (see :func:`main`). The thread
    counts of numba, torch and BLAS, set for the bench, are put back after it."""
    import numba

    from refnorm.kernels import norms as kernel_norms
    from refnorm.kernels.nn import _blas

    kernel_norms.loops()  # before torch: see _run
    torch = _import_torch(use_torch)
    numba_before = numba.get_num_threads()
    torch_before = None if torch is None else torch.get_num_threads()
    blas_before = [(lib, lib.num_threads) for lib in _blas()]
    try:
        return _run(quick=quick, repeats=repeats, threads=threads, use_torch=use_torch,
                    progress=progress, step_models=step_models)
    finally:
        numba.set_num_threads(numba_before)
        if torch is not None:
            torch.set_num_threads(torch_before)
        for lib, n in blas_before:
            lib.set_num_threads(n)


def _run(*, quick: bool, repeats: int | None, threads: int | None, use_torch: bool,
         progress: Callable[[str], None] | None,
         step_models: tuple[str, ...]) -> dict[str, Any]:
    say: Callable[[str], None] = progress or _quiet
    # before torch: OMP_WAIT_POLICY for both OpenMP pools, numba's pool, the allocator
    from refnorm.kernels import norms as kernel_norms

    kernel_norms.loops()
    torch = _import_torch(use_torch)
    repeats = repeats or (5 if quick else 30)
    machine = {"platform": platform.platform(), "processor": platform.processor(),
               "cpu_count": os.cpu_count(), "python": platform.python_version(),
               "numpy": np.__version__, "torch": None if torch is None else torch.__version__,
               "load_average_start": _load_average()}
    machine.update(_set_threads(threads, torch))
    probe = np.ones(1, np.float32)
    machine["fast_path"] = ("numba kernels" if fast_applies(probe)
                            else "not available (numba missing): 'fast' rows ran the reference")
    report: dict[str, Any] = {"machine": machine, "repeats": repeats,
                              "bytes_model": "5 n b: read x, write y, read dy, read x, write dx",
                              "copy_gb_per_s": copy_bandwidth(max(3, repeats // 3)),
                              "timings": [], "ratios": []}
    cases = [(m, s) for s in SHAPES for m in METHODS]
    rng = np.random.default_rng(0)
    n_parts = len(cases) + 1
    for i, (method, shape) in enumerate(cases):
        case = f"{method} {shape}"
        x = rng.standard_normal(shape).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        gamma, beta = np.ones(shape[1], np.float32), np.zeros(shape[1], np.float32)
        impls = {path: _pure(method, x, gamma, beta, dy, path) for path in ("reference", "fast")}
        impls["kernel"] = _kernel(method, x, gamma, beta, dy)
        if torch is not None and (t := _torch_case(torch, method, x, dy)) is not None:
            impls["torch"] = t
        head = f"[{i + 1}/{n_parts}] {case}"
        times = _interleaved(impls, repeats, lambda s: say(f"{head}: {s}"))  # noqa: B023
        nbytes = 5 * x.size * x.itemsize
        rows = {name: _summary(case, method, shape, name, t, nbytes)
                for name, t in times.items()}
        report["timings"] += [asdict(r) for r in rows.values()]
        fast = rows["fast"].median_ms
        ratio = {"case": case, "method": method, "shape": list(shape),
                 "fast_over_reference": fast / rows["reference"].median_ms,
                 "fast_over_kernel": fast / rows["kernel"].median_ms,
                 "fast_over_torch": (fast / rows["torch"].median_ms
                                     if "torch" in rows else None),
                 "fast_over_torch_cpu": (rows["fast"].cpu_ms / rows["torch"].cpu_ms
                                         if "torch" in rows else None),
                 "fast_of_copy": rows["fast"].gb_per_s / report["copy_gb_per_s"]}
        report["ratios"].append(ratio)
    report["train_steps"] = _steps(torch, machine["numba_threads"], max(3, repeats // 2),
                                   step_models, lambda s: say(f"[{n_parts}/{n_parts}] "
                                                              f"training steps: {s}"))
    machine["load_average_end"] = _load_average()
    machine["torch_requested"] = use_torch
    machine["numba_threading_layer_in_use"] = _threading_layer_in_use()
    return report


def _threading_layer_in_use() -> str | None:
    """The threading layer numba's parallel loops ran on (``omp``, ``tbb``, ``workqueue``),
    which ``numba.config.THREADING_LAYER`` (a request, ``default``) does not say; None before
    any parallel loop ran."""
    import numba

    try:
        return str(numba.threading_layer())
    except ValueError:
        return None


def _steps(torch, threads: int, repeats: int, models: tuple[str, ...],
           say: Callable[[str], None]) -> dict[str, Any]:
    """The training steps of ``models``: fast, torch (and the fast step on one thread when
    ``threads`` > 1) interleaved, then the reference steps interleaved among themselves; and
    the paths of the fast steps.

    The reference steps run apart: their convolution calls numpy's BLAS on all threads, whose
    idle workers then spin for tens of milliseconds (OpenBLAS), on the core a following fast or
    PyTorch step would use (and in its process CPU time)."""
    impls: dict[str, Callable[[], Any]] = {}
    references: dict[str, Callable[[], Any]] = {}
    paths = {}
    for model in models:
        references[f"{model} reference"] = _train_step("reference", model)
        fast = _train_step("fast", model)
        impls[f"{model} fast"] = fast
        if threads > 1:
            impls[f"{model} fast 1t"] = _on_threads(1, _train_step("fast", model))
        if torch is not None:
            impls[f"{model} torch"] = _train_step_torch(torch, model)
        paths[model] = layer_paths(fast)
    times = _interleaved(impls, repeats, say)
    times.update(_interleaved(references, repeats, lambda s: say(f"reference, {s}")))
    rows = []
    for name, t in times.items():
        model, _, impl = name.partition(" ")
        rows.append(asdict(_summary(f"{model} step", model, (32, 3, 32, 32), impl, t, 0)))
    return {"model": "ConvNet widths 16/32/32, batch 32 of 3x32x32, G = 4 for GN; "
                     "forward + loss + backward",
            "timings": rows, "paths": paths}


# -- where threads start to pay ----------------------------------------------------------------


def crossover(threads: int, repeats: int,
              progress: Callable[[str], None] = _quiet) -> dict[str, Any]:
    """1 thread against ``threads`` threads, interleaved, for the work sizes of a training
    step and beyond: GN (G = 32) forward+backward by the kernels at (N, 64, 32, 32) for N = 1
    ... 32 (the loops' per-call choice switched off, so that the thread count alone differs),
    the convolution's matrix products of the study's model at batch 32 (numpy's BLAS), and
    the middle convolution's forward+backward by sample blocks at N = 2 ... 32, one block per
    sample (timed in rounds of their own, first). ``kernels.norms.SERIAL_BELOW``,
    ``kernels.nn.BLAS_PARALLEL_FROM`` and ``kernels.blocks.MIN_BLOCK_WORK`` are set from
    these measurements (docs/performance.md)."""
    import numba

    from refnorm import kernels
    from refnorm.kernels import blocks as kernel_blocks
    from refnorm.kernels import norms as kernel_norms
    from refnorm.kernels.nn import _blas

    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    impls: dict[str, Callable[[], Any]] = {}
    sizes: dict[str, tuple[str, int]] = {}

    def on(n: int, fn: Callable[[], Any]) -> Callable[[], Any]:
        def run():
            before, serial = numba.get_num_threads(), kernel_norms.SERIAL_BELOW
            numba.set_num_threads(n)
            kernel_norms.SERIAL_BELOW = 0
            libs = [(lib, lib.num_threads) for lib in _blas()]
            for lib, _ in libs:
                lib.set_num_threads(n)
            try:
                return fn()
            finally:
                numba.set_num_threads(before)
                kernel_norms.SERIAL_BELOW = serial
                for lib, m in libs:
                    lib.set_num_threads(m)
        return run

    for N in (1, 2, 4, 8, 16, 32):
        x = rng.standard_normal((N, 64, 32, 32)).astype(np.float32)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        gamma, beta = np.ones(64, np.float32), np.zeros(64, np.float32)

        def gn(x=x, dy=dy, gamma=gamma, beta=beta):
            k = kernels.gn_forward(x, gamma, beta, EPS, GROUPS)
            return kernels.gn_backward(dy, k.x_hat, k.rstd, gamma)
        name = f"gn N={N}"
        sizes[name] = ("values per loop", 3 * x.size)  # what SERIAL_BELOW is set against
        for n in (1, threads):
            impls[f"{name} {n}t"] = on(n, gn)
    for c_in, c_out, hw in ((3, 16, 1024), (16, 32, 256), (32, 32, 64)):
        K = 9 * c_in
        cols = rng.standard_normal((32, K, hw)).astype(np.float32)
        w = rng.standard_normal((c_out, K)).astype(np.float32)

        def gemm(cols=cols, w=w):
            return np.matmul(w, cols)
        name = f"conv {c_in}->{c_out}"
        sizes[name] = ("multiply-adds", c_out * cols.size)
        for n in (1, threads):
            impls[f"{name} {n}t"] = on(n, gemm)
    def on_blocks(n: int, fn: Callable[[], Any]) -> Callable[[], Any]:
        def run():
            before, smallest = numba.get_num_threads(), kernel_blocks.MIN_BLOCK_WORK
            numba.set_num_threads(n)
            kernel_blocks.MIN_BLOCK_WORK = 1
            try:
                return fn()
            finally:
                numba.set_num_threads(before)
                kernel_blocks.MIN_BLOCK_WORK = smallest
        return run

    # the convolution by sample blocks: in rounds of their own, before the products above run
    # BLAS on several threads (OpenBLAS's threads spin for a while after a parallel product,
    # holding the cores the blocks' helper needs)
    blocks_impls: dict[str, Callable[[], Any]] = {}
    window = ((3, 3), (1, 1), (1, 1))
    for N in (2, 4, 8, 16, 32):
        x = rng.standard_normal((N, 16, 16, 16)).astype(np.float32)
        w = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
        dy = rng.standard_normal((N, 32, 16, 16)).astype(np.float32)

        def conv(x=x, w=w, dy=dy):
            f = kernels.conv_forward(x, w, None, window[1], window[2])
            return kernels.conv_backward(dy, f.cols, f.w_mat, x.shape, window, bias=False)
        name = f"conv blocks N={N}"
        sizes[name] = ("forward multiply-adds", 32 * 16 * 9 * 256 * N)  # as MIN_BLOCK_WORK
        for n in (1, threads):
            blocks_impls[f"{name} {n}t"] = on_blocks(n, conv)
    times = _interleaved(blocks_impls, repeats, progress)
    times.update(_interleaved(impls, repeats, progress))
    for name, (unit, work) in sizes.items():
        one = float(np.median(times[f"{name} 1t"]["wall"]))
        many = float(np.median(times[f"{name} {threads}t"]["wall"]))
        rows.append({"case": name, "work": work, "unit": unit, "one_thread_ms": one * 1e3,
                     "threads_ms": many * 1e3, "threads_over_one": many / one})
    return {"threads": threads, "rows": rows, "load_average": _load_average()}


def _no_torch(machine: dict[str, Any]) -> str:
    return "not installed" if machine.get("torch_requested", True) else "not timed: --no-torch"


def format_crossover(report: dict[str, Any]) -> str:
    """The crossover measurement as text."""
    n = report["threads"]
    load = " ".join(f"{v:.2f}" for v in report["load_average"] or []) or "-"
    lines = [f"1 thread against {n} (medians, interleaved; load average {load}):",
             f"  {'case':<18} {'work':>29} {'1 thread ms':>12} {f'{n} threads ms':>13} "
             f"{f'{n}t/1t':>7}"]
    for r in report["rows"]:
        lines.append(f"  {r['case']:<18} {r['work'] / 1e6:>6.2f}M {r['unit']:<21} "
                     f"{r['one_thread_ms']:>12.3f} {r['threads_ms']:>13.3f} "
                     f"{r['threads_over_one']:>7.2f}")
    return "\n".join(lines)


# -- output -----------------------------------------------------------------------------------


def format_report(report: dict[str, Any]) -> str:
    """The report as text: per case the medians, spread, CPU time, GB/s and its fraction of
    the copy bandwidth; the ratios of medians; the training steps and their paths."""
    m = report["machine"]
    load = " / ".join(" ".join(f"{v:.2f}" for v in m[k]) if m.get(k) else "-"
                      for k in ("load_average_start", "load_average_end"))
    lines = [
        f"machine: {m['platform']}, {m['cpu_count']} cores; numba {m['numba_threads']} threads "
        f"(layer {m.get('numba_threading_layer_in_use') or m['numba_threading_layer']}), torch "
        f"{m.get('torch_threads', '-')} threads ({m['torch'] or _no_torch(m)}), BLAS "
        f"{m['blas_threads']}; fast path: "
        f"{m['fast_path']}; "
        + ", ".join(f"{k}={v}" for k, v in m["openmp_env"].items()),
        f"load average (1, 5, 15 min) at start / end: {load}",
        f"copy bandwidth: {report['copy_gb_per_s']:.1f} GB/s; {report['repeats']} interleaved "
        f"repetitions of each normalizer ({max(3, report['repeats'] // 2)} of each training "
        f"step, {max(3, report['repeats'] // 3)} copies); GB/s counts {report['bytes_model']}",
        "",
        f"{'case':<21} {'impl':<9} {'median ms':>9} {'min-max ms':>13} {'cpu ms':>7} "
        f"{'GB/s':>6} {'of copy':>7} {'faults':>6}",
    ]
    copy = report["copy_gb_per_s"]
    for t in report["timings"]:
        spread = f"{t['min_ms']:.2f}-{t['max_ms']:.2f}"
        lines.append(f"{t['case']:<21} {t['impl']:<9} {t['median_ms']:>9.3f} {spread:>13} "
                     f"{t['cpu_ms']:>7.3f} {t['gb_per_s']:>6.1f} "
                     f"{t['gb_per_s'] / copy:>7.0%} {t['faults']:>6.0f}")
    lines += ["", f"{'case':<21} {'fast/ref':>8} {'fast/kernel':>11} {'fast/torch':>10} "
              f"{'(cpu)':>6} {'fast of copy':>12}   (ratios of medians; < 1: fast is quicker)"]
    for r in report["ratios"]:
        vs = ("-", "-") if r["fast_over_torch"] is None else (
            f"{r['fast_over_torch']:.2f}", f"{r['fast_over_torch_cpu']:.2f}")
        lines.append(f"{r['case']:<21} {r['fast_over_reference']:>8.3f} "
                     f"{r['fast_over_kernel']:>11.2f} {vs[0]:>10} {vs[1]:>6} "
                     f"{r['fast_of_copy']:>12.0%}")
    ts = report["train_steps"]
    lines += ["", f"training steps ({ts['model']}):",
              f"  {'model':<7} {'impl':<10} {'median ms':>9} {'min-max ms':>15} {'cpu ms':>7} "
              f"{'fast/this':>9}"]
    medians = {(t["method"], t["impl"]): t["median_ms"] for t in ts["timings"]}
    for t in ts["timings"]:
        fast = medians.get((t["method"], "fast"))
        versus = "" if fast is None or t["impl"] == "fast" else f"{fast / t['median_ms']:.2f}"
        lines.append(f"  {t['method']:<7} {t['impl']:<10} {t['median_ms']:>9.2f} "
                     f"{t['min_ms']:>7.2f}-{t['max_ms']:<7.2f} {t['cpu_ms']:>7.2f} "
                     f"{versus:>9}")
    lines += ["", "paths in the fast steps (dispatched functions per layer; 'numpy': the layer's "
              "functions have no fast variant):"]
    for model, rows in ts["paths"].items():
        seen: dict[str, str] = {}
        for row in rows:
            calls = ", ".join(f"{fn} {path}" for fn, path in row["calls"]) or "numpy"
            seen.setdefault(row["layer"], calls)
        lines.append(f"  {model}: " + "; ".join(f"{k}: {v}" for k, v in seen.items()))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``refnorm bench`` (shared by the ``refnorm`` command and :func:`main`)."""
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--quick", action="store_true",
                        help="5 repetitions instead of 30 (not with --repeats)")
    parser.add_argument("--repeats", type=int_at_least(1), default=None,
                        help="repetitions per case (default 30)")
    parser.add_argument("--threads", type=_thread_count, default=None,
                        help="threads for numba, torch and BLAS, at most numba's "
                             "NUMBA_NUM_THREADS (default: that many)")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch even if installed")
    parser.add_argument("--crossover", action="store_true",
                        help="instead: 1 thread against --threads (2 or more; default: all) by "
                             "work size, where running in parallel starts to pay (--quick, "
                             "--repeats, --json apply)")
    parser.add_argument("--data-parallel", action="store_true",
                        help="instead: the cost of communication in a data-parallel step "
                             "(2 devices in-process and under mpiexec; one run per row, so "
                             "only --json applies)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "gpu"),
                        help="gpu: instead, the normalizers at (32, 64, 32, 32) and "
                             "(256, 64, 56, 56) and the training step on the GPU: the "
                             "reference on CuPy, the fused numba.cuda kernels, PyTorch on "
                             "CUDA when it sees the GPU, and the device's copy bandwidth "
                             "(--quick, --repeats, --no-torch, --json apply); without a GPU "
                             "it says why and exits 2")
    return parser


def _thread_limit() -> int:
    """The most threads numba allows this process (``NUMBA_NUM_THREADS``: the cores it sees,
    unless the environment sets it), read without starting its thread pool."""
    import numba

    return int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]


def _thread_count(text: str) -> int:
    """An argparse type: a thread count from 1 to :func:`_thread_limit`."""
    value, limit = int_at_least(1)(text), _thread_limit()
    if value > limit:
        raise argparse.ArgumentTypeError(
            f"expected an integer from 1 to {limit} (numba's NUMBA_NUM_THREADS: the threads "
            f"available to this process); got {text!r}")
    return value


def _not_honoured(args: argparse.Namespace) -> str | None:
    """Why the CPU bench's options in ``args`` cannot all be honoured, in one sentence; None
    when they can."""
    if args.crossover and args.data_parallel:
        return "--crossover and --data-parallel are two benches: give one of them"
    if args.data_parallel:
        other = [flag for flag, given in (("--quick", args.quick),
                                          ("--repeats", args.repeats is not None),
                                          ("--threads", args.threads is not None),
                                          ("--no-torch", args.no_torch)) if given]
        if other:
            return (f"--data-parallel does not take {', '.join(other)} (it trains one run per "
                    "row, without torch; only --json applies)")
    if args.crossover:
        if args.no_torch:
            return "--crossover does not take --no-torch (it never runs torch)"
        if args.threads is not None and args.threads < 2:
            return (f"--crossover compares 1 thread with 2 or more; expected --threads >= 2; "
                    f"got --threads {args.threads}")
        if args.threads is None and _thread_limit() < 2:
            return ("--crossover compares 1 thread with 2 or more, but numba allows this "
                    "process 1 thread (NUMBA_NUM_THREADS)")
    return None


def run_args(args: argparse.Namespace) -> int:
    """Run the bench for parsed ``args``: the table (or JSON) on stdout, progress on stderr."""
    tty = sys.stderr.isatty()

    def progress(line: str) -> None:  # one updating line on a terminal, a line per case else
        if tty:
            sys.stderr.write(f"\r\x1b[K{line}")
        elif "round 1/" in line:
            sys.stderr.write(f"{line}\n")
        sys.stderr.flush()

    if args.quick and args.repeats is not None:
        print("refnorm bench: error: give --quick (5 repetitions) or --repeats N, not both",
              file=sys.stderr)
        return 2
    if args.device == "gpu":
        return _run_gpu(args, progress, tty)
    if (problem := _not_honoured(args)) is not None:
        print(f"refnorm bench: error: {problem}", file=sys.stderr)
        return 2
    if args.crossover:
        from refnorm.kernels import norms as kernel_norms

        kernel_norms.loops()
        n = args.threads or _thread_limit()
        result = crossover(n, args.repeats or (5 if args.quick else 30), progress)
        if tty:
            sys.stderr.write("\n")
        print(json.dumps(result, indent=2) if args.json else format_crossover(result))
        return 0
    if args.data_parallel:
        from refnorm import bench_parallel

        try:
            parallel = bench_parallel.run(progress=progress)
        except bench_parallel.MPIJobFailed as exc:
            if tty:
                sys.stderr.write("\n")
            print(f"refnorm bench: error: --data-parallel: {exc}", file=sys.stderr)
            return 1
        if tty:
            sys.stderr.write("\n")
        print(json.dumps(parallel, indent=2) if args.json
              else bench_parallel.format_report(parallel))
        return 0

    report = run(quick=args.quick, repeats=args.repeats, threads=args.threads,
                 use_torch=not args.no_torch, progress=progress)
    if tty:
        sys.stderr.write("\n")
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _run_gpu(args: argparse.Namespace, progress: Callable[[str], None], tty: bool) -> int:
    """``--device gpu``: :mod:`refnorm.bench_gpu` on CuPy's current device."""
    from refnorm import bench_gpu

    other = [flag for flag, given in (("--threads", args.threads is not None),
                                      ("--crossover", args.crossover),
                                      ("--data-parallel", args.data_parallel)) if given]
    if other:
        print(f"refnorm bench: error: --device gpu does not take {', '.join(other)} (they "
              "measure the CPU)", file=sys.stderr)
        return 2
    try:
        device = bench_gpu.gpu_device()
    except RuntimeError as exc:
        print(f"refnorm bench: error: --device gpu: {exc}", file=sys.stderr)
        return 2
    report = bench_gpu.run(device=device, repeats=args.repeats or (5 if args.quick else 30),
                           progress=progress, use_torch=not args.no_torch)
    if tty:
        sys.stderr.write("\n")
    print(json.dumps(report, indent=2) if args.json else bench_gpu.format_report(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m refnorm.bench [--json] [--quick | --repeats N] [--threads N] [--no-torch]``
    (and the other options of ``refnorm bench``), the same as ``refnorm bench``; returns the
    exit status."""
    from refnorm.argtypes import OneLineParser  # one-line errors, as refnorm bench's

    parser = OneLineParser(prog="refnorm bench", description=__doc__.splitlines()[0])
    return run_args(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["METHODS", "SHAPES", "STEP_MODELS", "Timing", "add_arguments", "copy_bandwidth",
           "crossover", "format_crossover", "format_report", "layer_paths", "main", "run",
           "run_args"]

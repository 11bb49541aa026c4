"""``refnorm bench``: time the normalizers' reference path, fast path and PyTorch CPU.

What is timed, for each normalizer (bn, in, ln, gn with G = 32, sn) at (32, 64, 32, 32) and
(2, 64, 32, 32) in float32: one forward and one backward with a random upstream gradient,

- ``reference``: the pure functions of :mod:`refnorm.norms` (what lessons show);
- ``fast``: the same pure functions with ``path="fast"``, which run the numba kernels of
  :mod:`refnorm.kernels` after the same argument checks;
- ``torch``: ``torch.nn.functional`` in the same process, when ``import torch`` works
  (torch is never a dependency of refnorm); SN has no PyTorch counterpart.

Method: every implementation runs once untimed (compilation, allocation), then the
repetitions are *interleaved* (one of each implementation per round), so that a slow spell
of the machine falls on all of them alike; the report gives the median and the spread (min,
max, quartiles). Threads are set before timing and reported: numba and torch get the same
count (all cores by default, ``--threads``), and numpy's BLAS (used by the convolution of the
training step only) gets it too through threadpoolctl when that is installed; otherwise the
BLAS environment variables in force are reported. The implementations never run at the same
time, so their threads do not compete with each other.

Bandwidth: a fused forward+backward must at least read x, write y, read dy, read x (or the
saved x_hat) and write dx: ``5 n b`` bytes for n values of b bytes. ``GB/s`` is that count over
the median time, shown next to the machine's copy bandwidth (a 64 MiB ``numpy.copyto``, read
plus write), the ceiling of any pass over memory. Arrays of 8 MiB fit this machine's last-level
cache, so the figures can exceed the copy bandwidth.

Training step: one forward, loss and backward (no optimizer update) of the study's model
(:class:`refnorm.train.model.ConvNet`, widths 16/32/32, BN) on a batch of 32 images 3x32x32,
on each path (every layer's ``path``), and the same network in PyTorch when available.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from refnorm.dispatch import fast_applies

METHODS = ("bn", "in", "ln", "gn", "sn")
SHAPES = ((32, 64, 32, 32), (2, 64, 32, 32))
GROUPS = 32
EPS = 1e-5
BLAS_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# how idle OpenMP threads wait (numba's and torch's pools): matters on an oversubscribed machine
OMP_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "NUMBA_THREADING_LAYER")


@dataclass
class Timing:
    """The timings of one implementation of one case, in milliseconds."""

    case: str
    method: str
    shape: tuple[int, ...]
    impl: str
    median_ms: float
    min_ms: float
    max_ms: float
    q1_ms: float
    q3_ms: float
    repeats: int
    bytes_moved: int
    gb_per_s: float


# -- the implementations ----------------------------------------------------------------------


def _pure(method: str, x, gamma, beta, dy, path: str) -> Callable[[], Any]:
    """Forward+backward through the public pure functions of refnorm.norms on ``path``
    ("reference": the readable numpy; "fast": the same calls dispatched to refnorm.kernels,
    argument checks included)."""
    from refnorm.norms import (
        batch_norm,
        group_norm,
        instance_norm,
        layer_norm,
        switchable_norm,
    )

    if method == "sn":
        logits = (np.zeros(3, x.dtype), np.zeros(3, x.dtype))

        def sn():
            y, cache = switchable_norm.switchable_norm_forward(x, gamma, beta, *logits,
                                                               eps=EPS, path=path)
            return switchable_norm.switchable_norm_backward(dy, cache, path=path)
        return sn
    pairs: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
        "bn": (batch_norm.batch_norm_forward, batch_norm.batch_norm_backward),
        "in": (instance_norm.instance_norm_forward, instance_norm.instance_norm_backward),
        "ln": (layer_norm.layer_norm_forward, layer_norm.layer_norm_backward),
        "gn": (lambda *a, **kw: group_norm.group_norm_forward(*a, num_groups=GROUPS, **kw),
               group_norm.group_norm_backward),
    }
    forward, backward = pairs[method]

    def run():
        y, cache = forward(x, gamma, beta, eps=EPS, path=path)
        return backward(dy, cache, path=path)
    return run


def _torch_case(torch, method: str, x, dy) -> Callable[[], Any] | None:
    """Forward+backward in torch.nn.functional; None for SN (no PyTorch counterpart)."""
    if method == "sn":
        return None
    F = torch.nn.functional
    C = x.shape[1]
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    dyt = torch.from_numpy(dy.copy())
    gt = torch.ones(C, requires_grad=True)
    bt = torch.zeros(C, requires_grad=True)
    forward = {
        "bn": lambda: F.batch_norm(xt, None, None, gt, bt, training=True, eps=EPS),
        "in": lambda: F.instance_norm(xt, weight=gt, bias=bt, eps=EPS),
        "ln": lambda: F.group_norm(xt, 1, gt, bt, eps=EPS),  # LN over (C, H, W), per-channel affine
        "gn": lambda: F.group_norm(xt, GROUPS, gt, bt, eps=EPS),
    }[method]

    def run():
        xt.grad = gt.grad = bt.grad = None
        forward().backward(dyt)
    return run


# -- the training step ------------------------------------------------------------------------


def _train_batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((32, 3, 32, 32)).astype(np.float32)
    labels = rng.integers(0, 10, size=32)
    return x, labels


def _train_step(path: str) -> Callable[[], Any]:
    """One forward, loss and backward of the study's model with its layers on ``path``."""
    from refnorm.nn import softmax_cross_entropy, softmax_cross_entropy_backward
    from refnorm.train.model import ConvNet

    model = ConvNet(in_channels=3, num_classes=10, norm="bn", widths=(16, 32, 32))
    for layer in model.layers():
        layer.path = path
    x, labels = _train_batch()

    def step():
        logits = model.forward(x, training=True)
        _, cache = softmax_cross_entropy(logits, labels)
        return model.backward(softmax_cross_entropy_backward(cache))
    return step


def _train_step_torch(torch) -> Callable[[], Any]:
    """The same network in PyTorch: 3x3 convs (no bias) + BN + ReLU, 2x2 max pools, global
    average pool, linear; one forward, loss and backward."""
    nn = torch.nn
    layers: list[Any] = []
    c_in = 3
    for i, width in enumerate((16, 32, 32)):
        layers += [nn.Conv2d(c_in, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                   nn.ReLU()]
        if i < 2:
            layers.append(nn.MaxPool2d(2))
        c_in = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10)]
    model = nn.Sequential(*layers)
    x, labels = _train_batch()
    xt, yt = torch.from_numpy(x), torch.from_numpy(labels)

    def step():
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(xt), yt).backward()
    return step


# -- measuring --------------------------------------------------------------------------------


def _set_threads(threads: int | None, torch) -> dict[str, Any]:
    """Give numba, torch and (if threadpoolctl is installed) BLAS the same thread count."""
    import numba

    # before numba starts its pool: refnorm.kernels sets OMP_WAIT_POLICY=PASSIVE (unless set)
    import refnorm.kernels  # noqa: F401

    n = threads or numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
    numba.set_num_threads(n)
    layer = numba.config.THREADING_LAYER  # type: ignore[attr-defined]
    info: dict[str, Any] = {"numba_threads": numba.get_num_threads(),
                            "numba_threading_layer": layer,
                            "openmp_env": {k: os.environ.get(k, "unset") for k in OMP_ENV}}
    if torch is not None:
        torch.set_num_threads(n)
        info["torch_threads"] = torch.get_num_threads()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        info["blas_threads"] = ("not set (threadpoolctl not installed); environment: "
                                + ", ".join(f"{k}={os.environ.get(k, 'unset')}"
                                            for k in BLAS_ENV))
    else:
        threadpool_limits(n)
        info["blas_threads"] = n
    return info


def _interleaved(impls: dict[str, Callable[[], Any]], repeats: int,
                 progress: Callable[[str], None]) -> dict[str, list[float]]:
    """Warm each implementation once, then time them in rounds, one call of each per round."""
    for fn in impls.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in impls}
    for r in range(repeats):
        progress(f"round {r + 1}/{repeats}")
        for name, fn in impls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def _summary(case: str, method: str, shape, impl: str, seconds: list[float],
             nbytes: int) -> Timing:
    ms = np.asarray(seconds) * 1e3
    q1, median, q3 = np.percentile(ms, [25, 50, 75])
    return Timing(case, method, tuple(shape), impl, float(median), float(ms.min()),
                  float(ms.max()), float(q1), float(q3), len(ms), nbytes,
                  nbytes / (median * 1e-3) / 1e9 if nbytes else 0.0)


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


def _quiet(line: str) -> None:
    """A progress callback that says nothing."""


def _import_torch(enabled: bool):
    if not enabled:
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch


def run(*, quick: bool = False, repeats: int | None = None, threads: int | None = None,
        use_torch: bool = True, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every case; return the report as a JSON-ready dict (see :func:`main`)."""
    say: Callable[[str], None] = progress or _quiet
    torch = _import_torch(use_torch)
    repeats = repeats or (5 if quick else 30)
    machine = {"platform": platform.platform(), "processor": platform.processor(),
               "cpu_count": os.cpu_count(), "python": platform.python_version(),
               "numpy": np.__version__, "torch": None if torch is None else torch.__version__}
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
    for i, (method, shape) in enumerate(cases):
        case = f"{method} {shape}"
        x = rng.standard_normal(shape).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        gamma, beta = np.ones(shape[1], np.float32), np.zeros(shape[1], np.float32)
        impls = {path: _pure(method, x, gamma, beta, dy, path) for path in ("reference", "fast")}
        if torch is not None and (t := _torch_case(torch, method, x, dy)) is not None:
            impls["torch"] = t
        head = f"[{i + 1}/{len(cases) + 1}] {case}"
        times = _interleaved(impls, repeats, lambda s: say(f"{head}: {s}"))  # noqa: B023
        nbytes = 5 * x.size * x.itemsize
        rows = {name: _summary(case, method, shape, name, t, nbytes)
                for name, t in times.items()}
        report["timings"] += [asdict(r) for r in rows.values()]
        ratio = {"case": case, "method": method, "shape": list(shape),
                 "fast_over_reference": rows["fast"].median_ms / rows["reference"].median_ms,
                 "fast_over_torch": (rows["fast"].median_ms / rows["torch"].median_ms
                                     if "torch" in rows else None)}
        report["ratios"].append(ratio)
    steps = {path: _train_step(path) for path in ("reference", "fast")}
    if torch is not None:
        steps["torch"] = _train_step_torch(torch)
    n = len(cases) + 1
    times = _interleaved(steps, max(3, repeats // 2),
                         lambda s: say(f"[{n}/{n}] training step: {s}"))
    report["train_step"] = {
        "model": "ConvNet widths 16/32/32, BN, batch 32 of 3x32x32; forward + loss + backward",
        "timings": [asdict(_summary("train step", "train", (32, 3, 32, 32), name, t, 0))
                    for name, t in times.items()]}
    return report


# -- output -----------------------------------------------------------------------------------


def format_report(report: dict[str, Any]) -> str:
    """The report as a text table (medians, min-max, GB/s; ratios of medians)."""
    m = report["machine"]
    lines = [
        f"machine: {m['platform']}, {m['cpu_count']} cores; numba {m['numba_threads']} threads "
        f"({m['numba_threading_layer']}), torch {m.get('torch_threads', '-')} threads "
        f"({m['torch'] or 'not installed'}), BLAS {m['blas_threads']}; fast path: "
        f"{m['fast_path']}; "
        + ", ".join(f"{k}={v}" for k, v in m["openmp_env"].items()),
        f"copy bandwidth: {report['copy_gb_per_s']:.1f} GB/s; {report['repeats']} interleaved "
        f"repetitions; GB/s counts {report['bytes_model']}",
        "",
        f"{'case':<24} {'impl':<10} {'median ms':>10} {'min-max ms':>17} {'GB/s':>6}",
    ]
    for t in report["timings"]:
        spread = f"{t['min_ms']:.2f}-{t['max_ms']:.2f}"
        lines.append(f"{t['case']:<24} {t['impl']:<10} {t['median_ms']:>10.2f} {spread:>17} "
                     f"{t['gb_per_s']:>6.1f}")
    lines += ["", f"{'case':<24} {'fast/ref':>9} {'fast/torch':>11}   (ratios of medians; "
              "< 1 means fast is quicker)"]
    for r in report["ratios"]:
        vs_torch = "-" if r["fast_over_torch"] is None else f"{r['fast_over_torch']:.2f}"
        lines.append(f"{r['case']:<24} {r['fast_over_reference']:>9.3f} {vs_torch:>11}")
    ts = report["train_step"]
    lines += ["", f"training step ({ts['model']}):"]
    for t in ts["timings"]:
        lines.append(f"  {t['impl']:<10} median {t['median_ms']:.2f} ms "
                     f"(min {t['min_ms']:.2f}, max {t['max_ms']:.2f})")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``refnorm bench`` (shared by the ``refnorm`` command and :func:`main`)."""
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--quick", action="store_true", help="5 repetitions instead of 30")
    parser.add_argument("--repeats", type=_positive_int, default=None,
                        help="repetitions per case")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="threads for numba, torch and BLAS (default: numba's default)")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch even if installed")
    parser.add_argument("--data-parallel", action="store_true",
                        help="instead: the cost of communication in a data-parallel step "
                             "(2 devices in-process and under mpiexec)")
    # Not offered in --help while the GPU bench is not built; `--device gpu` says so, exit 2.
    parser.add_argument("--device", default="cpu", choices=("cpu", "gpu"),
                        help=argparse.SUPPRESS)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {text!r}")
    return value


def run_args(args: argparse.Namespace) -> int:
    """Run the bench for parsed ``args``: the table (or JSON) on stdout, progress on stderr."""
    if args.device == "gpu":  # with or without a GPU
        print("refnorm bench: error: --device gpu: the GPU bench is not built (refnorm train "
              "and refnorm study run on a GPU with --device gpu)", file=sys.stderr)
        return 2
    tty = sys.stderr.isatty()

    def progress(line: str) -> None:  # one updating line on a terminal, a line per case else
        if tty:
            sys.stderr.write(f"\r\x1b[K{line}")
        elif "round 1/" in line:
            sys.stderr.write(f"{line}\n")
        sys.stderr.flush()

    if args.data_parallel:
        from refnorm import bench_parallel

        parallel = bench_parallel.run(progress=progress)
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


def main(argv: list[str] | None = None) -> int:
    """``python -m refnorm.bench [--json] [--quick] [--repeats N] [--threads N] [--no-torch]``,
    the same as ``refnorm bench``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="refnorm bench", description=__doc__.splitlines()[0])
    return run_args(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["METHODS", "SHAPES", "Timing", "add_arguments", "copy_bandwidth", "format_report",
           "main", "run", "run_args"]

"""``refnorm bench --device gpu``: the normalizers and the training step on a GPU.

Every normalizer's forward+backward at (32, 64, 32, 32) and (256, 64, 56, 56) float32
(gamma = 1, beta = 0, a random dy), three ways on the same GPU:

- ``reference``: the public functions of :mod:`refnorm.norms` on CuPy arrays (the readable
  code, each array operation a CuPy kernel);
- ``fused``: the ``numba.cuda`` kernels of :mod:`refnorm.kernels.cuda` alone;
- ``torch``: ``torch.nn.functional`` on CUDA tensors (cuDNN's batch norm, PyTorch's own group,
  layer and instance norm kernels), when PyTorch's CUDA build sees a GPU; none for SN;

next to the device's copy bandwidth (a device-to-device copy of the large input, read plus
write), and the training step of the study's four models (batch 32 of 3x32x32) on CuPy and in
PyTorch on CUDA. Every call ends with a device synchronization, and the wall clock times it,
in interleaved rounds (:func:`refnorm.bench_cases._interleaved`): the figures include the
launch costs a training loop pays. GB/s counts 5 n b, as the CPU bench does.

Without a GPU the command says why in one sentence and exits 2. The tests run the same code
under numba's CUDA simulator on numpy arrays, with tiny shapes (:func:`simulated_device`): that
checks the bench, never a GPU's speed.
"""
from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from types import ModuleType
from typing import Any

import numpy as np

from refnorm import bench_cases as cases
from refnorm.backend import gpu_problem

SHAPES = ((32, 64, 32, 32), (256, 64, 56, 56))


@dataclass(frozen=True)
class Device:
    """What the bench needs of a device: its arrays' namespace, a name, a way to wait for its
    work, and PyTorch's name for it (None: no PyTorch comparison)."""

    xp: ModuleType
    name: str
    synchronize: Callable[[], None]
    torch_device: str | None


def gpu_device() -> Device:
    """CuPy's current device; raises RuntimeError with :func:`~refnorm.backend.gpu_problem`'s
    sentence when there is none."""
    problem = gpu_problem()
    if problem is not None:
        raise RuntimeError(problem)
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return Device(cupy, name, lambda: cupy.cuda.Device().synchronize(), _torch_cuda())


def _torch_cuda() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return "cuda" if torch.cuda.is_available() else None


def simulated_device() -> Device:
    """numpy arrays under numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``): the bench's code
    on a machine without a GPU, for the tests."""
    from refnorm.kernels import cuda

    if not cuda.simulator():
        raise RuntimeError("simulated_device needs NUMBA_ENABLE_CUDASIM=1 before numba is "
                           "imported")
    return Device(np, "numba CUDA simulator (numpy arrays)", lambda: None, None)


def _synchronized(device: Device, fn: Callable[[], Any]) -> Callable[[], Any]:
    def run():
        out = fn()
        device.synchronize()
        return out
    return run


def _fused(method: str, x, gamma, beta, dy, xp: ModuleType) -> Callable[[], Any]:
    """Forward+backward by the GPU kernels alone (:mod:`refnorm.kernels.cuda`); SN with the
    ratios of zero logits, as the other rows."""
    from refnorm.kernels import cuda

    if method == "sn":
        w = xp.full(3, 1.0 / 3.0, dtype=x.dtype)
        scopes = ("in", "ln", "bn")

        def sn():
            k = cuda.sn_forward(x, gamma, beta, w, w, eps=cases.EPS, scopes=scopes)
            return cuda.sn_backward(dy, k.x_hat, k.rstd, gamma, (k.offset, k.var), (w, w),
                                    scopes=scopes)
        return sn
    forward, backward = {
        "bn": (lambda: cuda.bn_forward(x, gamma, beta, cases.EPS), cuda.bn_backward),
        "in": (lambda: cuda.in_forward(x, gamma, beta, cases.EPS), cuda.in_backward),
        "ln": (lambda: cuda.ln_forward(x, gamma, beta, cases.EPS), cuda.ln_backward),
        "gn": (lambda: cuda.gn_forward(x, gamma, beta, cases.EPS, cases.GROUPS),
               cuda.gn_backward),
    }[method]

    def run():
        k = forward()
        return backward(dy, k.x_hat, k.rstd, gamma)
    return run


def copy_bandwidth(device: Device, x, repeats: int) -> float:
    """GB/s of a device-to-device copy of ``x`` (read plus write), median of ``repeats``."""
    xp = device.xp
    out = xp.empty_like(x)
    xp.copyto(out, x)
    device.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        xp.copyto(out, x)
        device.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * x.nbytes / float(np.median(times)) / 1e9


def run(*, device: Device, repeats: int = 30, shapes: tuple[tuple[int, ...], ...] = SHAPES,
        methods: tuple[str, ...] = cases.METHODS,
        step_models: tuple[str, ...] = cases.STEP_MODELS,
        step_batch: tuple[int, ...] = cases.STEP_BATCH,
        progress: Callable[[str], None] = cases._quiet,
        use_torch: bool = True) -> dict[str, Any]:
    """Every case on ``device``; the report as a JSON-ready dict (:func:`format_report`).
    ``use_torch=False`` (``--no-torch``): no PyTorch rows, even where it sees the GPU."""
    if not use_torch:
        device = replace(device, torch_device=None)
    torch: Any = None
    if device.torch_device is not None:
        import torch
    xp = device.xp
    rng = np.random.default_rng(0)
    largest = max(shapes, key=lambda s: int(np.prod(s)))
    probe = xp.asarray(rng.standard_normal(largest).astype(np.float32))
    report: dict[str, Any] = {
        "device": {"name": device.name, "array_module": xp.__name__,
                   "torch": None if torch is None else f"{torch.__version__} on "
                                                       f"{torch.cuda.get_device_name()}",
                   "torch_requested": use_torch, "host": platform.platform()},
        "repeats": repeats,
        "bytes_model": "5 n b: read x, write y, read dy, read x, write dx",
        "copy_gb_per_s": copy_bandwidth(device, probe, max(3, repeats)),
        "copy_of": list(largest),
        "timings": [], "ratios": []}
    del probe
    todo = [(m, s) for s in shapes for m in methods]
    for i, (method, shape) in enumerate(todo):
        case = f"{method} {shape}"
        x_host = rng.standard_normal(shape).astype(np.float32)
        dy_host = rng.standard_normal(shape).astype(np.float32)
        x, dy = xp.asarray(x_host), xp.asarray(dy_host)
        gamma = xp.ones(shape[1], dtype=np.float32)
        beta = xp.zeros(shape[1], dtype=np.float32)
        impls = {"reference": cases._pure(method, x, gamma, beta, dy, "reference", xp),
                 "fused": _fused(method, x, gamma, beta, dy, xp)}
        if device.torch_device is not None and (
                t := cases._torch_case(torch, method, x_host, dy_host, device.torch_device)
        ) is not None:
            impls["torch"] = t
        impls = {name: _synchronized(device, fn) for name, fn in impls.items()}
        head = f"[{i + 1}/{len(todo) + 1}] {case}"
        times = cases._interleaved(impls, repeats, lambda s: progress(f"{head}: {s}"))  # noqa: B023
        nbytes = 5 * x_host.size * x_host.itemsize
        rows = {name: cases._summary(case, method, shape, name, t, nbytes)
                for name, t in times.items()}
        report["timings"] += [asdict(r) for r in rows.values()]
        fused = rows["fused"].median_ms
        report["ratios"].append({
            "case": case, "method": method, "shape": list(shape),
            "fused_over_reference": fused / rows["reference"].median_ms,
            "fused_over_torch": fused / rows["torch"].median_ms if "torch" in rows else None,
            "fused_of_copy": rows["fused"].gb_per_s / report["copy_gb_per_s"]})
        del x, dy, impls
    report["train_steps"] = _steps(device, torch, step_models, step_batch,
                                   max(3, repeats // 2),
                                   lambda s: progress(f"[{len(todo) + 1}/{len(todo) + 1}] "
                                                      f"training steps: {s}"))
    return report


def _steps(device: Device, torch, models: tuple[str, ...], batch: tuple[int, ...],
           repeats: int, say: Callable[[str], None]) -> dict[str, Any]:
    """The training steps of ``models`` on the device (refnorm's layers on CuPy arrays, and
    PyTorch on CUDA when it sees the GPU), interleaved."""
    impls: dict[str, Callable[[], Any]] = {}
    for model in models:
        impls[f"{model} refnorm"] = cases._train_step("reference", model, device.xp, batch)
        if torch is not None and device.torch_device is not None:
            impls[f"{model} torch"] = cases._train_step_torch(torch, model,
                                                              device.torch_device, batch)
    times = cases._interleaved({k: _synchronized(device, f) for k, f in impls.items()},
                               repeats, say)
    rows = []
    for name, t in times.items():
        model, _, impl = name.partition(" ")
        rows.append(asdict(cases._summary(f"{model} step", model, batch, impl, t, 0)))
    return {"model": f"ConvNet widths 16/32/32, batch {batch[0]} of "
                     f"{'x'.join(map(str, batch[1:]))}, G = {cases.STEP_GROUPS} for GN; "
                     "forward + loss + backward",
            "timings": rows}


def format_report(report: dict[str, Any]) -> str:
    """The report as text: per case the medians, spread, GB/s and its fraction of the device's
    copy bandwidth; the ratios; the training steps."""
    d = report["device"]
    no_torch = ("no CUDA build or no GPU: no comparison" if d.get("torch_requested", True)
                else "not timed: --no-torch")
    lines = [f"device: {d['name']} ({d['array_module']}); PyTorch: {d['torch'] or no_torch}",
             f"copy bandwidth: {report['copy_gb_per_s']:.1f} GB/s (a copy of "
             f"{tuple(report['copy_of'])} float32); {report['repeats']} interleaved "
             f"repetitions, each call synchronized; GB/s counts {report['bytes_model']}",
             "",
             f"{'case':<22}{'impl':<10}{'median ms':>10}{'min-max ms':>20}{'GB/s':>8}"
             f"{'of copy':>9}"]
    for t in report["timings"]:
        spread = f"{t['min_ms']:.3f}-{t['max_ms']:.3f}"
        lines.append(f"{t['case']:<22}{t['impl']:<10}{t['median_ms']:>10.3f}{spread:>20}"
                     f"{t['gb_per_s']:>8.1f}{t['gb_per_s'] / report['copy_gb_per_s']:>9.0%}")
    lines += ["", f"{'case':<22}{'fused/reference':>16}{'fused/torch':>12}{'fused of copy':>14}"]
    for r in report["ratios"]:
        torch = "-" if r["fused_over_torch"] is None else f"{r['fused_over_torch']:.2f}"
        lines.append(f"{r['case']:<22}{r['fused_over_reference']:>16.2f}{torch:>12}"
                     f"{r['fused_of_copy']:>14.0%}")
    ts = report["train_steps"]
    lines += ["", f"training steps ({ts['model']}):",
              f"  {'model':<7} {'impl':<8} {'median ms':>9} {'min-max ms':>15}"]
    for t in ts["timings"]:
        lines.append(f"  {t['method']:<7} {t['impl']:<8} {t['median_ms']:>9.2f} "
                     f"{t['min_ms']:>7.2f}-{t['max_ms']:<7.2f}")
    return "\n".join(lines)

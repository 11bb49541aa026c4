"""The array namespace refnorm computes in: numpy, CuPy, or any Array API namespace.

Reference code never imports numpy for its arithmetic. It asks its input which namespace it
belongs to (:func:`array_namespace`) and calls only functions of the Array API standard on
that namespace, so the same lines run on numpy arrays, on CuPy arrays and on
``array_api_strict`` arrays (the test suite runs over the last to prove it).

refnorm's runtime dependencies are numpy and numba only (numba runs the fast path,
:mod:`refnorm.kernels`).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["DEVICES", "array_namespace", "compute_dtype", "device_of", "gpu_available",
           "gpu_problem", "on_device", "to_device", "to_numpy"]

Array = Any  # an array of whatever namespace the caller uses


def array_namespace(*arrays: Array) -> ModuleType:
    """Return the one array namespace shared by ``arrays`` (``None`` entries are skipped).

    numpy arrays give ``numpy``; CuPy arrays give ``cupy``; any other object that implements
    ``__array_namespace__`` gives what it returns.

    Raises
    ------
    TypeError
        If an argument is not an array, or if the arrays come from different namespaces.
    """
    found: ModuleType | None = None
    for a in arrays:
        if a is None:
            continue
        xp = _namespace_of(a)
        if found is not None and xp is not found:
            raise TypeError(
                "all arrays must come from one array namespace; "
                f"got {found.__name__} and {xp.__name__}"
            )
        found = xp
    if found is None:
        raise TypeError("array_namespace() needs at least one array")
    return found


def _namespace_of(a: Array) -> ModuleType:
    if isinstance(a, np.ndarray):
        return np
    module = type(a).__module__.split(".")[0]
    if module == "cupy":
        return importlib.import_module("cupy")
    if hasattr(a, "__array_namespace__"):
        return a.__array_namespace__()
    raise TypeError(f"expected an array (numpy, CuPy or Array API); got {type(a).__name__}")


def device_of(a: Array) -> Any:
    """The device to create new arrays beside ``a`` on: pass it to :func:`on_device`.

    ``None`` for numpy and CuPy arrays: numpy has one device, and CuPy creates every array on
    the current CUDA device (``with cupy.cuda.Device(i):``), its creation functions taking no
    ``device=``. For any other Array API array, ``a.device`` (e.g. one of
    ``array_api_strict``'s devices, which refuse to combine with each other).
    """
    if isinstance(a, (np.ndarray, np.generic)) or type(a).__module__.split(".")[0] == "cupy":
        return None
    return a.device


def on_device(device: Any) -> dict[str, Any]:
    """Keyword arguments that put a new array on ``device``: ``xp.zeros(shape, dtype=dt,
    **on_device(device))``.

    ``{}`` for ``None`` (the namespace's default, the only choice numpy and CuPy are given,
    see :func:`device_of`), else ``{"device": device}``.
    """
    return {} if device is None else {"device": device}


def compute_dtype(xp: ModuleType, dtype: Any) -> Any:
    """The dtype refnorm computes in for inputs of ``dtype``: float16 computes in float32.

    float16 is not an Array API dtype; namespaces without it (array_api_strict) keep
    ``dtype`` as it is.
    """
    float16 = getattr(xp, "float16", None)
    return xp.float32 if float16 is not None and dtype == float16 else dtype


def to_numpy(a: Array) -> np.ndarray:
    """Copy any supported array to a numpy array on the host (for checks and printing)."""
    if isinstance(a, (np.ndarray, np.generic)):
        return np.asarray(a)
    module = type(a).__module__.split(".")[0]
    if module == "cupy":
        return a.get()
    return np.from_dlpack(a)


# -- the GPU: probe and moves ------------------------------------------------------------------

DEVICES = ("cpu", "gpu")


def gpu_problem() -> str | None:
    """Why there is no usable GPU, in one sentence; ``None`` when there is one.

    The probe is CuPy: ``import cupy`` and ``cupy.is_available()`` (which is False, not an
    error, when CuPy is installed without a driver or a device). Never raises.
    """
    try:
        import cupy
    except Exception as exc:  # noqa: BLE001 - ImportError, or a CuPy whose libraries fail to load
        return ("no GPU: refnorm looks for one through CuPy (import cupy), which failed "
                f"({type(exc).__name__}: {exc}); install the CuPy wheel for your CUDA "
                "(docs/gpu.md)")
    try:
        available = bool(cupy.is_available())
    except Exception as exc:  # noqa: BLE001 - a broken driver must still mean "no GPU"
        return (f"no GPU: CuPy is installed but cupy.is_available() failed "
                f"({type(exc).__name__}: {exc})")
    if not available:
        return ("no GPU: CuPy is installed but cupy.is_available() found no usable CUDA "
                "device (no driver, or no device visible)")
    return None


def gpu_available() -> bool:
    """Whether CuPy is importable and sees a CUDA device; never raises (:func:`gpu_problem`)."""
    return gpu_problem() is None


def _move(a: Array, device: str) -> Array:
    if device == "cpu":
        return to_numpy(a) if type(a).__module__.split(".")[0] == "cupy" else a
    import cupy

    return a if isinstance(a, cupy.ndarray) else cupy.asarray(to_numpy(a))


def to_device(layer_or_model: Any, device: str) -> Any:
    """Move every layer's ``params``, ``state`` and ``grads`` to ``device``, in place.

    ``"gpu"``: each array becomes a CuPy array (``cupy.asarray``; CuPy arrays stay as they
    are); ``"cpu"``: each CuPy array becomes a numpy array (``.get()``), other arrays stay as
    they are, so ``"cpu"`` on a numpy model changes nothing. A layer's ``xp`` attribute (the
    namespace its new arrays are made in) follows when it is numpy or CuPy, and its cache of
    the last forward is dropped (:meth:`~refnorm.layer.Layer.reset`): it holds arrays of the
    old device. A layer's ``device`` (where it creates arrays) becomes ``None`` with it.

    Parameters
    ----------
    layer_or_model : a layer, an object with a ``layers()`` method, or a list/tuple of those
    device : {"cpu", "gpu"}

    Returns
    -------
    ``layer_or_model``, for chaining.

    Raises
    ------
    ValueError
        If ``device`` is not "cpu" or "gpu".
    RuntimeError
        For ``"gpu"`` without a usable GPU, saying what was looked for (:func:`gpu_problem`).
    """
    if device not in DEVICES:
        raise ValueError(f"device must be 'cpu' or 'gpu'; got {device!r}")
    if device == "gpu":
        problem = gpu_problem()
        if problem is not None:
            raise RuntimeError(f"to_device(..., 'gpu'): {problem}")
    from refnorm.inference import iter_layers  # refnorm.layer imports this module

    for layer in iter_layers(layer_or_model):
        for field in ("params", "state", "grads"):
            arrays = getattr(layer, field)
            for key in list(arrays):
                arrays[key] = _move(arrays[key], device)
        xp = getattr(layer, "xp", None)
        if isinstance(xp, ModuleType) and xp.__name__ in ("numpy", "cupy"):
            layer.xp = np if device == "cpu" else importlib.import_module("cupy")  # type: ignore[attr-defined]
            if hasattr(layer, "device"):
                layer.device = None  # numpy's one device, or CuPy's current one
        layer.reset()
    return layer_or_model

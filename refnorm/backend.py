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

__all__ = ["DEVICES", "array_namespace", "compute_dtype", "device_namespace", "device_of",
           "gpu_available", "gpu_problem", "move_array", "on_device", "to_numpy"]

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
    if isinstance(a, np.matrix):  # its reductions keep 2 dimensions and * is a matrix product
        raise TypeError("expected an array (numpy, CuPy or Array API); got numpy.matrix, whose "
                        "reductions keep two dimensions: pass numpy.asarray(...) instead")
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
    """Any supported array as a numpy array on the host (for checks and printing): a CuPy
    array is copied; a numpy array is returned as it is and another Array API array comes
    through DLPack, both sharing memory with ``a`` (copy before writing into the result)."""
    if isinstance(a, (np.ndarray, np.generic)):
        return np.asarray(a)
    module = type(a).__module__.split(".")[0]
    if module == "cupy":
        return a.get()
    return np.from_dlpack(a)


# -- the GPU: probe, and moves of one array ---------------------------------------------------

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
                f"({type(exc).__name__}: {exc}); install the CuPy wheel for your CUDA: "
                "pip install 'refnorm[gpu]' for CUDA 12 (cupy-cuda12x), else CuPy's own "
                "wheel for your version (the documentation's GPU page)")
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


def _check_device(device: object) -> None:
    """Refuse a device other than :data:`DEVICES` (a misspelt ``"CPU"`` would mean the GPU)."""
    if device not in DEVICES:
        raise ValueError(f"device must be 'cpu' or 'gpu'; got {device!r}")


def device_namespace(device: str) -> ModuleType:
    """The namespace of ``device``'s arrays: numpy for ``"cpu"``, CuPy for ``"gpu"``;
    ``ValueError`` for another device."""
    _check_device(device)
    if device == "cpu":
        return np
    import cupy

    return cupy


def move_array(a: Array, device: str) -> Array:
    """``a`` on ``device``: ``"gpu"`` makes a CuPy array (``cupy.asarray``; a CuPy array stays
    as it is); ``"cpu"`` makes a CuPy array a numpy array (``.get()``) and leaves any other
    array as it is.

    The walker that moves a whole network is :func:`refnorm.layer.to_device`. ``ValueError``
    for another device.
    """
    _check_device(device)
    if device == "cpu":
        return to_numpy(a) if type(a).__module__.split(".")[0] == "cupy" else a
    import cupy

    return a if isinstance(a, cupy.ndarray) else cupy.asarray(to_numpy(a))

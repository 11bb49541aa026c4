"""refnorm: a numpy-first reference of normalization methods for deep networks.

Every method is a pair of pure functions ``*_forward(x, gamma, beta, *, eps, ...) ->
(y, cache)`` and ``*_backward(dy, cache)``, plus a layer object built by name::

    import refnorm
    layer = refnorm.build("gn", 64, num_groups=32)
    y = layer.forward(x, training=True)
    dx = layer.backward(dy)          # fills layer.grads

``import refnorm`` itself imports nothing heavy: the names below load their module on first
use (so that the ``refnorm`` command can install its Ctrl-C handling before numpy loads).
refnorm needs numpy; numba is imported on the first call of the fast path
(:mod:`refnorm.dispatch`, :mod:`refnorm.kernels`); CuPy, MPI, hypothesis (for
:mod:`refnorm.testing`) and Jupyter are optional.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # what the names below are, for editors and type checkers
    from refnorm import gradcheck, inference, nn, norms, sync, weights  # noqa: F401
    from refnorm.inference import batch_average  # noqa: F401
    from refnorm.norms import *  # noqa: F403, F401
    from refnorm.registry import build, names  # noqa: F401

_SUBMODULES = ("gradcheck", "inference", "nn", "norms", "sync", "weights")
_FROM = {"batch_average": "refnorm.inference", "build": "refnorm.registry",
         "names": "refnorm.registry"}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"refnorm.{name}")
    if name in _FROM:
        return getattr(importlib.import_module(_FROM[name]), name)
    if name == "__all__":
        return [*_SUBMODULES, *_FROM, *importlib.import_module("refnorm.norms").__all__]
    if name.startswith("_"):  # a dunder probe, or a private name
        raise AttributeError(f"module 'refnorm' has no attribute {name!r}")
    if importlib.util.find_spec(f"refnorm.{name}") is not None:
        # a public submodule not imported yet (refnorm.dispatch.set_path(...) in a fresh
        # process): loaded on first use, as the names above
        return importlib.import_module(f"refnorm.{name}")
    norms = importlib.import_module("refnorm.norms")
    if name in norms.__all__:  # the activation normalizers' functions and layers
        return getattr(norms, name)
    raise AttributeError(f"module 'refnorm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__getattr__("__all__")})

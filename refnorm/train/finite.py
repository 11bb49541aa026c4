"""Nothing non-finite is kept: the checks the trainer runs after every update.

After every update the parameters, their gradients, the momentum and every layer's state are
checked, one float64 sum per array (a NaN or an infinity anywhere makes the sum non-finite,
and float32 values cannot overflow it); the first non-finite value stops the run with
:class:`NonFinite` naming the layer and the array.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from refnorm.backend import Array, array_namespace, device_of, to_numpy
from refnorm.train.model import ConvNet
from refnorm.train.optim import SGD


class NonFinite(RuntimeError):
    """A NaN or an infinity appeared (in the loss, a parameter, a gradient, the momentum or
    a layer's state); the run stopped.

    Attributes
    ----------
    what : str
        The array or value, e.g. ``"layer 1 (BatchNorm) state running_var"``.
    value : float
        The first non-finite value found in it.
    """

    def __init__(self, what: str, value: float, *, where: str = "", kept: str = "",
                 reason: str | None = None) -> None:
        self.what, self.value, self.where, self.kept = what, value, where, kept
        self.reason = reason
        if reason is not None:
            text = f"{where}: {reason}" if where else reason
        else:
            text = f"{what} became {value}" + (f" {where}" if where else "")
        super().__init__(text + "; the run stopped" + (f"; {kept}" if kept else ""))

    def __reduce__(self) -> tuple:
        """Pickled with its fields (a study's worker process hands it to the parent)."""
        return (functools.partial(NonFinite, where=self.where, kept=self.kept,
                                  reason=self.reason), (self.what, self.value))

    def moved(self, *, where: str | None = None, kept: str | None = None) -> NonFinite:
        """The same finding, placed in the run (``where``) or with what is kept."""
        return NonFinite(self.what, self.value, where=self.where if where is None else where,
                         kept=self.kept if kept is None else kept, reason=self.reason)


def is_finite(a: Any) -> bool:
    """Whether every value of ``a`` is finite: one float64 sum (NaN and inf propagate into it;
    float16/float32 values cannot overflow it), confirmed element-wise only when the sum is
    not finite, so that huge finite float64 values are not taken for infinities. Arrays that
    are not floating point (integers, flags) are always finite. An array of another
    namespace (CuPy, array_api_strict) is checked on its own device: only the sum, and the
    answer of the element-wise check, come to the host."""
    if not isinstance(a, (np.ndarray, np.generic, float, int)):
        xp = array_namespace(a)
        if not xp.isdtype(a.dtype, "real floating"):
            return True
        with np.errstate(over="ignore", invalid="ignore"):  # numpy-backed namespaces
            if math.isfinite(float(xp.sum(xp.astype(a, xp.float64)))):
                return True
        return bool(xp.all(xp.isfinite(a)))
    a = np.asarray(a)
    if a.dtype.kind != "f":
        return True
    with np.errstate(over="ignore", invalid="ignore"):  # inf + -inf: the sum is NaN, quietly
        if math.isfinite(float(np.sum(a, dtype=np.float64))):
            return True
    return bool(np.all(np.isfinite(a)))


def first_bad(a: Any) -> float:
    flat = to_numpy(a).ravel()  # an error message: a copy to the host is fine
    return float(flat[np.flatnonzero(~np.isfinite(flat))[0]])


def check_finite(arrays: Iterator[tuple[str, Any]]) -> None:
    """Raise :class:`NonFinite` for the first named array holding a NaN or an infinity.

    Arrays of another namespace than numpy (CuPy) are first checked together, one float64
    sum of their sums per namespace and device: one transfer to the host instead of one per
    array. Only when that total is not finite is each checked on its own, to name it."""
    items = list(arrays)
    if _all_finite_on_devices([a for _, a in items if not _on_host(a)]):
        items = [(what, a) for what, a in items if _on_host(a)]
    for what, a in items:
        if not is_finite(a):
            raise NonFinite(what, first_bad(a))


def _on_host(a: Any) -> bool:
    return isinstance(a, (np.ndarray, np.generic, float, int))


def _all_finite_on_devices(arrays: list[Any]) -> bool:
    """Whether the total of all float64 sums of each (namespace, device) group is finite."""
    groups: dict[tuple[int, str], list[Any]] = {}
    for a in arrays:
        xp = array_namespace(a)
        if xp.isdtype(a.dtype, "real floating"):
            groups.setdefault((id(xp), repr(device_of(a))), []).append(a)
    for group in groups.values():
        xp = array_namespace(group[0])
        with np.errstate(over="ignore", invalid="ignore"):  # numpy-backed namespaces: quietly
            sums = xp.stack([xp.sum(xp.astype(a, xp.float64)) for a in group])  # (arrays,)
            total = float(xp.sum(sums))
        if not math.isfinite(total):
            return False
    return True


def layer_name(i: int, layer: Any) -> str:
    return f"layer {i} ({type(layer).__name__})"


def named_arrays(model: ConvNet, opt: SGD) -> Iterator[tuple[str, Any]]:
    """(name, array) for every parameter, its momentum and every state array of ``model``."""
    for i, layer in enumerate(model.layers()):
        for name, value in layer.params.items():
            yield f"{layer_name(i, layer)} parameter {name}", value
            yield f"{layer_name(i, layer)} momentum of {name}", opt.velocity[f"{i}/{name}"]
        for name, value in layer.state.items():
            yield f"{layer_name(i, layer)} state {name}", value


def named_params(model: ConvNet, opt: SGD) -> Iterator[tuple[str, Any]]:
    """(name, array) for every parameter and its momentum (what an update changes)."""
    for i, layer in enumerate(model.layers()):
        for name, value in layer.params.items():
            yield f"{layer_name(i, layer)} parameter {name}", value
            yield f"{layer_name(i, layer)} momentum of {name}", opt.velocity[f"{i}/{name}"]


def named_states(model: ConvNet) -> Iterator[tuple[str, Any]]:
    """(name, array) for every state array (what a training forward changes)."""
    for i, layer in enumerate(model.layers()):
        for name, value in layer.state.items():
            yield f"{layer_name(i, layer)} state {name}", value


def named_gradients(model: ConvNet, grads: dict[str, Array]) -> Iterator[tuple[str, Any]]:
    """(name, gradient) for every parameter; ``grads`` keyed as :meth:`ConvNet.named_params`."""
    for i, layer in enumerate(model.layers()):
        for name in layer.params:
            yield f"{layer_name(i, layer)} gradient of {name}", grads[f"{i}/{name}"]

"""The one interface every refnorm layer shares, the cases ``refnorm gradcheck`` runs, and the
two walkers over a network of layers.

Normalizers (:mod:`refnorm.norms`), weight-side methods (:mod:`refnorm.weights`) and the
network pieces (:mod:`refnorm.nn`) are all :class:`Layer` objects: ``forward(x, training)``,
``backward(dy)``, and dicts ``params``, ``grads``, ``state``. One generic gradcheck, one
property suite and the CLI then serve all of them. A network is a layer, an object with a
``layers()`` method, or a list/tuple of those: :func:`iter_layers` walks it and
:func:`to_device` moves it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from refnorm.backend import DEVICES, Array, device_namespace, gpu_problem, move_array
from refnorm.core.checks import check_bool, check_device, check_param_dtype
from refnorm.dispatch import resolve


@dataclass(frozen=True)
class CheckCase:
    """One configuration ``refnorm gradcheck`` runs a registered layer on.

    Attributes
    ----------
    shape : tuple of int
        Input shape (N, C, *spatial).
    options : dict
        Keyword arguments for the layer's constructor (e.g. ``num_groups``).
    training : bool
        Which mode the forward runs in.
    """

    shape: tuple[int, ...]
    options: dict[str, Any] = field(default_factory=dict)
    training: bool = True


class Layer:
    """The interface every refnorm layer shares.

    Parameters
    ----------
    dtype : dtype, default float32
        Dtype of the parameters and state (a real floating dtype of ``xp``).
    xp : module, default numpy
        Array namespace the parameters and state live in.
    device : device of ``xp``, optional
        Where the parameters and state are created (``xp.ones(..., device=device)``), e.g.
        an ``array_api_strict.Device``; ``None``: the namespace's default (numpy's host,
        CuPy's current GPU). Inputs must be on the same device; every output, gradient and
        state update is created there too.

    Attributes
    ----------
    params : dict of str to array
        Learnable parameters (``gamma``, ``beta``, ...).
    grads : dict of str to array
        Gradients of the last :meth:`backward`, same keys as ``params``.
    state : dict of str to array
        Non-learned state saved with a model (running statistics); may be empty.
    path : {"reference", "fast"} or None
        The path of the layer's pure functions; None: the process-wide choice
        (:func:`refnorm.dispatch.set_path`), else the reference.
    input_grad : bool
        Whether :meth:`backward` returns ``dx`` (default True). A model sets it False on its
        first layer, whose input (the data) needs no gradient: :meth:`backward` then returns
        None, and a layer that can skip the work (a convolution's input gradient, a third of
        its backward) skips it. The parameter gradients are the same either way.

    Subclasses implement :meth:`_forward` (returning ``(y, cache)``) and :meth:`_backward`
    (returning ``(dx, grads)``), each calling the method's pure function explicitly; the
    public methods keep the bookkeeping in one place. Nothing outside a layer touches its
    private attributes: :meth:`reset` drops the saved cache.
    """

    shared_attributes: ClassVar[tuple[str, ...]] = ()  # kept, not copied, by deepcopy
    path: str | None = None
    input_grad: bool = True
    check_cases: ClassVar[tuple[CheckCase, ...]] = ()

    def __init__(self, *, dtype: Any = None, xp: ModuleType | None = None,
                 device: Any = None) -> None:
        self.xp: ModuleType = np if xp is None else xp
        self.dtype = check_param_dtype(self.xp, dtype)
        self.device = check_device(self.xp, device)
        self.params: dict[str, Array] = {}
        self.grads: dict[str, Array] = {}
        self.state: dict[str, Array] = {}
        self._cache: Any = None

    def forward(self, x: Array, training: bool) -> Array:
        """Normalize ``x``; ``training`` selects batch statistics and updates the state."""
        training = check_bool("training", training)
        y, self._cache = self._forward(x, training)
        return y

    def backward(self, dy: Array) -> Array | None:
        """Return ``dx`` for the last forward (None if :attr:`input_grad` is False) and fill
        :attr:`grads`."""
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called before forward()")
        dx, self.grads = self._backward(dy, self._cache)
        return dx if self.input_grad else None

    def compute_path(self) -> str:
        """The path this layer's pure functions take: :attr:`path` if set, else the
        process-wide choice (:func:`refnorm.dispatch.set_path`), else ``"reference"``: a
        reader who steps into a layer lands in the reference unless the caller asked for the
        fast path (``layer.path = "fast"``, as the trainer and the bench do).

        The fast path runs only where it applies (numpy arrays); see :mod:`refnorm.dispatch`.
        """
        return resolve(self.path)

    def reset(self) -> None:
        """Drop what the last forward saved: a backward now needs a new forward first.

        Call it when the parameters or the state change outside :meth:`forward` (loading a
        checkpoint, a data-dependent initialization), so that no backward runs on a cache
        made with the old values.
        """
        self._cache = None

    def _forward(self, x: Array, training: bool) -> tuple[Array, Any]:
        raise NotImplementedError

    def _backward(self, dy: Array, cache: Any) -> tuple[Array, dict[str, Array]]:
        raise NotImplementedError

    def __deepcopy__(self, memo: dict) -> Layer:
        # Array namespaces (modules) and shared_attributes (communicators) are shared,
        # everything else is copied.
        new = object.__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            keep = isinstance(value, ModuleType) or key in self.shared_attributes
            new.__dict__[key] = value if keep else copy.deepcopy(value, memo)
        return new

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.params.items())
        return f"{type(self).__name__}({shapes})"


# -- a network of layers -----------------------------------------------------------------------


def iter_layers(model: Any) -> Iterator[Layer]:
    """Every :class:`Layer` in ``model``, in order.

    ``model`` is a layer, an object with a ``layers()`` method, or a list/tuple of those.
    """
    if isinstance(model, Layer):
        yield model
    if hasattr(model, "layers") and callable(model.layers):
        for sub in model.layers():
            yield from iter_layers(sub)
    elif isinstance(model, (list, tuple)):
        for sub in model:
            yield from iter_layers(sub)


def to_device(layer_or_model: Any, device: str) -> Any:
    """Move every layer's ``params``, ``state`` and ``grads`` to ``device`` ("cpu" or "gpu"),
    in place, and return ``layer_or_model`` (a network, as for :func:`iter_layers`).

    Each array moves by :func:`refnorm.backend.move_array`; a layer whose ``xp`` is numpy or
    CuPy takes the device's namespace (``device`` becomes ``None``), and its cache, which
    holds arrays of the old device, is dropped (:meth:`Layer.reset`). ``ValueError`` for
    another device; ``RuntimeError`` for "gpu" without one, saying what was looked for
    (:func:`refnorm.backend.gpu_problem`).
    """
    if device not in DEVICES:
        raise ValueError(f"device must be 'cpu' or 'gpu'; got {device!r}")
    if device == "gpu" and (problem := gpu_problem()) is not None:
        raise RuntimeError(f"to_device(..., 'gpu'): {problem}")
    for layer in iter_layers(layer_or_model):
        for arrays in (layer.params, layer.state, layer.grads):
            for key in list(arrays):
                arrays[key] = move_array(arrays[key], device)
        if layer.xp.__name__ in ("numpy", "cupy"):
            layer.xp, layer.device = device_namespace(device), None
        layer.reset()
    return layer_or_model

"""The one interface every refnorm layer shares, and the cases ``refnorm gradcheck`` runs.

Normalizers (:mod:`refnorm.norms`), weight-side methods (:mod:`refnorm.weights`) and the
network pieces (:mod:`refnorm.nn`) are all :class:`Layer` objects: ``forward(x, training)``,
``backward(dy)``, and dicts ``params``, ``grads``, ``state``. One generic gradcheck, one
property suite and the CLI then serve all of them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, ClassVar

from refnorm.backend import Array
from refnorm.core.checks import check_bool
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

    Attributes
    ----------
    params : dict of str to array
        Learnable parameters (``gamma``, ``beta``, ...).
    grads : dict of str to array
        Gradients of the last :meth:`backward`, same keys as ``params``.
    state : dict of str to array
        Non-learned state saved with a model (running statistics); may be empty.

    Subclasses implement :meth:`_forward` (returning ``(y, cache)``) and :meth:`_backward`
    (returning ``(dx, grads)``), each calling the method's pure function explicitly; the
    public methods keep the bookkeeping in one place. Nothing outside a layer touches its
    private attributes: :meth:`reset` drops the saved cache.
    """

    shared_attributes: ClassVar[tuple[str, ...]] = ()  # kept, not copied, by deepcopy
    #: "reference", "fast", or None: the process-wide choice, else "fast" (refnorm.dispatch)
    path: str | None = None
    check_cases: ClassVar[tuple[CheckCase, ...]] = ()

    def __init__(self) -> None:
        self.params: dict[str, Array] = {}
        self.grads: dict[str, Array] = {}
        self.state: dict[str, Array] = {}
        self._cache: Any = None

    def forward(self, x: Array, training: bool) -> Array:
        """Normalize ``x``; ``training`` selects batch statistics and updates the state."""
        training = check_bool("training", training)
        y, self._cache = self._forward(x, training)
        return y

    def backward(self, dy: Array) -> Array:
        """Return ``dx`` for the last forward and fill :attr:`grads`."""
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called before forward()")
        dx, self.grads = self._backward(dy, self._cache)
        return dx

    def compute_path(self) -> str:
        """The path this layer's pure functions take: :attr:`path` if set, else the
        process-wide choice (:func:`refnorm.dispatch.set_path`), else ``"fast"``.

        The fast path runs only where it applies (numpy arrays); see :mod:`refnorm.dispatch`.
        """
        return resolve(self.path, default="fast")

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

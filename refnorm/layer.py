"""The one interface every refnorm layer shares, the cases ``refnorm gradcheck`` runs, the
two walkers over a network of layers, and a layer made of two functions.

:func:`from_functions` turns a forward/backward pair (a lesson's exercise, a method being
tried out) into a :class:`Layer`.

Normalizers (:mod:`refnorm.norms`), weight-side methods (:mod:`refnorm.weights`) and the
network pieces (:mod:`refnorm.nn`) are all :class:`Layer` objects: ``forward(x, training)``,
``backward(dy)``, and dicts ``params``, ``grads``, ``state``. One generic gradcheck, one
property suite and the CLI then serve all of them. A network is a layer, an object with a
``layers()`` method, or a list/tuple of those: :func:`iter_layers` walks it and
:func:`to_device` moves it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from refnorm.backend import (
    DEVICES,
    Array,
    array_namespace,
    device_namespace,
    device_of,
    gpu_problem,
    move_array,
)
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
        self._cache = None  # a forward that raises leaves nothing for a backward to use
        training = check_bool("training", training)
        self._check_input(x)
        y, self._cache = self._forward(x, training)
        return y

    def backward(self, dy: Array) -> Array | None:
        """Return ``dx`` for the last forward (None if :attr:`input_grad` is False) and fill
        :attr:`grads`."""
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called before forward() (or "
                               "after a forward() that raised, or a reset())")
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

    def _check_input(self, x: Array) -> None:
        """Refuse an input this layer was not built for, in the layer's terms (a subclass
        knows its channel count); the pure functions check everything else."""

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


# -- a layer from two functions ---------------------------------------------------------------


class FunctionLayer(Layer):
    """A :class:`Layer` whose forward and backward are two given functions; build one with
    :func:`from_functions`, which documents the contract."""

    def __init__(self, forward: Callable[..., Any], backward: Callable[..., Any], *,
                 params: Mapping[str, Array], state: Mapping[str, Array] | None = None,
                 name: str | None = None) -> None:
        for what, fn in (("forward", forward), ("backward", backward)):
            if not callable(fn):
                raise TypeError(f"{what} must be a function; got {type(fn).__name__}")
        state = {} if state is None else state
        for what, given in (("params", params), ("state", state)):
            if not isinstance(given, Mapping):
                raise TypeError(f"{what} must be a dict of str to array; got "
                                f"{type(given).__name__}")
        clash = sorted(set(params) & set(state))
        if clash:
            raise ValueError(f"params and state must use different names; both have {clash}")
        arrays = [*params.values(), *state.values()]
        xp = array_namespace(*arrays) if arrays else np
        devices = [device_of(a) for a in arrays]
        if any(d != devices[0] for d in devices):
            raise ValueError(f"params and state must all be on one device; got {devices[0]!r} "
                             f"and {next(d for d in devices if d != devices[0])!r}")
        dtype = next(iter(params.values())).dtype if params else None
        super().__init__(dtype=dtype, xp=xp, device=devices[0] if arrays else None)
        self.forward_function, self.backward_function = forward, backward
        self.name = name or getattr(forward, "__name__", "forward")
        self.params = {k: xp.asarray(v, copy=True) for k, v in params.items()}
        self.state = {k: xp.asarray(v, copy=True) for k, v in state.items()}

    def _forward(self, x: Array, training: bool) -> tuple[Array, Any]:
        out = self.forward_function(x, **self.params, **self.state, training=training)
        want = 3 if self.state else 2
        if not isinstance(out, tuple) or len(out) != want:
            got = f"a tuple of {len(out)}" if isinstance(out, tuple) else type(out).__name__
            expected = "(y, cache, new_state)" if self.state else "(y, cache)"
            raise ValueError(f"{self.name} must return {expected} for a layer "
                             f"{'with' if self.state else 'without'} state; it returned {got}")
        if self.state:
            self.state = self._checked_state(out[2])
        return out[0], (out[1], tuple(x.shape))

    def _checked_state(self, new: Any) -> dict[str, Array]:
        if not isinstance(new, Mapping) or set(new) != set(self.state):
            keys = sorted(new) if isinstance(new, Mapping) else type(new).__name__
            raise ValueError(f"{self.name} must return its new state as a dict with the keys "
                             f"{sorted(self.state)}; it returned {keys}")
        for key, value in new.items():
            if not hasattr(value, "shape"):
                raise TypeError(f"{self.name} returned state {key!r} as "
                                f"{type(value).__name__}; it must be an array")
            if tuple(value.shape) != tuple(self.state[key].shape):
                raise ValueError(f"{self.name} returned state {key!r} of shape "
                                 f"{tuple(value.shape)}; it has shape "
                                 f"{tuple(self.state[key].shape)}")
        return dict(new)

    def _backward(self, dy: Array, cache: Any) -> tuple[Array, dict[str, Array]]:
        inner, x_shape = cache
        out = self.backward_function(dy, inner)
        name = getattr(self.backward_function, "__name__", "backward")
        want = 1 + len(self.params)
        if not isinstance(out, tuple) or len(out) != want:
            got = f"a tuple of {len(out)}" if isinstance(out, tuple) else type(out).__name__
            order = ", ".join(["dx", *(f"d{k}" for k in self.params)])
            raise ValueError(f"{name} must return ({order}); it returned {got}")
        dx, grads = out[0], dict(zip(self.params, out[1:], strict=True))
        for key, shape in (("x", x_shape), *((k, tuple(v.shape)) for k, v in
                                               self.params.items())):
            got = dx if key == "x" else grads[key]
            if not hasattr(got, "shape"):
                raise TypeError(f"{name} returned d{key} as {type(got).__name__}; it must be "
                                f"an array of shape {shape}")
            got_shape = tuple(got.shape)
            if got_shape != shape:
                raise ValueError(f"{name} returned d{key} of shape {got_shape}; {key} has "
                                 f"shape {shape}")
        return dx, grads

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.params.items())
        return f"FunctionLayer({self.name}: {shapes})"


def from_functions(forward: Callable[..., Any], backward: Callable[..., Any], *,
                   params: Mapping[str, Array], state: Mapping[str, Array] | None = None,
                   name: str | None = None) -> Layer:
    """Turn a forward/backward pair of functions into a :class:`Layer`.

    What a lesson's exercises produce (a student's Batch Normalization) or a method being
    tried out can then go wherever a layer goes: :func:`~refnorm.gradcheck.check_layer`, a
    list of layers, or the trainer's network (``train(config, norm_layer=...)``, see
    :class:`~refnorm.train.model.ConvNet`).

    Parameters
    ----------
    forward : callable
        Called as ``forward(x, **params, **state, training=training)`` with the layer's
        current arrays. It returns ``(y, cache)`` for a layer without state, or
        ``(y, cache, new_state)`` for a layer with state: ``new_state`` a dict with the keys
        and shapes of ``state``, the state after this forward (in evaluation mode usually the
        same arrays). Nothing else is kept between calls: ``cache`` goes to ``backward``.
    backward : callable
        Called as ``backward(dy, cache)`` with the ``cache`` of the last forward. It returns
        ``(dx, d<param 1>, ..., d<param k>)``: ``dx`` with the shape of ``x``, then one
        gradient per parameter, in the order of ``params`` and with its shape (the order
        refnorm's pure pairs use: ``batch_norm_backward`` returns ``dx, dgamma, dbeta``).
    params : dict of str to array
        The learnable parameters; the layer starts with copies. Their namespace is the
        layer's ``xp``, the first one's dtype its ``dtype`` and its device its ``device``.
    state : dict of str to array, optional
        Non-learned state (running statistics), copied likewise.
    name : str, optional
        How the layer names itself in messages and its ``repr``; default: the forward's name.

    Returns
    -------
    Layer
        Its ``forward(x, training)`` calls ``forward`` and keeps ``new_state`` as its
        ``state``; its ``backward(dy)`` calls ``backward`` and fills ``grads`` under the
        parameters' names.

    Raises
    ------
    TypeError
        If ``forward`` or ``backward`` is not callable, or ``params`` or ``state`` is not a
        dict.
        At a call, if a function returns a gradient (or a new state) that is not an array
        (None, a list, a number).
    ValueError
        If ``params`` and ``state`` share a name or their arrays lie on two devices; at a
        call, if a function returns another number of values or a gradient (or a new state)
        of another shape than its array.

    Examples
    --------
    Batch Normalization from refnorm's pure pair, with running statistics left out:

    >>> import numpy as np
    >>> from refnorm.norms.batch_norm import batch_norm_backward, batch_norm_forward
    >>> def forward(x, gamma, beta, training):
    ...     return batch_norm_forward(x, gamma, beta)
    >>> layer = from_functions(forward, batch_norm_backward,
    ...                        params={"gamma": np.ones(3), "beta": np.zeros(3)})
    >>> y = layer.forward(np.random.default_rng(0).standard_normal((4, 3, 2, 2)), True)
    >>> layer.backward(np.ones_like(y)).shape, sorted(layer.grads)
    ((4, 3, 2, 2), ['beta', 'gamma'])
    """
    return FunctionLayer(forward, backward, params=params, state=state, name=name)


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
    holds arrays of the old device, is dropped (:meth:`Layer.reset`). A model that has
    ``layers()`` and an ``xp`` of its own (:class:`refnorm.train.model.ConvNet`, which puts its
    batches beside its layers by it) takes the device's namespace too. An optimizer built
    before the move keeps its state where it was: build it after. ``ValueError`` for another
    device; ``RuntimeError`` for "gpu" without one, saying what was looked for
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
    for model in _models(layer_or_model):
        if getattr(getattr(model, "xp", None), "__name__", None) in ("numpy", "cupy"):
            model.xp, model.device = device_namespace(device), None
    return layer_or_model


def _models(model: Any) -> Iterator[Any]:
    """The containers of a network (what has ``layers()`` and is not a :class:`Layer`),
    outermost first."""
    if hasattr(model, "layers") and callable(model.layers) and not isinstance(model, Layer):
        yield model
        for sub in model.layers():
            yield from _models(sub)
    elif isinstance(model, (list, tuple)):
        for sub in model:
            yield from _models(sub)

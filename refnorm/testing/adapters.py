"""Adapters: one interface for every form of implementation :mod:`refnorm.testing` accepts.

An implementation (``impl``) may be

- a **numpy callable** ``forward(x, *params) -> y`` in training mode, with the parameters
  of :data:`refnorm.testing.reference.PARAM_NAMES` (``forward(x, gamma, beta)`` for BN);
  its optional vector-Jacobian product ``backward(dy, x, *params) -> (dx, *dparams)`` is
  passed separately;
- a callable taking and returning **any arrays with** ``__dlpack__`` (CuPy, JAX, torch
  tensors...): pass ``convert``, the function that makes such an array from a numpy array
  (``cupy.asarray``, ``jax.numpy.asarray``, ``torch.from_numpy``); results come back
  through ``numpy.from_dlpack`` (or ``.get()`` / ``.cpu()`` for device arrays);
- a **stateful object**: callable as ``impl(x, *params, training=bool)``, with attributes
  ``running_mean`` and ``running_var`` (numpy arrays, (C,)) that the adapter may assign,
  and optionally ``momentum``, ``eps`` and ``backward``;
- a **torch.nn.Module** (torch is optional): a copy is made per dtype
  (``copy.deepcopy(module).to(dtype)``), so the caller's module is never changed. Its
  ``weight``/``bias`` (BN, IN, GN, LN, and the official SN code's ``mean_weight`` /
  ``var_weight``) are set from the parameters, its running buffers are read and written,
  ``train()``/``eval()`` selects the mode, and autograd gives the vector-Jacobian product.
  A module wrapped by ``torch.nn.utils.parametrizations.weight_norm`` is a WN
  implementation: ``g`` and ``v`` go to ``original0`` and ``original1``, ``weight`` is the
  output.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from refnorm.testing.reference import PARAM_NAMES, check_method

Arrays = tuple[np.ndarray, ...]


def to_numpy(a: Any) -> np.ndarray:
    """A numpy array from the result of a user's implementation (dlpack, CuPy, torch...)."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "detach"):                          # torch: leave autograd, go to the host
        return a.detach().cpu().numpy()
    if hasattr(a, "get") and callable(a.get) and not isinstance(a, dict):  # CuPy
        return np.asarray(a.get())
    if hasattr(a, "__dlpack__"):
        try:
            return np.from_dlpack(a)
        except (BufferError, RuntimeError, TypeError):
            pass
    return np.asarray(a)


def output_array(y: Any, description: str) -> np.ndarray:
    """A forward's result as a numpy array; a tuple or list (``y`` with a cache) is refused."""
    if isinstance(y, (tuple, list)):
        raise TypeError(f"{description} returned a {type(y).__name__} of {len(y)} items; a "
                        "normalizer's forward returns its output y alone, one array")
    return to_numpy(y)


@dataclass
class Impl:
    """A user's implementation seen through one interface.

    Attributes
    ----------
    method : str
    description : str
        What it is, for reports (``torch.nn.BatchNorm2d``, ``numpy callable my_bn``).
    affine : bool
        False when the implementation has no ``gamma``/``beta`` (then tests pass ones and
        zeros).
    stateful : bool
        True when it keeps running statistics the adapter can read and set.
    has_vjp : bool
        True when :meth:`vjp` gives gradients; an entry of its result is None where the
        implementation gives none for that input (:meth:`why_none` says why).
    absent : dict
        The parameters (names of :data:`~refnorm.testing.reference.PARAM_NAMES`) the
        implementation does not have, each with a sentence saying so; gamma and beta of an
        implementation without an affine step (``affine`` False) are not listed.
    hints : dict
        What the implementation fixes: ``num_channels``, ``num_groups``, ``eps``,
        ``momentum``, ``spatial`` (number of spatial axes it accepts), ``input_shape``
        (trailing shape it requires, for LayerNorm with a multi-axis normalized shape).
    """

    method: str
    description: str
    affine: bool = True
    stateful: bool = False
    has_vjp: bool = False
    hints: dict[str, Any] = field(default_factory=dict)
    absent: dict[str, str] = field(default_factory=dict)

    def forward(self, x: np.ndarray, params: Arrays, *, training: bool = True) -> np.ndarray:
        """The implementation's output for ``x`` and ``params``, as a numpy array."""
        raise NotImplementedError

    def vjp(self, dy: np.ndarray, x: np.ndarray,
            params: Arrays) -> tuple[np.ndarray | None, ...]:
        """``(dx, *dparams)`` of the training forward, for the upstream gradient ``dy``;
        None for an input the implementation gives no gradient for."""
        raise NotImplementedError(f"{self.description} has no vector-Jacobian product")

    def why_none(self, name: str) -> str:
        """Why :meth:`vjp` gave None for input ``name`` (``"x"`` or a parameter name)."""
        return self.absent.get(name, f"the implementation gives no gradient for {name}")

    def get_running(self) -> tuple[np.ndarray, np.ndarray]:
        """The running mean and variance, (C,) each, float64."""
        raise NotImplementedError(f"{self.description} keeps no running statistics")

    def set_running(self, mean: np.ndarray, var: np.ndarray) -> None:
        """Set the running mean and variance, (C,) each."""
        raise NotImplementedError(f"{self.description} keeps no running statistics")


class CallableImpl(Impl):
    """A numpy (or dlpack, through ``convert``) callable, optionally stateful."""

    def __init__(self, method: str, fn: Any, backward: Callable[..., Any] | None,
                 convert: Callable[[np.ndarray], Any] | None) -> None:
        name = getattr(fn, "__qualname__", type(fn).__name__)
        stateful = hasattr(fn, "running_mean") and hasattr(fn, "running_var")
        backward = backward if backward is not None else getattr(fn, "backward", None)
        hints = {k: getattr(fn, k) for k in ("eps", "momentum", "num_groups", "num_channels")
                 if isinstance(getattr(fn, k, None), (int, float))}
        if stateful and "num_channels" not in hints:       # the buffers fix C
            hints["num_channels"] = int(np.size(to_numpy(fn.running_mean)))
        super().__init__(method, f"callable {name}", stateful=stateful,
                         has_vjp=backward is not None, hints=hints)
        self.fn, self.backward, self.convert = fn, backward, convert or (lambda a: a)

    def forward(self, x: np.ndarray, params: Arrays, *, training: bool = True) -> np.ndarray:
        args = [self.convert(a) for a in (x, *params)]
        if self.stateful:
            return output_array(self.fn(*args, training=training), self.description)
        if not training:
            raise ValueError(f"training must be True for {self.description}, which keeps no "
                             "running statistics; got False")
        return output_array(self.fn(*args), self.description)

    def vjp(self, dy: np.ndarray, x: np.ndarray,
            params: Arrays) -> tuple[np.ndarray | None, ...]:
        if self.backward is None:
            return super().vjp(dy, x, params)
        out = self.backward(*(self.convert(a) for a in (dy, x, *params)))
        out = out if isinstance(out, (tuple, list)) else (out,)
        return tuple(None if a is None else to_numpy(a) for a in out)

    def why_none(self, name: str) -> str:
        return f"its backward returned None for the gradient of {name}"

    def get_running(self) -> tuple[np.ndarray, np.ndarray]:
        return (np.asarray(to_numpy(self.fn.running_mean), dtype=np.float64).reshape(-1),
                np.asarray(to_numpy(self.fn.running_var), dtype=np.float64).reshape(-1))

    def set_running(self, mean: np.ndarray, var: np.ndarray) -> None:
        self.fn.running_mean = np.array(mean, copy=True)
        self.fn.running_var = np.array(var, copy=True)


class TorchModuleImpl(Impl):
    """A ``torch.nn.Module``: copied per dtype, parameters set, buffers read and written."""

    def __init__(self, method: str, module: Any) -> None:
        self.torch = __import__("torch")
        self.module = module
        self.copies: dict[Any, Any] = {}
        name = f"{type(module).__module__}.{type(module).__name__}"
        if name.startswith("torch.nn.modules."):
            name = "torch.nn." + type(module).__name__
        weight_norm = method == "wn"
        affine = weight_norm or getattr(module, "weight", None) is not None
        stateful = getattr(module, "running_mean", None) is not None
        super().__init__(method, name, affine=affine, stateful=stateful, has_vjp=True,
                         hints=_torch_hints(module))
        for param in PARAM_NAMES[method] if not weight_norm else ():
            attr = _TORCH_PARAM[param]
            if getattr(module, attr, None) is None and (affine or param not in ("gamma",
                                                                                "beta")):
                self.absent[param] = (f"the module has no parameter {attr!r} for {param}, so "
                                      f"its output cannot depend on {param}; refnorm's does")

    def _copy(self, dtype: Any) -> Any:
        key = np.dtype(dtype)
        if key not in self.copies:
            tdtype = getattr(self.torch, key.name)
            self.copies[key] = copy.deepcopy(self.module).to(tdtype)
        return self.copies[key]

    def _run(self, x: np.ndarray, params: Arrays, training: bool, grad: bool) -> tuple:
        torch = self.torch
        m = self.last = self._copy(x.dtype)
        m.train(training)
        tensors = [torch.tensor(np.asarray(p), dtype=getattr(torch, x.dtype.name),
                                requires_grad=grad) for p in params]
        if self.method == "wn":
            pw = m.parametrizations.weight
            g, v = tensors[0], torch.tensor(x, requires_grad=grad)
            with torch.no_grad():
                pw.original0.copy_(g.reshape(pw.original0.shape))
                pw.original1.copy_(v)
            for p in (pw.original0, pw.original1):
                p.grad = None
                p.requires_grad_(grad)         # the copy's: a frozen module has gradients too
            return m, m.weight, (pw.original1, pw.original0)
        xt = torch.tensor(x, requires_grad=grad)
        leaves = [xt]
        for name, t in zip(PARAM_NAMES[self.method], tensors, strict=True):
            attr = _TORCH_PARAM[name]
            p = getattr(m, attr, None)
            if p is None:
                continue
            with torch.no_grad():
                p.copy_(_broadcast_param(torch, t, p.shape))
            p.grad = None
            p.requires_grad_(grad)             # the copy's: a frozen module has gradients too
            leaves.append(p)
        return m, m(xt), tuple(leaves)

    def forward(self, x: np.ndarray, params: Arrays, *, training: bool = True) -> np.ndarray:
        with self.torch.no_grad():
            _, y, _ = self._run(x, params, training, grad=False)
        return output_array(y, self.description)

    def vjp(self, dy: np.ndarray, x: np.ndarray,
            params: Arrays) -> tuple[np.ndarray | None, ...]:
        torch = self.torch
        m, y, leaves = self._run(x, params, True, grad=True)
        if y.requires_grad:                   # else it depends on no input: every grad None
            (y * torch.tensor(np.asarray(dy, dtype=x.dtype))).sum().backward()
        grads = [None if leaf.grad is None else to_numpy(leaf.grad) for leaf in leaves]
        if self.method == "wn":
            return grads[0], None if grads[1] is None else grads[1].reshape(-1)
        out = [grads[0]]
        for name in PARAM_NAMES[self.method]:
            p = getattr(m, _TORCH_PARAM[name], None)
            out.append(None if p is None or p.grad is None else
                       _reduce_param_grad(to_numpy(p.grad), name))
        return tuple(out)

    def why_none(self, name: str) -> str:
        if name in self.absent:
            return self.absent[name]
        attr = {"x": "the input", "v": "parametrizations.weight.original1",
                "g": "parametrizations.weight.original0"}.get(name, _TORCH_PARAM.get(name))
        return (f"the gradient of {name} ({attr}) is None after backward: the module's output "
                f"does not depend on it; refnorm's does")

    def _buffers(self) -> list[Any]:
        return [m for m in self.copies.values()] or [self._copy(np.float64)]

    def get_running(self) -> tuple[np.ndarray, np.ndarray]:
        m = getattr(self, "last", None) or self._buffers()[-1]
        return (to_numpy(m.running_mean).astype(np.float64).reshape(-1),
                to_numpy(m.running_var).astype(np.float64).reshape(-1))

    def set_running(self, mean: np.ndarray, var: np.ndarray) -> None:
        torch = self.torch
        for m in self._buffers():
            with torch.no_grad():
                m.running_mean.copy_(torch.tensor(mean).reshape(m.running_mean.shape))
                m.running_var.copy_(torch.tensor(var).reshape(m.running_var.shape))
                if getattr(m, "num_batches_tracked", None) is not None:
                    m.num_batches_tracked.zero_()


_TORCH_PARAM = {"gamma": "weight", "beta": "bias", "mean_logits": "mean_weight",
                "var_logits": "var_weight"}


def _broadcast_param(torch: Any, t: Any, shape: Any) -> Any:
    """A (C,) parameter as the module holds it: (C,), (1, C, 1, 1) or LayerNorm's (C, H, W)."""
    if tuple(shape) == tuple(t.shape):
        return t
    if len(shape) >= 2 and shape[0] == 1:                         # (1, C, 1, ...)
        return t.reshape(shape)
    return t.reshape((-1,) + (1,) * (len(shape) - 1)).expand(shape)   # (C, *rest)


def _reduce_param_grad(g: np.ndarray, name: str) -> np.ndarray:
    """The gradient of a (C,) parameter from the module's parameter gradient."""
    if name in ("mean_logits", "var_logits"):
        return g.reshape(-1)
    if g.ndim >= 2 and g.shape[0] == 1:                           # (1, C, 1, ...)
        return g.reshape(-1)
    return g.reshape(g.shape[0], -1).sum(axis=1) if g.ndim > 1 else g


def _torch_hints(module: Any) -> dict[str, Any]:
    """Channels, groups, eps, momentum and the input rank a torch module fixes."""
    hints: dict[str, Any] = {}
    for attr, key in (("num_features", "num_channels"), ("num_channels", "num_channels"),
                      ("num_groups", "num_groups"), ("eps", "eps"), ("momentum", "momentum")):
        value = getattr(module, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            hints[key] = value
    if getattr(module, "momentum", 0) is None:
        hints["momentum"] = None
    shape = getattr(module, "normalized_shape", None)
    if shape is not None:                                         # LayerNorm
        hints["num_channels"] = int(shape[0])
        hints["spatial"] = len(shape) - 1
        hints["input_shape"] = tuple(int(s) for s in shape)
        weight = getattr(module, "weight", None)
        if weight is not None and len(weight.shape) > 1:          # one gain per element
            hints["gain_shape"] = tuple(int(s) for s in weight.shape)
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and hasattr(parametrizations, "weight"):   # weight_norm
        hints["weight_shape"] = tuple(parametrizations.weight.original1.shape)
        hints["num_channels"] = hints["weight_shape"][0]
    name = type(module).__name__
    for k in (1, 2, 3):
        if name.endswith(f"{k}d"):
            hints["spatial"] = k
    return hints


def as_impl(method: str, impl: Any, *, backward: Callable[..., Any] | None = None,
            convert: Callable[[np.ndarray], Any] | None = None) -> Impl:
    """Wrap ``impl`` (see the module docstring) as an :class:`Impl`.

    Parameters
    ----------
    method : str, one of :data:`refnorm.testing.reference.METHODS`
    impl : callable, stateful object, torch.nn.Module, or an :class:`Impl` (returned as is)
    backward : callable, optional
        ``backward(dy, x, *params) -> (dx, *dparams)`` for a callable ``impl``.
    convert : callable, optional
        numpy array -> the array type ``impl`` takes (dlpack callables).

    Returns
    -------
    Impl
    """
    method = check_method(method)
    if isinstance(impl, Impl):
        return impl
    torch_module = _is_torch_module(impl)
    if torch_module:
        if backward is not None or convert is not None:
            raise ValueError("backward and convert must be None for a torch.nn.Module impl "
                             "(autograd gives the vector-Jacobian product); got "
                             f"backward={backward!r}, convert={convert!r}")
        return TorchModuleImpl(method, impl)
    if not callable(impl):
        raise TypeError(f"impl must be a callable, a stateful object or a torch.nn.Module; "
                        f"got {type(impl).__name__}")
    _check_arity(method, impl)
    return CallableImpl(method, impl, backward, convert)


def _is_torch_module(obj: Any) -> bool:
    torch = __import__("sys").modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def _check_arity(method: str, fn: Callable[..., Any]) -> None:
    """Refuse a callable that cannot take ``x`` and the method's parameters positionally."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):   # builtins, C extensions: trust the caller
        return
    want = 1 + len(PARAM_NAMES[method])
    try:
        sig.bind(*range(want))
    except TypeError:
        try:
            sig.bind(*range(want), training=True)
            return
        except TypeError:
            pass
        names = ", ".join(("x",) + PARAM_NAMES[method])
        raise TypeError(f"impl must take ({names}) positionally for method {method!r}; "
                        f"got a callable with signature {sig}") from None

"""The glue between :mod:`refnorm.testing` and refnorm's public functions, in one place.

Everything else in :mod:`refnorm.testing` reaches refnorm through :func:`forward`,
:func:`backward`, :func:`running_update` and :func:`describe`, so a change of a refnorm
signature is a one-line fix here.

Methods, their inputs and their parameters (the positional order a user's callable takes):

======  =====================================  =========================================
method  input                                  parameters
======  =====================================  =========================================
bn      x (N, C, *spatial)                     gamma (C,), beta (C,)
in      x (N, C, *spatial), spatial non-empty  gamma (C,), beta (C,)
ln      x (N, C, *spatial)                     gamma (C,), beta (C,)
gn      x (N, C, *spatial)                     gamma (C,), beta (C,)
sn      x (N, C, *spatial), spatial non-empty  gamma (C,), beta (C,), mean_logits (3,),
                                               var_logits (3,) (scopes IN, LN, BN)
ws      w (C_out, ...)                         none
wn      v (C_out, ...)                         g (C_out,)
======  =====================================  =========================================

Options (the keyword arguments of refnorm's function): ``eps`` for every method,
``num_groups`` for gn, ``options`` (a :class:`refnorm.SwitchableOptions`) for sn,
``eps_mode`` and ``correction`` for ws.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import refnorm
import refnorm.weights
from refnorm.core.running import update_running_stats

METHODS = ("bn", "in", "ln", "gn", "sn", "ws", "wn")
ACTIVATION_METHODS = ("bn", "in", "ln", "gn", "sn")
PARAM_NAMES: dict[str, tuple[str, ...]] = {
    "bn": ("gamma", "beta"),
    "in": ("gamma", "beta"),
    "ln": ("gamma", "beta"),
    "gn": ("gamma", "beta"),
    "sn": ("gamma", "beta", "mean_logits", "var_logits"),
    "ws": (),
    "wn": ("g",),
}
SN_SCOPES = refnorm.SwitchableOptions().scopes  # the scopes of the reference, in its order

_FORWARD = {
    "bn": lambda x, p, o: refnorm.batch_norm_forward(x, *p, eps=o["eps"]),
    "in": lambda x, p, o: refnorm.instance_norm_forward(x, *p, eps=o["eps"]),
    "ln": lambda x, p, o: refnorm.layer_norm_forward(x, *p, eps=o["eps"]),
    "gn": lambda x, p, o: refnorm.group_norm_forward(x, *p, num_groups=o["num_groups"],
                                                     eps=o["eps"]),
    "sn": lambda x, p, o: refnorm.switchable_norm_forward(
        x, *p, eps=o["eps"], options=o.get("options", refnorm.SwitchableOptions())),
    "ws": lambda x, p, o: refnorm.weights.weight_standardization_forward(
        x, eps=o["eps"], eps_mode=o.get("eps_mode", "add"), correction=o.get("correction", 0)),
    "wn": lambda x, p, o: refnorm.weights.weight_norm_forward(x, *p, eps=o["eps"]),
}
_BACKWARD: dict[str, Any] = {
    "bn": refnorm.batch_norm_backward,
    "in": refnorm.instance_norm_backward,
    "ln": refnorm.layer_norm_backward,
    "gn": refnorm.group_norm_backward,
    "sn": refnorm.switchable_norm_backward,
    "ws": refnorm.weights.weight_standardization_backward,
    "wn": refnorm.weights.weight_norm_backward,
}
_FUNCTION_NAMES = {
    "bn": "refnorm.batch_norm_forward",
    "in": "refnorm.instance_norm_forward",
    "ln": "refnorm.layer_norm_forward",
    "gn": "refnorm.group_norm_forward",
    "sn": "refnorm.switchable_norm_forward",
    "ws": "refnorm.weights.weight_standardization_forward",
    "wn": "refnorm.weights.weight_norm_forward",
}


def check_method(method: object) -> str:
    """Return ``method`` if it is one of :data:`METHODS`; raise ``ValueError`` otherwise."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    return str(method)


def forward(method: str, x: np.ndarray, params: tuple[np.ndarray, ...],
            options: dict[str, Any]) -> tuple[np.ndarray, Any]:
    """refnorm's training forward of ``method``: ``(y, cache)``.

    Parameters
    ----------
    method : str, one of :data:`METHODS`
    x : array, the method's input
    params : tuple of arrays, in the order of :data:`PARAM_NAMES`
    options : dict, the keyword options (see the module docstring)
    """
    return _FORWARD[method](x, tuple(params), options)


def backward(method: str, dy: np.ndarray, cache: Any) -> tuple[np.ndarray, ...]:
    """refnorm's backward: ``(dx, *dparams)``, one gradient per entry of :data:`PARAM_NAMES`."""
    grads = _BACKWARD[method](dy, cache)
    return grads if isinstance(grads, tuple) else (grads,)


def running_update(mean: np.ndarray, var: np.ndarray, batch_mean: np.ndarray,
                   batch_var: np.ndarray, *, count: int,
                   momentum: float) -> tuple[np.ndarray, np.ndarray]:
    """refnorm's running-statistics update (PyTorch's convention); ``batch_var`` biased."""
    return update_running_stats(mean, var, batch_mean, batch_var, count=count,
                                momentum=momentum)


def describe(method: str, options: dict[str, Any]) -> str:
    """The refnorm call with ``options``, e.g. ``refnorm.batch_norm_forward(..., eps=1e-05)``."""
    shown = []
    for key in ("num_groups", "eps", "eps_mode", "correction"):
        if key in options:
            shown.append(f"{key}={options[key]!r}")
    if "options" in options:
        o = options["options"]
        shown.append(f"options=SwitchableOptions(scopes={o.scopes!r}, "
                     f"in_correction={o.in_correction}, hard={o.hard})")
    return f"{_FUNCTION_NAMES[method]}({', '.join(shown)})"


def group_ids(method: str, shape: tuple[int, ...], *, num_groups: int | None = None,
              layout: str = "consecutive") -> np.ndarray:
    """Which statistic each element of an input of ``shape`` belongs to.

    Parameters
    ----------
    method : {"bn", "in", "ln", "gn", "ws", "wn"}
    shape : tuple of int
    num_groups : int, for gn
    layout : {"consecutive", "interleaved"}, for gn
        Channel c is in group ``c // (C / G)`` (consecutive, refnorm's and PyTorch's) or
        ``c % G`` (interleaved).

    Returns
    -------
    ids : int array, ``shape``, values 0 .. (number of statistics - 1)
    """
    idx = np.indices(shape)
    if method in ("ws", "wn"):
        return idx[0]
    N, C = shape[:2]
    n, c = idx[0], idx[1]
    if method == "bn":
        return c
    if method == "in":
        return n * C + c
    if method == "ln":
        return n
    if method == "gn":
        if num_groups is None:
            raise ValueError("num_groups must be given for method 'gn'; got None")
        g = c // (C // num_groups) if layout == "consecutive" else c % num_groups
        return n * num_groups + g
    raise ValueError(f"method must be one of bn, in, ln, gn, ws, wn; got {method!r}")

"""Check a backward against central finite differences of a vector-Jacobian product.

For a function ``y = f(**inputs)`` and its claimed backward, draw a random upstream gradient
``dy`` (standard normal, never all ones, so every output element is weighted differently),
form the scalar ``L = sum(f(**inputs) * dy)`` and compare each claimed gradient with

    dL/du_i ~ (L(u_i + h) - L(u_i - h)) / (2 h)

element by element, everything in float64. The reported error for one gradient is

    max_rel_error = max_i |analytic_i - numeric_i| / max(max_i |analytic_i|, max_i |numeric_i|)

the largest deviation relative to the gradient's scale. (An element-wise ratio would blow up
on entries that are zero up to rounding, which a normalizer's dx has by construction.)

Use :func:`check_vjp` for a pure forward/backward pair, :func:`check_layer` for a layer
object, and :func:`check_registered` for a normalizer registered by name (what the
``refnorm gradcheck`` command runs).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from refnorm import registry
from refnorm.backend import Array, array_namespace, to_numpy

__all__ = [
    "CaseResult",
    "GradError",
    "check_layer",
    "check_registered",
    "check_vjp",
    "numerical_vjp",
    "relative_error",
]

DEFAULT_STEP = 1e-6
_DY_STREAM = 0x6479  # "dy"


@dataclass(frozen=True)
class GradError:
    """How far one analytic gradient is from its finite-difference estimate."""

    max_rel_error: float
    max_abs_error: float


def relative_error(analytic: np.ndarray, numeric: np.ndarray) -> GradError:
    """Max absolute deviation, and that deviation relative to the larger gradient's max."""
    analytic = np.asarray(analytic, dtype=np.float64)
    numeric = np.asarray(numeric, dtype=np.float64)
    if analytic.shape != numeric.shape:
        raise ValueError(
            f"analytic gradient has shape {analytic.shape}, numeric {numeric.shape}"
        )
    if analytic.size == 0:
        return GradError(0.0, 0.0)
    abs_err = float(np.max(np.abs(analytic - numeric)))
    scale = float(max(np.max(np.abs(analytic)), np.max(np.abs(numeric))))
    if not (math.isfinite(abs_err) and math.isfinite(scale)):
        return GradError(math.inf, math.inf)
    if scale == 0.0:
        return GradError(0.0, 0.0)
    return GradError(abs_err / scale, abs_err)


def numerical_vjp(
    f: Callable[..., Array],
    inputs: Mapping[str, np.ndarray],
    dy: np.ndarray,
    wrt: str,
    *,
    step: float = DEFAULT_STEP,
) -> np.ndarray:
    """Central-difference estimate of ``d sum(f(**inputs) * dy) / d inputs[wrt]``.

    ``f`` receives float64 numpy arrays (copies; the caller's arrays are not touched) and
    may return any array ``to_numpy`` understands.
    """
    args = {k: np.array(v, dtype=np.float64) for k, v in inputs.items()}
    u = args[wrt].reshape(-1)  # a view: writing u perturbs args[wrt]
    grad = np.empty(u.size, dtype=np.float64)
    for i in range(u.size):
        original = u[i]
        u[i] = original + step
        plus = np.sum(to_numpy(f(**args)) * dy)
        u[i] = original - step
        minus = np.sum(to_numpy(f(**args)) * dy)
        u[i] = original
        grad[i] = (plus - minus) / (2.0 * step)
    return grad.reshape(args[wrt].shape)


def check_vjp(
    f: Callable[..., Array],
    vjp: Callable[..., Mapping[str, Array]],
    inputs: Mapping[str, Any],
    *,
    seed: int = 0,
    step: float = DEFAULT_STEP,
) -> dict[str, GradError]:
    """Compare a claimed backward with finite differences, for every gradient it returns.

    Parameters
    ----------
    f : callable
        ``f(**inputs) -> y``.
    vjp : callable
        ``vjp(dy, **inputs) -> {name: gradient}``, the backward under test; each name must
        be a key of ``inputs``.
    inputs : dict of str to array
        The point to check at; converted to float64 numpy arrays.
    seed : int
        Seeds the random upstream gradient (a stream distinct from ``default_rng(seed)``).
    step : float
        The finite-difference step ``h``.

    Returns
    -------
    dict of str to GradError, one per gradient ``vjp`` returned
    """
    args = {k: np.array(to_numpy(v), dtype=np.float64) for k, v in inputs.items()}
    y = to_numpy(f(**args))
    # A stream of its own: default_rng(seed) would give a caller who drew x with the same
    # seed dy = (x - 12) / 5, which lies in the span a normalizer's backward projects out.
    dy = np.random.default_rng([seed, _DY_STREAM]).standard_normal(y.shape)
    analytic = vjp(dy, **args)
    unknown = set(analytic) - set(args)
    if unknown:
        raise ValueError(f"vjp returned gradients for unknown inputs: {sorted(unknown)}")
    return {
        name: relative_error(to_numpy(grad), numerical_vjp(f, args, dy, name, step=step))
        for name, grad in analytic.items()
    }


def check_layer(
    layer: Any,
    x: Any,
    *,
    training: bool = True,
    seed: int = 0,
    step: float = DEFAULT_STEP,
) -> dict[str, GradError]:
    """Check a layer's ``backward`` for ``x`` and every parameter, in float64.

    The layer is not modified: every evaluation runs on a float64 copy whose parameters and
    state are converted to float64 in the layer's array namespace.

    Returns
    -------
    dict with key ``"x"`` and one key per parameter, to GradError
    """
    template = copy.deepcopy(layer)
    xp = array_namespace(*template.params.values()) if template.params else np

    def as_layer_array(a: np.ndarray) -> Array:
        return xp.asarray(np.asarray(a, dtype=np.float64))

    template.state = {k: as_layer_array(to_numpy(v)) for k, v in template.state.items()}

    def probe(params: Mapping[str, np.ndarray]) -> Any:
        p = copy.deepcopy(template)
        p.params = {k: as_layer_array(v) for k, v in params.items()}
        return p

    def f(x: np.ndarray, **params: np.ndarray) -> Array:
        return probe(params).forward(as_layer_array(x), training)

    def vjp(dy: np.ndarray, x: np.ndarray, **params: np.ndarray) -> dict[str, Array]:
        p = probe(params)
        p.forward(as_layer_array(x), training)
        dx = p.backward(as_layer_array(dy))
        return {"x": dx, **p.grads}

    inputs = {"x": to_numpy(x), **{k: to_numpy(v) for k, v in layer.params.items()}}
    return check_vjp(f, vjp, inputs, seed=seed, step=step)


@dataclass(frozen=True)
class CaseResult:
    """The errors of one registered normalizer on one :class:`~refnorm.norms.CheckCase`."""

    normalizer: str
    shape: tuple[int, ...]
    options: dict[str, Any]
    training: bool
    errors: dict[str, GradError]


def check_registered(name: str, *, seed: int = 0) -> list[CaseResult]:
    """Run :func:`check_layer` on every check case of the normalizer registered as ``name``.

    Inputs are ``5 * randn + 12`` so the mean subtraction is exercised; parameters and
    running statistics are drawn at random around their usual values so that every term of
    the backward matters.
    """
    cls = registry.layer_class(name)
    rng = np.random.default_rng(seed)
    results = []
    for case in cls.check_cases:
        layer = registry.build(name, case.shape[1], dtype=np.float64, **case.options)
        layer.params = {
            k: v + 0.5 * rng.standard_normal(v.shape) for k, v in layer.params.items()
        }
        layer.state = _random_state(layer.state, rng)
        x = 5.0 * rng.standard_normal(case.shape) + 12.0
        errors = check_layer(layer, x, training=case.training, seed=int(rng.integers(2**31)))
        results.append(
            CaseResult(name, tuple(case.shape), dict(case.options), case.training, errors)
        )
    return results


def _random_state(state: Mapping[str, np.ndarray], rng: np.random.Generator) -> dict:
    """Running statistics near the statistics of ``5 * randn + 12`` inputs."""
    out = {}
    for k, v in state.items():
        if k.endswith("mean"):
            out[k] = 12.0 + rng.standard_normal(v.shape)
        elif k.endswith("var"):
            out[k] = 25.0 * rng.uniform(0.5, 1.5, v.shape)
        else:
            out[k] = v
    return out

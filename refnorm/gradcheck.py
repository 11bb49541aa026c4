"""Check a backward against central finite differences of a vector-Jacobian product.

For a function ``y = f(**inputs)`` and its claimed backward, draw a random upstream gradient
``dy`` (standard normal, never all ones, so every output element is weighted differently),
form the scalar ``L = sum(f(**inputs) * dy)`` and compare each claimed gradient ``a`` with

    n_i = (L(u_i + h) - L(u_i - h)) / (2 h)

element by element, everything in float64.

The error measure
-----------------
A finite difference is only as good as the two values of ``L`` it subtracts. Each is a sum of
products of size ``|y_j dy_j|`` computed in floating point, so it carries a rounding error of
order ``eps * S`` with ``S = sum_j |y_j dy_j|`` (``eps`` the machine epsilon of ``y``'s dtype,
2.2e-16 for float64), and dividing by the step turns that into an absolute error of every
``n_i`` of order ``eps * S / h``. This *noise floor* has the size of the outputs, not of the
gradient: when the true gradient is tiny (Switchable Normalization with a saturated softmax
has ratio gradients ~2e-5 beside outputs of size 1) the noise alone is a large part of it.

So the deviation is measured beyond that floor, as ``numpy.allclose`` does with an ``atol``::

    deviation = max_i |a_i - n_i|
    scale     = max(max_i |a_i|, max_i |n_i|)
    fd_noise  = ROUNDING_SAFETY * eps * S / h                         (the atol)
    error     = max(deviation - fd_noise, 0) / scale                  (GradError.max_rel_error)

and ``error <= tol`` is exactly ``deviation <= fd_noise + tol * scale``. A relative measure
(rather than element-wise ratios) because a normalizer's ``dx`` has entries that are zero up
to rounding by construction. ``ROUNDING_SAFETY`` is measured, not guessed: over 750 gradients
of correct float64 SN backwards (every scope combination, ``5 * randn + 12`` inputs, logits
up to 5 standard deviations apart), the deviation reached at most 2.1 ``eps * S / h``; the
factor 10 leaves a margin of about 5. ``GradError`` also keeps ``max_abs_error``, ``scale`` and
``fd_noise``, so ``raw_rel_error = deviation / scale`` (the measure without a floor) can be
read as well.

What the floor cannot see. A backward whose mistakes are smaller than ``fd_noise`` in absolute
size passes: on a gradient whose whole scale is below the floor even a backward that returns
zeros passes, because finite differences at this step cannot tell it from the truth (check
such a gradient at a point where it is larger, or with a larger ``h``). The floor counts the
rounding of ``L`` with ``y`` correct to a few ulps; a forward whose own rounding error is
much larger than ``eps * |y|`` (one that cancels large terms, e.g. a normalizer fed
``|mean| >> std``) makes the real noise larger than the floor, and the check then fails a
correct backward: loudly, never silently. Measured: SN over ("ln", "bn") on (3, 2) inputs
``5 * randn + 12`` whose two LN values lie 0.014 apart deviates by 6.7 floors (by at most 0.5
floor when every group's spread is above 0.5). The truncation error of central differences,
``h**2 / 6 * |d^3 L / du^3|`` (about 1.7e-13 times the third derivative at ``h = 1e-6``), is
not modelled; it matters only for functions whose third derivatives exceed ``1e4 * S`` or so
(a tiny variance with a tiny ``eps``), and it too can only make a correct backward fail.

Use :func:`check_vjp` for a pure forward/backward pair, :func:`check_layer` for a layer
object, and :func:`check_registered` for a layer registered by name (what the
``refnorm gradcheck`` command runs); all three report this measure.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from refnorm import registry
from refnorm.backend import Array, array_namespace, device_of, on_device, to_numpy
from refnorm.core.checks import check_float_array, is_int
from refnorm.dispatch import check_path
from refnorm.layer import Layer

__all__ = [
    "CaseResult",
    "GradError",
    "check_layer",
    "check_registered",
    "check_vjp",
    "finite_difference_noise",
    "numerical_vjp",
    "relative_error",
]

DEFAULT_STEP = 1e-6


def _check_step(step: object) -> float:
    """A finite-difference step: a finite real number > 0 (0 divides by zero; a negative step
    makes the noise floor negative, so a right backward shows an error)."""
    if isinstance(step, bool) or not isinstance(step, (int, float, np.integer, np.floating)):
        raise TypeError(f"step must be a float; got {type(step).__name__}")
    if not (math.isfinite(step) and step > 0):
        raise ValueError(f"step must be finite and > 0; got {step}")
    return float(step)


def _check_seed(seed: object) -> int:
    """A seed: an int >= 0 (numpy's too, not a bool), as numpy's generators take."""
    if not is_int(seed):
        raise TypeError(f"seed must be an int >= 0; got {seed!r}")
    if operator.index(seed) < 0:
        raise ValueError(f"seed must be an int >= 0; got {seed!r}")
    return operator.index(seed)


def _as_float64(name: str, value: Any) -> np.ndarray:
    """``value`` (an array of any namespace, or a Python number) as a float64 numpy array."""
    try:
        return np.array(to_numpy(value), dtype=np.float64)
    except (AttributeError, TypeError):
        if isinstance(value, (int, float, np.number)):
            return np.array(value, dtype=np.float64)
        raise TypeError(f"{name} must be an array; got {type(value).__name__}") from None
# Measured: correct float64 backwards deviate from central differences by at most 2.1
# eps * S / h (750 SN gradients, see the module docstring); 10 leaves a margin of about 5.
ROUNDING_SAFETY = 10.0
_DY_STREAM = 0x6479  # "dy"


@dataclass(frozen=True)
class GradError:
    """How far one analytic gradient is from its finite-difference estimate.

    Attributes
    ----------
    max_rel_error : float
        ``max(max_abs_error - fd_noise, 0) / scale``: the deviation beyond the
        finite-difference noise floor, relative to the gradient's scale. Tolerances are
        compared with this (0 when the deviation is within the noise; inf when a value is
        not finite; a deviation implies a nonzero scale, so it is never a ratio over 0).
    max_abs_error : float
        ``max_i |analytic_i - numeric_i|``.
    scale : float
        ``max(max_i |analytic_i|, max_i |numeric_i|)``.
    fd_noise : float
        The noise floor (an absolute tolerance), see :func:`finite_difference_noise`; 0 when
        the caller gave none.
    """

    max_rel_error: float
    max_abs_error: float
    scale: float = math.nan
    fd_noise: float = 0.0

    @property
    def raw_rel_error(self) -> float:
        """``max_abs_error / scale``: the measure without the noise floor."""
        if self.max_abs_error == 0.0:
            return 0.0
        return self.max_abs_error / self.scale if self.scale > 0 else math.inf


def finite_difference_noise(y: np.ndarray, dy: np.ndarray, step: float) -> float:
    """The absolute error central differences of ``L = sum(y * dy)`` can carry.

    ``ROUNDING_SAFETY * eps * sum(|y * dy|) / step``, with ``eps`` the machine epsilon of
    ``y``'s dtype: the rounding error of the two sums that each difference subtracts,
    divided by the step (see the module docstring for what it leaves out).

    Parameters
    ----------
    y : array, any shape
        The function's output at the point checked.
    dy : array, same shape as ``y``
        The upstream gradient.
    step : float
        The finite-difference step ``h``.
    """
    step = _check_step(step)
    y = np.asarray(y)
    eps = float(np.finfo(y.dtype if np.issubdtype(y.dtype, np.floating) else np.float64).eps)
    return ROUNDING_SAFETY * eps * float(np.sum(np.abs(y * dy))) / step


def relative_error(analytic: np.ndarray, numeric: np.ndarray, *,
                   noise: float = 0.0) -> GradError:
    """The deviation of ``analytic`` from ``numeric`` beyond ``noise``, relative to their scale.

    Parameters
    ----------
    analytic, numeric : array, same shape
        The claimed gradient and its finite-difference estimate.
    noise : float, default 0
        An absolute tolerance: deviations up to it count as zero (the finite-difference
        noise floor for :func:`check_vjp`; 0 gives the plain ratio
        ``max|a - n| / max(max|a|, max|n|)``).

    Returns
    -------
    GradError
        All zeros for empty arrays; ``max_rel_error``, ``max_abs_error`` and ``scale`` inf
        when a value is not finite.

    Raises
    ------
    ValueError
        If the two shapes differ, or ``noise`` is not a finite number >= 0 (checked once the
        values are known finite: a NaN forward's floor is NaN, its error inf).
    """
    analytic = np.asarray(analytic, dtype=np.float64)
    numeric = np.asarray(numeric, dtype=np.float64)
    if analytic.shape != numeric.shape:
        raise ValueError(
            f"analytic gradient has shape {analytic.shape}, numeric {numeric.shape}"
        )
    if analytic.size == 0:
        return GradError(0.0, 0.0, 0.0, noise)
    abs_err = float(np.max(np.abs(analytic - numeric)))
    scale = float(max(np.max(np.abs(analytic)), np.max(np.abs(numeric))))
    if not (math.isfinite(abs_err) and math.isfinite(scale)):
        return GradError(math.inf, math.inf, math.inf, noise)
    if not (math.isfinite(noise) and noise >= 0):  # NaN gave a NaN error, < 0 divided by 0
        raise ValueError(f"noise must be finite and >= 0; got {noise}")
    excess = max(abs_err - noise, 0.0)
    if excess == 0.0:
        return GradError(0.0, abs_err, scale, noise)
    return GradError(excess / scale, abs_err, scale, noise)  # excess > 0: scale >= it > 0


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

    Parameters
    ----------
    f : callable
        ``f(**inputs) -> y``.
    inputs : dict of str to array
        The point; each value is copied to a float64 numpy array.
    dy : array, the shape of ``f(**inputs)``
        The upstream gradient.
    wrt : str
        A key of ``inputs``: the input differentiated.
    step : float, default 1e-6
        The finite-difference step ``h``.

    Returns
    -------
    array, ``inputs[wrt].shape``, float64
    """
    step = _check_step(step)
    if wrt not in inputs:
        raise ValueError(f"wrt must be a key of inputs ({sorted(inputs)}); got {wrt!r}")
    args = {k: np.array(v, dtype=np.float64) for k, v in inputs.items()}
    y_shape = np.shape(_as_float64("f's output", f(**args)))
    if np.shape(dy) != y_shape:
        raise ValueError(f"dy must have the shape of f(**inputs), {y_shape}; got {np.shape(dy)}")
    u = args[wrt].reshape(-1)  # a view: writing u perturbs args[wrt]
    grad = np.empty(u.size, dtype=np.float64)
    for i in range(u.size):
        original = u[i]
        u[i] = original + step
        plus = np.sum(_as_float64("f's output", f(**args)) * dy)
        u[i] = original - step
        minus = np.sum(_as_float64("f's output", f(**args)) * dy)
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
        ``vjp(dy, **inputs) -> {name: gradient}``, the backward under test: a dict (not a
        tuple), each name a key of ``inputs``.
    inputs : dict of str to array
        The point to check at; each value (an array of any namespace ``to_numpy``
        understands, or a number) is converted to a float64 numpy array.
    seed : int >= 0
        Seeds the random upstream gradient (a stream distinct from ``default_rng(seed)``).
    step : float, default 1e-6
        The finite-difference step ``h``, > 0.

    Returns
    -------
    dict of str to GradError, one per gradient ``vjp`` returned; all share the noise floor
    :func:`finite_difference_noise` of ``y`` and ``dy``
    """
    step = _check_step(step)
    seed = _check_seed(seed)
    args = {k: _as_float64(f"inputs[{k!r}]", v) for k, v in inputs.items()}
    y = _as_float64("f's output", f(**args))
    # A stream of its own: default_rng(seed) would give a caller who drew x with the same
    # seed dy = (x - 12) / 5, which lies in the span a normalizer's backward projects out.
    dy = np.random.default_rng([seed, _DY_STREAM]).standard_normal(y.shape)
    analytic = vjp(dy, **args)
    if not isinstance(analytic, Mapping):
        raise TypeError(f"vjp must return a dict {{name: gradient}} with names from inputs "
                        f"({sorted(args)}); got {type(analytic).__name__}")
    unknown = set(analytic) - set(args)
    if unknown:
        raise ValueError(f"vjp returned gradients for unknown inputs: {sorted(unknown)}")
    noise = finite_difference_noise(y, dy, step)
    return {
        name: relative_error(_as_float64(f"vjp's gradient {name!r}", grad),
                             numerical_vjp(f, args, dy, name, step=step), noise=noise)
        for name, grad in analytic.items()
    }


def check_layer(
    layer: Any,
    x: Any,
    *,
    training: bool = True,
    seed: int = 0,
    step: float = DEFAULT_STEP,
    path: str = "reference",
) -> dict[str, GradError]:
    """Check a layer's ``backward`` for ``x`` and every parameter, in float64.

    The layer is not modified: every evaluation runs on a float64 copy whose parameters and
    state are converted to float64 in the layer's array namespace. ``path`` is the
    implementation the copy runs (:mod:`refnorm.dispatch`): the reference unless asked, as
    a layer would otherwise take the fast path. A layer that computes no input gradient
    (``input_grad=False``, the first layer of a model) is checked with it on: the copy's
    ``dx`` is checked, and its parameter gradients are the same either way.

    Parameters
    ----------
    layer : Layer
        A :class:`~refnorm.layer.Layer` (``params``, ``state``, ``forward``, ``backward``,
        ``grads``, ``path`` and ``input_grad`` are used).
    x : array
        The input to check at (any namespace ``to_numpy`` understands).
    training : bool, default True
        Which forward is checked.
    seed : int, default 0
        As in :func:`check_vjp`.
    step : float, default 1e-6
        The finite-difference step.
    path : {"reference", "fast"}, default "reference"
        The implementation the float64 copy runs.

    Returns
    -------
    dict with key ``"x"`` and one key per parameter, to GradError
    """
    check_float_array("x", x)  # the layer's error for a list, not to_numpy's AttributeError
    template = copy.deepcopy(layer)
    template.path = check_path(path)
    template.input_grad = True
    xp = array_namespace(*template.params.values()) if template.params else np
    where = on_device(device_of(next(iter(template.params.values())))) if template.params else {}

    def as_layer_array(a: np.ndarray) -> Array:  # on the layer's device, as its parameters
        return xp.asarray(np.asarray(a, dtype=np.float64), **where)

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
    """The errors of one registered layer on one :class:`~refnorm.layer.CheckCase`."""

    normalizer: str
    shape: tuple[int, ...]
    options: dict[str, Any]
    training: bool
    errors: dict[str, GradError]


def check_registered(name: str, *, seed: int = 0, path: str = "reference") -> list[CaseResult]:
    """Run :func:`check_layer` on every check case of the layer registered as ``name``, on
    the given ``path`` (the reference unless asked).

    Inputs are ``5 * randn + 12`` so the mean subtraction is exercised; parameters and
    running statistics are drawn at random around their usual values so that every term of
    the backward matters.

    Parameters
    ----------
    name : str
        A name of :func:`refnorm.registry.names`.
    seed : int >= 0, default 0
        Seeds the parameters, states, inputs and upstream gradients.
    path : {"reference", "fast"}, default "reference"

    Returns
    -------
    list of CaseResult
        One per entry of the layer class's ``check_cases``.

    Raises
    ------
    ValueError
        If ``name`` is not registered, or ``path`` is not one of the two.
    """
    cls: type[Layer] = registry.layer_class(name)
    rng = np.random.default_rng(_check_seed(seed))
    results = []
    for case in cls.check_cases:
        layer = registry.build(name, case.shape[1], dtype=np.float64, **case.options)
        layer.params = {
            k: v + 0.5 * rng.standard_normal(v.shape) for k, v in layer.params.items()
        }
        layer.state = _random_state(layer.state, rng)
        x = 5.0 * rng.standard_normal(case.shape) + 12.0
        errors = check_layer(layer, x, training=case.training, seed=int(rng.integers(2**31)),
                             path=path)
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

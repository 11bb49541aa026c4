"""``assert_matches``: a user's implementation against refnorm on hypothesis-drawn inputs.

Every output is compared within the bound :mod:`refnorm.testing.tolerance` derives from the
drawn case; when one differs, the first convention :func:`~refnorm.testing.fingerprint`
finds diverging from refnorm's is stated with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import find, settings
from hypothesis.errors import NoSuchExample

from refnorm.testing import reference
from refnorm.testing.adapters import Impl, as_impl
from refnorm.testing.strategies import KINDS, Case, norm_inputs
from refnorm.testing.tolerance import GRAD_NAMES, reference_outputs, tolerances, unit_roundoff


@dataclass(frozen=True)
class Mismatch:
    """Where an implementation and refnorm disagree on one case.

    Attributes
    ----------
    output : str
        ``"y"`` or a gradient name (``"dx"``, ``"dgamma"``...), a parameter name when the
        implementation does not have that parameter, or ``"error"`` when it raised or
        returned the wrong shape or number of gradients.
    max_error : float
        The largest absolute difference.
    index : tuple of int
        Where it is.
    tolerance : float
    got, expected : float
        The implementation's and refnorm's values there.
    note : str
        What happened, when it is not a difference of numbers (then ``str()`` says it).
    """

    output: str
    max_error: float
    index: tuple[int, ...]
    tolerance: float
    got: float = math.nan
    expected: float = math.nan
    note: str = ""

    def __str__(self) -> str:
        if self.output == "error":
            return self.note
        if self.note:
            return f"{self.output}: {self.note}"
        return (f"{self.output}: max |error| {self.max_error:.3g} at index {self.index} "
                f"(got {self.got!r}, refnorm {self.expected!r}), tolerance {self.tolerance:.3g}")


def compare_case(impl: Impl, case: Case, options: dict[str, Any]) -> Mismatch | None:
    """The first output on which ``impl`` and refnorm disagree beyond tolerance, or None.

    A parameter the implementation does not have, and a gradient it does not give (None),
    are reported as such before any number is compared; gamma and beta of an
    implementation without an affine step are passed as ones and zeros and their gradients
    not compared.
    """
    if impl.absent:                                   # the first parameter it lacks
        param, why = next(iter(impl.absent.items()))
        return Mismatch(param, math.inf, (), 0.0, note=why)
    names = GRAD_NAMES[case.method]
    ref = reference_outputs(case, options, with_grads=impl.has_vjp)
    tol = tolerances(case, ref)
    try:
        got = {"y": impl.forward(case.x, case.params, training=True)}
        grads = impl.vjp(case.dy, case.x, case.params) if impl.has_vjp else ()
    except Exception as exc:  # the implementation's own error is the finding
        return Mismatch("error", math.inf, (), 0.0,
                        note=f"the implementation raised {type(exc).__name__}: {exc}")
    if impl.has_vjp and len(grads) != len(names):
        return Mismatch("error", math.inf, (), 0.0,
                        note=f"the vector-Jacobian product gave {len(grads)} arrays; "
                             f"{case.method} has {len(names)} inputs ({', '.join(names)})")
    for name, grad in zip(names, grads, strict=False):
        if grad is not None:
            got[name] = grad
        elif name in ("dgamma", "dbeta") and not impl.affine:
            del ref[name]                               # no such parameter, as documented
        else:
            return Mismatch(name, math.inf, (), tol[name], note=impl.why_none(name[1:]))
    for name in ("y", "dx"):  # refnorm returns both in x's dtype (float16 included)
        dtype = getattr(got.get(name), "dtype", None)
        if dtype is not None and name in ref and dtype != case.x.dtype:
            return Mismatch(name, math.inf, (), tol[name],
                            note=f"returned as {dtype} for {case.x.dtype} input; refnorm "
                                 f"returns {name} in the input's dtype")
    for name, expected in ref.items():
        mismatch = _compare(name, np.asarray(got[name]), expected, tol[name])
        if mismatch is not None:
            return mismatch
    if impl.stateful and case.method in ("bn", "in"):
        return _compare_running(impl, case, options.get("momentum", 0.1))
    return None


def _compare_running(impl: Impl, case: Case, momentum: float) -> Mismatch | None:
    """One training step from running statistics (0, 1) against refnorm's update."""
    x = case.x.astype(np.float64)
    C = x.shape[1]
    impl.set_running(np.zeros(C), np.ones(C))
    impl.forward(case.x, case.params, training=True)
    got_mean, got_var = impl.get_running()
    axes = (0,) + tuple(range(2, x.ndim)) if case.method == "bn" else tuple(range(2, x.ndim))
    mean, var = np.mean(x, axis=axes), np.var(x, axis=axes)     # per channel or per instance
    count = x.size // C if case.method == "bn" else x[0, 0].size
    if case.method == "in":                                     # averaged over the batch
        mean, var = mean.mean(axis=0), var.mean(axis=0)
    want_mean, want_var = reference.running_update(np.zeros(C), np.ones(C), mean, var,
                                                   count=count, momentum=momentum)
    u, _ = unit_roundoff(case.x.dtype)
    # the running values are convex combinations of the batch statistics: their rounding is
    # that of a variance, (m + 4) u relative, plus the tolerance of the input's magnitude;
    # and the buffers store them in the input's dtype (float16 holds 0.9 as 0.8999...)
    stored = float(np.finfo(case.x.dtype).eps) / 2
    tol = (count + 4) * u * (1 + float(np.max(x * x))) + stored * (1 + float(np.max(x * x)))
    for name, got, want in (("running_mean", got_mean, want_mean),
                            ("running_var", got_var, want_var)):
        mismatch = _compare(name, got, want, tol)
        if mismatch is not None:
            return mismatch
    return None


def _compare(name: str, got: np.ndarray, expected: np.ndarray, tol: float) -> Mismatch | None:
    if got.shape != expected.shape:
        return Mismatch("error", math.inf, (), tol,
                        note=f"{name}: shape {got.shape}, refnorm's is {expected.shape}")
    err = np.abs(got.astype(np.float64) - expected)
    err = np.where(np.isnan(err), np.inf, err)                    # NaN is never a match
    if not err.size or float(np.max(err)) <= tol:
        return None
    index = tuple(int(i) for i in np.unravel_index(int(np.argmax(err)), err.shape))
    return Mismatch(name, float(err[index]), index, tol, float(got[index]),
                    float(expected[index]))


def assert_matches(
    method: str,
    forward: Any,
    backward: Callable[..., Any] | None = None,
    *,
    eps: float | None = None,
    num_groups: int | None = None,
    options: Any = None,
    eps_mode: str | None = None,
    correction: int | None = None,
    dtype: Any = np.float64,
    convert: Callable[[np.ndarray], Any] | None = None,
    num_channels: int | None = None,
    spatial: int | None = None,
    momentum: float | None = None,
    kinds: tuple[str, ...] = KINDS,
    max_examples: int | None = None,
) -> None:
    """Assert that ``forward`` (and its vector-Jacobian product) matches refnorm's ``method``.

    Draws inputs with :func:`~refnorm.testing.strategies.norm_inputs`, compares the
    training-mode output (and every gradient, when a backward is known) with refnorm's,
    computed in float64, to the tolerances of :func:`tolerances`. On a mismatch hypothesis
    shrinks the input, and the ``AssertionError`` shows the smallest failing case, the
    output that differs, the max error and its index.

    Parameters
    ----------
    method : {"bn", "in", "ln", "gn", "sn", "ws", "wn"}
    forward : callable, stateful object or torch.nn.Module
        See :mod:`refnorm.testing.adapters`.
    backward : callable, optional
        ``backward(dy, x, *params) -> (dx, *dparams)``.
    eps : float, optional
        refnorm's ``eps``; default: the implementation's ``eps`` attribute, else 1e-5.
    num_groups : int, optional
        GN's G; default: the implementation's ``num_groups`` attribute. Required for
        ``"gn"`` when the implementation has none (``ValueError`` otherwise).
    options : refnorm.SwitchableOptions, optional
        For SN (default: refnorm's defaults).
    eps_mode, correction : optional
        For WS (defaults ``"add"``, 0).
    dtype : float16, float32 or float64
        The dtype of the inputs handed to ``forward``.
    convert : callable, optional
        numpy array -> the array type ``forward`` takes.
    num_channels, spatial : int, optional
        Fix C and the number of spatial axes (a module's are read from it).
    momentum : float, optional
        For an implementation with running statistics (BN, IN): refnorm's momentum (weight
        of the new batch) its buffers are checked against after one training step;
        default: its ``momentum`` attribute, else 0.1.
    kinds : tuple of str
        The input kinds to draw (:data:`~refnorm.testing.strategies.KINDS`).
    max_examples : int, optional
        Default: the current hypothesis profile's.

    Raises
    ------
    AssertionError
        With the shrunk failing case.
    ValueError
        For ``"gn"`` without ``num_groups`` given or read from the implementation.
    """
    impl = as_impl(method, forward, backward=backward, convert=convert)
    hints = impl.hints
    eps = eps if eps is not None else hints.get("eps", 1e-5)
    momentum = momentum if momentum is not None else hints.get("momentum") or 0.1
    G = num_groups if num_groups is not None else hints.get("num_groups")
    if method == "gn" and G is None:
        raise ValueError("num_groups must be given for method 'gn' when the implementation "
                         "does not say (no num_groups attribute); got None")
    strategy = norm_inputs(method, dtype=dtype, eps=eps,
                           num_channels=(num_channels if num_channels is not None
                                         else hints.get("num_channels")),
                           num_groups=G,
                           spatial=spatial if spatial is not None else hints.get("spatial"),
                           input_shape=hints.get("input_shape", hints.get("weight_shape")),
                           affine=impl.affine, kinds=kinds)
    base_options: dict[str, Any] = {"eps": eps, "momentum": momentum}
    for key, value in (("options", options), ("eps_mode", eps_mode),
                       ("correction", correction)):
        if value is not None:
            base_options[key] = value

    def options_for(case: Case) -> dict[str, Any]:
        return {**base_options, **({"num_groups": case.num_groups} if method == "gn" else {})}

    current = settings()
    run = settings(current, database=None, deadline=None,
                   max_examples=max_examples or current.max_examples)
    try:
        case = find(strategy, lambda c: compare_case(impl, c, options_for(c)) is not None,
                    settings=run)
    except NoSuchExample:
        return
    mismatch = compare_case(impl, case, options_for(case))
    C = num_channels
    if C is None and case.num_groups and 12 % case.num_groups:
        C = 2 * case.num_groups                   # fingerprint's GN probes have C = 12
    why = diagnose(impl, method, options_for(case), num_channels=C, spatial=spatial)
    raise AssertionError(
        f"{impl.description} does not match {reference.describe(method, options_for(case))} "
        f"in {np.dtype(dtype).name}.\n{why}\nOn the smallest failing input: {mismatch}\n"
        f"Smallest failing input (shrunk by hypothesis):\n{case!r}")


def diagnose(impl: Impl, method: str, options: dict[str, Any], *,
             num_channels: int | None = None, spatial: int | None = None) -> str:
    """One sentence: the first convention in which ``impl`` differs from refnorm's
    ``method`` under ``options``, read by :func:`refnorm.testing.fingerprint`'s probes."""
    from refnorm.testing.probes import fingerprint  # probes uses this module's bounds

    try:
        report = fingerprint(method, impl, num_channels=num_channels, spatial=spatial)
    except Exception as exc:  # a probe the implementation cannot take is no diagnosis
        return f"No diagnosis: fingerprint could not probe it ({type(exc).__name__}: {exc})."
    row = report.first_divergence(options)
    if row is None:
        return ("No diverging convention: fingerprint finds every convention it probes as "
                "refnorm's, so the difference lies outside its probes.")
    return (f"First diverging convention (refnorm.testing.fingerprint): {row.topic}: found "
            f"{row.found}; refnorm: {row.refnorm}.")

"""``assert_matches``: a user's implementation against refnorm on hypothesis-drawn inputs.

Tolerances
----------
refnorm's output is computed in float64 from the inputs as drawn (already rounded to the
dtype under test), so it is exact to about 1e-15 and the tolerance only has to cover the
rounding of the implementation under test, working in the compute dtype (float32 for
float16, as refnorm does; unit roundoff ``u``) and returning the dtype under test (unit
roundoff ``u_out``). Each bound is the classical worst case of the operations:

- a statistic over ``m`` values is a sum of ``m`` terms: relative error up to ``(m + 4) u``
  (naive summation ``(m - 1) u``, plus the subtraction, square, root and division);
- ``x - mean`` is off by up to ``K u max|x|`` in absolute terms, whatever the spread of
  the data; divided by the standard deviation this is ``K u max|x| rstd_max`` in
  ``x_hat`` (large offsets and tiny variances are ill-conditioned for *every*
  implementation, and the bound grows with them);
- ``|x_hat| <= sqrt(m)`` for any standardization, so products with ``x_hat`` are bounded;
- the returned value is rounded once more, ``u_out |y|``;
- below a dtype's smallest normal number ``tiny`` a rounding has no relative precision
  left: its result is off by up to half the subnormal spacing ``u tiny``, however small the
  value (a float16 ``gamma = 1e-7`` gives outputs that carry a few bits). Each output gets
  an absolute floor: one subnormal spacing of the returned dtype for its own rounding, plus
  one spacing of the compute dtype (and one of refnorm's float64, whose own result rounds
  there too) for every product or quotient that may underflow on the way, times the
  factor ``S`` by which the later operations multiply it: ``S_y = 3 + |gamma| + rstd +
  2 max|x|`` (``gamma (x - mu) rstd`` in any order), ``S_dx = (m + 4)(1 + rstd)
  (1 + |dy|)(2 + sqrt(m))`` (the backward's projection), and so on per output (see
  :func:`underflow_floors`). A whole spacing per rounding rather than half keeps the bound
  representable in float64 (half of float64's spacing, ``2**-1075``, is not).

These are bounds, not estimates: a correct implementation (pairwise or Welford sums) lands
orders of magnitude inside them, while a wrong convention (the variance estimator, where
eps goes, a one-pass variance at an offset) moves the output by a relative amount the
strategies make large (tiny variances, large offsets).
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

GRAD_NAMES = {m: ("dx",) + tuple("d" + p for p in reference.PARAM_NAMES[m])
              for m in reference.ACTIVATION_METHODS}
GRAD_NAMES.update(ws=("dw",), wn=("dv", "dg"))


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


def compute_dtype(dtype: Any) -> np.dtype:
    """The dtype an implementation is assumed to compute in: float32 for a narrower dtype
    (float16, as refnorm does), else ``dtype`` itself."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype.itemsize < 4 else dtype


def unit_roundoff(dtype: Any) -> tuple[float, float]:
    """(u of the compute dtype, u of the returned dtype); float16 computes in float32."""
    return (float(np.finfo(compute_dtype(dtype)).eps) / 2, float(np.finfo(dtype).eps) / 2)


def underflow_floors(dtype: Any, scales: dict[str, float]) -> dict[str, float]:
    """The absolute floor of each output's tolerance (module docstring, last item).

    Parameters
    ----------
    dtype : the dtype under test (returned by the implementation)
    scales : dict
        For each output, ``S``: the factor by which the operations after a product or a
        quotient multiply its error, summed over the products that may underflow.

    Returns
    -------
    dict
        ``spacing(dtype) + (spacing(compute dtype) + spacing(float64)) * S`` per output,
        where ``spacing`` is the dtype's subnormal spacing (``2 u tiny``, its smallest
        subnormal number): the returned value's own rounding, and the underflowing roundings
        of the implementation and of refnorm's float64 reference, each scaled by ``S``.
    """
    out = float(np.finfo(dtype).smallest_subnormal)
    inner = (float(np.finfo(compute_dtype(dtype)).smallest_subnormal)
             + float(np.finfo(np.float64).smallest_subnormal))
    return {k: out + inner * s for k, s in scales.items()}


def _amax(a: np.ndarray) -> float:
    return float(np.max(np.abs(a))) if a.size else 0.0


def tolerances(case: Case, outputs: dict[str, np.ndarray]) -> dict[str, float]:
    """Absolute tolerance for each output of refnorm (``outputs``: ``"y"``, ``"dx"``...).

    The bounds are those of the module docstring, for the dtype of ``case.x``.
    """
    u, u_out = unit_roundoff(case.x.dtype)
    x = case.x.astype(np.float64)
    dy = case.dy.astype(np.float64)
    p = [a.astype(np.float64) for a in case.params]
    if case.method in ("ws", "wn"):
        return _weight_tolerances(case, x, p, dy, outputs, (u, u_out))
    m = x.size
    K = m + 4                                                    # summation bound, see above
    rstd_max = _rstd_max(case, x)
    gamma = _amax(p[0])
    err_xhat = K * u * (_amax(x) * rstd_max + math.sqrt(m))
    A = gamma * _amax(dy)
    per_channel = x.size / x.shape[1]
    tol = {
        "y": gamma * err_xhat,
        "dx": rstd_max * A * (K * u * (1 + math.sqrt(m)) ** 2
                              + 3 * err_xhat * (1 + math.sqrt(m))),
        "dgamma": per_channel * _amax(dy) * (err_xhat + K * u * math.sqrt(m)),
        "dbeta": per_channel * K * u * _amax(dy),
        # a logit gradient sums dy * (terms of x_hat and of x * rstd) over every element
        "dmean_logits": m * A * (err_xhat + K * u * math.sqrt(m)) * (1 + _amax(x) * rstd_max),
    }
    tol["dvar_logits"] = tol["dmean_logits"]
    sm, X, D = math.sqrt(m), _amax(x), _amax(dy)
    scale_dx = K * (1 + rstd_max) * (1 + D) * (2 + sm)
    floors = underflow_floors(case.x.dtype, {
        # gamma (x - mu) rstd in any order: (x - mu) rstd then times gamma, gamma (x - mu)
        # then times rstd, alpha = gamma rstd then times x - mu, or x alpha - mu alpha
        "y": 3 + gamma + rstd_max + 2 * X,
        # dx_hat = gamma * dy, its projection on (1, x_hat) and the products with rstd, in
        # any order (gamma * rstd / m first: its error times |dy| (2 + sqrt(m)) m)
        "dx": scale_dx,
        # per_channel products dy * x_hat, or dy * (x - mu) then times rstd
        "dgamma": per_channel * (2 + D + rstd_max),
        "dbeta": 1.0,                       # a sum of given values: no product underflows
        "dmean_logits": m * (1 + X * rstd_max) * scale_dx,
        "dvar_logits": m * (1 + X * rstd_max) * scale_dx,
    })
    return {k: tol[k] + 2 * u_out * _amax(v) + floors[k] for k, v in outputs.items()}


def _rstd_max(case: Case, x: np.ndarray) -> float:
    """1 / sqrt(smallest variance + eps) over the statistics (1 / sqrt(eps) for SN's mix)."""
    if case.method == "sn":
        return 1.0 / math.sqrt(case.eps)
    ids = reference.group_ids(case.method, x.shape, num_groups=case.num_groups).ravel()
    count = np.bincount(ids)
    mean = np.bincount(ids, x.ravel()) / count
    var = np.bincount(ids, (x.ravel() - mean[ids]) ** 2) / count
    return 1.0 / math.sqrt(float(np.min(var)) + case.eps)


def _weight_tolerances(case: Case, w: np.ndarray, p: list[np.ndarray], dy: np.ndarray,
                       outputs: dict[str, np.ndarray],
                       rounding: tuple[float, float]) -> dict[str, float]:
    """WS and WN: the same bounds per output channel, over I weights."""
    u, u_out = rounding
    ww = w.reshape(w.shape[0], -1)
    I = ww.shape[1]
    K = I + 4
    G = _amax(dy)
    if case.method == "ws":
        sigma = ww.std(axis=1)
        d_min = float(np.min(np.minimum(sigma + case.eps, np.sqrt(sigma**2 + case.eps))))
        err = K * u * (_amax(ww) / d_min + math.sqrt(I))
        tol = {"y": err,
               "dw": G / d_min * (K * u * (1 + math.sqrt(I)) ** 2
                                  + 3 * err * (1 + math.sqrt(I)))}
    else:
        n_min = float(np.min(np.sqrt(np.sum(ww**2, axis=1))))
        g = _amax(p[0])
        tol = {"y": K * u * g,
               "dv": 3 * K * u * g * 2 * math.sqrt(I) * G / (n_min + case.eps),
               "dg": 3 * K * u * I * G}
    sI, W = math.sqrt(I), _amax(ww)
    if case.method == "ws":                     # (w - mu) / d; dw as the activations' dx
        scales = {"y": 2.0, "dw": K * (1 + 1 / d_min) * (1 + G) * (2 + sI)}
    else:                   # v / n then times g, or g / n then times v; dv as WS's dw
        r = 1 / (n_min + case.eps)
        scales = {"y": 2 + g + W, "dv": K * (1 + g) * (1 + r) * (1 + G) * (2 + sI),
                  "dg": I * (2 + G + r)}
    floors = underflow_floors(case.x.dtype, scales)
    return {k: tol[k] + 2 * u_out * _amax(v) + floors[k] for k, v in outputs.items()}


def reference_outputs(case: Case, options: dict[str, Any],
                      with_grads: bool) -> dict[str, np.ndarray]:
    """refnorm's ``y`` (and gradients) on ``case``, computed in float64."""
    x = case.x.astype(np.float64)
    params = tuple(a.astype(np.float64) for a in case.params)
    y, cache = reference.forward(case.method, x, params, options)
    out = {"y": np.asarray(y)}
    if with_grads:
        grads = reference.backward(case.method, case.dy.astype(np.float64), cache)
        out.update(zip(GRAD_NAMES[case.method], grads, strict=True))
    return out


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
    # that of a variance, (m + 4) u relative, plus the tolerance of the input's magnitude
    tol = (count + 4) * u * (1 + float(np.max(x * x)))
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
        GN's G; default: the implementation's, else drawn (then ``forward`` must accept
        any G: it is not passed, so this is only for implementations fixing G).
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
                           num_channels=num_channels or hints.get("num_channels"),
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

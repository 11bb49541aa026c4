"""``fingerprint``: name the conventions a normalization implementation follows.

Designed probes, each reading one convention off the implementation's outputs (probes run
in float64, training mode, ``gamma = 1`` and ``beta = 0`` unless said):

- **statistics scope** (:mod:`refnorm.testing.axes`): change one input element and see
  which outputs move: the elements that share its statistic, which give the reduction
  axes; for GN the group count and the layout (channel ``c`` in group ``c // (C/G)``,
  consecutive, or ``c % G``, interleaved). The probes below standardize within the
  statistics found, so a wrong scope is reported as itself and not as a variance scaled
  by some factor;
- **variance estimator, eps placement and value**: inputs ``s * z`` with ``z`` of mean 0
  and biased variance 1 in every statistic, for ``s`` from 1e2 down to 1e-7. The output is
  ``z * s / D(s)``; the largest and the smallest ``s`` fix the variance scale ``f``
  (1: biased, ``m/(m-1)``: unbiased) and eps under each model, ``D = sqrt(f s^2 + eps)``
  (inside the root) and ``D = sqrt(f) s + eps`` (added to the standard deviation), and the
  model whose prediction fits every ``s`` is the placement (``(D / s)^2`` at ``s = 1e2``
  alone would carry ``eps / 1e4``, a variance scaled by 1.001 for ``eps = 10``);
- **precision at an offset**: unit-variance data at 1e4 in float32, where a one-pass
  ``E[x^2] - E[x]^2`` loses the variance;
- **affine**: ``y(gamma, beta) = gamma * y(1, 0) + beta`` per channel;
- **running statistics** (stateful implementations): two training calls on batches of known
  mean and variance from known buffers give the weight of the new batch (twice: constant
  for an exponential average, 1 then 1/2 for a cumulative one) and the factor on the
  variance (``m/(m-1)``: unbiased), compared with the implementation's ``momentum``;
  then an eval call shows which statistics inference uses;
- **gradients** (when a vector-Jacobian product is known): ``dgamma`` and ``dbeta`` against
  the exact sums from the implementation's own forward (``y`` is affine in gamma and beta),
  ``dx`` against central differences of that forward;
- **SN**: IN variance estimator with all ratios on IN; tied or separate ratios with the
  mean ratios on IN and the variance ratios on BN;
- **WS**: the same ladder over a filter (std estimator, eps placement and value);
  **WN**: over a filter's norm (eps placement and value).

Then refnorm's functions are run under the options these conventions call for, on
ordinary inputs and on tiny variances, and compared to the tolerances of
:func:`refnorm.testing.tolerance.tolerances`: the report names the options that match, or
says "matches no known convention" with the closest options and the residual.
:meth:`Report.first_divergence` gives the first row that differs from refnorm under given
options: :func:`refnorm.testing.assert_matches` states it when outputs differ.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import refnorm
from refnorm.argtypes import json_text
from refnorm.core.checks import is_int
from refnorm.testing import reference
from refnorm.testing.adapters import Impl, as_impl
from refnorm.testing.axes import axis_names, expected_axes, probe_axes
from refnorm.testing.strategies import Case
from refnorm.testing.tolerance import reference_outputs, tolerances

LADDER = tuple(10.0 ** -k for k in range(-2, 8))      # s = 1e2 ... 1e-7
FIT = 1e-3          # a model "fits" the ladder within 0.1 %: float32 outputs reach 1e-6, and
                    # the wrong placement misses by >= 10 % at the crossover s^2 ~ eps
SAME = 1e-6         # two float64 readings of one quantity (weights, factors) agree to 1e-6
ONE_HOT = 30.0      # softmax of (30, -30, -30): e^-60 ~ 1e-26, exactly one-hot in float64


@dataclass
class Row:
    """One convention: what was found, refnorm's default, and whether they agree."""

    topic: str
    found: str
    refnorm: str
    agrees: bool | None = None
    key: str | None = None          # the first key it sets in Report.conventions


@dataclass
class Report:
    """What :func:`fingerprint` found. ``str(report)`` is a table; :meth:`to_dict` is JSON.

    Attributes
    ----------
    method, impl : str
    rows : list of Row
    conventions : dict
        Machine-readable findings (``variance``, ``eps_placement``, ``eps``,
        ``momentum_new_weight``, ``running_var``, ``group_layout``, ``num_groups``,
        ``ratios``, ``in_variance``, ``std``, ``gradients``...).
    match : str or None
        The refnorm calls under which the implementation matches, or None.
    closest : str
        The closest refnorm options when nothing matches.
    residual : float
        Max ``|error|`` of the implementation against ``match`` (or ``closest``).
    """

    method: str
    impl: str
    rows: list[Row] = field(default_factory=list)
    conventions: dict[str, Any] = field(default_factory=dict)
    match: str | None = None
    closest: str = ""
    residual: float = math.nan

    def add(self, topic: str, found: str, refnorm_default: str, agrees: bool | None = None,
            **conventions: Any) -> None:
        self.rows.append(Row(topic, found, refnorm_default, agrees,
                             next(iter(conventions), None)))
        self.conventions.update(conventions)

    def first_divergence(self, options: dict[str, Any] | None = None) -> Row | None:
        """The first row whose finding is not refnorm's under ``options``, or None.

        ``options`` are refnorm's keyword options as :func:`refnorm.testing.assert_matches`
        compares under (``eps``, ``momentum``, ``num_groups``, ``options``, ``eps_mode``,
        ``correction``); the rows they decide (eps value, running average, GN groups, WS
        std and eps placement, SN IN variance) are judged against them, the others against
        refnorm's defaults. The returned row's ``refnorm`` says what was expected.
        """
        expected = _expected_under(self.method, options or {}, self.conventions)
        for row in self.rows:
            if row.key in expected:
                agrees, text = expected[row.key]
                if not agrees:
                    return Row(row.topic, row.found, text, False, row.key)
            elif row.agrees is False:
                return row
        return None

    def __str__(self) -> str:
        widths = [max(len(r.topic) for r in self.rows), max(len(r.found) for r in self.rows)]
        mark = {True: "=", False: "≠", None: " "}
        lines = [f"fingerprint of {self.impl} as {self.method} (probes in float64)",
                 f"{'convention':<{widths[0]}} | {'found':<{widths[1]}} |   refnorm default"]
        lines.append("-" * len(lines[-1]))
        for r in self.rows:
            lines.append(f"{r.topic:<{widths[0]}} | {r.found:<{widths[1]}} | "
                         f"{mark[r.agrees]} {r.refnorm}")
        if self.match is not None:
            lines.append(f"matches refnorm: {self.match} (max |error| {self.residual:.2g})")
        else:
            lines.append(f"matches no known convention; closest: {self.closest}, "
                         f"residual max |error| {self.residual:.2g}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict of the report."""
        return {"method": self.method, "impl": self.impl,
                "rows": [vars(r) for r in self.rows], "conventions": self.conventions,
                "match": self.match, "closest": self.closest, "residual": self.residual}

    def to_json(self) -> str:
        """:meth:`to_dict` as JSON; an infinite or NaN number as the string ``"inf"`` or
        ``"nan"`` (JSON has neither: ``json.dumps`` writes ``Infinity``, which parsers
        other than Python's refuse)."""
        return json_text(self.to_dict())


def _expected_under(method: str, options: dict[str, Any],
                    found: dict[str, Any]) -> dict[str, tuple[bool, str]]:
    """For the conventions ``options`` decide: (``found`` agrees, what refnorm does)."""
    out: dict[str, tuple[bool, str]] = {}
    eps = options.get("eps")
    if isinstance(found.get("eps"), float) and isinstance(eps, float):
        got = found["eps"]
        out["eps"] = (abs(got - eps) <= 1e-2 * eps or (got == 0 and eps <= 1e-200),
                      f"{eps:g} (the eps compared under)")
    momentum = options.get("momentum")
    if found.get("running") not in (None, "none") and isinstance(momentum, float):
        weight = found.get("momentum_new_weight")
        out["running"] = (found["running"] == "exponential" and isinstance(weight, float)
                          and abs(weight - momentum) < SAME,
                          f"exponential, new batch weighted {momentum:g} (the momentum "
                          "compared under)")
    if method == "gn" and options.get("num_groups") is not None:
        G = options["num_groups"]
        out["group_layout"] = (found.get("group_layout") in ("consecutive", "n/a")
                               and found.get("num_groups") == G,
                               f"consecutive channels (c // (C/G)), G = {G}")
    if method != "ws" and isinstance(eps, float) and "eps_placement" in found:
        tiny = found["eps_placement"] == "none" and eps <= 1e-200
        out["eps_placement"] = (found["eps_placement"] == default_key(method) or tiny,
                                "||v|| + eps" if method == "wn" else "sqrt(var + eps)")
    if method == "ws":
        unbiased = options.get("correction", 0) == 1
        out["std"] = (found.get("std") == ("unbiased" if unbiased else "biased"),
                      "unbiased (1/(I-1))" if unbiased else "biased (1/I)")
        placement = {"add": "added_to_std", "sqrt": "inside_sqrt"}[options.get("eps_mode",
                                                                                "add")]
        out["eps_placement"] = (found.get("eps_placement") in (placement, "none"),
                                "sigma + eps" if placement == "added_to_std"
                                else "sqrt(sigma^2 + eps)")
    if method == "sn":
        c = getattr(options.get("options"), "in_correction", 0)
        name = "unbiased" if c else "biased"
        text = "unbiased (1/(S-1))" if c else "biased (1/S)"
        out["variance"] = (found.get("variance") == name, text)
        out["in_variance"] = (found.get("in_variance") == name, text)
    return out


# -- helpers -----------------------------------------------------------------------------------


def _standardize(z: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``z`` with mean 0 and biased variance 1 within each statistic of ``ids``."""
    flat, i = z.ravel(), ids.ravel()
    count = np.bincount(i)
    mean = np.bincount(i, flat) / count
    d = flat - mean[i]
    var = np.bincount(i, d * d) / count
    return (d / np.sqrt(var[i])).reshape(z.shape)


def _scale(z: np.ndarray, y: np.ndarray, ids: np.ndarray) -> float:
    """The median over statistics of ``D`` in ``y = z / D`` (least squares per statistic)."""
    i = ids.ravel()
    zz = np.bincount(i, z.ravel() ** 2)
    zy = np.bincount(i, z.ravel() * y.ravel())
    return float(np.median(zz / zy))


def _fit_eps(D: np.ndarray, s: np.ndarray) -> dict[str, tuple[float, float, float]]:
    """(f, eps, max relative misfit of D(s)) under each placement, f and eps solved from the
    largest and the smallest s (see module docstring)."""
    f_in = float((D[0] ** 2 - D[-1] ** 2) / (s[0] ** 2 - s[-1] ** 2))   # D^2 = f s^2 + eps
    r = float((D[0] - D[-1]) / (s[0] - s[-1]))                        # D = sqrt(f) s + eps
    models = {
        "inside_sqrt": (f_in, lambda e: np.sqrt(f_in * s * s + e), D[-1] ** 2 - f_in * s[-1] ** 2),
        "added_to_std": (r * r, lambda e: r * s + e, D[-1] - r * s[-1]),
    }
    out = {}
    for name, (f, predict, eps) in models.items():
        eps = max(float(eps), 0.0)
        out[name] = (f, eps, float(np.max(np.abs(predict(eps) - D) / D)))
    return out


def _factor(D: np.ndarray, s: np.ndarray) -> float:
    """The variance (or squared norm) scale ``f`` of the placement that fits the ladder best."""
    return min(_fit_eps(D, s).values(), key=lambda fit: fit[2])[0]


def _estimator(f: float, m: int) -> str:
    """"biased" or "unbiased" for the variance factor ``f`` of a statistic over ``m`` values:
    the nearer of 1 and ``m/(m-1)`` when within FIT of it (the two lie ``1/(m-1)`` apart, less
    than FIT for ``m > 1000``), else "other"."""
    factors = {"biased": 1.0, "unbiased": m / (m - 1)}
    name = min(factors, key=lambda k: abs(f - factors[k]))
    return name if abs(f - factors[name]) < FIT else "other"


def _round(v: float, digits: int = 3) -> float:
    return float(f"{v:.{digits}g}") if v else 0.0


def _eps_rows(report: Report, D: np.ndarray, s: np.ndarray, eps_hint: Any,
              default: str, what: str) -> tuple[str, float]:
    """Rows for eps placement and value from the ladder; returns (placement, eps)."""
    fits = _fit_eps(D, s)
    best = min(fits, key=lambda k: fits[k][2])
    _, eps, misfit = fits[best]
    if eps <= 1e-13 * float(D[-1]) ** (2 if best == "inside_sqrt" else 1):
        best, eps = "none", 0.0
    elif misfit > FIT:
        best = "unknown"
    names = {"inside_sqrt": f"inside the square root, sqrt({what} + eps)",
             "added_to_std": f"added to the {'norm' if what == '||v||^2' else 'std'}, "
                             f"sqrt({what}) + eps",
             "none": "none (eps = 0)", "unknown": f"unknown (best fit misses by {misfit:.2g})"}
    report.add("eps placement", names[best], default, best == default_key(report.method),
               eps_placement=best)
    if isinstance(eps_hint, float) and eps and abs(eps / eps_hint - 1) < 1e-2:
        eps = eps_hint
    shown = f"{_round(eps):g}" + (f" (attribute eps = {eps_hint:g})"
                                  if isinstance(eps_hint, float) else "")
    report.add("eps value", shown, "1e-05", None, eps=_round(eps) if eps != eps_hint else eps)
    return best, (eps if eps == eps_hint else _round(eps))


def default_key(method: str) -> str:
    """refnorm's default eps placement for ``method``."""
    return {"ws": "added_to_std", "wn": "added_to_std"}.get(method, "inside_sqrt")


# -- activation normalizers -------------------------------------------------------------------


@dataclass
class _Probe:
    """The implementation, the probe shape and parameter makers for one fingerprint."""

    impl: Impl
    method: str
    shape: tuple[int, ...]
    rng: np.random.Generator
    logits: tuple[np.ndarray, np.ndarray] | None = None   # SN: current probe logits

    @property
    def C(self) -> int:
        return self.shape[1]

    def params(self, gamma: np.ndarray | None = None,
               beta: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        C = self.C
        p = [np.ones(C) if gamma is None else gamma, np.zeros(C) if beta is None else beta]
        if self.method == "sn":
            assert self.logits is not None
            p += list(self.logits)
        return tuple(p)

    def run(self, x: np.ndarray, training: bool = True, **kw: Any) -> np.ndarray:
        return np.asarray(self.impl.forward(x, self.params(**kw), training=training),
                          dtype=np.float64)


def _check_output(p: _Probe, rng: np.random.Generator) -> None:
    """Refuse an output there is nothing to fingerprint in: of another shape than the input
    (the probes read which outputs an input element moves), or not finite for a finite
    input (every probe would read NaN as "moved" or "not moved" at random)."""
    x = rng.standard_normal(p.shape)
    y = p.run(x)
    if y.shape != x.shape:
        raise ValueError(f"its output has shape {tuple(y.shape)} for an input of shape "
                         f"{tuple(x.shape)}: a normalizer's output has its input's shape")
    bad = int(np.count_nonzero(~np.isfinite(y)))
    if bad:
        raise ValueError(f"its output holds {bad} NaN or infinite values of {y.size} for a "
                         f"finite input of shape {tuple(x.shape)} (gamma = 1, beta = 0)")


def _one_hot(scope: str) -> np.ndarray:
    return np.array([ONE_HOT if s == scope else -ONE_HOT for s in reference.SN_SCOPES])


def _probe_shape(method: str, impl: Impl, num_channels: int | None,
                 spatial: int | None) -> tuple[int, ...]:
    hints = impl.hints
    if "input_shape" in hints:
        return (2, *hints["input_shape"])
    G = hints.get("num_groups")
    C_gn = 2 * G if isinstance(G, int) and G > 0 and 12 % G else 12   # G must divide C
    C = num_channels or hints.get("num_channels") or (C_gn if method == "gn" else 4)
    k = spatial if spatial is not None else hints.get("spatial", 2)
    sizes = {0: (), 1: (3,), 2: (3, 4), 3: (3, 2, 2)}[k]    # N = 2: sizes tell axes apart
    return (2 if k else 4, C, *sizes)


def _scope(p: _Probe, report: Report) -> tuple[np.ndarray | None, bool]:
    """Statistics-scope rows (the axes probe, :mod:`refnorm.testing.axes`).

    Returns the statistic of every element of the probe input, as the implementation forms
    them (None when there is none of two or more values: its output does not move with its
    input, or each element only with itself), and whether they are refnorm's.
    """
    found = probe_axes(p.run, p.shape, p.rng)
    C = p.C
    G = C // found.sizes[1] if found.moved else C
    if p.method == "gn":
        layout = {"consecutive": "consecutive", "interleaved": "interleaved",
                  "reduced": "n/a", "kept": "n/a"}.get(found.kinds[1] if found.moved else "",
                                                       "other")
        want = expected_axes("gn", p.shape, 1)                  # N kept, spatial reduced
        same = found.box and found.kinds[:1] + found.kinds[2:] == want.kinds[:1] + want.kinds[2:]
        spatial = ", ".join(axis_names(len(p.shape))[2:])
        report.add("statistics over", found.describe(),
                   f"{spatial + ' and ' if spatial else ''}groups of C/G consecutive channels, "
                   "per sample", same, reduce_axes=list(found.reduce_axes))
        report.add("group layout", f"{layout}, G = {G}" if layout != "other" else layout,
                   "consecutive channels (c // (C/G))",
                   layout in ("consecutive", "n/a"), group_layout=layout, num_groups=G)
        agrees = same and layout in ("consecutive", "n/a")
    else:
        want = expected_axes(p.method, p.shape)
        agrees = found == want
        report.add("statistics over", found.describe(), want.describe(), agrees,
                   reduce_axes=list(found.reduce_axes))
    if found.moved:
        report.conventions["scope"] = {"channels": list(found.indices[1]),
                                       "across_samples": found.kinds[0] != "kept"}
    if p.method == "sn":                     # the later probes put every ratio on IN
        return reference.group_ids("in", p.shape), agrees
    ids = found.ids() if found.moved else None
    if found.moved and ids is None:        # an irregular scope: read the rest in refnorm's
        ids = reference.group_ids(p.method, p.shape, num_groups=G)
    if ids is not None and np.bincount(ids.ravel()).min() < 2:
        ids = None                         # a statistic of one value has no variance
    return ids, agrees


def _ladder(p: _Probe, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    z = _standardize(p.rng.standard_normal(p.shape), ids)
    s = np.array(LADDER)
    D = np.array([_scale(z, p.run(si * z), ids) * si for si in s])
    m = int(np.bincount(ids.ravel())[0])
    return D, s, m


def _variance_rows(p: _Probe, report: Report, ids: np.ndarray, topic: str,
                   key: str) -> tuple[float, str, float]:
    """Variance estimator, eps placement and value; returns (factor f, placement, eps)."""
    D, s, m = _ladder(p, ids)
    f = _factor(D, s)
    name = _estimator(f, m)
    found = {"biased": "biased (1/m)", "unbiased": f"unbiased (1/(m-1), m = {m})",
             "other": f"scaled by {f:.4g} (m = {m})"}[name]
    report.add(topic, found, "biased (1/m)", name == "biased", **{key: name})
    placement, eps = _eps_rows(report, D, s, p.impl.hints.get("eps"), "sqrt(var + eps)",
                               "var")
    return f, placement, eps


def _offset_row(p: _Probe, report: Report, ids: np.ndarray, f: float, placement: str,
                eps: float) -> None:
    z = _standardize(p.rng.standard_normal(p.shape), ids)
    x32 = (1e4 + z).astype(np.float32)
    y = np.asarray(p.impl.forward(x32, tuple(a.astype(np.float32) for a in p.params()),
                                  training=True), dtype=np.float64)
    x = x32.astype(np.float64)
    i = ids.ravel()
    count = np.bincount(i)
    mean = np.bincount(i, x.ravel()) / count
    d = x.ravel() - mean[i]
    var = np.bincount(i, d * d) / count
    D = (math.sqrt(f) * np.sqrt(var) + eps) if placement == "added_to_std" else \
        np.sqrt(f * var + eps)
    err = float(np.max(np.abs(y.ravel() - d / D[i])))
    ok = err < 1e-2  # float32 two-pass at 1e4: x - mean is off by ~1e-3 (ulp(1e4) = 1e-3)
    found = (f"keeps the variance (max |error| {err:.1g})" if ok else
             f"loses the variance (max |error| {err:.2g}: one-pass E[x^2]-E[x]^2?)")
    report.add("float32, mean 1e4 x std", found, "two-pass: keeps it", ok,
               offset_precision="ok" if ok else "lost")


def _affine_row(p: _Probe, report: Report) -> bool:
    x = p.rng.standard_normal(p.shape) * 2 + 1
    gamma, beta = p.rng.uniform(0.5, 2, p.C), p.rng.uniform(-1, 1, p.C)
    y1 = p.run(x)
    y2 = p.run(x, gamma=gamma, beta=beta)
    view = (1, -1) + (1,) * (len(p.shape) - 2)
    if not p.impl.affine:
        report.add("affine", "none (gamma, beta not used)", "gamma, beta per channel (C,)",
                   None, affine="none")
        return True
    gain = p.impl.hints.get("gain_shape")
    if "beta" in p.impl.absent and "gamma" not in p.impl.absent:  # LayerNorm(bias=False)
        ok = bool(np.allclose(y2, gamma.reshape(view) * y1, rtol=1e-9, atol=1e-12))
        per = f"one gain per element of {tuple(gain)}" if gain is not None else "per channel"
        report.add("affine", f"gamma * x_hat, no beta, {per}" if ok else "other",
                   "gamma * x_hat + beta, (C,)", False, affine="no_beta" if ok else "other")
        return False
    ok = bool(np.allclose(y2, gamma.reshape(view) * y1 + beta.reshape(view), rtol=1e-9,
                          atol=1e-12))
    if ok and gain is not None:  # PyTorch's LayerNorm: one gain per element, not per channel
        report.add("affine", f"gamma * x_hat + beta, one gain and bias per element of "
                             f"{tuple(gain)} (probed per channel)", "gamma * x_hat + beta, (C,)",
                   False, affine="per_element")
        return False
    affine = gamma.reshape(view) * y1 + beta.reshape(view)
    err = float(np.max(np.abs(y2 - affine)))
    if not ok and err <= 1e-5 * float(np.max(np.abs(affine))):  # float32 rounding, ~1e-7
        # the affine holds, to float32 precision: a layer that computes in float32 whatever
        # its input (JAX without x64), which every other float64 row would call "other"
        report.add("affine", f"gamma * x_hat + beta, per channel, to float32 precision only "
                             f"(max |error| {err:.1g} on float64 inputs)",
                   "gamma * x_hat + beta, (C,)", False, affine="per_channel_float32")
        return False
    report.add("affine", "gamma * x_hat + beta, per channel" if ok else "other",
               "gamma * x_hat + beta, (C,)", ok, affine="per_channel" if ok else "other")
    return ok


def _running_rows(p: _Probe, report: Report, ids_in: np.ndarray, placement: str,
                  eps: float) -> dict[str, Any] | None:
    """Momentum and running-variance rows; returns refnorm's running options or None."""
    impl = p.impl
    if not impl.stateful:
        report.add("running statistics", "none kept", "BN: kept; IN: optional", None,
                   running="none")
        return None
    N, C = p.shape[:2]
    S = math.prod(p.shape[2:])
    m = S if p.method == "in" else N * S
    z = _standardize(p.rng.standard_normal(p.shape), ids_in)   # per (n, c) (per c for (N, C))
    view = (1, C) + (1,) * (len(p.shape) - 2)
    mu1, v1, mu2, v2 = 1.0 + np.arange(C), 4.0, -2.0 - np.arange(C), 9.0
    impl.set_running(np.zeros(C), np.ones(C))
    p.run(mu1.reshape(view) + math.sqrt(v1) * z)
    rm1, rv1 = impl.get_running()
    p.run(mu2.reshape(view) + math.sqrt(v2) * z)
    rm2, rv2 = impl.get_running()
    w1 = float(np.median(rm1 / mu1))
    w2 = float(np.median((rm2 - rm1) / (mu2 - rm1)))
    # with the new batch weighted 0 (momentum 0) no batch variance reaches the buffer
    c1 = float(np.median((rv1 - (1 - w1)) / (w1 * v1))) if abs(w1) >= SAME else math.nan
    mom = impl.hints.get("momentum", "absent")
    if abs(w1 - w2) < SAME:
        kind, text = "exponential", f"exponential, new batch weighted {w1:.6g}"
    elif abs(w1 - 1) < SAME and abs(w2 - 0.5) < SAME:
        kind, text = "cumulative", "cumulative average (1/k for the k-th batch)"
    else:
        kind, text = "other", f"weights {w1:.6g} then {w2:.6g}"
    if isinstance(mom, float) and kind == "exponential":
        if abs(w1 - mom) < SAME:
            text += f" = momentum {mom:g} (on the new value)"
            on = "new"
        elif abs(w1 - (1 - mom)) < SAME:
            text += f" = 1 - momentum {mom:g} (momentum on the old value)"
            on = "old"
        else:
            on = "unknown"
    else:
        on = "n/a"
    frozen = kind == "exponential" and abs(w1) < SAME
    if frozen:
        text += "; refnorm's momentum is in (0, 1]"
    report.add("running average", text, "exponential, momentum 0.1 on the new value",
               kind == "exponential" and on in ("new", "n/a") and not frozen,
               running=kind, momentum_new_weight=_round(w1, 6), momentum_on=on)
    factors = {"unbiased": m / (m - 1), "biased": 1.0}
    if p.method == "sn":
        factors["in_unbiased"] = S / (S - 1)
    name = next((k for k, v in factors.items() if abs(c1 - v) < FIT),
                "unseen" if math.isnan(c1) else "other")
    texts = {"unbiased": f"unbiased (x m/(m-1), m = {m})", "biased": "biased (1/m)",
             "in_unbiased": f"the IN-unbiased BN variance (x S/(S-1), S = {S})",
             "unseen": "not seen: no batch enters the running averages (weight 0)",
             "other": f"scaled by {c1:.4g} (m = {m})"}
    report.add("running variance", texts[name], f"unbiased (x m/(m-1), m = {m})",
               None if name == "unseen" else name == "unbiased", running_var=name)
    _eval_row(p, report, placement, eps, (rm2, rv2))
    if kind != "exponential" or name != "unbiased" or not 0 < w1 <= 1:
        return None
    exp_m, exp_v = reference.running_update(np.zeros(C), np.ones(C), mu1, np.full(C, v1),
                                            count=m, momentum=_round(w1, 6))
    exp_m, exp_v = reference.running_update(exp_m, exp_v, mu2, np.full(C, v2), count=m,
                                            momentum=_round(w1, 6))
    if not (np.allclose(rm2, exp_m, rtol=1e-9) and np.allclose(rv2, exp_v, rtol=1e-9)):
        return None
    return {"momentum": _round(w1, 6)}


def _eval_row(p: _Probe, report: Report, placement: str, eps: float,
              running: tuple[np.ndarray, np.ndarray]) -> None:
    rm, rv = running
    view = (1, p.C) + (1,) * (len(p.shape) - 2)
    x = p.rng.standard_normal(p.shape) * 2 + 1
    y = p.run(x, training=False)
    den = (np.sqrt(rv) + eps) if placement == "added_to_std" else np.sqrt(rv + eps)
    uses_running = bool(np.allclose(y, (x - rm.reshape(view)) / den.reshape(view),
                                    rtol=1e-9, atol=1e-12))
    report.add("inference statistics", "running mean and variance" if uses_running
               else "not the running statistics", "running mean and variance",
               uses_running, inference="running" if uses_running else "other")


def _gradient_rows(p: _Probe, report: Report) -> None:
    """dgamma, dbeta exactly and dx by central differences, from the impl's own forward."""
    if not p.impl.has_vjp:
        report.add("gradients", "not probed (no vector-Jacobian product)", "", None)
        return
    x = p.rng.standard_normal(p.shape) * 2 + 1
    gamma, beta = p.rng.uniform(0.5, 2, p.C), p.rng.uniform(-1, 1, p.C)
    dy = p.rng.standard_normal(p.shape)
    if p.method == "sn":  # every scope in the mixture, so that each term of the backward counts
        kept, p.logits = p.logits, (p.rng.normal(0, 1, 3), p.rng.normal(0, 1, 3))
        try:
            _gradients(p, report, x, gamma, beta, dy)
        finally:
            p.logits = kept
        return
    _gradients(p, report, x, gamma, beta, dy)


def _gradients(p: _Probe, report: Report, x: np.ndarray, gamma: np.ndarray, beta: np.ndarray,
               dy: np.ndarray) -> None:
    """The rows of :func:`_gradient_rows` at ``x``, ``gamma``, ``beta`` (and, for SN, the
    probe's logits, whose gradients are checked by central differences too)."""
    grads = p.impl.vjp(dy, x, p.params(gamma, beta))
    axes = (0,) + tuple(range(2, len(p.shape)))
    x_hat = p.run(x)
    want = {"dgamma": np.sum(dy * x_hat, axis=axes), "dbeta": np.sum(dy, axis=axes),
            "dx": _central_differences(lambda xx: float(np.sum(dy * p.run(xx, gamma=gamma,
                                                                           beta=beta))), x)}
    names = ["dx", "dgamma", "dbeta"]
    if p.method == "sn":
        assert p.logits is not None
        for i, name in enumerate(("dmean_logits", "dvar_logits")):
            def loss(lg: np.ndarray, i: int = i) -> float:
                logits = list(p.logits)  # type: ignore[arg-type]
                logits[i] = lg
                params = (gamma, beta, *logits)
                return float(np.sum(dy * np.asarray(p.impl.forward(x, params, training=True),
                                                    dtype=np.float64)))
            want[name] = _central_differences(loss, np.asarray(p.logits[i], dtype=np.float64))
            names.append(name)
    got = dict(zip(names, grads, strict=False))
    if not p.impl.affine:
        del want["dgamma"], want["dbeta"]
    for param in ("gamma", "beta"):  # a parameter the implementation lacks has no gradient
        if param in p.impl.absent:
            want.pop("d" + param, None)
    wrong = []
    for name, w in want.items():
        scale = float(np.max(np.abs(w))) or 1.0
        g = got.get(name)
        if g is None:
            wrong.append(f"{name} (none given)")
        # central differences with h = 1e-5 are accurate to ~1e-9 of the scale
        elif g.shape != w.shape or np.max(np.abs(g - w)) > 1e-6 * scale:
            wrong.append(name + _which_sum(g, dy * x_hat if name == "dgamma" else dy,
                                           axes) * (name != "dx"))
    found = "consistent with its forward" if not wrong else "wrong: " + "; ".join(wrong)
    report.add("gradients", found, "closed form, gradchecked", not wrong,
               gradients="consistent" if not wrong else wrong)


def _which_sum(got: np.ndarray, terms: np.ndarray, axes: tuple[int, ...]) -> str:
    """Which reduction of ``terms`` to (C,) ``got`` is, when it is not the sum over ``axes``."""
    names = {0: "N"} | {a: f"spatial axis {a}" for a in axes[1:]}
    for r in range(1, len(axes) + 1):
        for summed in _subsets(axes, r):
            rest = tuple(a for a in axes if a not in summed)
            candidate = np.mean(np.sum(terms, axis=summed, keepdims=True), axis=rest)
            candidate = candidate.reshape(-1)
            if candidate.shape == got.shape and np.allclose(got, candidate, rtol=1e-9):
                summed_names = ", ".join(names[a] for a in summed)
                return (f" (summed over {summed_names} only"
                        + (f", averaged over {', '.join(names[a] for a in rest)})"
                           if rest else ")"))
    return ""


def _subsets(axes: tuple[int, ...], r: int) -> list[tuple[int, ...]]:
    from itertools import combinations
    return [c for c in combinations(axes, r) if len(c) < len(axes)]


def _central_differences(L: Callable[[np.ndarray], float], x: np.ndarray,
                         h: float = 1e-5) -> np.ndarray:
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        g[i] = (L(xp) - L(xm)) / (2 * h)
    return g


def _sn_rows(p: _Probe, report: Report, eps: float) -> tuple[str, int]:
    """Tied or separate ratios; IN variance estimator. Returns (ratios, in_correction)."""
    ids = reference.group_ids("in", p.shape)
    N, C = p.shape[:2]
    S = math.prod(p.shape[2:])
    p.logits = (_one_hot("in"), _one_hot("in"))
    D, s, m = _ladder(p, ids)
    f = _factor(D, s)
    in_correction = 1 if abs(f - S / (S - 1)) < FIT else 0
    report.add("IN variance", "unbiased (1/(S-1))" if in_correction else
               ("biased (1/S)" if abs(f - 1) < FIT else f"scaled by {f:.4g}"),
               "biased (1/S)", not in_correction, in_variance=["biased", "unbiased"]
               [in_correction])
    x = p.rng.standard_normal(p.shape) * 2 + 1
    x += 3 * p.rng.standard_normal((N, C) + (1,) * (len(p.shape) - 2))
    p.logits = (_one_hot("in"), _one_hot("bn"))
    y = p.run(x)
    opts = {"eps": eps or 1e-300,
            "options": refnorm.SwitchableOptions(in_correction=in_correction)}
    candidates = {"separate": p.logits, "tied (mean ratios for both)":
                  (_one_hot("in"), _one_hot("in")), "tied (variance ratios for both)":
                  (_one_hot("bn"), _one_hot("bn"))}
    found = "other"
    for name, logits in candidates.items():
        ref, _ = reference.forward("sn", x, (np.ones(C), np.zeros(C), *logits), opts)
        if np.allclose(y, ref, rtol=1e-6, atol=1e-9):
            found = name
            break
    report.add("ratios", found, "separate for means and variances", found == "separate",
               ratios=found.split(" ")[0])
    return found, in_correction


# -- matching ----------------------------------------------------------------------------------


def _verify(impl: Impl, method: str, shape: tuple[int, ...], options: dict[str, Any],
            rng: np.random.Generator, dtype: Any = np.float64) -> tuple[bool, float]:
    """Run ``impl`` and refnorm on three inputs; (all within tolerance, max |error|)."""
    C = shape[0] if method in ("ws", "wn") else shape[1]
    eps = options["eps"]
    cases = []
    for kind in ("plain", "tiny_variance", "plain"):
        x = rng.standard_normal(shape) * 5 + 12                  # a real mean, as gradcheck
        if kind == "tiny_variance":
            x = 12 + rng.standard_normal(shape) * 0.1 * math.sqrt(eps)
        params: list[np.ndarray] = []
        for name in reference.PARAM_NAMES[method]:
            if name.endswith("logits"):
                params.append(rng.standard_normal(3))
            elif not impl.affine or name in impl.absent:  # what it lacks: 1 or 0, as unused
                params.append(np.ones(C) if name == "gamma" else np.zeros(C))
            else:
                params.append(rng.uniform(0.5, 2, C) * (1 if name != "beta" else 0.5))
        cases.append(Case(method, kind, x.astype(dtype), tuple(params),
                          rng.standard_normal(shape), float(eps), options.get("num_groups")))
    ok, worst = True, 0.0
    for case in cases:
        ref = reference_outputs(case, options, with_grads=False)
        got = np.asarray(impl.forward(case.x, case.params, training=True), dtype=np.float64)
        err = float(np.max(np.abs(got - ref["y"]))) if got.shape == ref["y"].shape else math.inf
        worst = max(worst, err if not math.isnan(err) else math.inf)
        ok = ok and err <= tolerances(case, ref)["y"]
    return ok, worst


def _conclude(report: Report, impl: Impl, shape: tuple[int, ...],
              candidates: list[dict[str, Any]], running: dict[str, Any] | None,
              rng: np.random.Generator, conventions_ok: bool) -> None:
    method = report.method
    results = []
    for opts in candidates:
        ok, err = _verify(impl, method, shape, opts, rng)
        results.append((ok and conventions_ok, err, opts))
    # a match with the least residual; with none, the first candidate, which follows the
    # conventions found above (SN's IN variance as probed): the closest never contradicts them
    results.sort(key=lambda r: (not r[0], r[1] if r[0] else 0.0))
    ok, err, opts = results[0]
    text = reference.describe(method, opts)
    if running is not None:
        text += (f"; running statistics: refnorm.core.running.update_running_stats("
                 f"momentum={running['momentum']!r})")
    elif report.conventions.get("running") not in (None, "none"):
        text += "; running statistics: no refnorm option (see the rows above)"
    report.residual = err
    if ok:
        report.match = text
    else:
        report.closest = text


def fingerprint(method: str, impl: Any, *, backward: Callable[..., Any] | None = None,
                convert: Callable[[np.ndarray], Any] | None = None,
                num_channels: int | None = None, spatial: int | None = None,
                seed: int = 0) -> Report:
    """Probe ``impl`` and report which conventions it follows and which refnorm options match.

    Parameters
    ----------
    method : {"bn", "in", "ln", "gn", "sn", "ws", "wn"}
    impl : callable, stateful object or torch.nn.Module (see :mod:`refnorm.testing.adapters`)
    backward, convert : optional, as in :func:`refnorm.testing.assert_matches`
    num_channels : int, optional
        C for the probes (default: the implementation's, else 4; 12 for GN, so that any
        G in 1, 2, 3, 4, 6, 12 can be found, or 2 G for a ``num_groups`` G that does not
        divide 12).
    spatial : int, optional
        The number of spatial axes of the probe input, 0 to 3 (default: the
        implementation's, else 2).
    seed : int
        For the probe inputs.

    Returns
    -------
    Report
        ``str(report)`` is the table; ``report.conventions`` the findings by key.
    """
    for name, value, low, high, want in (("num_channels", num_channels, 1, math.inf, ">= 1"),
                                         ("spatial", spatial, 0, 3, "from 0 to 3")):
        if value is not None and not (is_int(value) and low <= int(value) <= high):
            raise ValueError(f"{name} must be None or an int {want}; got {value!r}")
    if not is_int(seed) or int(seed) < 0:
        raise ValueError(f"seed must be an int >= 0; got {seed!r}")
    impl = as_impl(method, impl, backward=backward, convert=convert)
    rng = np.random.default_rng(seed)
    report = Report(reference.check_method(method), impl.description)
    if method in ("ws", "wn"):
        return _fingerprint_weights(report, impl, num_channels, rng)
    p = _Probe(impl, method, _probe_shape(method, impl, num_channels, spatial), rng)
    if method == "sn":
        p.logits = (_one_hot("bn"), _one_hot("bn"))
    _check_output(p, np.random.default_rng([seed, 1]))
    ids, scope_ok = _scope(p, report)
    if method == "sn":
        p.logits = (_one_hot("in"), _one_hot("in"))
    if ids is not None:
        f, placement, eps = _variance_rows(p, report, ids, "variance in normalization",
                                           "variance")
        _offset_row(p, report, ids, f, placement, eps)
    else:                                  # nothing to standardize
        report.add("variance in normalization", "not probed (no statistic of two values)",
                   "biased (1/m)", None, variance="not probed")
        hint = p.impl.hints.get("eps")
        placement, eps = "unknown", hint if isinstance(hint, float) else 1e-5
    per_channel = (_affine_row(p, report)
                   or report.conventions.get("affine") not in ("per_element", "no_beta"))
    options: dict[str, Any] = {"eps": eps or 1e-300}
    ok = ((method == "sn" or report.conventions["variance"] == "biased")
          and placement in ("inside_sqrt", "none") and scope_ok and per_channel)
    if method == "gn":
        options["num_groups"] = report.conventions["num_groups"]
        ok = ok and report.conventions["group_layout"] in ("consecutive", "n/a")
    candidates = [options]
    if method == "sn":
        ratios, in_correction = _sn_rows(p, report, eps)
        candidates = [{**options, "options": refnorm.SwitchableOptions(in_correction=c)}
                      for c in (in_correction, 1 - in_correction)]
        ok = ok and ratios == "separate"
        p.logits = (_one_hot("bn"), _one_hot("bn"))
    per_instance = reference.group_ids("in" if len(p.shape) > 2 else "bn", p.shape)
    running = _running_rows(p, report, per_instance, placement, eps) \
        if method in ("bn", "in", "sn") else None
    if report.conventions.get("running") not in (None, "none") and running is None:
        ok = False                       # buffers follow no refnorm option
    ok = ok and report.conventions.get("inference", "running") == "running"
    _gradient_rows(p, report)
    ok = ok and report.conventions.get("gradients", "consistent") == "consistent"
    ok = ok and report.conventions.get("offset_precision") == "ok"
    _conclude(report, impl, p.shape, candidates, running, rng, ok)
    return report


# -- weight-side methods -----------------------------------------------------------------------


def _fingerprint_weights(report: Report, impl: Impl, num_channels: int | None,
                         rng: np.random.Generator) -> Report:
    method = report.method
    hints = impl.hints
    C = num_channels or hints.get("num_channels") or 3
    shape = tuple(hints.get("weight_shape", (C, 2, 2, 2)))
    ids = reference.group_ids(method, shape)
    I = math.prod(shape[1:])
    g = (np.ones(shape[0]),) if method == "wn" else ()

    def run(w: np.ndarray) -> np.ndarray:
        return np.asarray(impl.forward(w, g, training=True), dtype=np.float64)

    z = _standardize(rng.standard_normal(shape), ids)
    if method == "wn":
        z = z / math.sqrt(I)                                          # unit norm per filter
    s = np.array(LADDER)
    D = np.array([_scale(z, run(si * z), ids) * si for si in s])
    f = _factor(D, s)
    if method == "ws":
        name = _estimator(f, I)
        report.add("std estimator", {"biased": "biased (1/I)",
                                     "unbiased": f"unbiased (1/(I-1), I = {I})",
                                     "other": f"scaled by {f:.4g}"}[name],
                   "biased (1/I), the paper's Eq. (4)", name == "biased", std=name)
        placement, eps = _eps_rows(report, D, s, hints.get("eps"), "sigma + eps", "var")
        candidates = [{"eps": eps or 1e-300, "eps_mode": mode, "correction": corr}
                      for mode in ("add", "sqrt") for corr in (0, 1)]
        pick = {"added_to_std": "add", "inside_sqrt": "sqrt"}.get(placement, "add")
        candidates.sort(key=lambda o: (o["eps_mode"] != pick,
                                       o["correction"] != (name == "unbiased")))
        ok = name in ("biased", "unbiased") and placement != "unknown"
    else:
        report.add("norm", "Frobenius norm per output channel" if abs(f - 1) < FIT
                   else f"scaled by {f:.4g}", "Frobenius norm per output channel",
                   abs(f - 1) < FIT)
        placement, eps = _eps_rows(report, D, s, hints.get("eps"), "||v|| + eps",
                                   "||v||^2")
        # refnorm needs eps > 0; one far below the filter norms (~1) reproduces eps = 0
        candidates = [{"eps": eps or 1e-300}]
        ok = placement in ("added_to_std", "none")
    _weight_gradient_row(report, impl, shape, g, rng)
    ok = ok and report.conventions.get("gradients", "consistent") == "consistent"
    _conclude(report, impl, shape, candidates, None, rng, ok)
    return report


def _weight_gradient_row(report: Report, impl: Impl, shape: tuple[int, ...],
                         g: tuple[np.ndarray, ...], rng: np.random.Generator) -> None:
    if not impl.has_vjp:
        report.add("gradients", "not probed (no vector-Jacobian product)", "", None)
        return
    w = rng.standard_normal(shape) + 0.5
    dy = rng.standard_normal(shape)
    gv = tuple(rng.uniform(0.5, 2, shape[0]) for _ in g)
    grads = impl.vjp(dy, w, gv)

    def L(ww: np.ndarray) -> float:
        return float(np.sum(dy * np.asarray(impl.forward(ww, gv), dtype=np.float64)))

    want = [_central_differences(L, w)]
    if g:
        unit = np.asarray(impl.forward(w, (np.ones(shape[0]),)), dtype=np.float64)
        want.append(np.sum((dy * unit).reshape(shape[0], -1), axis=1))
    names = ["dw" if report.method == "ws" else "dv", "dg"]
    wrong = [names[i] + " (none given)" * (a is None)
             for i, (a, b) in enumerate(zip(grads, want, strict=False))
             if a is None or np.shape(a) != b.shape
             or np.max(np.abs(np.asarray(a) - b)) > 1e-6 * (np.max(np.abs(b)) or 1.0)]
    report.add("gradients", "consistent with its forward" if not wrong else
               "wrong: " + ", ".join(wrong), "closed form, gradchecked", not wrong,
               gradients="consistent" if not wrong else wrong)


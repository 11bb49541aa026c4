"""Switchable Normalization, Appendix A (single GPU), Eq. (6)-(14), and §3.1 Eq. (4),
transcribed as printed.

Luo et al. (2019), *Switchable Normalization for Learning-to-Normalize Deep Representation*
(journal version), Appendix A. The appendix ties the mean and variance ratios ("the
importance weights are shared among the means and variances for clarity of notations"), so
every function here takes one ratio vector ``w`` over the scopes (in, ln, bn), and the
checks build a tied SN (``mean_logits == var_logits``) to compare against.

Each ``printed_eq*`` function computes what the printed equation says, nothing corrected;
:func:`check_appendix` compares each with central finite differences of the quantity it
claims to be and reports whether they agree. Eq. (13), the gradient of lambda_ln, is taken in
the form symmetric with Eq. (12) and (14), the softmax Jacobian (:func:`printed_eq13`).

Also here: the statistics of Eq. (4) as printed (:func:`printed_eq4`, the one-pass
``E[h^2] - mu^2``), which refnorm's reference replaces by the law of total variance, and
:func:`check_eq4_float32`, which measures what the printed form loses in float32.

Shapes: ``h`` is the input viewed as (N, C, S) with S = H * W; per-(n, c) statistics are
(N, C, 1) as the appendix reshapes them ("a vector of N x C entries").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refnorm.backend import Array, array_namespace
from refnorm.errata.findings import AGREES, Finding, finding, relative, to_markdown
from refnorm.gradcheck import numerical_vjp
from refnorm.norms.switchable_norm import (
    SCOPES,
    SwitchableOptions,
    in_moments,
    ratios,
    scope_moments,
    switchable_norm_backward,
    switchable_norm_forward,
)

__all__ = ["AGREES", "Finding", "check_appendix", "check_eq4_float32", "printed_eq4",
           "to_markdown"]


def printed_eq4(h: Array, *, in_correction: int = 0) -> tuple[dict, dict]:
    """Eq. (4) as printed: the LN and BN statistics from the IN moments, one-pass variances.

    ``sigma_k^2 = mean(sigma_in^2 + mu_in^2) - mu_k^2`` over the IN groups of the scope:
    right in exact arithmetic, but the two terms are near ``mean(h)^2`` and cancel in
    float32 when the data sit far from zero. (With ``in_correction=1``, the official code's
    unbiased IN variance, the same formula is what that code computes.)

    Parameters
    ----------
    h : array, (N, C, S)
    in_correction : {0, 1}
        1: the IN variance unbiased (``S - 1``), as the official code.

    Returns
    -------
    mu, var : dicts with keys "in" (N, C, 1), "ln" (N, 1, 1), "bn" (1, C, 1)
    """
    xp = array_namespace(h)
    mu_in, _, var_in = in_moments(h, in_correction=in_correction)   # the mean as rounded
    mu, var = {"in": mu_in}, {"in": var_in}
    for scope, axis in (("ln", 1), ("bn", 0)):
        mu[scope] = xp.mean(mu_in, axis=axis, keepdims=True)                       # Eq. (4)
        second = xp.mean(var_in + mu_in * mu_in, axis=axis, keepdims=True)         # E[h^2]
        var[scope] = second - mu[scope] * mu[scope]                                # Eq. (4)
    return mu, var


# -- the printed formulas ---------------------------------------------------------------------


def printed_eq6(dy: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """Eq. (6): dL/dh~ = dL/dh^ * gamma. (N, C, S)."""
    return dy * gamma.reshape(1, -1, 1)


def printed_eq7(dx_tilde: np.ndarray, x_tilde: np.ndarray, var: np.ndarray, eps: float):
    """Eq. (7): dL/dsigma^2 = -1 / (2 (sigma^2 + eps)) sum_ij dL/dh~ h~. (N, C, 1)."""
    return -1.0 / (2.0 * (var + eps)) * np.sum(dx_tilde * x_tilde, axis=2, keepdims=True)


def printed_eq8(dx_tilde: np.ndarray, var: np.ndarray, eps: float) -> np.ndarray:
    """Eq. (8): dL/dmu = -1 / sqrt(sigma^2 + eps) sum_ij dL/dh~. (N, C, 1)."""
    return -1.0 / np.sqrt(var + eps) * np.sum(dx_tilde, axis=2, keepdims=True)


def printed_eq9(h, dx_tilde, var, eps, w, stats) -> np.ndarray:
    """Eq. (9): dL/dh, with ``stats = (mu, dvar, dmu)``; ``mu`` a dict by scope. (N, C, S).

    ``w = (w_in, w_ln, w_bn)``; ``dvar``, ``dmu`` are Eq. (7) and (8).
    """
    mu, dvar, dmu = stats
    N, C, S = h.shape
    w_in, w_ln, w_bn = w
    return (dx_tilde / np.sqrt(var + eps)
            + 2 * w_in * (h - mu["in"]) / S * dvar
            + 2 * w_ln * (h - mu["ln"]) / (C * S) * np.sum(dvar, axis=1, keepdims=True)
            + 2 * w_bn * (h - mu["bn"]) / (N * S) * np.sum(dvar, axis=0, keepdims=True)
            + w_in / S * dmu
            + w_ln / (C * S) * np.sum(dmu, axis=1, keepdims=True)
            + w_bn / (N * S) * np.sum(dmu, axis=0, keepdims=True))


def printed_eq10(dy: np.ndarray, x_tilde: np.ndarray) -> float:
    """Eq. (10): dL/dgamma = sum over n, c, i, j of dL/dh^ h~ (one number)."""
    return float(np.sum(dy * x_tilde))


def printed_eq11(dy: np.ndarray) -> float:
    """Eq. (11): dL/dbeta = sum over n, c, i, j of dL/dh^ (one number)."""
    return float(np.sum(dy))


def _scope_sums(dmu, dvar, mu, var) -> dict[str, float]:
    """``sum_nc (dL/dmu_nc mu_k + dL/dsigma^2_nc sigma_k^2)`` for each scope k."""
    return {k: float(np.sum(dmu * mu[k] + dvar * var[k])) for k in SCOPES}


def printed_eq12(w, sums) -> float:
    """Eq. (12): dL/dlambda_in = w_in (1 - w_in) S_in - w_in w_ln S_ln - w_in w_bn S_bn."""
    w_in, w_ln, w_bn = w
    return w_in * (1 - w_in) * sums["in"] - w_in * w_ln * sums["ln"] - w_in * w_bn * sums["bn"]


def printed_eq13(w, sums) -> float:
    """Eq. (13), read by symmetry: w_ln (1 - w_ln) S_ln - w_ln w_in S_in - w_ln w_bn S_bn."""
    w_in, w_ln, w_bn = w
    return w_ln * (1 - w_ln) * sums["ln"] - w_ln * w_in * sums["in"] - w_ln * w_bn * sums["bn"]


def printed_eq14(w, sums) -> float:
    """Eq. (14): dL/dlambda_bn = w_bn (1 - w_bn) S_bn - w_in w_bn S_in - w_ln w_bn S_ln."""
    w_in, w_ln, w_bn = w
    return w_bn * (1 - w_bn) * sums["bn"] - w_in * w_bn * sums["in"] - w_ln * w_bn * sums["ln"]


# -- the checks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Problem:
    h: np.ndarray        # (N, C, S)
    gamma: np.ndarray    # (C,)
    beta: np.ndarray     # (C,)
    lam: np.ndarray      # (3,), tied mean and variance control parameters
    dy: np.ndarray       # (N, C, S)
    eps: float


def _problem(seed: int) -> _Problem:
    rng = np.random.default_rng(seed)
    N, C, S = 3, 4, 6
    return _Problem(5 * rng.standard_normal((N, C, S)) + 12, 1 + 0.5 * rng.standard_normal(C),
                    0.5 * rng.standard_normal(C), rng.standard_normal(3),
                    rng.standard_normal((N, C, S)), 1e-5)


def _sn(p: _Problem, h=None, gamma=None, beta=None, lam=None) -> np.ndarray:
    """Tied SN forward on the (N, C, S) view; any argument replaces the problem's."""
    h = p.h if h is None else h
    lam = p.lam if lam is None else lam
    y, _ = switchable_norm_forward(h, p.gamma if gamma is None else gamma,
                                   p.beta if beta is None else beta, lam, lam, eps=p.eps)
    return y


def _finding(equation, quantity, printed, truth, note) -> Finding:
    return finding(equation, quantity, relative(printed, truth), note)


def check_appendix(seed: int = 0) -> list[Finding]:
    """Check every printed equation of Appendix A (single GPU) against finite differences."""
    p = _problem(seed)
    h, eps = p.h, p.eps
    w = ratios(p.lam)                                            # tied ratios, Eq. (5)
    mu, var = scope_moments(h, SwitchableOptions())              # Eq. (4)
    mu_mix = sum(w[i] * mu[k] for i, k in enumerate(SCOPES))     # (N, C, 1)
    var_mix = sum(w[i] * var[k] for i, k in enumerate(SCOPES))   # (N, C, 1)
    x_tilde = (h - mu_mix) / np.sqrt(var_mix + eps)              # (N, C, S)
    g = p.gamma.reshape(1, -1, 1)

    def out_of_x_tilde(x_tilde):
        return g * x_tilde + p.beta.reshape(1, -1, 1)

    def out_of_var(var_mix):
        return out_of_x_tilde((h - mu_mix) / np.sqrt(var_mix + eps))

    def out_of_mu(mu_mix):
        return out_of_x_tilde((h - mu_mix) / np.sqrt(var_mix + eps))

    true_dx_tilde = numerical_vjp(out_of_x_tilde, {"x_tilde": x_tilde}, p.dy, "x_tilde")
    true_dvar = numerical_vjp(out_of_var, {"var_mix": var_mix}, p.dy, "var_mix")
    true_dmu = numerical_vjp(out_of_mu, {"mu_mix": mu_mix}, p.dy, "mu_mix")
    true_dh = numerical_vjp(lambda h: _sn(p, h=h), {"h": h}, p.dy, "h")
    true_dgamma = numerical_vjp(lambda gamma: _sn(p, gamma=gamma), {"gamma": p.gamma}, p.dy,
                                "gamma")
    true_dbeta = numerical_vjp(lambda beta: _sn(p, beta=beta), {"beta": p.beta}, p.dy, "beta")
    true_dlam = numerical_vjp(lambda lam: _sn(p, lam=lam), {"lam": p.lam}, p.dy, "lam")

    dx_tilde = printed_eq6(p.dy, p.gamma)
    dvar = printed_eq7(dx_tilde, x_tilde, var_mix, eps)
    dmu = printed_eq8(dx_tilde, var_mix, eps)
    sums = _scope_sums(dmu, dvar, mu, var)
    # refnorm's backward, for the corrected forms of Eq. (10)-(11)
    refnorm = switchable_norm_backward(p.dy, switchable_norm_forward(
        h, p.gamma, p.beta, p.lam, p.lam, eps=eps)[1])
    per_channel = "with per-channel gamma, beta (SN's Table 1, the official code)"
    return [
        _finding("Eq. (6)", "dL/dh~", dx_tilde, true_dx_tilde,
                 "agrees, reading gamma as the channel's gamma_c"),
        _finding("Eq. (7)", "dL/dsigma^2 per (n, c)", dvar, true_dvar, "agrees"),
        _finding("Eq. (8)", "dL/dmu per (n, c)", dmu, true_dmu,
                 "agrees (mu and sigma^2 of Eq. 3 as independent variables)"),
        _finding("Eq. (9)", "dL/dh", printed_eq9(h, dx_tilde, var_mix, eps, w, (mu, dvar, dmu)),
                 true_dh, "agrees for tied ratios and the biased IN variance; with separate "
                 "ratios the variance terms take w'_k"),
        _finding("Eq. (10)", "dL/dgamma", printed_eq10(p.dy, x_tilde), true_dgamma,
                 f"disagrees {per_channel}: the printed sum over c adds up every channel's "
                 "gradient; sum over (n, i, j) only"),
        _finding("Eq. (10), scalar gamma", "sum_c dL/dgamma_c", printed_eq10(p.dy, x_tilde),
                 float(np.sum(true_dgamma)), "agrees: the printed form is the gradient of one "
                 "gamma shared by all channels"),
        _finding("Eq. (11)", "dL/dbeta", printed_eq11(p.dy), true_dbeta,
                 f"disagrees {per_channel}: sum over (n, i, j) only"),
        _finding("Eq. (10)-(11), corrected", "dL/dgamma_c, dL/dbeta_c",
                 np.concatenate([refnorm.dgamma, refnorm.dbeta]),
                 np.concatenate([true_dgamma, true_dbeta]),
                 "agrees: refnorm's backward, the sums over (n, i, j) per channel"),
        _finding("Eq. (12)", "dL/dlambda_in", printed_eq12(w, sums), true_dlam[0],
                 "agrees (tied ratios: the mean and variance parts summed)"),
        _finding("Eq. (13)", "dL/dlambda_ln", printed_eq13(w, sums), true_dlam[1],
                 "agrees, read by symmetry with Eq. (12) and (14)"),
        _finding("Eq. (14)", "dL/dlambda_bn", printed_eq14(w, sums), true_dlam[2], "agrees"),
    ]


@dataclass(frozen=True)
class Eq4Measurement:
    """The BN-scope variance of float32 data far from zero, printed vs stable Eq. (4)."""

    offset: float
    paper_rel_error: float
    stable_rel_error: float


def check_eq4_float32(offset: float = 1e4, seed: int = 0) -> Eq4Measurement:
    """Relative error of the float32 BN-scope variance against float64, for both forms.

    Inputs have unit variance around ``offset``: the printed ``E[h^2] - mu^2``
    (:func:`printed_eq4`) subtracts two numbers near ``offset^2`` whose float32 spacing
    exceeds the variance itself; refnorm's :func:`~refnorm.norms.switchable_norm.scope_moments`
    does not.
    """
    rng = np.random.default_rng(seed)
    h64 = offset + rng.standard_normal((8, 4, 64))
    h32 = h64.astype(np.float32)
    reference = scope_moments(h32.astype(np.float64), SwitchableOptions())[1]["bn"]
    printed = printed_eq4(h32)[1]["bn"].astype(np.float64)
    stable = scope_moments(h32, SwitchableOptions())[1]["bn"].astype(np.float64)
    return Eq4Measurement(offset, float(np.max(np.abs(printed - reference) / reference)),
                          float(np.max(np.abs(stable - reference) / reference)))

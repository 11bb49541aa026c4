"""The SN of Luo, Peng, Ren & Zhang's study of distinct normalizers, Eq. (1), transcribed as
printed, beside the SN journal version's Eq. (3), which refnorm implements.

Luo, Peng, Ren & Zhang, *Do Normalization Layers in a Deep ConvNet Really Need to Be
Distinct?* (preprint, 2018), a study that uses Switchable Normalization, §2:

    h^_sn = (h - sum_z lambda^mu_z mu_z) / sum_z lambda^sigma_z sigma_z          # Eq. (1)

divides by a ratio-weighted average of the scopes' *standard deviations*, with no eps. The
journal version's Eq. (3), the official code and refnorm
(:func:`refnorm.norms.switchable_norm.switchable_norm_forward`) take the square root of a
weighted average of *variances*, plus eps. The square root is concave and the ratios sum to
1, so ``sum_z lambda_z sigma_z <= sqrt(sum_z lambda_z sigma_z^2)`` (Jensen), with equality
exactly when every scope with a positive ratio has the same standard deviation: with one-hot
ratios the two forms agree up to eps, with soft ratios over scopes whose variances differ
they do not. :func:`compare` measures both on one problem.

Shapes: ``h`` is the input viewed as (N, C, S), the statistics (N, C, 1) after mixing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refnorm.errata.findings import relative
from refnorm.norms.switchable_norm import (
    SCOPES,
    SwitchableOptions,
    ratios,
    scope_moments,
    switchable_norm_forward,
)


def printed_eq1(h: np.ndarray, mean_logits: np.ndarray, std_logits: np.ndarray, *,
                hard: bool = False) -> np.ndarray:
    """Eq. (1) as printed, with the ratios a softmax of the logits (one-hot with ``hard``).

    Parameters
    ----------
    h : array, (N, C, S)
    mean_logits, std_logits : arrays, (3,)
        The control parameters of ``lambda^mu`` and ``lambda^sigma``, scopes (in, ln, bn).
    hard : bool
        One-hot ratios (the argmax of each softmax) instead of the softmax.

    Returns
    -------
    array, (N, C, S)
    """
    mu, var = scope_moments(h, SwitchableOptions())
    w_mu, w_sigma = ratios(mean_logits, hard=hard), ratios(std_logits, hard=hard)
    mean = sum(w_mu[i] * mu[k] for i, k in enumerate(SCOPES))                   # (N, C, 1)
    std = sum(w_sigma[i] * np.sqrt(var[k]) for i, k in enumerate(SCOPES))       # (N, C, 1)
    return (h - mean) / std                                                      # Eq. (1)


@dataclass(frozen=True)
class Comparison:
    """The study's Eq. (1) against the journal's Eq. (3) on one problem.

    Attributes
    ----------
    one_hot : float
        Max relative difference of the outputs with one-hot ratios (each scope in turn):
        eps only.
    soft : float
        Max relative difference with soft ratios.
    jensen_gap : float
        The smallest ``sqrt(sum w sigma^2) - sum w sigma`` over (n, c), relative to the
        root: >= 0 by Jensen's inequality, 0 only where the scopes' deviations are equal.
    """

    one_hot: float
    soft: float
    jensen_gap: float


def compare(seed: int = 0, eps: float = 1e-12) -> Comparison:
    """Measure how far the study's form is from refnorm's (the journal's, ``eps``)."""
    rng = np.random.default_rng(seed)
    # channels of standard deviation 1, 3 and 9: the LN scope pools them, IN and BN do not
    h = np.array([1.0, 3.0, 9.0]).reshape(1, 3, 1) * rng.standard_normal((4, 3, 6)) + 12
    ones, zeros = np.ones(3), np.zeros(3)
    one_hot = 0.0
    for scope in range(3):
        logits = np.where(np.arange(3) == scope, 1.0, 0.0)
        hard = SwitchableOptions(hard=True)
        journal = switchable_norm_forward(h, ones, zeros, logits, logits, eps=eps, options=hard)
        one_hot = max(one_hot, relative(printed_eq1(h, logits, logits, hard=True), journal[0]))
    mean_logits, std_logits = rng.standard_normal(3), rng.standard_normal(3)
    journal = switchable_norm_forward(h, ones, zeros, mean_logits, std_logits, eps=eps)[0]
    soft = relative(printed_eq1(h, mean_logits, std_logits), journal)
    _, var = scope_moments(h, SwitchableOptions())
    w = ratios(std_logits)
    root = np.sqrt(sum(w[i] * var[k] for i, k in enumerate(SCOPES)))
    average = sum(w[i] * np.sqrt(var[k]) for i, k in enumerate(SCOPES))
    return Comparison(float(one_hot), float(soft), float(np.min((root - average) / root)))


@dataclass(frozen=True)
class TiedRatiosRemark:
    """The study's remark after its Fig. 1: with ``lambda^mu = lambda^sigma``, Eq. (1) "can be
    reformulated as" ``sum_z lambda_z h^_z``, the ratio-weighted sum of the IN, LN and BN
    outputs.

    Attributes
    ----------
    one_hot : float
        Max relative difference of Eq. (1) and the weighted sum with one-hot tied ratios
        (each scope in turn): both are that scope's output.
    soft : float
        The same with tied soft ratios: Eq. (1) divides ``h - sum_z lambda_z mu_z`` by one
        average ``sum_z lambda_z sigma_z``, the sum divides each ``h - mu_z`` by its own
        ``sigma_z``; they agree only where the scopes' deviations are equal.
    """

    one_hot: float
    soft: float


def tied_ratios_remark(seed: int = 0) -> TiedRatiosRemark:
    """Measure the remark on :func:`compare`'s problem (channels of deviation 1, 3 and 9)."""
    rng = np.random.default_rng(seed)
    h = np.array([1.0, 3.0, 9.0]).reshape(1, 3, 1) * rng.standard_normal((4, 3, 6)) + 12
    mu, var = scope_moments(h, SwitchableOptions())
    outputs = {k: (h - mu[k]) / np.sqrt(var[k]) for k in SCOPES}                # (N, C, S)

    def difference(logits: np.ndarray, hard: bool) -> float:
        w = ratios(logits, hard=hard)
        weighted_sum = sum(w[i] * outputs[k] for i, k in enumerate(SCOPES))
        return relative(printed_eq1(h, logits, logits, hard=hard), weighted_sum)

    one_hot = max(difference(np.where(np.arange(3) == scope, 1.0, 0.0), True)
                  for scope in range(3))
    return TiedRatiosRemark(float(one_hot), float(difference(rng.standard_normal(3), False)))


def remark_to_markdown(r: TiedRatiosRemark) -> str:
    """The remark's measurement as a Markdown table."""
    return "\n".join([
        "| tied ratios | max relative difference, Eq. (1) vs the weighted sum of outputs |",
        "|---|---|",
        f"| one-hot (each scope in turn) | {r.one_hot:.1e} |",
        f"| soft (random control parameters) | {r.soft:.2g} |",
    ])


def to_markdown(c: Comparison) -> str:
    """The comparison as a Markdown table."""
    return "\n".join([
        "| ratios | max relative difference, study's Eq. (1) vs journal's Eq. (3) |",
        "|---|---|",
        f"| one-hot (each scope in turn) | {c.one_hot:.1e} |",
        f"| soft (random control parameters) | {c.soft:.2g} |",
    ])

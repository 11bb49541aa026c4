"""Switchable Normalization, Appendix A, "Forward and Backward for Multiple GPUs", Eq. (15)-(25),
transcribed as printed, and their checks.

Luo et al. (2019), journal version. P devices hold shards h_p of one batch; IN and LN statistics are
per device, the BN scope is synchronized (mu_sybn, sigma_sybn^2). As in Eq. (6)-(14) the
ratios are tied between means and variances. The truth for every quantity is central finite
differences of one device holding the concatenated batch, which synchronized SN must equal
(the defining property; tests/sync/ checks it on its own).

The problem has P = 2 devices with *unequal* shards (2 and 3 samples): the printed Eq.
(24)-(25) divide the BN-scope terms by P N H W, which is the batch's value count only when
every device holds N samples. Each is checked with the printed P N (N this device's batch)
and with the count of the whole batch.

Eq. (19)-(20), the gradients of lambda_ln and lambda_bn, are taken in the form symmetric with
Eq. (18), the softmax Jacobian, as Eq. (13) in the single-device case.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refnorm.errata.findings import Finding, finding, relative
from refnorm.errata.sn_appendix import printed_eq7, printed_eq8
from refnorm.gradcheck import numerical_vjp
from refnorm.norms.switchable_norm import (
    SCOPES,
    SwitchableOptions,
    ratios,
    scope_moments,
    statistic_gradients,
    switchable_norm_eval_forward,
    switchable_norm_forward,
)


@dataclass(frozen=True)
class DeviceTerms:
    """What Eq. (22)-(25) read on one device p.

    Attributes
    ----------
    h, dy : arrays, (N_p, C, S)
        The shard and its upstream gradient.
    mu : dict of scope to array
        "in" (N_p, C, 1), "ln" (N_p, 1, 1) local; "bn" (1, C, 1) the synchronized mu_sybn.
    var_p : array, (N_p, C, 1)
        The mixed variance sigma_p^2.
    dvar, dmu : arrays, (N_p, C, 1)
        dL/dsigma^2_p and dL/dmu_p, from Eq. (7)-(8) or from the printed Eq. (21).
    gamma : array, (C,)
    """

    h: np.ndarray
    dy: np.ndarray
    mu: dict
    var_p: np.ndarray
    dvar: np.ndarray
    dmu: np.ndarray
    gamma: np.ndarray


# -- the printed formulas ---------------------------------------------------------------------


def printed_eq15(h_p, mu_sybn, var_sybn, w, eps):
    """Eq. (15): h~_p = (h_p - mu_p) / sqrt(sigma_p^2 + eps) with the BN scope synchronized."""
    mu, var = scope_moments(h_p, SwitchableOptions())
    mu_p = w[0] * mu["in"] + w[1] * mu["ln"] + w[2] * mu_sybn
    var_p = w[0] * var["in"] + w[1] * var["ln"] + w[2] * var_sybn
    return (h_p - mu_p) / np.sqrt(var_p + eps)


def printed_eq16(dys, x_tildes):
    """Eq. (16): dL/dgamma = sum over p, n, i, j of dL/dh^ h~ (per channel)."""
    return sum(np.sum(dy * xt, axis=(0, 2)) for dy, xt in zip(dys, x_tildes, strict=True))


def printed_eq17(dys):
    """Eq. (17): dL/dbeta = sum over p, n, i, j of dL/dh^ (per channel)."""
    return sum(np.sum(dy, axis=(0, 2)) for dy in dys)


def _sums(dmus, dvars, mus, vars_) -> dict[str, float]:
    """S_k = sum_{p,n,c} (dL/dmu_p,nc mu_k,p + dL/dsigma^2_p,nc sigma^2_k,p)."""
    per_device = list(zip(dmus, dvars, mus, vars_, strict=True))
    return {k: float(sum(np.sum(dm * m[k] + dv * v[k]) for dm, dv, m, v in per_device))
            for k in SCOPES}


def printed_eq18_20(k: str, w, sums) -> float:
    """Eq. (18) (and (19), (20) by symmetry): w_k (1 - w_k) S_k - sum_{j != k} w_k w_j S_j."""
    i = SCOPES.index(k)
    return w[i] * (1 - w[i]) * sums[k] - sum(w[i] * w[j] * sums[s]
                                             for j, s in enumerate(SCOPES) if s != k)


def printed_eq21(dy, x_tilde, var_p, gamma, eps):
    """Eq. (21) as printed: (dL/dsigma^2_p, dL/dmu_p), each with two terms and a square root.

    dL/dsigma^2 = -1/(2 sqrt(s+eps)) sum dL/dh~ h~ - gamma/(2 sqrt(s+eps)) sum dL/dh^ h~
    dL/dmu      = -1/sqrt(s+eps) sum dL/dh~       - gamma/sqrt(s+eps) sum dL/dh^
    """
    g = gamma.reshape(1, -1, 1)
    dx_tilde = dy * g
    root = np.sqrt(var_p + eps)
    dvar = (-np.sum(dx_tilde * x_tilde, axis=2, keepdims=True) / (2 * root)
            - g * np.sum(dy * x_tilde, axis=2, keepdims=True) / (2 * root))
    dmu = (-np.sum(dx_tilde, axis=2, keepdims=True) / root
           - g * np.sum(dy, axis=2, keepdims=True) / root)
    return dvar, dmu


def printed_eq23_25(p: int, devices: list[DeviceTerms], w, eps: float, bn_count: int):
    """Eq. (22) = Term1 (23) + Term2 (24) + Term3 (25) on device ``p``. (N_p, C, S).

    ``bn_count`` is what divides the BN-scope terms: the printed P N (H W) or the whole
    batch's count.
    """
    d = devices[p]
    N, C, S = d.h.shape
    term1 = d.dy * d.gamma.reshape(1, -1, 1) / np.sqrt(d.var_p + eps)               # Eq. (23)
    all_dvar = sum(np.sum(q.dvar, axis=0, keepdims=True) for q in devices)          # sum_p,n
    all_dmu = sum(np.sum(q.dmu, axis=0, keepdims=True) for q in devices)
    term2 = (w[0] * 2 * (d.h - d.mu["in"]) / S * d.dvar                             # Eq. (24)
             + w[1] * 2 * (d.h - d.mu["ln"]) / (C * S) * np.sum(d.dvar, axis=1, keepdims=True)
             + w[2] * 2 * (d.h - d.mu["bn"]) / bn_count * all_dvar)
    term3 = (w[0] / S * d.dmu                                                         # Eq. (25)
             + w[1] / (C * S) * np.sum(d.dmu, axis=1, keepdims=True)
             + w[2] / bn_count * all_dmu)
    return term1 + term2 + term3


# -- the checks -------------------------------------------------------------------------------


def check_multi_gpu(seed: int = 0, shard_sizes: tuple[int, ...] = (2, 3)) -> list[Finding]:
    """Check Eq. (15)-(25) on P = len(shard_sizes) devices against one device's gradients."""
    rng = np.random.default_rng(seed)
    C, S, eps = 3, 4, 1e-5
    N_total = sum(shard_sizes)
    h = 5 * rng.standard_normal((N_total, C, S)) + 12
    gamma, beta = 1 + 0.5 * rng.standard_normal(C), 0.5 * rng.standard_normal(C)
    lam, dy = rng.standard_normal(3), rng.standard_normal(h.shape)
    w = ratios(lam)
    edges = np.cumsum((0,) + tuple(shard_sizes))
    shards = [slice(edges[p], edges[p + 1]) for p in range(len(shard_sizes))]

    def sn(h=h, gamma=gamma, beta=beta, lam=lam):
        return switchable_norm_forward(h, gamma, beta, lam, lam, eps=eps)[0]

    true_dh = numerical_vjp(lambda h: sn(h=h), {"h": h}, dy, "h")
    true_dgamma = numerical_vjp(lambda gamma: sn(gamma=gamma), {"gamma": gamma}, dy, "gamma")
    true_dbeta = numerical_vjp(lambda beta: sn(beta=beta), {"beta": beta}, dy, "beta")
    true_dlam = numerical_vjp(lambda lam: sn(lam=lam), {"lam": lam}, dy, "lam")

    # synchronized BN-scope statistics: pooled IN moments of every device
    mu_all, var_all = scope_moments(h, SwitchableOptions())
    mu_sybn, var_sybn = mu_all["bn"], var_all["bn"]               # (1, C, 1) each
    devices, x_tildes, dys, mus, vars_ = [], [], [], [], []
    eq21_dvar_err, eq21_dmu_err, corrected_err = 0.0, 0.0, 0.0
    for sl in shards:
        h_p, dy_p = h[sl], dy[sl]
        mu, var = scope_moments(h_p, SwitchableOptions())
        mu["bn"], var["bn"] = mu_sybn, var_sybn
        mu_p = sum(w[i] * mu[k] for i, k in enumerate(SCOPES))      # (N_p, C, 1)
        var_p = sum(w[i] * var[k] for i, k in enumerate(SCOPES))    # (N_p, C, 1)
        x_tilde = printed_eq15(h_p, mu_sybn, var_sybn, w, eps)
        g = gamma.reshape(1, -1, 1)

        def of_var(v, h_p=h_p, mu_p=mu_p, g=g):
            return g * (h_p - mu_p) / np.sqrt(v + eps) + beta.reshape(1, -1, 1)

        def of_mu(m, h_p=h_p, var_p=var_p, g=g):
            return g * (h_p - m) / np.sqrt(var_p + eps) + beta.reshape(1, -1, 1)

        true_dvar = numerical_vjp(of_var, {"v": var_p}, dy_p, "v")
        true_dmu = numerical_vjp(of_mu, {"m": mu_p}, dy_p, "m")
        dvar = printed_eq7(dy_p * g, x_tilde, var_p, eps)            # the single-GPU Eq. (7)
        dmu = printed_eq8(dy_p * g, var_p, eps)                       # and Eq. (8)
        p_dvar, p_dmu = printed_eq21(dy_p, x_tilde, var_p, gamma, eps)
        eq21_dvar_err = max(eq21_dvar_err, relative(p_dvar, true_dvar))
        eq21_dmu_err = max(eq21_dmu_err, relative(p_dmu, true_dmu))
        # refnorm's: Eq. (7)-(8) on this device's cache, as sync_switchable_norm_backward does
        local = switchable_norm_eval_forward(h_p, gamma, beta, lam, lam, mu_sybn.reshape(-1),
                                             var_sybn.reshape(-1), eps=eps)[1]
        _, r_dvar, r_dmu = statistic_gradients(dy_p, local)
        corrected_err = max(corrected_err, relative(r_dvar, true_dvar), relative(r_dmu, true_dmu))
        devices.append(DeviceTerms(h_p, dy_p, mu, var_p, dvar, dmu, gamma))
        x_tildes.append(x_tilde)
        dys.append(dy_p)
        mus.append(mu)
        vars_.append(var)

    y_sync = np.concatenate([gamma.reshape(1, -1, 1) * xt + beta.reshape(1, -1, 1)
                             for xt in x_tildes])
    sums = _sums([d.dmu for d in devices], [d.dvar for d in devices], mus, vars_)
    dh_total = np.concatenate([printed_eq23_25(p, devices, w, eps, N_total * S)
                               for p in range(len(shards))])
    dh_pn = np.concatenate([printed_eq23_25(p, devices, w, eps,
                                            len(shards) * shard_sizes[p] * S)
                            for p in range(len(shards))])
    devices_21 = []
    for d, x_tilde in zip(devices, x_tildes, strict=True):
        dvar21, dmu21 = printed_eq21(d.dy, x_tilde, d.var_p, gamma, eps)
        devices_21.append(DeviceTerms(d.h, d.dy, d.mu, d.var_p, dvar21, dmu21, gamma))
    dh_eq21 = np.concatenate([printed_eq23_25(p, devices_21, w, eps, N_total * S)
                              for p in range(len(shards))])

    return [
        finding("Eq. (15)", "y on every device", relative(y_sync, sn()),
            "agrees: synchronized SN equals one device with the whole batch"),
        finding("Eq. (16)", "dL/dgamma", relative(printed_eq16(dys, x_tildes), true_dgamma),
            "agrees, per channel (the upper limits P, N, C, H, W list a C the sum does not "
            "run over)"),
        finding("Eq. (17)", "dL/dbeta", relative(printed_eq17(dys), true_dbeta), "agrees"),
        finding("Eq. (18)", "dL/dlambda_in", relative(printed_eq18_20("in", w, sums), true_dlam[0]),
            "agrees (tied ratios)"),
        finding("Eq. (19)", "dL/dlambda_ln", relative(printed_eq18_20("ln", w, sums), true_dlam[1]),
            "agrees (read by symmetry with Eq. (18))"),
        finding("Eq. (20)", "dL/dlambda_bn", relative(printed_eq18_20("bn", w, sums), true_dlam[2]),
            "agrees (read by symmetry with Eq. (18))"),
        finding("Eq. (21), variance", "dL/dsigma^2_p per (n, c)", eq21_dvar_err,
            "disagrees: divides by 2 sqrt(sigma^2 + eps) where Eq. (7) has 2 (sigma^2 + eps), "
            "and adds the same sum a second time (dL/dh~ = gamma dL/dh^); it is Eq. (7)"),
        finding("Eq. (21), mean", "dL/dmu_p per (n, c)", eq21_dmu_err,
            "disagrees: counts -gamma / sqrt(sigma^2 + eps) sum dL/dh^ twice; it is Eq. (8)"),
        finding("Eq. (21), corrected", "dL/dsigma^2_p and dL/dmu_p per (n, c)", corrected_err,
            "agrees: refnorm's Eq. (7)-(8) on each device's own statistics"),
        finding("Eq. (22)-(25)", "dL/dh_p, BN terms over the whole batch's count",
                relative(dh_total, true_dh),
            "agrees with Eq. (7)-(8) for dL/dsigma^2, dL/dmu and the count of the whole batch"),
        finding("Eq. (22)-(25), P N H W", "dL/dh_p with unequal shards", relative(dh_pn, true_dh),
            "disagrees when devices hold different numbers of samples: P N H W is the batch's "
            "count only for equal shards"),
        finding("Eq. (22)-(25) with Eq. (21)", "dL/dh_p", relative(dh_eq21, true_dh),
            "disagrees: inherits the errors of Eq. (21)"),
    ]

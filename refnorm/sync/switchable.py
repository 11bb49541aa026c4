"""Synchronized Switchable Normalization (Luo et al., journal version, Appendix A, "Forward
and Backward for Multiple GPUs", Eq. 15-25; SyncSN in Table 7).

On device p the SN statistics are

    mu_p = w_bn mu_sybn + w_in mu_in,p + w_ln mu_ln,p                          # Eq. (15)
    sigma_p^2 = w'_bn sigma_sybn^2 + w'_in sigma_in,p^2 + w'_ln sigma_ln,p^2

with IN and LN local and the BN scope synchronized: mu_sybn and sigma_sybn^2 pool the IN
moments of every device with two sum-all-reduces (the law of total variance written as
sums, so that a device holding no sample contributes zeros). Everything else is the
single-device SN of :mod:`refnorm.norms.switchable_norm`, called, not copied: its IN moments
and LN pooling with the BN scope given (``scope_statistics``), and its mixing, ratios and
Eq. (3) (``mix_and_normalize``). As there, every mean is also held relative to the IN mean
(the BN scope's too: the all-reduces sum IN means about the rounded ``mu_sybn``), and the
backward forms its differences of means and the sums S_k of Eq. (18)-(20) from those offsets.

The backward is Eq. (22): dh = Term1 + Term2 + Term3 (Eq. 23-25), with dL/dsigma^2_p and
dL/dmu_p from the single-device Eq. (7)-(8) per device (the printed Eq. 21 is wrong; see the
errata page). Term2 and Term3 need sum_{p, n} of Eq. (7) and Eq. (8) per channel: one
all-reduce of two (C,) arrays. They divide by the count of the whole batch, where the
printed Eq. (24)-(25) write P N H W (equal only for equal shards).

The gradients of gamma, beta and the control parameters (Eq. 16-20) are returned as this
device's contributions, sum_{n, c} over its own samples; the data-parallel step reduces every
parameter gradient across devices exactly once
(:func:`refnorm.sync.data_parallel.allreduce_gradients`). Reducing them inside the layer as
well would count them twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from refnorm.backend import Array, array_namespace, device_of, on_device
from refnorm.core.checks import check_cache
from refnorm.core.moments import check_variance_finite
from refnorm.layer import CheckCase
from refnorm.norms.switchable_norm import (
    DEFAULT_OPTIONS,
    BatchStatistics,
    SwitchableNorm,
    SwitchableNormCache,
    SwitchableOptions,
    backward_view,
    cast_gradients,
    centred_input,
    check_scope_counts,
    in_moments,
    mix_and_normalize,
    prepare_inputs,
    ratio_gradients,
    scope_statistics,
    scope_variance_derivative,
    statistic_gradients,
    switchable_norm_backward,
    switchable_norm_eval_forward,
    switchable_norm_forward,
    variance_factors,
)
from refnorm.sync.comm import SingleProcess, check_comm
from refnorm.sync.headers import allreduce, layer_label, note_local_call


@dataclass(frozen=True)
class SyncSwitchableNormCache:
    """What the synchronized SN forward saves.

    Attributes
    ----------
    local : SwitchableNormCache
        This device's single-device cache, its BN-scope statistics the synchronized ones
        (``local.mu["bn"]`` is mu_sybn, ``local.var["bn"]`` sigma_sybn^2).
    comm : communicator
    bn_groups : int
        The IN groups one BN statistic pools: N summed over every device (the P N of
        Eq. 24-25 when shards are equal).
    layer : str
        The layer's name in the headers of its collectives (``"syncsn#0"``).
    """

    local: SwitchableNormCache
    comm: Any
    bn_groups: int
    layer: str = "syncsn"


def synchronized_bn_moments(h: Array, *, comm: Any, in_correction: int = 0,
                            layer: str = "syncsn") -> tuple[Array, Array, Array, int]:
    """mu_sybn and sigma_sybn^2: the BN-scope statistics of every device's IN moments.

    As on one device (:func:`~refnorm.norms.switchable_norm.pool_in_moments`) the mean comes
    in two parts, ``mu_sybn`` rounded to the dtype and what that rounding lost: the second
    all-reduce sums each IN mean about ``mu_sybn``, ``d = (mu_in - mu_sybn) + offset_in``, a
    difference of nearby numbers, and its square. Then ``lost = mean(d)`` and the spread of
    the IN means about their exact mean is ``sum (d - lost)^2 = sum d^2 - groups lost^2``.

    Parameters
    ----------
    h : array, (N_p, C, S)
        This device's shard; N_p may be 0.
    comm : communicator
    in_correction : {0, 1}
    layer : str
        Names the layer in the headers of the collectives (:mod:`refnorm.sync.headers`).

    Returns
    -------
    mu_sybn, lost, var_sybn : arrays, (C,)
    groups : int
        N summed over every device.
    """
    xp = array_namespace(h)
    mu_in, offset_in, var_in = in_moments(h, in_correction=in_correction)  # (N_p, C, 1)
    S = h.shape[2]
    count, sum_mu, sum_var = allreduce(comm, [
        xp.asarray([float(h.shape[0]), float(S), float(S * S)], dtype=xp.float64,
                   **on_device(device_of(h))),
        xp.sum(mu_in, axis=(0, 2)), xp.sum(var_in, axis=(0, 2))],
        op="syncsn forward (count, IN moments)", layer=layer)
    groups = int(count[0])
    total_s, total_s2 = float(count[1]), float(count[2])
    if total_s * total_s != comm.size * total_s2:  # equal iff every rank's S is the same
        raise ValueError(f"synchronized switchable normalization needs the same spatial size "
                         f"on every device (its IN and LN scopes count S values per "
                         f"statistic); this device's x has {S} values per plane, the devices' "
                         f"mean is {total_s / comm.size:g}")
    if groups == 0:
        raise ValueError("no samples on any device: the BN scope has nothing to average")
    mu_sybn = sum_mu / groups                                               # (C,)
    with np.errstate(over="ignore", invalid="ignore"):  # the sums are checked just below
        d = (mu_in - xp.reshape(mu_sybn, (1, -1, 1))) + offset_in           # (N_p, C, 1)
        sum_d, sum_d2 = allreduce(comm, [xp.sum(d, axis=(0, 2)), xp.sum(d * d, axis=(0, 2))],
                                  op="syncsn forward (spread of IN means)", layer=layer)
        lost = sum_d / groups                                               # (C,)
        spread = sum_d2 - groups * lost * lost    # >= 0 in exact arithmetic; keep it so
        spread = xp.maximum(spread, xp.zeros_like(spread))
        var_sybn = (sum_var + spread) / groups                              # total variance
    # Sums beyond the dtype: the reference's error. Not sum_mu: an infinite value on another
    # device makes it inf too, which is no overflow (its IN mean is inf; one device gives NaN);
    # an overflowing sum of finite IN means makes every d infinite, and sum_d2 inf.
    for total in (sum_d2, var_sybn):
        check_variance_finite(xp.reshape(total, (1, -1, 1)), h, merged=True)
    return mu_sybn, lost, var_sybn, groups


def sync_switchable_norm_forward(
    x: Array,
    gamma: Array,
    beta: Array,
    mean_logits: Array,
    var_logits: Array,
    *,
    comm: Any,
    eps: float = 1e-5,
    options: SwitchableOptions = DEFAULT_OPTIONS,
    layer: str = "syncsn",
) -> tuple[Array, SyncSwitchableNormCache]:
    """SN in training with the BN scope synchronized over the devices of ``comm``, Eq. (15).

    No ``path``: the fast kernels compute one device's statistics; this pair merges them
    across devices between its passes, with Array API calls only.

    Parameters
    ----------
    x : array, (N_p, C, *spatial)
        This device's shard; N_p may be 0.
    gamma, beta : arrays, (C,)
    mean_logits, var_logits : arrays, (K,)
    comm : communicator (:mod:`refnorm.sync.comm`)
        Required (unlike the layer's ``comm``, None is not a single process here: pass
        :class:`~refnorm.sync.comm.SingleProcess` for one device).
    eps : float, > 0
    options : SwitchableOptions
    layer : str
        Names this layer in the headers of its collectives (:mod:`refnorm.sync.headers`).

    Returns
    -------
    y : array, ``x.shape``
    cache : SyncSwitchableNormCache
    """
    args = (x, gamma, beta, mean_logits, var_logits)
    if not isinstance(options, SwitchableOptions):
        raise TypeError(f"options must be a SwitchableOptions; got {type(options).__name__}")
    check_comm(comm)
    if "bn" not in options.scopes:  # nothing to synchronize: plain SN
        y, local = switchable_norm_forward(*args, eps=eps, options=options)
        return y, SyncSwitchableNormCache(local, comm, x.shape[0], layer)
    xp, h = prepare_inputs(x, gamma, beta, (mean_logits, var_logits), eps=eps,
                           options=options)                              # (N_p, C, S)
    check_scope_counts(x.shape, options, with_bn=False)  # the BN scope: after pooling
    S = h.shape[2]
    mu_sybn, lost, var_sybn, groups = synchronized_bn_moments(
        h, comm=comm, in_correction=options.in_correction, layer=layer)
    if groups * S < 2:
        raise ValueError(f"the synchronized BN scope needs more than 1 value per statistic over "
                         f"all devices; got {groups * S} (this device's x has shape "
                         f"{tuple(x.shape)})")
    # scope_correction: the BN variance unbiased over the values of every device
    var_sybn = var_sybn * variance_factors(tuple(h.shape), options, bn_groups=groups)["bn"]
    # Eq. (15): single-device SN with the BN scope's statistics given (mixing, Eq. 3, 5)
    bn = tuple(xp.reshape(s, (1, -1, 1)) for s in (mu_sybn, lost, var_sybn))
    stats = scope_statistics(h, options, bn=bn)
    y, local = mix_and_normalize(x, h, (gamma, beta), (mean_logits, var_logits), stats,
                                 bn_given=True, eps=eps, options=options)
    return y, SyncSwitchableNormCache(local, comm, groups, layer)         # y: Eq. (15)


def sync_switchable_norm_backward(
    dy: Array, cache: SyncSwitchableNormCache
) -> tuple[Array, Array, Array, Array, Array]:
    """Backward of :func:`sync_switchable_norm_forward`, Eq. (22)-(25) with Eq. (16)-(20).

    No ``path``: as :func:`sync_switchable_norm_forward`.

    Returns
    -------
    dx : array, (N_p, C, *spatial)
    dgamma, dbeta : arrays, (C,), this device's contributions
    dmean_logits, dvar_logits : arrays, (K,), this device's contributions
    """
    check_cache(cache, SyncSwitchableNormCache)
    c = cache.local
    xp, dy_v = backward_view(dy, c)
    scopes = c.options.scopes
    N, C, S = c.h.shape
    wm = {k: c.w_mean[i] for i, k in enumerate(scopes)}
    wv = {k: c.w_var[i] for i, k in enumerate(scopes)}

    centred = centred_input(c)                                          # h - mu_in
    unbias = variance_factors(tuple(c.h.shape), c.options, bn_groups=cache.bn_groups)

    def dsigma2_k_dh(k: str) -> Array:
        groups = {"in": 1, "ln": C, "bn": cache.bn_groups}[k]
        return unbias[k] * scope_variance_derivative(
            centred, c.offset["in"] - c.offset[k], groups=groups,
            in_correction=c.options.in_correction)

    # dL/dsigma^2_p and dL/dmu_p: Eq. (7)-(8) on this device (Eq. 21 as printed is wrong)
    dx_tilde, dvar, dmu = statistic_gradients(dy_v, c)  # Eq. (21) corrected: Eq. (7)-(8)
    dh = dx_tilde * c.rstd                                  # Eq. (22) = Term1, Eq. (23) + ...
    if "in" in scopes:
        dh = dh + wv["in"] * dsigma2_k_dh("in") * dvar                  # Term2, Eq. (24)
        dh = dh + wm["in"] / S * dmu                                    # Term3, Eq. (25)
    if "ln" in scopes:
        sum_c_dvar = xp.sum(dvar, axis=1, keepdims=True)                # (N_p, 1, 1)
        dh = dh + wv["ln"] * dsigma2_k_dh("ln") * sum_c_dvar            # Term2, Eq. (24)
        dh = dh + wm["ln"] / (C * S) * xp.sum(dmu, axis=1, keepdims=True)   # Term3, Eq. (25)
    if "bn" in scopes:
        local = [xp.sum(dvar, axis=0, keepdims=True), xp.sum(dmu, axis=0, keepdims=True)]
        sum_pn_dvar, sum_pn_dmu = allreduce(                            # (1, C, 1), sum_{p,n}
            cache.comm, local, op="syncsn backward (sums of Eq. 7, 8)", layer=cache.layer)
        dh = dh + wv["bn"] * dsigma2_k_dh("bn") * sum_pn_dvar           # Term2, Eq. (24)
        dh = dh + wm["bn"] / (cache.bn_groups * S) * sum_pn_dmu         # Term3, Eq. (25)
    dgamma = xp.sum(dy_v * c.x_hat, axis=(0, 2))                       # Eq. (16), this device
    dbeta = xp.sum(dy_v, axis=(0, 2))                                  # Eq. (17), this device
    # S_k relative to the shift mu_in: the same gradients (switchable_norm_backward's comment)
    s_mean = [xp.sum(dmu * c.offset[k]) for k in scopes]               # Eq. (18)-(20), S_k
    s_var = [xp.sum(dvar * c.var[k]) for k in scopes]                  # Eq. (18)-(20), S'_k
    dmean_logits = ratio_gradients(c.w_mean, s_mean, hard=c.options.hard)  # Eq. (18)-(20)
    dvar_logits = ratio_gradients(c.w_var, s_var, hard=c.options.hard)     # Eq. (18)-(20)
    return cast_gradients(c, dh, (dgamma, dbeta), (dmean_logits, dvar_logits))


class SyncSwitchableNorm(SwitchableNorm):
    """Switchable Normalization with its BN scope synchronized over the devices of ``comm``.

    Parameters as :class:`~refnorm.norms.switchable_norm.SwitchableNorm`, plus ``comm`` (default:
    a single process, which makes it plain SN). Training with a BN scope runs the
    synchronized pair; inference (population statistics) and scopes without BN run the
    single-device pair, which needs no communication (inference with a BN scope is recorded
    on ``comm``, as in :class:`~refnorm.sync.batch_norm.SyncBatchNorm`). The collectives'
    headers name the layer ``syncsn#i``.
    """

    check_cases: ClassVar[tuple[CheckCase, ...]] = (
        CheckCase((3, 4, 3, 3)),
        CheckCase((4, 6), {"scopes": ("ln", "bn")}),
        CheckCase((3, 4, 3, 3), training=False),
    )
    shared_attributes = ("comm",)

    def __init__(self, num_channels: int, *, comm: Any = None, **kw: Any) -> None:
        super().__init__(num_channels, **kw)
        self.comm = SingleProcess() if comm is None else comm
        check_comm(self.comm)
        self._synchronized = False  # which pair made the saved cache

    def _forward(self, x: Array, training: bool) -> tuple[Array, Any]:
        p = self.params
        args = (x, p["gamma"], p["beta"], p["mean_logits"], p["var_logits"])
        self._synchronized = training and "bn" in self.options.scopes
        label = layer_label(self.comm, self, "syncsn")
        if not self._synchronized:
            if "bn" in self.options.scopes:
                note_local_call(self.comm, "forward in eval mode (no collective)", label)
                return switchable_norm_eval_forward(*args, *self.population(), eps=self.eps,
                                                    options=self.options,
                                                    path=self.compute_path())
            return switchable_norm_forward(*args, eps=self.eps, options=self.options,
                                           path=self.compute_path())
        y, cache = sync_switchable_norm_forward(*args, comm=self.comm, eps=self.eps,
                                                options=self.options, layer=label)
        C, S = self.num_channels, cache.local.h.shape[2]
        self._observe(BatchStatistics(count=cache.bn_groups * S,
                                      mean=self.xp.reshape(cache.local.mu["bn"], (C,)),
                                      var=self.xp.reshape(cache.local.var["bn"], (C,))))
        return y, cache

    def _backward(self, dy: Array, cache: Any) -> tuple[Array, dict[str, Array]]:
        if self._synchronized:
            dx, dgamma, dbeta, dml, dvl = sync_switchable_norm_backward(dy, cache)
        else:
            dx, dgamma, dbeta, dml, dvl = switchable_norm_backward(dy, cache,
                                                                   path=self.compute_path())
        return dx, {"gamma": dgamma, "beta": dbeta, "mean_logits": dml, "var_logits": dvl}

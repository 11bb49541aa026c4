"""Synchronized Batch Normalization: the batch statistics of all devices together.

Each device holds a shard x_p of the batch (any number of samples, none included). The
forward pools the per-device (count, mean, M2) into the statistics of the whole batch with
two sum-all-reduces, Chan et al.'s merge written as sums:

    n = sum_p n_p,  mean = sum_p n_p mean_p / n                          # first all-reduce
    M2 = sum_p [M2_p + n_p (mean_p - mean)^2],  var = M2 / n             # second all-reduce

which is the two-pass variance of the concatenated batch (no E[x^2] - E[x]^2 cancellation).
The backward needs two per-channel sums over the whole batch, sum(dx_hat) and
sum(dx_hat * x_hat), in one all-reduce:

    dx_p = rstd * (dx_hat_p - sum(dx_hat) / n - x_hat_p * sum(dx_hat * x_hat) / n)

``dgamma`` and ``dbeta`` are returned as this device's contributions (sums over its own
samples): the data-parallel step sums parameter gradients over devices once
(:func:`refnorm.sync.data_parallel.allreduce_gradients`).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from refnorm.backend import Array, array_namespace, device_of, on_device
from refnorm.core import affine_backward, affine_forward, standardize
from refnorm.core.affine import channel_view, non_channel_axes
from refnorm.core.checks import check_cache, check_like, check_momentum, prepare_channel_norm
from refnorm.core.moments import check_variance_finite
from refnorm.core.running import update_running_stats
from refnorm.layer import CheckCase
from refnorm.norms.base import ChannelNorm
from refnorm.norms.batch_norm import batch_norm_backward, batch_norm_eval_forward
from refnorm.sync.comm import SingleProcess, check_comm
from refnorm.sync.headers import allreduce, layer_label, note_local_call


@dataclass(frozen=True)
class SyncBatchNormCache:
    """What the synchronized forward saves.

    Attributes
    ----------
    x_hat : array, (N_p, C, *spatial)
    rstd : array, (1, C, 1, ...)
    gamma : array, (C,)
    mean, var : arrays, (C,)
        The statistics of the whole batch (for the running update).
    count : int
        n, the values per channel over all devices.
    comm : the communicator
    x_dtype, param_dtype : dtypes of the returned gradients
    layer : str
        The layer's name in the headers of its collectives (``"syncbn#0"``).
    """

    x_hat: Array
    rstd: Array
    gamma: Array
    mean: Array
    var: Array
    count: int
    comm: Any
    x_dtype: Any
    param_dtype: Any
    layer: str = "syncbn"


def sync_batch_norm_forward(
    x: Array, gamma: Array, beta: Array, *, comm: Any, eps: float = 1e-5, layer: str = "syncbn"
) -> tuple[Array, SyncBatchNormCache]:
    """Batch Normalization in training with statistics over every device of ``comm``.

    No ``path``: the fast kernels compute one device's statistics; this pair merges them
    across devices between its passes, with Array API calls only.

    Parameters
    ----------
    x : array, (N_p, C, *spatial)
        This device's shard; N_p may be 0.
    gamma, beta : arrays, (C,)
    comm : communicator (:mod:`refnorm.sync.comm`)
        Required (unlike the layer's ``comm``, None is not a single process here: pass
        :class:`~refnorm.sync.comm.SingleProcess` for one device).
    eps : float, > 0
    layer : str
        Names this layer in the headers of its collectives (:mod:`refnorm.sync.headers`).

    Returns
    -------
    y : array, ``x.shape``
    cache : SyncBatchNormCache
    """
    check_comm(comm)
    xp, xc, gamma_c, beta_c = prepare_channel_norm(x, gamma, beta, eps=eps)
    axes = non_channel_axes(x.ndim)                                        # (0, 2, 3, ...)
    n_p = 1
    for a in axes:
        n_p *= x.shape[a]
    # The sums of the values are float64, and the means rounded once, as in moments().
    local_sum = xp.sum(xc, axis=axes, dtype=xp.float64)                    # (C,)
    n_p_array = xp.asarray([float(n_p)], dtype=xp.float64, **on_device(device_of(xc)))  # (1,)
    count, total = allreduce(comm, [n_p_array, local_sum],
                             op="syncbn forward (count, sum)", layer=layer)
    n = int(count[0])
    if n < 2:
        raise ValueError("synchronized batch normalization needs more than 1 value per "
                         f"channel over all devices; got {n} (this device's x has shape "
                         f"{tuple(x.shape)})")
    mean = xp.astype(total / n, xc.dtype)                                  # (C,)
    local_mean = xp.astype(local_sum / max(n_p, 1), xc.dtype)              # (C,)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow raises just below
        d = xc - channel_view(local_mean, x.ndim)                          # (N_p, C, H, W)
        local_m2 = xp.sum(d * d, axis=axes)                                # (C,)
    # this device's sums overflow: the reference's error
    check_variance_finite(channel_view(local_m2, x.ndim), xc)
    shift = local_mean - mean
    with np.errstate(over="ignore", invalid="ignore"):  # as below: the merged sum is checked
        merged = local_m2 + n_p * shift * shift                            # Chan's merge
    (m2,) = allreduce(comm, [merged], op="syncbn forward (M2)", layer=layer)
    var = m2 / n                                                           # (C,)
    # the merged sum overflows (where this device's channel is finite, it raises)
    check_variance_finite(channel_view(var, x.ndim), xc, merged=True)
    x_hat, rstd = standardize(xc, channel_view(mean, x.ndim), channel_view(var, x.ndim), eps=eps)
    y = affine_forward(x_hat, gamma_c, beta_c)
    cache = SyncBatchNormCache(x_hat, rstd, gamma_c, mean, var, n, comm, x.dtype, gamma.dtype,
                               layer)
    return xp.astype(y, x.dtype, copy=False), cache


def sync_batch_norm_backward(dy: Array, cache: SyncBatchNormCache) -> tuple[Array, Array, Array]:
    """Backward of :func:`sync_batch_norm_forward`: one all-reduce of two (C,) sums.

    No ``path``: as :func:`sync_batch_norm_forward`.

    Returns
    -------
    dx : array, (N_p, C, *spatial)
    dgamma, dbeta : arrays, (C,), this device's contributions
    """
    check_cache(cache, SyncBatchNormCache)
    check_like("dy", dy, cache.x_hat.shape)
    xp = array_namespace(dy, cache.x_hat)
    dy_c = xp.astype(dy, cache.x_hat.dtype, copy=False)
    dx_hat, dgamma, dbeta = affine_backward(dy_c, cache.x_hat, cache.gamma)
    axes = non_channel_axes(dy.ndim)
    local = [xp.sum(dx_hat, axis=axes), xp.sum(dx_hat * cache.x_hat, axis=axes)]
    sum_dx_hat, sum_dx_hat_x_hat = allreduce(                              # (C,) each
        cache.comm, local, op="syncbn backward (two sums)", layer=cache.layer)
    n, ndim = cache.count, dy.ndim
    dx = cache.rstd * (dx_hat - channel_view(sum_dx_hat, ndim) / n
                       - cache.x_hat * channel_view(sum_dx_hat_x_hat, ndim) / n)
    return (xp.astype(dx, cache.x_dtype, copy=False),
            xp.astype(dgamma, cache.param_dtype, copy=False),
            xp.astype(dbeta, cache.param_dtype, copy=False))


class SyncBatchNorm(ChannelNorm):
    """Batch Normalization synchronized over the devices of ``comm``.

    Parameters
    ----------
    num_channels : int
    eps : float, default 1e-5
    momentum : float, default 0.1
        Weight of the new batch in the running average (PyTorch's convention).
    comm : communicator, default a single process (which makes it plain BN)
    dtype, xp, device : see :class:`~refnorm.norms.base.ChannelNorm`

    Training runs the synchronized pair and updates the running statistics with the whole
    batch's statistics and count, identically on every device; inference runs BN's eval
    pair (:func:`~refnorm.norms.batch_norm.batch_norm_eval_forward`), which needs no
    communication (the call is recorded on ``comm``, so that a peer left waiting in a
    training collective is told this rank was in eval mode). The collectives' headers name
    the layer ``syncbn#i``, the i-th syncbn layer to use ``comm``.

    State: running_mean (C,), starts at 0; running_var (C,), starts at 1.
    """

    check_cases = (CheckCase((4, 3, 5, 5)), CheckCase((6, 4)),
                   CheckCase((4, 3, 5, 5), training=False))
    shared_attributes = ("comm",)

    def __init__(
        self,
        num_channels: int,
        *,
        eps: float = 1e-5,
        momentum: float = 0.1,
        comm: Any = None,
        dtype: Any = None,
        xp: ModuleType | None = None,
        device: Any = None,
    ) -> None:
        super().__init__(num_channels, eps=eps, dtype=dtype, xp=xp, device=device)
        check_momentum(momentum)
        self.momentum = momentum
        self.comm = SingleProcess() if comm is None else comm
        check_comm(self.comm)
        where = on_device(self.device)
        self.state = {
            "running_mean": self.xp.zeros((num_channels,), dtype=self.dtype, **where),
            "running_var": self.xp.ones((num_channels,), dtype=self.dtype, **where),
        }
        self._synchronized = False  # which pair made the saved cache

    def _forward(self, x: Array, training: bool) -> tuple[Array, Any]:
        gamma, beta = self.params["gamma"], self.params["beta"]
        self._synchronized = training
        label = layer_label(self.comm, self, "syncbn")
        if not training:
            note_local_call(self.comm, "forward in eval mode (no collective)", label)
            stats = (self.state["running_mean"], self.state["running_var"])
            return batch_norm_eval_forward(x, gamma, beta, *stats, eps=self.eps,
                                           path=self.compute_path())
        y, cache = sync_batch_norm_forward(x, gamma, beta, comm=self.comm, eps=self.eps,
                                           layer=label)
        running_mean, running_var = update_running_stats(
            self.state["running_mean"], self.state["running_var"], cache.mean, cache.var,
            count=cache.count, momentum=self.momentum)
        self.state = {"running_mean": running_mean, "running_var": running_var}
        return y, cache

    def _backward(self, dy: Array, cache: Any) -> tuple[Array, dict[str, Array]]:
        if self._synchronized:
            dx, dgamma, dbeta = sync_batch_norm_backward(dy, cache)
        else:
            dx, dgamma, dbeta = batch_norm_backward(dy, cache, path=self.compute_path())
        return dx, {"gamma": dgamma, "beta": dbeta}

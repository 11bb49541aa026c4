"""Synchronized Switchable Normalization (Luo et al., journal version, Appendix A, "Forward
and Backward for Multiple GPUs", Eq. 15-25; SyncSN in Table 7).

On device p the SN statistics are

    mu_p = w_bn mu_sybn + w_in mu_in,p + w_ln mu_ln,p                          # Eq. (15)
    sigma_p^2 = w'_bn sigma_sybn^2 + w'_in sigma_in,p^2 + w'_ln sigma_ln,p^2

with IN and LN local and the BN scope synchronized: mu_sybn and sigma_sybn^2 pool the IN
moments of every device (:func:`refnorm.norms.switchable.pool_in_moments`, two all-reduces,
the law of total variance). The backward is the single-device Appendix A backward with the
BN scope's sums running over every device: dh = Term1 + Term2 + Term3 (Eq. 22-25), where
Term2 and Term3 need sum_{p, n} of Eq. (7) and Eq. (8) per channel, one all-reduce of two
(C,) arrays. The code is the same as single-device SN
(:func:`refnorm.norms.switchable.switchable_norm_backward`, which names Term1-3): a
communicator in the cache is all that changes.

The gradients of gamma, beta and the control parameters (Eq. 16-20) are returned as this
device's contributions, sum_{n, c} over its own samples; the data-parallel step reduces every
parameter gradient across devices exactly once
(:func:`refnorm.sync.data_parallel.allreduce_gradients`). Reducing them inside the layer as
well would count them twice.
"""

from __future__ import annotations

from typing import Any

from refnorm.layer import CheckCase
from refnorm.norms.switchable import SwitchableNorm
from refnorm.sync.comm import SingleProcess


class SyncSwitchableNorm(SwitchableNorm):
    """Switchable Normalization with its BN scope synchronized over the devices of ``comm``.

    Parameters as :class:`~refnorm.norms.switchable.SwitchableNorm`, plus ``comm`` (default:
    a single process, which makes it plain SN).
    """

    check_cases = (
        CheckCase((3, 4, 3, 3)),
        CheckCase((4, 6), {"scopes": ("ln", "bn")}),
        CheckCase((3, 4, 3, 3), training=False),
    )
    shared_attributes = ("comm",)

    def __init__(self, num_channels: int, *, comm: Any = None, **kw: Any) -> None:
        super().__init__(num_channels, **kw)
        self.comm = SingleProcess() if comm is None else comm

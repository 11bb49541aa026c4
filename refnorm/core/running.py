"""Population statistics for inference: an exponential moving average, or the records of a
batch average.

The moving average (:func:`update_running_stats`) follows PyTorch's convention: ``momentum``
is the weight of the *new* batch,

    running_mean <- (1 - momentum) * running_mean + momentum * batch_mean
    running_var  <- (1 - momentum) * running_var  + momentum * batch_var * m / (m - 1)

with the batch variance made unbiased (``m`` values per statistic), as Ioffe & Szegedy (2015)
prescribe for inference. Keras/TensorFlow and the official Switchable Normalization code
write the same average with ``momentum`` weighting the *old* value (0.99, 0.997); see the
conventions page.

The batch average (Switchable Normalization's, :func:`refnorm.inference.batch_average`)
collects one :class:`BatchStatistics` per batch from each SN layer and merges them after
training.
"""

from __future__ import annotations

from dataclasses import dataclass

from refnorm.backend import Array, array_namespace
from refnorm.core.checks import check_momentum


def update_running_stats(
    running_mean: Array,
    running_var: Array,
    batch_mean: Array,
    batch_var: Array,
    *,
    count: int,
    momentum: float = 0.1,
) -> tuple[Array, Array]:
    """Return the updated running mean and variance; the arguments are not modified.

    Parameters
    ----------
    running_mean, running_var : arrays, (C,)
    batch_mean : array, (C,)
        The batch statistic.
    batch_var : array, (C,)
        The *biased* batch variance (what the forward normalized with).
    count : int
        Values per statistic ``m``; the unbiased variance is ``batch_var * m / (m - 1)``.
    momentum : float in (0, 1]
        Weight of the new batch.

    Returns
    -------
    new_mean, new_var : arrays, (C,), in the dtype of the running statistics
    """
    check_momentum(momentum)
    momentum = float(momentum)  # a numpy scalar or a Fraction would change the state's dtype
    if count < 2:
        raise ValueError(f"count must be >= 2 for an unbiased variance; got {count}")
    xp = array_namespace(running_mean, running_var)
    dtype = running_mean.dtype
    unbiased_var = batch_var * (count / (count - 1))
    new_mean = (1 - momentum) * running_mean + momentum * xp.astype(batch_mean, dtype)
    new_var = (1 - momentum) * running_var + momentum * xp.astype(unbiased_var, dtype)
    return new_mean, new_var


@dataclass(frozen=True)
class BatchStatistics:
    """The statistics of one training batch, for the batch average.

    Attributes
    ----------
    count : int
        Values per channel the statistics cover (N * S, over every device when synchronized).
    mean, var : arrays, (C,)
        The mean and the variance the forward normalized with (SN: its BN scope's).
    """

    count: int
    mean: Array
    var: Array

"""Softmax cross-entropy, averaged over the batch.

For logits z (N, K) and integer labels t (N,) in [0, K):

    log p[n, k] = z[n, k] - m[n] - log sum_j exp(z[n, j] - m[n]),   m[n] = max_j z[n, j]
    L           = -(1/N) sum_n log p[n, t[n]]
    dL/dz[n, k] = (p[n, k] - [k = t[n]]) / N

Subtracting the row maximum m (the log-sum-exp trick) changes nothing mathematically and
keeps every exponent <= 0: no overflow for logits of any size whose spread within a row fits
the dtype (``z - m`` of a row holding 1e308 and -1e308 is -inf, whose exponential is 0, and
the loss stays right), and the largest term of each sum is exactly 1, so the logarithm never
sees 0. The naive ``log(sum(exp(z)))`` overflows to
``inf`` in float64 once a logit exceeds about 709 (88 in float32).

The loss is a scalar at the end of the network, so its backward takes no upstream gradient:
it returns dL/dz for ``L`` itself (an upstream gradient g of the scalar would scale it by g).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from refnorm.backend import Array, array_namespace, compute_dtype, device_of, on_device
from refnorm.core.checks import check_cache, check_rank


@dataclass(frozen=True)
class SoftmaxCrossEntropyCache:
    """What :func:`softmax_cross_entropy` saves for :func:`softmax_cross_entropy_backward`.

    Attributes
    ----------
    probs : array, (N, K)
        The softmax probabilities in the compute dtype (``dz = (p - onehot) / N``).
    onehot : bool array, (N, K)
        ``onehot[n, k] = (k == labels[n])``. Saved instead of the labels so that the
        backward is one subtraction.
    logits_dtype : dtype
        The dtype ``dlogits`` is returned in.
    """

    probs: Array
    onehot: Array
    logits_dtype: Any


def softmax_cross_entropy(logits: Array, labels: Array) -> tuple[Array, SoftmaxCrossEntropyCache]:
    """Mean softmax cross-entropy of a batch, computed stably with log-sum-exp.

    No ``path``: the logits are (N, K), far smaller than the activations; a few numpy
    passes.

    Parameters
    ----------
    logits : array, (N, K)
        Real floating, N >= 1 samples of K >= 1 unnormalized class scores; float16 computes
        in float32.
    labels : integer array, (N,)
        The class of each sample, each in [0, K); same array namespace as ``logits``.

    Returns
    -------
    loss : array, () (0-d), dtype of ``logits``
        ``-(1/N) sum_n log softmax(logits[n])[labels[n]]``.
    cache : SoftmaxCrossEntropyCache

    Raises
    ------
    TypeError
        If ``labels`` has a non-integer dtype (float or bool), or the namespaces differ.
    ValueError
        If ``logits`` is not 2-D or has N = 0 or K = 0, ``labels`` is not (N,), or a label is
        outside [0, K).
    """
    xp = check_rank("logits", logits, layout="(N, K)")
    N, K = logits.shape
    if N == 0:
        raise ValueError("logits must hold at least one sample (N >= 1); got shape "
                         f"{tuple(logits.shape)}")
    if K == 0:
        raise ValueError("logits must hold at least one class (K >= 1); got shape "
                         f"{tuple(logits.shape)}")
    _check_labels(xp, labels, N, K)
    array_namespace(logits, labels)  # one namespace for both
    z = xp.astype(logits, compute_dtype(xp, logits.dtype), copy=False)
    shifted = z - xp.max(z, axis=1, keepdims=True)                # (N, K), every entry <= 0
    lse = xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True))  # (N, 1)
    log_probs = shifted - lse                                     # (N, K)
    classes = xp.arange(K, dtype=xp.int64, **on_device(device_of(logits)))
    classes = xp.reshape(classes, (1, K))                          # (1, K)
    onehot = xp.reshape(xp.astype(labels, xp.int64), (N, 1)) == classes  # (N, K)
    # where, not onehot * log_probs: a logit of -inf has log p = -inf, and 0 * -inf is NaN.
    picked = xp.sum(xp.where(onehot, log_probs, xp.zeros_like(log_probs)), axis=1)  # (N,)
    # keepdims, then reshape: numpy reduces a full reduction to a numpy scalar, not an array.
    # 0 - mean, not -mean: a loss of zero is +0.0, as PyTorch's, not -0.0
    loss = xp.reshape(0.0 - xp.mean(picked, axis=0, keepdims=True), ())  # ()
    cache = SoftmaxCrossEntropyCache(probs=xp.exp(log_probs), onehot=onehot,
                                     logits_dtype=logits.dtype)
    return xp.astype(loss, logits.dtype, copy=False), cache


def softmax_cross_entropy_backward(cache: SoftmaxCrossEntropyCache) -> Array:
    """Gradient of the mean loss with respect to the logits: ``(softmax - onehot) / N``.

    The loss is the scalar that ends the network, so there is no upstream gradient argument:
    this is dL/dlogits of ``L`` itself (multiply by g for an upstream gradient g).

    No ``path``: as :func:`softmax_cross_entropy`, a few numpy passes over (N, K) arrays.

    Parameters
    ----------
    cache : SoftmaxCrossEntropyCache

    Returns
    -------
    dlogits : array, (N, K), dtype of ``logits``
        Each row sums to zero.
    """
    check_cache(cache, SoftmaxCrossEntropyCache)
    xp = array_namespace(cache.probs)
    N = cache.probs.shape[0]
    target = xp.astype(cache.onehot, cache.probs.dtype)           # (N, K)
    dlogits = (cache.probs - target) / N                          # (N, K)
    return xp.astype(dlogits, cache.logits_dtype, copy=False)


def _check_labels(xp: Any, labels: Array, N: int, K: int) -> None:
    """Labels must be an integer (N,) array with every entry in [0, K)."""
    try:
        labels_xp = array_namespace(labels)
    except TypeError:
        raise TypeError(f"labels must be an integer array; got {type(labels).__name__}") from None
    if not labels_xp.isdtype(labels.dtype, "integral"):
        raise TypeError(f"labels must have an integer dtype; got {labels.dtype}")
    if tuple(labels.shape) != (N,):
        raise ValueError(
            f"labels must have shape (N,) = ({N},) to match logits' axis 0; "
            f"got shape {tuple(labels.shape)}"
        )
    low, high = int(labels_xp.min(labels)), int(labels_xp.max(labels))
    if low < 0 or high >= K:
        raise ValueError(
            f"labels must lie in [0, K) = [0, {K}) for logits with K = {K} classes; "
            f"got labels from {low} to {high}"
        )

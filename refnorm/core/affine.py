"""The per-channel scale and shift ``y = gamma * x_hat + beta`` (channels on axis 1)."""

from __future__ import annotations

from refnorm.backend import Array, array_namespace


def channel_view(p: Array, ndim: int) -> Array:
    """Reshape a per-channel vector ``(C,)`` to ``(1, C, 1, ...)`` for an ``ndim`` input."""
    xp = array_namespace(p)
    return xp.reshape(p, (1, p.shape[0]) + (1,) * (ndim - 2))


def non_channel_axes(ndim: int) -> tuple[int, ...]:
    """Every axis but the channel axis 1: ``(0, 2, 3, ...)``."""
    return (0,) + tuple(range(2, ndim))


def affine_forward(x_hat: Array, gamma: Array, beta: Array) -> Array:
    """``y = gamma * x_hat + beta`` with ``gamma``, ``beta`` of shape ``(C,)``.

    Parameters
    ----------
    x_hat : array, (N, C, *spatial)
    gamma, beta : arrays, (C,)

    Returns
    -------
    y : array, ``x_hat.shape``
    """
    return x_hat * channel_view(gamma, x_hat.ndim) + channel_view(beta, x_hat.ndim)


def affine_backward(dy: Array, x_hat: Array, gamma: Array) -> tuple[Array, Array, Array]:
    """Backward of :func:`affine_forward`.

    Returns
    -------
    dx_hat : array, ``dy.shape``
    dgamma : array, (C,)
        ``sum(dy * x_hat)`` over every axis but the channel axis.
    dbeta : array, (C,)
        ``sum(dy)`` over every axis but the channel axis.
    """
    xp = array_namespace(dy, x_hat, gamma)
    axes = non_channel_axes(dy.ndim)
    dgamma = xp.sum(dy * x_hat, axis=axes)
    dbeta = xp.sum(dy, axis=axes)
    return dy * channel_view(gamma, dy.ndim), dgamma, dbeta

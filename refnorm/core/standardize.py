"""Standardization ``x_hat = (x - mu) / sqrt(var + eps)`` and its closed-form backward.

With ``mu`` and ``var`` the mean and biased variance of ``x`` over the reduction axes
(``m`` elements each), the chain rule through ``mu`` and ``var`` collapses to

    dx = rstd * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat)),

means taken over the reduction axes. The ``var`` path contributes
``dL/dvar * dvar/dx = (-1/2) rstd^3 sum(dx_hat (x - mu)) * 2 (x - mu) / m``
``= -rstd * x_hat * mean(dx_hat * x_hat)``; the ``mu`` path contributes ``-rstd * mean(dx_hat)``
(its effect through ``var`` vanishes because the deviations sum to zero). ``eps`` enters only
through ``rstd`` and ``x_hat``, so the form is exact for any ``eps``.
"""

from __future__ import annotations

from refnorm.backend import Array, array_namespace


def standardize(x: Array, mu: Array, var: Array, *, eps: float) -> tuple[Array, Array]:
    """Return ``x_hat = (x - mu) * rstd`` and ``rstd = 1 / sqrt(var + eps)``.

    Parameters
    ----------
    x : array, any shape
    mu, var : arrays broadcastable to ``x.shape``
    eps : float
        Added to the variance inside the square root.

    Returns
    -------
    x_hat : array, ``x.shape``
    rstd : array, ``var.shape``
    """
    xp = array_namespace(x, mu, var)
    rstd = 1.0 / xp.sqrt(var + float(eps))  # float: a numpy scalar would promote float32
    return (x - mu) * rstd, rstd


def standardize_backward(
    dx_hat: Array, x_hat: Array, rstd: Array, axes: tuple[int, ...]
) -> Array:
    """Gradient through ``x_hat`` when ``mu``/``var`` were computed from ``x`` over ``axes``.

    Parameters
    ----------
    dx_hat : array, ``x_hat.shape``
        Upstream gradient with respect to ``x_hat``.
    x_hat : array
        The standardized input saved by the forward.
    rstd : array, ``x_hat.shape`` with ``axes`` set to 1
    axes : tuple of int
        The axes the statistics were taken over.

    Returns
    -------
    dx : array, ``x_hat.shape``
    """
    xp = array_namespace(dx_hat, x_hat, rstd)
    mean_dx_hat = xp.mean(dx_hat, axis=axes, keepdims=True)
    mean_dx_hat_x_hat = xp.mean(dx_hat * x_hat, axis=axes, keepdims=True)
    return rstd * (dx_hat - mean_dx_hat - x_hat * mean_dx_hat_x_hat)

"""What the activation normalizers share: the steps around their statistics, and the layer base.

Each method file (``batch_norm.py``, ``instance_norm.py``, ``layer_norm.py``,
``group_norm.py``) spells out its own reduction axes, cache and closed-form backward; the
pieces here are the ones that have nothing method-specific in them:

- :func:`frozen_statistics` — check running statistics and view them per channel, for the
  inference forwards that normalize with them;
- :func:`upstream` and :func:`cast_grads` — check an upstream gradient and bring it to the
  compute dtype, and return gradients in the dtypes of the forward's arguments;
- :class:`ChannelNorm` — the layer base: per-channel ``gamma`` and ``beta``, ``eps``, dtype
  and namespace (the interface itself is :class:`refnorm.layer.Layer`);
- :func:`fast_channel_args`, :func:`fast_backward_args` and :func:`fast_grads` — what the
  fast variants (:mod:`refnorm.dispatch`) do around their kernels: the reference's argument
  checks and a check that a cache holds the shapes its kernels index by, run once per argument
  signature (:func:`refnorm.core.checks.check_once`), and the casts.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from refnorm.backend import Array, array_namespace, compute_dtype, on_device
from refnorm.core.affine import channel_view
from refnorm.core.checks import (
    check_channel_param,
    check_eps,
    check_like,
    check_once,
    check_positive_int,
    is_int,
    prepare_channel_norm,
)
from refnorm.layer import CheckCase, Layer


def frozen_statistics(
    running_mean: Array, running_var: Array, *, like: Array
) -> tuple[Array, Array]:
    """Running statistics viewed per channel for an input like ``like`` (N, C, *spatial).

    Parameters
    ----------
    running_mean, running_var : arrays, (C,)
        ``running_var`` must have no negative entry (refused); a NaN in either propagates
        to its channel's outputs, as a NaN in the input does.
    like : array, (N, C, *spatial)
        The input in the compute dtype; gives C, the number of axes and the dtype.

    Returns
    -------
    mu, var : arrays, (1, C, 1, ...), dtype of ``like``
    """
    xp = array_namespace(like)
    check_channel_param("running_mean", running_mean, like.shape[1])
    check_channel_param("running_var", running_var, like.shape[1])
    if bool(xp.any(running_var < 0)):
        raise ValueError("running_var must be >= 0 everywhere; got a negative entry")
    mu = channel_view(xp.astype(running_mean, like.dtype), like.ndim)    # (1, C, 1, 1)
    var = channel_view(xp.astype(running_var, like.dtype), like.ndim)    # (1, C, 1, 1)
    return mu, var


def upstream(dy: Array, x_hat: Array) -> tuple[ModuleType, Array]:
    """Check ``dy`` against the saved ``x_hat`` and cast it to the compute dtype.

    Returns
    -------
    xp : the array namespace
    dy_c : array, ``x_hat.shape``, dtype of ``x_hat``
    """
    check_like("dy", dy, x_hat.shape)
    xp = array_namespace(dy, x_hat)
    return xp, xp.astype(dy, x_hat.dtype, copy=False)


def cast_grads(
    xp: ModuleType, dx: Array, dgamma: Array, dbeta: Array, *, x_dtype: Any, param_dtype: Any
) -> tuple[Array, Array, Array]:
    """``dx`` in the dtype of ``x``; ``dgamma``, ``dbeta`` in the dtype of ``gamma``."""
    return (
        xp.astype(dx, x_dtype, copy=False),
        xp.astype(dgamma, param_dtype, copy=False),
        xp.astype(dbeta, param_dtype, copy=False),
    )


# -- the fast variants: check a signature once, then cast ----------------------------------------


def fast_channel_args(what: str, x: Array, gamma: Array, beta: Array, eps: float, *,
                      min_ndim: int = 2, hyper: tuple = (),
                      check: Callable[[], object] | None = None) -> tuple[Array, Array]:
    """The fast variant's :func:`refnorm.core.checks.prepare_channel_norm`: the same checks
    (and ``check``, the method's own, which may depend on ``hyper``), run once per signature;
    returns ``gamma`` (a copy: the cache keeps it) and ``beta`` in the compute dtype.

    The signature holds the types, shapes and dtypes of the arrays and the type and value of
    ``eps`` and of every ``hyper`` entry (``True`` is not ``1``), so a call that differs in
    anything the checks read is checked again.
    """
    def full() -> None:
        prepare_channel_norm(x, gamma, beta, eps=eps, min_ndim=min_ndim)
        if check is not None:
            check()

    check_once(lambda: (what, type(x), x.shape, x.dtype, type(gamma), gamma.shape, gamma.dtype,
                        type(beta), beta.shape, beta.dtype, type(eps), eps,
                        *((type(h), h) for h in hyper)), full)
    dtype = np.float32 if x.dtype == np.float16 else x.dtype
    return gamma.astype(dtype, copy=True), beta.astype(dtype, copy=False)


def fast_backward_args(what: str, dy: Array, x_hat: Array, rstd: Array, gamma: Array, *,
                       per_sample: bool, groups: object = None) -> Array:
    """The fast backward's :func:`upstream` and its check that the cache holds what the forward
    put in it, once per signature (:func:`refnorm.core.checks.check_once`); returns ``dy`` in
    the compute dtype.

    The kernels turn ``x_hat``'s shape, ``rstd``'s size and ``gamma``'s length into addresses,
    so a cache built or edited by hand whose arrays disagree would make them read and write
    outside the arrays. Such a cache is refused here (the reference, which broadcasts, may
    accept some of them: ``path="reference"``). The forward makes one statistic per sample
    (``per_sample``) and per channel (``groups`` None) or per group of ``groups`` (1: LN).
    """
    def check() -> None:
        for name, a in (("x_hat", x_hat), ("rstd", rstd), ("gamma", gamma)):
            if not (isinstance(a, np.ndarray) and a.dtype.kind == "f"):
                raise TypeError(f"{what}: the cache's {name} must be a floating numpy array "
                                f"(the forward's); got {type(a).__name__} of dtype "
                                f"{getattr(a, 'dtype', None)}")
        check_like("dy", dy, x_hat.shape)
        if x_hat.ndim < 2:
            raise ValueError(f"{what}: the cache's x_hat must have shape (N, C, ...); got "
                             f"{x_hat.shape}")
        N, C = x_hat.shape[:2]
        if gamma.shape != (C,):
            raise ValueError(f"{what}: the cache's gamma must have shape ({C},) for x_hat of "
                             f"shape {x_hat.shape}; got {gamma.shape}")
        if groups is None:
            G, scope = C, "one per sample and channel" if per_sample else "one per channel"
        elif is_int(groups) and 0 < int(groups) and C % int(groups) == 0:
            G = int(groups)
            scope = "one per sample" if G == 1 else f"one per sample and group, {G} groups"
        else:
            raise ValueError(f"{what}: the cache's num_groups ({groups!r}) must divide its "
                             f"{C} channels")
        units = (N if per_sample else 1) * G
        if rstd.size != units:
            raise ValueError(
                f"{what}: the cache's rstd must hold {units} values ({scope}) for x_hat of "
                f"shape {x_hat.shape}, as the forward makes it; got shape {rstd.shape} (a "
                f"cache built by hand? the fast path reads only the forward's caches; "
                f"path='reference' broadcasts)")

    check_once(lambda: (what, type(dy), dy.shape, dy.dtype, type(x_hat), x_hat.shape,
                        x_hat.dtype, type(rstd), rstd.shape, rstd.dtype, type(gamma),
                        gamma.shape, gamma.dtype, per_sample, type(groups), groups), check)
    return dy if dy.dtype == x_hat.dtype else dy.astype(x_hat.dtype)


def fast_grads(dx: Array, dgamma: Array, dbeta: Array, *, x_dtype: Any,
               param_dtype: Any) -> tuple[Array, Array, Array]:
    """:func:`cast_grads` for numpy arrays, without a call where nothing changes."""
    return (dx if dx.dtype == x_dtype else dx.astype(x_dtype),
            dgamma if dgamma.dtype == param_dtype else dgamma.astype(param_dtype),
            dbeta if dbeta.dtype == param_dtype else dbeta.astype(param_dtype))


class ChannelNorm(Layer):
    """Base of the activation normalizers: per-channel ``gamma`` (ones) and ``beta`` (zeros).

    A subclass's ``_forward`` and ``_backward`` call its method's pure pair.

    Parameters
    ----------
    num_channels : int
        C, the size of the input's axis 1.
    eps : float
        Added to the variance inside the square root.
    dtype, xp, device : where the parameters and state live (:class:`~refnorm.layer.Layer`)
    """

    eps: float
    num_channels: int

    def __init__(
        self,
        num_channels: int,
        *,
        eps: float = 1e-5,
        dtype: Any = None,
        xp: ModuleType | None = None,
        device: Any = None,
    ) -> None:
        super().__init__(dtype=dtype, xp=xp, device=device)
        num_channels = check_positive_int("num_channels", num_channels)
        # at build(), not at the first forward: also that eps does not round to 0 in the
        # compute dtype of inputs of the parameters' dtype
        check_eps(eps, xp=self.xp, dtype=compute_dtype(self.xp, self.dtype))
        self.num_channels = num_channels
        self.eps = eps
        self.params = {
            "gamma": self.xp.ones((num_channels,), dtype=self.dtype, **on_device(self.device)),
            "beta": self.xp.zeros((num_channels,), dtype=self.dtype, **on_device(self.device)),
        }

    def _check_input(self, x: Array) -> None:
        shape = getattr(x, "shape", None)
        if isinstance(shape, tuple) and len(shape) >= 2 and shape[1] != self.num_channels:
            raise ValueError(
                f"{type(self).__name__} was built for {self.num_channels} channels; x of shape "
                f"{tuple(shape)} has {shape[1]} on its channel axis (axis 1)")


__all__ = ["ChannelNorm", "CheckCase", "Layer", "cast_grads", "fast_backward_args",
           "fast_channel_args", "fast_grads", "frozen_statistics", "upstream"]

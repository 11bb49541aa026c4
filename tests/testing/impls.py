"""Hand-written implementations for the refnorm.testing suite: correct ones, the official
SN and WS codes' formulas (as the conventions page states them), and mutants with one
planted bug each.

Nothing here calls refnorm: these are "implementations nobody here wrote" stand-ins, each a
page of plain numpy.
"""

from __future__ import annotations

import numpy as np


def _view(a: np.ndarray, ndim: int) -> np.ndarray:
    return a.reshape((1, -1) + (1,) * (ndim - 2))


class NumpyBN:
    """Batch Normalization in numpy with running statistics; each flag plants one bug.

    Flags: ``one_pass32`` (E[x^2] - E[x]^2 in float32), ``eps_outside``
    ((x - mu) / (sqrt(var) + eps)), ``unbiased`` (1/(m-1) in the normalization),
    ``running_biased`` (running variance without m/(m-1)), ``momentum_old`` (momentum
    weights the old value), ``dgamma_wrong`` (dgamma summed over the spatial axes and
    averaged over N).
    """

    def __init__(self, C: int, *, eps: float = 1e-5, momentum: float = 0.1, **bugs: bool):
        self.eps, self.momentum, self.bugs = eps, momentum, bugs
        self.running_mean, self.running_var = np.zeros(C), np.ones(C)

    def _stats(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        axes = (0,) + tuple(range(2, x.ndim))
        m = x.size // x.shape[1]
        if self.bugs.get("one_pass32"):
            x32 = x.astype(np.float32)
            mu = x32.mean(axis=axes, keepdims=True)
            var = (x32 * x32).mean(axis=axes, keepdims=True) - mu * mu
            return mu.astype(x.dtype), np.maximum(var, 0).astype(x.dtype), m
        return x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True), m

    def _x_hat(self, x: np.ndarray, mu: np.ndarray, var: np.ndarray, m: int) -> np.ndarray:
        if self.bugs.get("unbiased"):
            var = var * m / (m - 1)
        if self.bugs.get("eps_outside"):
            return (x - mu) / (np.sqrt(var) + self.eps)
        return (x - mu) / np.sqrt(var + self.eps)

    def __call__(self, x, gamma, beta, *, training: bool = True) -> np.ndarray:
        if training:
            mu, var, m = self._stats(x)
            new = 1 - self.momentum if self.bugs.get("momentum_old") else self.momentum
            factor = 1.0 if self.bugs.get("running_biased") else m / (m - 1)
            self.running_mean = (1 - new) * self.running_mean + new * mu.reshape(-1)
            self.running_var = (1 - new) * self.running_var + new * factor * var.reshape(-1)
        else:
            mu, var, m = _view(self.running_mean, x.ndim), _view(self.running_var, x.ndim), 2
        x_hat = self._x_hat(x, mu, var, m)
        return _view(gamma, x.ndim) * x_hat + _view(beta, x.ndim)

    def backward(self, dy, x, gamma, beta):
        """The closed-form BN backward (dx, dgamma, dbeta), stateless."""
        axes = (0,) + tuple(range(2, x.ndim))
        mu, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
        rstd = 1 / np.sqrt(var + self.eps)
        x_hat = (x - mu) * rstd
        dx_hat = dy * _view(gamma, x.ndim)
        dx = rstd * (dx_hat - dx_hat.mean(axis=axes, keepdims=True)
                     - x_hat * (dx_hat * x_hat).mean(axis=axes, keepdims=True))
        dgamma = np.sum(dy * x_hat, axis=axes)
        if self.bugs.get("dgamma_wrong"):
            dgamma = np.sum(dy * x_hat, axis=tuple(range(2, x.ndim))).mean(axis=0)
        return dx, dgamma, np.sum(dy, axis=axes)


class NumpyIN:
    """Instance Normalization in numpy with running statistics (the batch mean of the
    per-instance ones, the variances unbiased over the S positions, as PyTorch's
    ``InstanceNorm2d(track_running_stats=True)``); ``running_biased`` plants the bug of
    leaving out S/(S - 1)."""

    def __init__(self, C: int, *, eps: float = 1e-5, momentum: float = 0.1, **bugs: bool):
        self.eps, self.momentum, self.bugs = eps, momentum, bugs
        self.running_mean, self.running_var = np.zeros(C), np.ones(C)

    def __call__(self, x, gamma, beta, *, training: bool = True) -> np.ndarray:
        axes = tuple(range(2, x.ndim))
        mu, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
        if training:
            S = int(np.prod(x.shape[2:]))
            factor = 1.0 if self.bugs.get("running_biased") else S / (S - 1)
            k = self.momentum
            self.running_mean = (1 - k) * self.running_mean + k * mu.reshape(x.shape[:2]).mean(0)
            self.running_var = ((1 - k) * self.running_var
                                + k * factor * var.reshape(x.shape[:2]).mean(0))
        return _view(gamma, x.ndim) * (x - mu) / np.sqrt(var + self.eps) + _view(beta, x.ndim)


def numpy_bn_forward(x, gamma, beta, eps=1e-5):
    """A plain training-mode BN forward: the numpy-callable form."""
    axes = (0,) + tuple(range(2, x.ndim))
    mu, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
    return _view(gamma, x.ndim) * (x - mu) / np.sqrt(var + eps) + _view(beta, x.ndim)


def float32_bn_forward(x, gamma, beta, eps=1e-5):
    """The same BN computed in float32 whatever the input's dtype (as JAX without x64),
    returned in the input's dtype."""
    x32, g32, b32 = (np.asarray(a, dtype=np.float32) for a in (x, gamma, beta))
    return numpy_bn_forward(x32, g32, b32, np.float32(eps)).astype(np.asarray(x).dtype)


class NumpyGN:
    """Group Normalization in numpy; ``layout="interleaved"`` puts channel c in group c % G."""

    def __init__(self, num_groups: int, *, eps: float = 1e-5, layout: str = "consecutive"):
        self.num_groups, self.eps, self.layout = num_groups, eps, layout

    def __call__(self, x, gamma, beta):
        N, C, G = x.shape[0], x.shape[1], self.num_groups
        if self.layout == "consecutive":
            xg = x.reshape((N, G, C // G) + x.shape[2:])
        else:
            xg = np.swapaxes(x.reshape((N, C // G, G) + x.shape[2:]), 1, 2)
        axes = tuple(range(2, xg.ndim))
        x_hat = (xg - xg.mean(axis=axes, keepdims=True)) / np.sqrt(
            xg.var(axis=axes, keepdims=True) + self.eps)
        if self.layout != "consecutive":
            x_hat = np.swapaxes(x_hat, 1, 2)
        return _view(gamma, x.ndim) * x_hat.reshape(x.shape) + _view(beta, x.ndim)


class AxesNorm:
    """Standardize over the given axes of the input (biased variance, eps inside the root),
    then a per-channel affine: BN is ``axes=(0, 2, 3)``, LN ``(1, 2, 3)``, IN ``(2, 3)``;
    ``(1,)`` is an LN over the channels alone at each position (the LayerNorm a
    channels-last network applies to a channels-first tensor)."""

    def __init__(self, axes: tuple[int, ...], *, eps: float = 1e-5):
        self.axes, self.eps = tuple(axes), eps

    def __call__(self, x, gamma, beta):
        mu = x.mean(axis=self.axes, keepdims=True)
        var = x.var(axis=self.axes, keepdims=True)
        return _view(gamma, x.ndim) * (x - mu) / np.sqrt(var + self.eps) + _view(beta, x.ndim)


def _softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max())
    return e / e.sum()


class NumpySN:
    """Switchable Normalization (IN, LN, BN scopes) in numpy.

    ``official=True`` follows the official code's formulas as the conventions page lists
    them: unbiased IN variance, LN/BN variances as E[h^2] - mu^2 from the IN moments, and
    a moving average with ``momentum`` 0.997 on the *old* value of the biased BN-scope
    variance. ``tied=True`` (a mutant) uses the mean ratios for the variances too.
    """

    def __init__(self, C: int, *, eps: float = 1e-5, official: bool = False,
                 tied: bool = False):
        self.eps, self.official, self.tied = eps, official, tied
        self.momentum = 0.997 if official else 0.1
        self.running_mean, self.running_var = np.zeros(C), np.ones(C)

    def __call__(self, x, gamma, beta, mean_logits, var_logits, *, training: bool = True):
        N, C = x.shape[:2]
        h = x.reshape(N, C, -1)
        S = h.shape[2]
        mu_in = h.mean(axis=2, keepdims=True)
        var_in = h.var(axis=2, keepdims=True, ddof=1 if self.official else 0)
        if self.official:                                   # E[h^2] - mu^2, as printed
            sq = var_in + mu_in**2
            mu_ln, mu_bn = mu_in.mean(axis=1, keepdims=True), mu_in.mean(axis=0, keepdims=True)
            var_ln = sq.mean(axis=1, keepdims=True) - mu_ln**2
            var_bn = sq.mean(axis=0, keepdims=True) - mu_bn**2
        else:                                               # law of total variance
            mu_ln, mu_bn = mu_in.mean(axis=1, keepdims=True), mu_in.mean(axis=0, keepdims=True)
            var_ln = (var_in + (mu_in - mu_ln) ** 2).mean(axis=1, keepdims=True)
            var_bn = (var_in + (mu_in - mu_bn) ** 2).mean(axis=0, keepdims=True)
        if training:
            if self.official:                               # momentum on the old value
                keep, factor = self.momentum, 1.0
            else:
                keep, factor = 1 - self.momentum, N * S / (N * S - 1)
            self.running_mean = keep * self.running_mean + (1 - keep) * mu_bn.reshape(-1)
            self.running_var = keep * self.running_var + (1 - keep) * factor * var_bn.reshape(-1)
        else:
            mu_bn = self.running_mean.reshape(1, C, 1)
            var_bn = self.running_var.reshape(1, C, 1)
        w = _softmax(mean_logits)
        w_var = w if self.tied else _softmax(var_logits)
        mu = w[0] * mu_in + w[1] * mu_ln + w[2] * mu_bn
        var = w_var[0] * var_in + w_var[1] * var_ln + w_var[2] * var_bn
        y = (h - mu) / np.sqrt(var + self.eps)
        return (_view(gamma, 3) * y + _view(beta, 3)).reshape(x.shape)


def official_ws_forward(w):
    """The official WS code's formula: unbiased std (torch.std), eps = 1e-5 added to it."""
    mean = w.reshape(w.shape[0], -1).mean(axis=1).reshape((-1,) + (1,) * (w.ndim - 1))
    d = w - mean
    std = d.reshape(w.shape[0], -1).std(axis=1, ddof=1).reshape(mean.shape) + 1e-5
    return d / std


def eps_outside_bn(C: int) -> NumpyBN:
    """A factory for ``refnorm conform``: BN with eps outside the square root."""
    return NumpyBN(C, eps_outside=True)

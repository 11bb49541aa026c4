"""torch.nn.Module mutants for the refnorm.testing suite, one planted convention each (import
only after ``pytest.importorskip("torch")``). As in ``impls.py``, nothing here calls refnorm.
"""

from __future__ import annotations

import torch


def _view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape((1, -1) + (1,) * (ndim - 2))


class LayerNormOverChannels(torch.nn.Module):
    """LayerNorm over the channels alone at each position: ``F.layer_norm`` on the tensor
    moved channels-last (a channels-last network's LayerNorm on an NCHW tensor)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.weight = torch.nn.Parameter(torch.ones(num_features))
        self.bias = torch.nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.layer_norm(x.movedim(1, -1), (x.shape[1],), self.weight,
                                           self.bias, self.eps)
        return y.movedim(-1, 1)


class BatchNormEpsOnStd(torch.nn.Module):
    """BN with eps added to the standard deviation: ``(x - mu) / (sqrt(var) + eps)``."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.weight = torch.nn.Parameter(torch.ones(num_features))
        self.bias = torch.nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axes = [0, *range(2, x.ndim)]
        mu = x.mean(axes, keepdim=True)
        std = x.var(axes, keepdim=True, unbiased=False).sqrt()
        return (_view(self.weight, x.ndim) * (x - mu) / (std + self.eps)
                + _view(self.bias, x.ndim))


class SwitchNormTied(torch.nn.Module):
    """SN (scopes IN, LN, BN) whose variances are mixed with the *mean* ratios.

    ``keep_var_weight=True`` keeps an unused ``var_weight`` parameter (its gradient is None
    after backward); False has none at all.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, keep_var_weight: bool = True):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.weight = torch.nn.Parameter(torch.ones(num_features))
        self.bias = torch.nn.Parameter(torch.zeros(num_features))
        self.mean_weight = torch.nn.Parameter(torch.ones(3))
        if keep_var_weight:
            self.var_weight = torch.nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, C = x.shape[:2]
        h = x.reshape(N, C, -1)
        mu_in, var_in = h.mean(2, keepdim=True), h.var(2, keepdim=True, unbiased=False)
        mu_ln, mu_bn = mu_in.mean(1, keepdim=True), mu_in.mean(0, keepdim=True)
        var_ln = (var_in + (mu_in - mu_ln) ** 2).mean(1, keepdim=True)   # total variance
        var_bn = (var_in + (mu_in - mu_bn) ** 2).mean(0, keepdim=True)
        w = torch.softmax(self.mean_weight, 0)
        mu = w[0] * mu_in + w[1] * mu_ln + w[2] * mu_bn
        var = w[0] * var_in + w[1] * var_ln + w[2] * var_bn               # the planted tie
        y = (h - mu) / torch.sqrt(var + self.eps)
        return (self.weight.reshape(1, C, 1) * y + self.bias.reshape(1, C, 1)).reshape(x.shape)

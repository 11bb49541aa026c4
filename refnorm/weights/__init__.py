"""Weight-side normalizers: each reparameterizes a convolution's or linear layer's weights.

- :mod:`~refnorm.weights.weight_norm` — Weight Normalization (``wn``), data-dependent init;
- :mod:`~refnorm.weights.norm_prop` — Normalization Propagation (``np``);
- :mod:`~refnorm.weights.trelu` — WN with translated ReLU (``trelu``);
- :mod:`~refnorm.weights.standardization` — Weight Standardization (``ws``);
- :mod:`~refnorm.weights.base` — the per-output-channel view and the convolution or linear
  map the layers run with their reparameterized weights.
"""

from refnorm.weights.norm_prop import (
    RELU_MEAN,
    RELU_STD,
    NormProp,
    norm_prop_relu_backward,
    norm_prop_relu_forward,
)
from refnorm.weights.standardization import (
    WeightStandardization,
    weight_standardization_backward,
    weight_standardization_forward,
)
from refnorm.weights.trelu import TReLUWeightNorm, translated_relu_backward, translated_relu_forward
from refnorm.weights.weight_norm import WeightNorm, weight_norm_backward, weight_norm_forward

__all__ = [
    "RELU_MEAN",
    "RELU_STD",
    "NormProp",
    "TReLUWeightNorm",
    "WeightNorm",
    "WeightStandardization",
    "norm_prop_relu_backward",
    "norm_prop_relu_forward",
    "translated_relu_backward",
    "translated_relu_forward",
    "weight_norm_backward",
    "weight_norm_forward",
    "weight_standardization_backward",
    "weight_standardization_forward",
]

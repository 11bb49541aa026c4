"""The math every activation normalizer shares.

Every method in :mod:`refnorm.norms` is "statistics over reduction axes, then a per-channel
scale and shift". This package holds those pieces once:

- :func:`moments` — two-pass mean and biased variance over given axes;
- :func:`standardize` and :func:`standardize_backward` — ``x_hat = (x - mu) * rstd`` and its
  closed-form backward;
- :func:`affine_forward` and :func:`affine_backward` — ``y = gamma * x_hat + beta`` per channel;
- :mod:`refnorm.core.checks` — argument checks shared by the public functions.
"""

from refnorm.core.affine import affine_backward, affine_forward
from refnorm.core.moments import moments, reduced_count
from refnorm.core.standardize import standardize, standardize_backward

__all__ = [
    "affine_backward",
    "affine_forward",
    "moments",
    "reduced_count",
    "standardize",
    "standardize_backward",
]

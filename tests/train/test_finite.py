"""The non-finite checks."""

from __future__ import annotations

import numpy as np

from refnorm.train import finite


def test_is_finite_is_exact():
    assert finite.is_finite(np.full(10**6, np.finfo(np.float32).max, np.float32))
    assert finite.is_finite(np.array([1e308, 1e308]))  # its float64 sum overflows
    assert not finite.is_finite(np.array([1.0, np.inf, -np.inf]))  # sum nan
    assert not finite.is_finite(np.array([np.nan], np.float16))
    assert finite.is_finite(np.array(True)) and finite.is_finite(np.arange(3))


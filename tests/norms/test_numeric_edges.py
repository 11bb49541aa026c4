"""Numeric edges say so: eps that underflows, variances that overflow,
numpy integers and booleans where Python ones are accepted, eps refused at build()."""

from __future__ import annotations

import numpy as np
import pytest

import refnorm

FORWARDS = {
    "bn": lambda x, g, b, **kw: refnorm.batch_norm_forward(x, g, b, **kw),
    "in": lambda x, g, b, **kw: refnorm.instance_norm_forward(x, g, b, **kw),
    "ln": lambda x, g, b, **kw: refnorm.layer_norm_forward(x, g, b, **kw),
    "gn": lambda x, g, b, **kw: refnorm.group_norm_forward(x, g, b, num_groups=2, **kw),
}


@pytest.mark.parametrize("name", sorted(FORWARDS))
def test_eps_that_rounds_to_zero_in_float32_is_refused_like_zero(name):
    x = np.random.default_rng(0).standard_normal((2, 4, 3, 3)).astype(np.float32)
    g, b = np.ones(4, np.float32), np.zeros(4, np.float32)
    with pytest.raises(ValueError, match=r"eps=1e-50 rounds to 0 in float32"):
        FORWARDS[name](x, g, b, eps=1e-50)
    # The same eps is representable in float64 and accepted there.
    FORWARDS[name](x.astype(np.float64), g.astype(np.float64), b.astype(np.float64), eps=1e-50)


@pytest.mark.parametrize("name", sorted(FORWARDS))
def test_a_variance_that_overflows_float32_raises_instead_of_returning_beta(name):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, 4, 3, 3)) * 1e20).astype(np.float32)  # squares ~1e40 > 3.4e38
    g, b = np.ones(4, np.float32), np.full(4, 0.5, np.float32)
    with pytest.raises(ValueError, match=r"the variance of x overflows float32"):
        FORWARDS[name](x, g, b)
    # float64 holds those squares: the same values normalize to unit variance there.
    y, _ = FORWARDS[name](x.astype(np.float64), g.astype(np.float64), b.astype(np.float64))
    assert np.all(np.isfinite(y)) and np.std(y) > 0.5


def test_nan_input_still_propagates_as_nan_rather_than_raising():
    x = np.ones((2, 3, 2, 2))
    x[0, 0, 0, 0] = np.nan
    y, _ = refnorm.batch_norm_forward(x, np.ones(3), np.zeros(3))
    assert np.isnan(y[:, 0]).all() and not np.isnan(y[:, 1:]).any()


@pytest.mark.parametrize("name", ["bn", "in", "ln", "gn", "sn"])
@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_layers_refuse_eps_at_build_not_at_first_forward(name, eps):
    options = {"num_groups": 2} if name == "gn" else {}
    with pytest.raises(ValueError, match="eps must be finite and > 0"):
        refnorm.build(name, 4, eps=eps, **options)


def test_numpy_integers_are_accepted_where_ints_are():
    layer = refnorm.build("gn", np.int64(4), num_groups=np.int32(2))
    assert (layer.num_channels, layer.num_groups) == (4, 2)
    assert type(layer.num_channels) is int and type(layer.num_groups) is int
    x = np.random.default_rng(2).standard_normal((2, 4, 3, 3))
    y, _ = refnorm.group_norm_forward(x, np.ones(4), np.zeros(4), num_groups=np.int64(2))
    y_int, _ = refnorm.group_norm_forward(x, np.ones(4), np.zeros(4), num_groups=2)
    np.testing.assert_array_equal(y, y_int)

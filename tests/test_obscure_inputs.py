"""Inputs that used to crash with a raw traceback (a reliability audit's finds): each is now one
clear ValueError or TypeError naming the argument."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

import refnorm
from refnorm.weights import translated_relu_forward, weight_norm_forward

pytestmark = pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
X = np.random.default_rng(0).standard_normal((4, 3))
G, B = np.ones(3), np.zeros(3)


@pytest.mark.parametrize("path", ["reference", "fast"])
@pytest.mark.parametrize("forward", [refnorm.batch_norm_forward, refnorm.layer_norm_forward])
def test_a_numpy_matrix_is_refused_by_name(forward, path):
    with pytest.raises(TypeError, match=r"^x must be an array, not a numpy.matrix .*pass "
                                        r"numpy.asarray\(x\)$"):
        forward(np.matrix(X), G, B, path=path)


def test_a_numpy_matrix_parameter_is_refused_by_name():
    with pytest.raises(TypeError, match=r"^gamma must be an array, not a numpy.matrix"):
        refnorm.batch_norm_forward(X, np.matrix(G), B)


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_a_fraction_eps_is_refused_with_the_remedy(path):
    with pytest.raises(TypeError, match=r"^eps must be a float; got Fraction \(pass "
                                        r"float\(eps\)\)$"):
        refnorm.batch_norm_forward(X, G, B, eps=Fraction(1, 10**5), path=path)


def test_weight_norm_with_no_output_channel_is_refused():
    with pytest.raises(ValueError, match=r"^v must have at least one output channel \(C_out "
                                         r">= 1\); got shape \(0, 3, 3, 3\)$"):
        weight_norm_forward(np.zeros((0, 3, 3, 3)), np.ones(0))


@pytest.mark.parametrize("z", [np.array(1.0), np.array([1.0, -2.0])])
def test_translated_relu_needs_a_channel_axis(z):
    with pytest.raises(ValueError, match=r"^z must have layout \(N, C, \*spatial\), at least 2 "
                                         r"dimensions"):
        translated_relu_forward(z, np.zeros(2))


OVERFLOWING = {
    "bn": lambda x, g, b, path: refnorm.batch_norm_forward(x, g, b, path=path),
    "in": lambda x, g, b, path: refnorm.instance_norm_forward(x, g, b, path=path),
    "ln": lambda x, g, b, path: refnorm.layer_norm_forward(x, g, b, path=path),
    "gn": lambda x, g, b, path: refnorm.group_norm_forward(x, g, b, num_groups=2, path=path),
    "sn": lambda x, g, b, path: refnorm.switchable_norm_forward(
        x, g, b, np.zeros(3, x.dtype), np.zeros(3, x.dtype), path=path),
}


@pytest.mark.parametrize(("dtype", "remedy"), [(np.float64, "rescale x$"),
                                               (np.float32, "compute in float64 or rescale x$")])
@pytest.mark.parametrize("path", ["reference", "fast"])
def test_an_overflowing_variance_advises_what_helps(dtype, remedy, path):
    big = 1e200 if dtype == np.float64 else 1e20
    x = (np.array([[big], [-big]]) * np.ones((2, 3))).astype(dtype)
    with np.errstate(over="ignore"), pytest.raises(ValueError, match=f"overflows {np.dtype(dtype)}"
                                                                     f".*; {remedy}"):
        refnorm.batch_norm_forward(x, G.astype(dtype), B.astype(dtype), path=path)


@pytest.mark.parametrize("method", sorted(OVERFLOWING))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("path", ["reference", "fast"])
def test_every_normalizer_refuses_an_overflowing_variance(method, dtype, path):
    """Means beyond sqrt(max) in every statistic (the fast path's first segment of a unit
    included: its merge once made NaN of 0 * inf, and so no error), signs mixed within each."""
    big = 1e200 if dtype == np.float64 else 1e20
    x = np.full((2, 4, 2, 2), big)
    x[1] *= -1
    x[:, :, 0, 0] *= -1
    g, b = np.ones(4, dtype), np.zeros(4, dtype)
    with np.errstate(over="ignore", invalid="ignore"), \
            pytest.raises(ValueError, match=f"overflows {np.dtype(dtype)}"):
        OVERFLOWING[method](x.astype(dtype), g, b, path)

"""Caches built or edited by hand, given to the fast backwards.

The fast loops turn a cache's shapes into addresses and do not check bounds, so a cache whose
fields disagree (a shorter ``rstd``, an ``x_shape`` from another input, fewer ``argmax``
columns) used to make them read or write outside their arrays: garbage, or a crashed
interpreter. Each such cache is now refused with one ValueError or TypeError that names the
field; the reference, which broadcasts, accepts some of them, and the message says so.
A regression here would crash the test process, which fails the run as loudly.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from refnorm.nn import conv, pooling
from refnorm.norms import batch_norm, group_norm, instance_norm, layer_norm
from refnorm.weights import standardization

R = dataclasses.replace
RNG = np.random.default_rng(0)
X = RNG.standard_normal((8, 16, 4, 4))
ONES, ZEROS = np.ones(16), np.zeros(16)


def _norm_cases():
    y, c = batch_norm.batch_norm_forward(X, ONES, ZEROS)
    bn = batch_norm.batch_norm_backward
    yield "bn rstd broadcast", bn, y, R(c, rstd=np.ones((1, 1, 1, 1))), "rstd must hold 16"
    yield "bn rstd per value", bn, y, R(c, rstd=np.ones(X.shape)), "rstd must hold 16"
    yield "bn gamma short", bn, y, R(c, gamma=np.ones(3)), r"gamma must have shape \(16,\)"
    yield "bn gamma int", bn, y, R(c, gamma=np.ones(16, int)), "gamma must be a floating"
    yield "bn x_hat a list", bn, y, R(c, x_hat=c.x_hat.tolist()), "x_hat must be a floating"
    yield ("bn x_hat 2-D", bn, y.reshape(8, -1), R(c, x_hat=c.x_hat.reshape(8, -1)),
           r"gamma must have shape \(256,\)")
    y, c = layer_norm.layer_norm_forward(X, ONES, ZEROS)
    yield ("ln rstd of 2N", layer_norm.layer_norm_backward, y, R(c, rstd=np.ones(16)),
           "rstd must hold 8 values")
    yield ("ln x_hat fewer samples", layer_norm.layer_norm_backward, y[:4],
           R(c, x_hat=c.x_hat[:4].copy()), "rstd must hold 4 values")
    y, c = instance_norm.instance_norm_forward(X, ONES, ZEROS)
    yield ("in rstd scalar", instance_norm.instance_norm_backward, y,
           R(c, rstd=np.float64(1.0)), "rstd must be a floating numpy array")
    yield ("in rstd first sample", instance_norm.instance_norm_backward, y,
           R(c, rstd=c.rstd[:1].copy()), "rstd must hold 128 values")
    y, c = group_norm.group_norm_forward(X, ONES, ZEROS, num_groups=4)
    gn = group_norm.group_norm_backward
    yield "gn groups not dividing", gn, y, R(c, num_groups=3), "num_groups .3. must divide"
    yield "gn groups changed", gn, y, R(c, num_groups=8), "rstd must hold 64 values"


def _layer_cases():
    x = RNG.standard_normal((2, 3, 8, 8))
    y, c = pooling.max_pool2d_forward(x, kernel_size=2)
    mp = pooling.max_pool2d_backward
    yield ("max-pool y_shape", mp, np.ones((2, 4, 4, 4)),
           R(c, pool=R(c.pool, y_shape=(2, 4, 4, 4))), "y_shape")
    yield "max-pool x_shape", mp, y, R(c, pool=R(c.pool, x_shape=(1, 3, 7, 8))), "window"
    yield "max-pool argmax narrow", mp, y, R(c, argmax=c.argmax[:, :5].copy()), "argmax"
    yield "max-pool argmax float", mp, y, R(c, argmax=c.argmax.astype(float)), "argmax"
    y, c = pooling.avg_pool2d_forward(x, kernel_size=2)
    yield ("avg-pool x_shape", pooling.avg_pool2d_backward, y, R(c, x_shape=(2, 4, 8, 8)),
           "y_shape")
    xc, w = RNG.standard_normal((2, 3, 5, 6)), RNG.standard_normal((4, 3, 3, 2))
    y, c = conv.conv2d_forward(xc, w)
    cb = conv.conv2d_backward
    yield "conv w_mat", cb, y, R(c, w_mat=c.w_mat[:, :6].copy()), "w_mat"
    yield "conv x_shape", cb, y, R(c, x_shape=(2000, 3, 5, 6)), "y_shape"
    yield "conv cols", cb, y, R(c, cols=c.cols[:, :7].copy()), "cols"
    wt = RNG.standard_normal((64, 3, 3, 3))
    _, c = standardization.weight_standardization_forward(wt)
    yield ("ws denom broadcast", standardization.weight_standardization_backward,
           np.ones_like(wt), R(c, denom=c.denom[:1].copy(), kappa=c.kappa[:1].copy()), "denom")


CASES = list(_norm_cases()) + list(_layer_cases())


@pytest.mark.parametrize(("name", "backward", "dy", "cache", "message"), CASES,
                         ids=[c[0] for c in CASES])
def test_the_fast_backward_refuses_a_cache_whose_fields_disagree(name, backward, dy, cache,
                                                                 message):
    with pytest.raises((ValueError, TypeError), match=message):
        backward(dy, cache, path="fast")


def test_a_cache_the_reference_broadcasts_is_refused_with_the_way_out():
    y, c = batch_norm.batch_norm_forward(X, ONES, ZEROS)
    bad = R(c, rstd=np.ones((1, 1, 1, 1)))
    batch_norm.batch_norm_backward(y, bad, path="reference")  # broadcasts
    with pytest.raises(ValueError, match="path='reference' broadcasts"):
        batch_norm.batch_norm_backward(y, bad, path="fast")


def test_the_forwards_caches_pass_the_checks_on_both_paths():
    """The checks refuse only what the forward never makes: its own caches, in training and
    at inference, float16 to float64, still give the reference's gradients."""
    for dtype in (np.float16, np.float32, np.float64):
        x = X.astype(dtype)
        for forward, backward, kw in (
            (batch_norm.batch_norm_forward, batch_norm.batch_norm_backward, {}),
            (instance_norm.instance_norm_forward, instance_norm.instance_norm_backward, {}),
            (layer_norm.layer_norm_forward, layer_norm.layer_norm_backward, {}),
            (group_norm.group_norm_forward, group_norm.group_norm_backward, {"num_groups": 4}),
        ):
            dy = RNG.standard_normal(x.shape).astype(dtype)
            got = backward(dy, forward(x, ONES, ZEROS, path="fast", **kw)[1], path="fast")
            want = backward(dy, forward(x, ONES, ZEROS, path="reference", **kw)[1],
                            path="reference")
            # normwise, as tests/kernels compares the paths; float16 computes in float32 and
            # rounds each output once to float16: one float16 ulp
            tol = {np.float16: 2.0**-10, np.float32: 2e-6, np.float64: 1e-12}[dtype]
            for g, r in zip(got, want, strict=True):
                g64, r64 = g.astype(np.float64), r.astype(np.float64)
                assert g.dtype == r.dtype
                assert np.max(np.abs(g64 - r64)) <= tol * max(1.0, np.max(np.abs(r64)))
    y, c = batch_norm.batch_norm_eval_forward(X, ONES, ZEROS, np.zeros(16), np.ones(16),
                                              path="fast")
    np.testing.assert_allclose(batch_norm.batch_norm_backward(y, c, path="fast")[0],
                               batch_norm.batch_norm_backward(y, c, path="reference")[0])


def test_a_group_count_edited_after_a_valid_backward_is_still_refused():
    """The fast backward remembers the signatures it checked, the cache's group count among
    them: after the forward's own cache passed, the same arrays under another num_groups
    are refused (the kernels would take the groups from rstd's shape and return another
    group count's gradient)."""
    y, c = group_norm.group_norm_forward(X, ONES, ZEROS, num_groups=4)
    group_norm.group_norm_backward(y, c, path="fast")  # valid: remembered
    with pytest.raises(ValueError, match=r"num_groups \(3\) must divide"):
        group_norm.group_norm_backward(y, R(c, num_groups=3), path="fast")
    with pytest.raises(ValueError, match="rstd must hold 64 values"):
        group_norm.group_norm_backward(y, R(c, num_groups=8), path="fast")


def test_the_fast_conv_backward_refuses_a_cache_whose_x_has_other_channels_than_w():
    """An x_shape whose channel count differs from w's C_in, every other field consistent
    (window, y_shape, the columns' shape all follow w): refused by name, not handed to the
    col2im loop, whose rows would then run over another count of channels."""
    rng = np.random.default_rng(1)
    y, c = conv.conv2d_forward(rng.standard_normal((2, 3, 5, 6)),
                               rng.standard_normal((4, 3, 3, 2)))
    for x_shape in ((2, 1, 5, 6), (2, 2, 5, 6)):
        with pytest.raises(ValueError, match=r"x_shape \(2, \d, 5, 6\), w_shape \(4, 3, 3, 2\)"):
            conv.conv2d_backward(y, R(c, x_shape=x_shape), path="fast")


@pytest.mark.parametrize("field", ["denom", "kappa", "w_hat"])
def test_the_ws_fast_backward_names_each_field_of_a_short_cache(field):
    # Qiao et al.'s Eq. (8) reads d and kappa at every output channel: a cache whose one
    # field holds a single channel's value (the others intact) is refused by that field's
    # name, not read beyond its end.
    wt = RNG.standard_normal((64, 3, 3, 3))
    _, c = standardization.weight_standardization_forward(wt, path="fast")
    bad = R(c, **{field: getattr(c, field)[:1].copy()})
    with pytest.raises(ValueError, match=f"the cache's {field} has shape"):
        standardization.weight_standardization_backward(np.ones_like(wt), bad, path="fast")

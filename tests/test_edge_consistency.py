"""Edge inputs where a result could be silently wrong, or the two paths could disagree: a
layer's forward that raises, masked arrays, statistics whose sums overflow the dtype, NaN
through the weight-normalized layers' activations, and arguments checked at build."""

from __future__ import annotations

import numpy as np
import pytest

import refnorm
from refnorm import registry
from refnorm.norms import switchable_norm
from refnorm.sync import InProcessGroup, sync_batch_norm_forward
from refnorm.weights import norm_prop, standardization, trelu, weight_norm

# An overflow is refused in refnorm's words (ValueError), with no numpy warning before it.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

LAYERS = {
    "bn": {}, "gn": {"num_groups": 2}, "ln": {}, "in": {}, "sn": {}, "syncbn": {},
    "syncsn": {},
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_a_forward_that_raises_leaves_nothing_for_backward(name):
    """Before, the layer kept the previous forward's cache, and backward returned that
    forward's gradient without a word."""
    rng = np.random.default_rng(0)
    layer = refnorm.build(name, 4, dtype=np.float64, **LAYERS[name])
    layer.forward(rng.standard_normal((3, 4, 5, 5)), training=True)
    with pytest.raises(ValueError, match=r"was built for 4 channels; x of shape \(3, 3, 5, 5\) "
                                         r"has 3 on its channel axis"):
        layer.forward(rng.standard_normal((3, 3, 5, 5)), training=True)
    with pytest.raises(RuntimeError, match=r"backward\(\) called before forward\(\) \(or after "
                                           r"a forward\(\) that raised"):
        layer.backward(rng.standard_normal((3, 4, 5, 5)))


def test_a_forward_that_raises_in_the_pure_function_also_drops_the_cache():
    layer = refnorm.build("bn", 3, dtype=np.float64)
    layer.forward(np.random.default_rng(1).standard_normal((4, 3)), training=True)
    with pytest.raises(ValueError, match="more than 1 value"):
        layer.forward(np.ones((1, 3)), training=True)  # one value per channel
    with pytest.raises(RuntimeError, match="called before forward"):
        layer.backward(np.ones((1, 3)))


@pytest.mark.parametrize("path", ["reference", "fast"])
@pytest.mark.parametrize("method", ["bn", "gn", "sn"])
def test_masked_arrays_are_refused_on_both_paths(path, method):
    """The reference honoured the mask (numpy.ma reductions), the fast path read the raw data."""
    x = np.ma.masked_array(np.random.default_rng(2).standard_normal((4, 4, 3, 3)))
    x[0, 0, 0, 0] = np.ma.masked
    g, b = np.ones(4), np.zeros(4)
    call = {"bn": lambda: refnorm.batch_norm_forward(x, g, b, path=path),
            "gn": lambda: refnorm.group_norm_forward(x, g, b, num_groups=2, path=path),
            "sn": lambda: refnorm.switchable_norm_forward(x, g, b, np.zeros(3), np.zeros(3),
                                                          path=path)}
    with pytest.raises(TypeError, match="x must be an array, not a numpy masked array"):
        call[method]()


FORWARDS = {
    "bn": lambda x, g, b, p: refnorm.batch_norm_forward(x, g, b, path=p),
    "in": lambda x, g, b, p: refnorm.instance_norm_forward(x, g, b, path=p),
    "ln": lambda x, g, b, p: refnorm.layer_norm_forward(x, g, b, path=p),
    "gn": lambda x, g, b, p: refnorm.group_norm_forward(x, g, b, num_groups=2, path=p),
    "sn": lambda x, g, b, p: refnorm.switchable_norm_forward(
        x, g, b, np.zeros(3, x.dtype), np.zeros(3, x.dtype), path=p),
}


def _inputs(kind, dtype):
    """(x, whether the reference's sums overflow dtype, or the methods whose do), far from
    the boundary either way."""
    rng = np.random.default_rng(3)
    z = rng.standard_normal((4, 4, 3, 3))
    cases = {
        # float32: squares of 1e17 fit (1e34), their sums too
        ("spread", np.float32): (1e17 * z, False),
        # squares of 1e19 reach 1e39 > 3.4e38, though the variance (1e38) fits: refused on
        # both paths, as the reference's float32 sums overflow
        ("squares", np.float32): (1e19 * z, True),
        # a constant channel at 1.7e38: its float32 sum overflows, which SN's reference forms
        # (its mean is inf); BN and IN sum in float64 and normalize the channel to 0; LN and
        # GN mix it with the others, whose deviations from it overflow when squared
        ("sum", np.float32): (np.where(np.arange(4)[None, :, None, None] == 1, 1.7e38, z),
                              ("ln", "gn", "sn")),
        # channel 1 at +-3e38: partial sums of both signs overflow, inf - inf: the reference's
        # mean was NaN, and so its outputs, for finite inputs
        ("signs", np.float32): (np.where(np.arange(4)[None, :, None, None] == 1,
                                         3e38 * np.sign(z), z), True),
        ("spread", np.float64): (1e150 * z, False),
        ("squares", np.float64): (1e160 * z, True),
    }
    x, overflows = cases[kind, dtype]
    return np.asarray(x).astype(dtype), overflows


@pytest.mark.parametrize("method", sorted(FORWARDS))
@pytest.mark.parametrize(("kind", "dtype"), [("spread", np.float32), ("squares", np.float32),
                                             ("sum", np.float32), ("signs", np.float32),
                                             ("spread", np.float64), ("squares", np.float64)])
def test_both_paths_refuse_exactly_where_the_references_sums_overflow(method, kind, dtype):
    """The fast path sums in float64; it once accepted float32 inputs whose squared
    deviations overflow float32 (1e19) or whose sum does (1.7e38), which the reference
    refuses: now both refuse them, and both accept what fits."""
    x, overflows = _inputs(kind, dtype)
    if isinstance(overflows, tuple):  # the methods whose reference overflows
        overflows = method in overflows
    g, b = np.ones(4, dtype), np.zeros(4, dtype)
    results = {}
    for path in ("reference", "fast"):
        if overflows:
            with pytest.raises(ValueError, match=f"the variance of x overflows {np.dtype(dtype)}"):
                FORWARDS[method](x, g, b, path)
        else:
            results[path] = FORWARDS[method](x, g, b, path)[0]
    if not overflows:
        np.testing.assert_allclose(results["fast"], results["reference"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["bn", "in", "ln", "gn"])
@pytest.mark.parametrize("value", [1000.1, 1e5 + 0.3, 1e20, 1e30, -3e38])
def test_a_constant_group_normalizes_to_zero_on_both_paths(method, value):
    """A group of equal float32 values has variance 0 and x_hat = 0. The reference took a
    float32 sum for its mean, which is not the constant: the deviations from it, normalized by
    sqrt(eps), gave |y| up to 0.9 at 1e5 and exactly 1 at 1e20, and at 1e30 their squares
    overflowed (refused). Its mean's sum is float64 now, as the kernels' (and PyTorch's CPU
    kernels') are."""
    f = np.array([1.0, -1.0, 0.5, -0.25])  # another constant in each channel, or sample
    scale = f[None, :, None, None] if method == "bn" else f[:3, None, None, None]
    x = np.broadcast_to(value * scale, (3, 4, 5, 5)).astype(np.float32)
    g, b = np.ones(4, np.float32), np.linspace(-1, 1, 4).astype(np.float32)
    for path in ("reference", "fast"):
        y = FORWARDS[method](x, g, b, path)[0]
        np.testing.assert_array_equal(y, np.broadcast_to(b[None, :, None, None], y.shape),
                                      err_msg=path)


@pytest.mark.parametrize("method", ["bn", "in", "ln", "gn", "sn", "staged bn"])
@pytest.mark.parametrize("value", [1.2345678901234567e13, 3.3e13 + 0.1, 7.777777777777e15,
                                   -0.1, 1e300])
def test_a_constant_float64_group_normalizes_to_zero_on_both_paths(method, value):
    """In float64 a float64 sum adds no precision: the rounded mean of a constant group of
    1.2345678901234567e13 was an ulp (0.002) off, and the deviations from it, normalized by
    sqrt(eps), gave |y| = 0.53 on the reference where the kernels, which shift each group by
    one of its values, gave 0. The mean is refined by the mean of the deviations now."""
    f = np.array([1.0, -1.0, 0.5, -0.25])  # another constant in each channel, or sample
    scale = f[None, :, None, None] if method in ("bn", "staged bn") else f[:3, None, None, None]
    if method == "sn":
        scale = 1.0  # constant in every scope: one value throughout
    x = np.ascontiguousarray(np.broadcast_to(value * scale, (3, 4, 5, 5)))
    g, b = np.ones(4), np.linspace(-1, 1, 4)
    beta = np.broadcast_to(b[None, :, None, None], x.shape)
    if method == "staged bn":
        np.testing.assert_array_equal(refnorm.batch_norm_forward_graph(x, g, b)[0], beta)
        return
    for path in ("reference", "fast"):
        if method == "sn":
            y = switchable_norm.switchable_norm_forward(x, g, b, np.zeros(3), np.zeros(3),
                                                        path=path)[0]
        else:
            y = FORWARDS[method](x, g, b, path)[0]
        np.testing.assert_array_equal(y, beta, err_msg=path)


def test_synchronized_batch_norm_of_a_constant_float64_channel_stays_within_its_tolerance():
    """The conventions page: the synchronized BN merges the devices' sums without refining the
    mean, so a float64 constant channel of 7.8e15 is not normalized to exactly 0 there, but
    within the float64 tolerance, 1e-12 times 1 + max|mean| / min sqrt(var + eps)."""
    value, eps = 7.777777777777e15, 1e-5
    x = np.full((5, 2, 3, 3), value)
    g, b = np.ones(2), np.zeros(2)

    def forward(comm, shard):
        return sync_batch_norm_forward(shard, g, b, comm=comm, eps=eps)[0]

    y = np.concatenate(InProcessGroup.run(2, forward, [x[:2], x[2:]]))
    assert np.all(np.abs(y) <= 1e-12 * (1 + value / np.sqrt(eps)))


def test_switchable_norm_refuses_a_pooled_variance_that_overflows():
    """Plane means 1e19 apart with no spread within a plane: the IN moments fit, but LN's and
    BN's variances (the spread of the IN means) overflow float32. The reference returned
    beta for every value; both paths refuse."""
    x = np.ones((2, 4, 3, 3), np.float32)
    x *= np.array([1.0, -1.0, 2.0, -2.0], np.float32)[None, :, None, None] * 1e19
    x[:, :, 0, 0] += 1.0e12  # some spread within each plane
    args = (np.ones(4, np.float32), np.zeros(4, np.float32), np.zeros(3, np.float32),
            np.zeros(3, np.float32))
    for path in ("reference", "fast"):
        with pytest.raises(ValueError, match="the variance of x overflows float32"):
            switchable_norm.switchable_norm_forward(x, *args, path=path)


def test_synchronized_and_staged_batch_norm_refuse_an_overflow_as_batch_norm_does():
    x = (np.random.default_rng(4).standard_normal((6, 2, 3)) * 1e20).astype(np.float32)
    g, b = np.ones(2, np.float32), np.zeros(2, np.float32)
    with pytest.raises(ValueError, match="the variance of x overflows float32"):
        refnorm.batch_norm_forward_graph(x, g, b)
    layer = refnorm.build("syncbn", 2)
    with pytest.raises(ValueError, match="the variance of x overflows float32"):
        layer.forward(x, training=True)
    np.testing.assert_array_equal(layer.state["running_var"], np.ones(2, np.float32))


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_weight_standardization_refuses_weights_whose_sums_overflow(path):
    """The reference returned w_hat = 0 and a NaN gradient for float32 weights of 1e20;
    the fast path (float64 sums) returned the standardized weights."""
    w = np.random.default_rng(5).standard_normal((3, 2, 3, 3))
    with pytest.raises(ValueError, match="the variance of w overflows float32"):
        standardization.weight_standardization_forward((1e20 * w).astype(np.float32), path=path)
    w_hat, _ = standardization.weight_standardization_forward((1e15 * w).astype(np.float32),
                                                              path=path)
    ref, _ = standardization.weight_standardization_forward(w, path="reference")
    np.testing.assert_allclose(w_hat, ref, rtol=1e-4, atol=1e-4)


def test_weight_norm_refuses_a_squared_norm_that_overflows():
    """||[3e19, 4e19]||^2 = 2.5e39 overflows float32: w was [0, 0] and dv NaN."""
    v = np.array([[3e19, 4e19]], np.float32)
    with pytest.raises(ValueError, match="the squared norm of a filter of v overflows float32"):
        weight_norm.weight_norm_forward(v, np.ones(1, np.float32))
    w, _ = weight_norm.weight_norm_forward(v.astype(np.float64), np.ones(1))
    np.testing.assert_allclose(w, [[0.6, 0.8]])


def test_norm_prop_and_translated_relu_keep_nan_as_nan():
    """Both took ``where(z > a, z, a)``, which sends NaN to the other branch (a finite value);
    ReLU, max and PyTorch's relu keep it."""
    z = np.array([[[np.nan, 1.0, -1.0, np.inf]]]).reshape(1, 1, 4)
    y, cache = norm_prop.norm_prop_relu_forward(z)
    assert np.isnan(y[0, 0, 0]) and np.isfinite(y[0, 0, 1:3]).all() and y[0, 0, 3] == np.inf
    dz = norm_prop.norm_prop_relu_backward(np.ones_like(z), cache)
    assert dz[0, 0, 0] == 0  # NaN > 0 is false: no gradient, as refnorm's ReLU
    y, cache = trelu.translated_relu_forward(z, np.array([0.5]))
    np.testing.assert_array_equal(y, [[[np.nan, 1.0, 0.5, np.inf]]])
    dz, dalpha = trelu.translated_relu_backward(np.ones_like(z), cache)
    np.testing.assert_array_equal(dz, [[[0.0, 1.0, 0.0, 1.0]]])
    np.testing.assert_array_equal(dalpha, [2.0])


BUILD_ARGS = {"gn": ((4,), {"num_groups": 2}), "wn": ((4, 4, 3), {}), "np": ((4, 4, 3), {}),
              "trelu": ((4, 4, 3), {}), "ws": ((4, 4, 3), {})}


@pytest.mark.parametrize("name", [n for n in registry.names() if n not in ("conv", "linear")])
def test_layers_check_eps_against_their_dtype_when_built(name):
    args, options = BUILD_ARGS.get(name, ((4,), {}))

    def build(**kw):
        return refnorm.build(name, *args, **options, **kw)

    with pytest.raises(ValueError, match=r"eps=1e-50 rounds to 0 in float32, the compute dtype"):
        build(eps=1e-50)
    with pytest.raises(ValueError, match=r"eps=1e\+39 overflows float32, the compute dtype"):
        build(eps=1e39)
    with pytest.raises(ValueError, match=r"rounds to 0 in float32"):  # float16 computes in it
        build(eps=1e-50, dtype=np.float16)
    build(eps=1e-50, dtype=np.float64)  # representable there


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_an_eps_beyond_the_dtype_is_refused_by_the_functions(path):
    x = np.random.default_rng(6).standard_normal((4, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=r"eps=1e\+39 overflows float32, the compute dtype"):
        refnorm.batch_norm_forward(x, np.ones(3, np.float32), np.zeros(3, np.float32), eps=1e39,
                                   path=path)


@pytest.mark.parametrize("dtype", ["float32", float])
def test_a_dtype_that_is_not_one_of_the_namespace_is_named(dtype):
    with pytest.raises(TypeError, match=r"dtype must be a dtype of numpy, such as "
                                        r"numpy.float32; got"):
        refnorm.build("bn", 3, dtype=dtype)


def test_track_running_stats_must_be_a_bool():
    with pytest.raises(TypeError, match="track_running_stats must be a bool; got str"):
        refnorm.build("in", 3, track_running_stats="no")


def test_weight_norm_initialization_refuses_a_batch_with_nan():
    layer = refnorm.build("wn", 2, 3, 3, dtype=np.float64)
    x = np.random.default_rng(7).standard_normal((4, 2, 5, 5))
    x[0, 0, 0, 0] = np.nan
    g, b = layer.params["g"].copy(), layer.params["b"].copy()
    with pytest.raises(ValueError, match="has a NaN or infinite mean or std"):
        layer.init_from_batch(x)
    np.testing.assert_array_equal(layer.params["g"], g)
    np.testing.assert_array_equal(layer.params["b"], b)


def test_synchronized_switchable_norm_refuses_a_pooled_variance_that_overflows():
    """Samples whose means lie 2e19 apart: each plane's moments fit, the spread of the IN
    means that the BN scope pools does not (its sum of squares reaches 5e38)."""
    x = np.ones((4, 2, 3, 3), np.float32)
    x[:, :, 0, 0] = 2.0
    x[:2] *= 1e19
    x[2:] *= -1e19
    layer = refnorm.build("syncsn", 2)
    with pytest.raises(ValueError, match="the variance of x overflows float32"):
        layer.forward(x, training=True)
    for path in ("reference", "fast"):
        with pytest.raises(ValueError, match="the variance of x overflows float32"):
            switchable_norm.switchable_norm_forward(
                x, np.ones(2, np.float32), np.zeros(2, np.float32), np.zeros(3, np.float32),
                np.zeros(3, np.float32), path=path)


def test_float32_statistics_at_a_large_offset_as_the_conventions_page_states():
    """The reference rounds its means to float32 and sums the squared deviations in float32,
    the kernels work in float64: against float64 arithmetic on the same values the reference's
    error grows with the offset (about 5e-4 at 1e4 standard deviations, 0.015 to 0.045 at
    1e8 + 100 randn), the fast path's stays at float32 rounding, and SN's reference (which
    keeps what its means' rounding lost) with it."""
    rng = np.random.default_rng(0)
    forwards = {"bn": refnorm.batch_norm_forward, "in": refnorm.instance_norm_forward,
                "ln": refnorm.layer_norm_forward,
                "gn": lambda *a, **k: refnorm.group_norm_forward(*a, num_groups=2, **k)}

    def errors(x, method):
        g, b = np.ones(4, np.float32), np.zeros(4, np.float32)
        truth = forwards[method](x.astype(np.float64), g.astype(np.float64),
                                 b.astype(np.float64))[0]
        return {p: float(np.abs(forwards[method](x, g, b, path=p)[0] - truth).max())
                for p in ("reference", "fast")}

    moderate = (1e4 + rng.standard_normal((8, 4, 16, 16))).astype(np.float32)
    e = errors(moderate, "bn")
    assert 1e-4 < e["reference"] < 2e-3 and e["fast"] < 1e-6, e
    far = (1e8 + 100 * rng.standard_normal((4, 4, 6, 6))).astype(np.float32)
    for method in forwards:
        e = errors(far, method)
        assert 0.01 < e["reference"] < 0.5 and e["fast"] < 1e-6, (method, e)
    g, b = np.ones(4, np.float32), np.zeros(4, np.float32)
    truth = refnorm.batch_norm_forward(far.astype(np.float64), g.astype(np.float64),
                                       b.astype(np.float64))[0]
    logits = np.log(np.array([1e-9, 1e-9, 1.0], np.float32))  # the BN scope alone
    y, _ = refnorm.switchable_norm_forward(far, g, b, logits, logits, path="reference")
    assert np.abs(y - truth).max() < 1e-5


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_switchable_norm_inference_refuses_an_overflowing_ln_pool_on_both_paths(path):
    """Channel means of +-1.5e19 in float32: each IN statistic fits, but pooling them into
    the LN scope squares 1.5e19; the reference refuses in training and at inference (with
    the population's BN statistics given), and so must the fast path."""
    from refnorm.norms import switchable_norm as sn

    rng = np.random.default_rng(0)
    means = np.array([1.5e19, -1.5e19, 1.5e19, -1.5e19]).reshape(1, 4, 1)
    x = (rng.standard_normal((2, 4, 3)) + means).astype(np.float32)
    g, b = np.ones(4, np.float32), np.zeros(4, np.float32)
    logits = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="overflows float32"):
        sn.switchable_norm_forward(x, g, b, logits, logits, path=path)
    with pytest.raises(ValueError, match="overflows float32"):
        sn.switchable_norm_eval_forward(x, g, b, logits, logits, np.zeros(4, np.float32),
                                        np.ones(4, np.float32), path=path)


@pytest.mark.parametrize("value", [1000.1, 1e5 + 0.3, 1e20, -3e38])
def test_synchronized_and_staged_batch_norm_normalize_a_constant_channel_to_beta(value):
    """As batch normalization does (the test above): their means' sums are float64 too. A
    float32 sum gave |y| = 0.04 for a constant channel of 1000.1, 1 at 1e20, and refused -3e38
    as an overflowing variance; on devices holding unequal shares the merge adds nothing."""
    f = np.array([1.0, -1.0, 0.5, -0.25])
    x = np.broadcast_to(value * f[None, :, None, None], (5, 4, 3, 3)).astype(np.float32)
    g, b = np.ones(4, np.float32), np.linspace(-1, 1, 4).astype(np.float32)
    beta = np.broadcast_to(b[None, :, None, None], x.shape)
    np.testing.assert_array_equal(refnorm.batch_norm_forward_graph(x, g, b)[0], beta)

    def forward(comm, shard):
        return sync_batch_norm_forward(shard, g, b, comm=comm)[0]

    ys = InProcessGroup.run(2, forward, [x[:1], x[1:]])
    np.testing.assert_array_equal(np.concatenate(ys), beta)


# docs/conventions.md, "Dtypes": the reference's float32 error against float64 arithmetic on
# the same values, (smallest, largest) over BN, IN, LN and GN and the draws of seeds 0-2
LARGE_OFFSET_FIGURES = {"1e2 + randn": ("3.5e-06", "4.1e-06"),
                        "1e4 + randn": ("0.00039", "0.00051"),
                        "1e8 + 100 randn": ("0.025", "0.048")}


def test_float32_error_figures_are_the_conventions_pages():
    forwards = {"bn": refnorm.batch_norm_forward, "in": refnorm.instance_norm_forward,
                "ln": refnorm.layer_norm_forward,
                "gn": lambda *a, **k: refnorm.group_norm_forward(*a, num_groups=2, **k)}
    draws = {"1e2 + randn": lambda r: 1e2 + r.standard_normal((8, 4, 16, 16)),
             "1e4 + randn": lambda r: 1e4 + r.standard_normal((8, 4, 16, 16)),
             "1e8 + 100 randn": lambda r: 1e8 + 100 * r.standard_normal((4, 4, 6, 6))}
    g, b = np.ones(4, np.float32), np.zeros(4, np.float32)
    for label, draw in draws.items():
        errors = []
        for seed in range(3):
            x = draw(np.random.default_rng(seed)).astype(np.float32)
            for f in forwards.values():
                truth = f(x.astype(np.float64), g.astype(np.float64), b.astype(np.float64))[0]
                errors.append(float(np.abs(f(x, g, b, path="reference")[0] - truth).max()))
        assert (f"{min(errors):.2g}", f"{max(errors):.2g}") == LARGE_OFFSET_FIGURES[label], (
            label, errors)


def test_float64_parts_of_a_statistic_whose_means_are_1e154_apart_are_refused_by_the_fast_path():
    """docs/conventions.md: the fast path's one refusal of its own. LN of one sample whose two
    channels hold +-9e153 has variance 8.1e307, which the reference returns; the kernels merge
    the two planes by Chan's formula, whose squared difference of means (3.2e308) overflows,
    and refuse with the reference's overflow error."""
    x = np.array([[9e153, -9e153]])
    g, b = np.ones(2), np.zeros(2)
    _, cache = refnorm.layer_norm_forward(x, g, b, path="reference")
    np.testing.assert_allclose(cache.var, 8.1e307, rtol=1e-12)
    with pytest.raises(ValueError, match="the variance of x overflows float64"):
        refnorm.layer_norm_forward(x, g, b, path="fast")


def _nan_and_overflowing_groups(scale):
    """(4, 4, 3, 3) float32 with a NaN at x[0, 0, 0, 0] and ``scale * randn`` in x[1:, 2:]:
    the NaN's group (channel 0 for BN, sample 0 for LN, (0, 0) for IN, (0, group 0) for GN)
    holds none of the scaled values, and every other statistic of the scaled block does."""
    x = np.random.default_rng(8).standard_normal((4, 4, 3, 3))
    x[1:, 2:] *= scale
    x[0, 0, 0, 0] = np.nan
    return x.astype(np.float32)


# the outputs that the NaN at x[0, 0, 0, 0] reaches, per method (SN: its plane's IN, LN and
# BN scopes)
NAN_REACHES = {"bn": [np.s_[:, 0]], "in": [np.s_[0, 0]], "ln": [np.s_[0]], "gn": [np.s_[0, :2]],
               "sn": [np.s_[0], np.s_[:, 0]]}


@pytest.mark.parametrize("path", ["reference", "fast"])
@pytest.mark.parametrize("method", sorted(FORWARDS))
def test_a_nan_group_excuses_no_overflow_in_another_group(method, path):
    """The squared deviations of float32 values of 1e20 overflow (about 1e40) in groups that
    hold no NaN: refused. Before, a NaN anywhere in x excused every group's overflow: the
    reference returned beta for those groups, the fast path normalized them."""
    x = _nan_and_overflowing_groups(1e20)
    g, b = np.ones(4, np.float32), np.zeros(4, np.float32)
    with pytest.raises(ValueError, match=r"the variance of x overflows float32 \(\|x\| up to "
                                         r"\d\.\d\de\+20\)"):
        FORWARDS[method](x, g, b, path)


@pytest.mark.parametrize("path", ["reference", "fast"])
@pytest.mark.parametrize("method", sorted(FORWARDS))
def test_a_nan_group_beside_ordinary_groups_is_no_overflow(method, path):
    """The NaN makes its own groups' outputs NaN, and every other output is finite."""
    x = _nan_and_overflowing_groups(1.0)
    g, b = np.ones(4, np.float32), np.zeros(4, np.float32)
    y = FORWARDS[method](x, g, b, path)[0]
    reached = np.zeros(x.shape, bool)
    for where in NAN_REACHES[method]:
        reached[where] = True
    assert np.isnan(y[reached]).all() and np.isfinite(y[~reached]).all()


def _pooled_overflow_beside_a_nan(scope):
    """float32 x with a NaN at x[0, 0, 0, 0] whose IN moments fit while one pooled scope's
    spread of IN means overflows in groups without the NaN. "ln": channel means +-1e19 and
    +-2e19, whose squares (up to 4e38) each sample's LN pool sums; "bn": channels 2 and 3 at
    +1.3e19 in samples 0, 1 and -1.3e19 in samples 2, 3, whose BN pool sums 4 squares of
    1.3e19 (6.8e38) while each LN pool sums 4 of 6.5e18 (1.7e38, which fits)."""
    x = np.random.default_rng(9).standard_normal((4, 4, 3, 3))
    if scope == "ln":
        x += np.array([1.0, -1.0, 2.0, -2.0])[None, :, None, None] * 1e19
    else:
        x[:, 2:] += np.array([1.0, 1.0, -1.0, -1.0])[:, None, None, None] * 1.3e19
    x[0, 0, 0, 0] = np.nan
    return x.astype(np.float32)


@pytest.mark.parametrize("path", ["reference", "fast"])
@pytest.mark.parametrize("scope", ["ln", "bn"])
def test_switchable_norm_refuses_a_pooled_overflow_beside_a_nan(scope, path):
    """The NaN makes its sample's LN and its channel's BN statistics NaN; another sample's
    (LN) or channel's (BN) pooled variance overflows from finite values: refused, in training
    and, for the LN scope that inference still pools, at inference. Before, the NaN excused
    it: the reference returned beta there, the fast path the normalized values."""
    x = _pooled_overflow_beside_a_nan(scope)
    g, b, logits = np.ones(4, np.float32), np.zeros(4, np.float32), np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="the variance of x overflows float32"):
        switchable_norm.switchable_norm_forward(x, g, b, logits, logits, path=path)
    if scope == "ln":
        with pytest.raises(ValueError, match="the variance of x overflows float32"):
            switchable_norm.switchable_norm_eval_forward(
                x, g, b, logits, logits, np.zeros(4, np.float32), np.ones(4, np.float32),
                path=path)


def test_staged_and_synchronized_batch_norm_refuse_an_overflow_beside_a_nan_channel():
    x = _nan_and_overflowing_groups(1e20)
    g, b = np.ones(4, np.float32), np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="the variance of x overflows float32"):
        refnorm.batch_norm_forward_graph(x, g, b)
    with pytest.raises(ValueError, match="the variance of x overflows float32"):
        refnorm.build("syncbn", 4).forward(x, training=True)
    y, _ = refnorm.batch_norm_forward_graph(_nan_and_overflowing_groups(1.0), g, b)
    assert np.isnan(y[:, 0]).all() and np.isfinite(y[:, 1:]).all()


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_weight_standardization_refuses_an_overflowing_filter_beside_a_nan_filter(path):
    """Filter 0 holds a NaN, filter 1 float32 weights of 1e20 (squared deviations about
    1e40): refused; with filter 1 ordinary, only filter 0 comes out NaN."""
    w = np.random.default_rng(10).standard_normal((3, 2, 3, 3))
    w[0, 0, 0, 0] = np.nan
    w_hat, _ = standardization.weight_standardization_forward(w.astype(np.float32), path=path)
    assert np.isnan(w_hat[0]).all() and np.isfinite(w_hat[1:]).all()
    w[1] *= 1e20
    with pytest.raises(ValueError, match=r"the variance of w overflows float32 \(\|w\| up to "
                                         r"\d\.\d\de\+20\)"):
        standardization.weight_standardization_forward(w.astype(np.float32), path=path)

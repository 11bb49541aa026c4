"""refnorm/dispatch.py: which path a call takes, and that both paths accept and refuse the
same inputs."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest

import refnorm
from refnorm import dispatch
from refnorm.gradcheck import check_layer
from refnorm.norms.switchable_norm import SwitchableOptions


@pytest.fixture(autouse=True)
def _no_process_choice(monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)
    dispatch.set_path(None)
    yield
    dispatch.set_path(None)


def test_functions_and_layers_default_to_the_reference():
    assert dispatch.get_path() == "reference"
    assert refnorm.build("bn", 3).compute_path() == "reference"


def _record_calls(monkeypatch, function):
    """Count the calls of ``function``'s reference and of its fast variant."""
    calls = {"reference": 0, "fast": 0}
    for kind, attr in (("reference", "reference"), ("fast", "fast_variant")):
        original = getattr(function, attr)

        def counted(*args, _original=original, _kind=kind, **kwargs):
            calls[_kind] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(function, attr, counted)
    return calls


@pytest.mark.parametrize("name", ["bn", "in", "ln", "gn", "sn", "conv"])
def test_a_built_layer_runs_the_reference_unless_asked(name, monkeypatch):
    module = {"bn": refnorm.norms.batch_norm, "in": refnorm.norms.instance_norm,
              "ln": refnorm.norms.layer_norm, "gn": refnorm.norms.group_norm,
              "sn": refnorm.norms.switchable_norm, "conv": refnorm.nn.conv}[name]
    prefix = {"bn": "batch_norm", "in": "instance_norm", "ln": "layer_norm",
              "gn": "group_norm", "sn": "switchable_norm", "conv": "conv2d"}[name]
    forward = _record_calls(monkeypatch, getattr(module, f"{prefix}_forward"))
    backward = _record_calls(monkeypatch, getattr(module, f"{prefix}_backward"))
    args = (4, 3, 3) if name == "conv" else (4,)
    options = {"num_groups": 2} if name == "gn" else {}
    x = 5 * np.random.default_rng(5).standard_normal((2, 4, 3, 3)) + 12
    layer = refnorm.build(name, *args, dtype=np.float64, **options)
    dy = np.ones_like(layer.forward(x, training=True))
    layer.backward(dy)
    assert forward == backward == {"reference": 1, "fast": 0}
    layer.path = "fast"                                  # asked: the kernels run
    layer.forward(x, training=True)
    layer.backward(dy)
    assert forward == backward == {"reference": 1, "fast": 1}


def test_process_choice_beats_the_defaults_and_an_explicit_choice_beats_it(monkeypatch):
    layer = refnorm.build("bn", 3)
    monkeypatch.setenv(dispatch.ENV, "fast")
    assert dispatch.get_path() == "fast"
    dispatch.set_path("reference")                      # set_path beats the environment
    assert dispatch.get_path() == "reference" and layer.compute_path() == "reference"
    with dispatch.use_path("fast"):
        assert layer.compute_path() == "fast"
    assert layer.compute_path() == "reference"          # use_path restores
    layer.path = "fast"                                 # the layer's own choice wins
    assert layer.compute_path() == "fast"
    assert dispatch.resolve("reference") == "reference"


@pytest.mark.parametrize("bad", ["Fast", "numba", ""])
def test_bad_path_values_are_refused(bad, monkeypatch):
    with pytest.raises(ValueError, match="path must be 'reference' or 'fast'"):
        dispatch.set_path(bad)
    with pytest.raises(ValueError, match="path must be 'reference' or 'fast'"):
        refnorm.batch_norm_forward(np.ones((2, 3)), np.ones(3), np.zeros(3), path=bad)
    if bad:
        monkeypatch.setenv(dispatch.ENV, bad)
        with pytest.raises(ValueError, match="REFNORM_PATH must be 'reference' or 'fast'"):
            dispatch.get_path()


def test_the_first_argument_decides_whether_given_by_position_or_by_name(monkeypatch):
    calls = _record_calls(monkeypatch, refnorm.norms.batch_norm.batch_norm_forward)
    refnorm.batch_norm_forward(x=X, gamma=G, beta=B, path="fast")
    refnorm.batch_norm_forward(X, G, B, path="fast")
    assert calls == {"reference": 0, "fast": 2}


def test_fast_applies_to_numpy_floats_only():
    xps = pytest.importorskip("array_api_strict")
    assert dispatch.fast_applies(np.ones(2, np.float32), np.ones(2))
    assert not dispatch.fast_applies(xps.ones(2))
    assert not dispatch.fast_applies(np.ones(2, np.int64))
    assert not dispatch.runs_fast("reference", np.ones(2))
    assert dispatch.runs_fast("fast", np.ones(2))


def test_another_namespace_falls_back_to_the_reference_with_the_same_result():
    xps = pytest.importorskip("array_api_strict")
    rng = np.random.default_rng(0)
    x = 5 * rng.standard_normal((3, 4, 5)) + 12
    args = [xps.asarray(a) for a in (x, rng.standard_normal(4), rng.standard_normal(4))]
    y_fast, _ = refnorm.group_norm_forward(*args, num_groups=2, path="fast")
    y_ref, _ = refnorm.group_norm_forward(*args, num_groups=2, path="reference")
    np.testing.assert_array_equal(np.asarray(y_fast), np.asarray(y_ref))


def test_gradcheck_checks_the_reference_unless_asked():
    layer = refnorm.build("gn", 4, num_groups=2, dtype=np.float64)
    x = 5 * np.random.default_rng(1).standard_normal((2, 4, 3, 3)) + 12
    for path in ("reference", "fast"):
        errors = check_layer(layer, x, path=path)
        assert max(e.max_rel_error for e in errors.values()) < 1e-6, path
    with pytest.raises(ValueError, match="path must be"):
        check_layer(layer, x, path="gpu")


# -- both paths accept and refuse the same inputs ---------------------------------------------

G = np.ones(4)
B = np.zeros(4)
X = 5 * np.random.default_rng(2).standard_normal((2, 4, 3, 3)) + 12


def _sn(x, g, b, **kw):
    logits = np.zeros(3)
    return refnorm.switchable_norm_forward(x, g, b, logits, logits, **kw)


FORWARDS = {
    "bn": refnorm.batch_norm_forward,
    "in": refnorm.instance_norm_forward,
    "ln": refnorm.layer_norm_forward,
    "gn": lambda x, g, b, **kw: refnorm.group_norm_forward(x, g, b, num_groups=2, **kw),
    "sn": _sn,
}
BAD = {
    "x not an array": ([[1.0]], G, B, {}),
    "integer x": (np.ones((2, 4, 3), np.int64), G, B, {}),
    "x of one dimension": (np.ones(4), G, B, {}),
    "gamma of the wrong shape": (X, np.ones(3), B, {}),
    "eps = 0": (X, G, B, {"eps": 0.0}),
    "eps that rounds to 0": (X.astype(np.float32), G.astype(np.float32),
                             B.astype(np.float32), {"eps": 1e-50}),
    "one value per statistic": (X[:1, :, :1, :1], G, B, {}),
    "a variance that overflows": ((np.random.default_rng(3).standard_normal((2, 4, 3, 3))
                                   * 1e20).astype(np.float32), G, B, {}),
}


def _outcome(call):
    try:
        call()
    except (TypeError, ValueError) as exc:
        return type(exc), str(exc)
    return None


@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("name", sorted(FORWARDS))
def test_both_paths_refuse_the_same_inputs_with_the_same_error(name, case):
    x, g, b, kw = BAD[case]
    forward = FORWARDS[name]
    fast = _outcome(lambda: forward(x, g, b, path="fast", **kw))
    ref = _outcome(lambda: forward(x, g, b, path="reference", **kw))
    assert fast == ref
    if not (case == "one value per statistic" and name in ("ln", "gn")):  # 4 and 2 values
        assert ref is not None, f"{name} accepted {case}"


@pytest.mark.parametrize("name", sorted(FORWARDS))
def test_a_checked_signature_does_not_let_a_different_argument_through(name):
    """The fast variants check an argument signature once (refnorm.core.checks.CHECKED): a
    call that differs from a checked one only in the type of a hyperparameter (True for 1),
    or in a parameter's dtype, is checked again and refused as the reference refuses it."""
    forward = FORWARDS[name]
    forward(X, G, B, eps=1, path="fast")  # valid: checked and remembered
    for kw, g in (({"eps": True}, G), ({}, G.astype(np.int64))):
        fast = _outcome(lambda kw=kw, g=g: forward(X, g, B, path="fast", **kw))
        ref = _outcome(lambda kw=kw, g=g: forward(X, g, B, path="reference", **kw))
        assert fast == ref and ref is not None and ref[0] is TypeError


WS_BAD = {
    "w of one dimension": (np.ones(4), {}),
    "integer w": (np.ones((2, 3), np.int64), {}),
    "one weight per output": (np.ones((3, 1, 1, 1)), {}),
    "eps_mode unknown": (X, {"eps_mode": "mul"}),
    "correction 2": (X, {"correction": 2}),
    "correction True": (X, {"correction": True}),
    "eps = 0": (X, {"eps": 0.0}),
}


@pytest.mark.parametrize("case", sorted(WS_BAD))
def test_weight_standardization_paths_refuse_the_same_inputs(case):
    w, kw = WS_BAD[case]
    forward = refnorm.weights.weight_standardization_forward
    forward(X, path="fast")  # a valid signature checked first
    fast = _outcome(lambda: forward(w, path="fast", **kw))
    ref = _outcome(lambda: forward(w, path="reference", **kw))
    assert fast == ref and ref is not None


@pytest.mark.parametrize("name", sorted(FORWARDS))
def test_both_paths_accept_views_float16_and_negative_strides(name):
    forward = FORWARDS[name]
    base = 5 * np.random.default_rng(4).standard_normal((3, 8, 6, 7)) + 12
    for x in (base[:, ::2, 1:, ::-1], base.astype(np.float16)[:, :4], base[::-1, 2:6]):
        y_fast, _ = forward(x, G, B, path="fast")
        y_ref, _ = forward(x, G, B, path="reference")
        assert y_fast.dtype == y_ref.dtype == x.dtype and y_fast.shape == x.shape
        # float16: both paths round float32 values that differ by ~1e-7 to float16, so they
        # may land one float16 spacing apart at most (at the largest |y|); float64: 1e-12
        tol = (float(np.spacing(np.max(np.abs(y_ref)))) if x.dtype == np.float16
               else 1e-12 * float(np.max(np.abs(y_ref))))
        np.testing.assert_allclose(y_fast, y_ref, atol=tol, rtol=0)


def test_sn_options_object_is_passed_through_on_both_paths():
    options = SwitchableOptions(scopes=("in", "ln"), in_correction=1)
    logits = np.array([0.3, -0.2])
    outs = [refnorm.switchable_norm_forward(X, G, B, logits, logits, options=options,
                                            path=p)[0] for p in ("fast", "reference")]
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-12, rtol=0)


# -- float16 on every fast function --------------------------------------------------------


def _dispatched_functions():
    """Every public function that has a fast variant, by name."""
    found = {}
    for package in (refnorm.norms, refnorm.nn, refnorm.weights):
        for name in dir(package):
            function = getattr(package, name)
            if getattr(function, "fast_variant", None) is not None:
                found[name] = function
    return found


def _half(*shape, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    return (offset + rng.standard_normal(shape)).astype(np.float16)


def _norm_pair(forward, backward, **options):
    """Forward then backward in float16 on ``path``: y, dx and the parameter gradients."""
    def run(path):
        x, dy = _half(3, 4, 5, 6, offset=3.0), _half(3, 4, 5, 6, seed=1)
        gamma, beta = _half(4, seed=2, offset=1.0), _half(4, seed=3)
        y, cache = forward(x, gamma, beta, **options, path=path)
        return (y, *backward(dy, cache, path=path))
    return run


def _sn_float16(path):
    x, dy = _half(3, 4, 5, 6, offset=3.0), _half(3, 4, 5, 6, seed=1)
    gamma, beta, logits = _half(4, seed=2, offset=1.0), _half(4, seed=3), _half(3, seed=4)
    y, cache = refnorm.switchable_norm_forward(x, gamma, beta, logits, logits, path=path)
    return (y, *refnorm.switchable_norm_backward(dy, cache, path=path))


def _eval_pair(forward, backward):
    """The inference forward (running statistics) and the backward on its cache."""
    def run(path):
        x, dy = _half(3, 4, 5, 6, offset=3.0), _half(3, 4, 5, 6, seed=1)
        gamma, beta = _half(4, seed=2, offset=1.0), _half(4, seed=3)
        mean, var = _half(4, seed=4, offset=3.0), np.abs(_half(4, seed=5, offset=1.0))
        y, cache = forward(x, gamma, beta, mean, var, path=path)
        return (y, *backward(dy, cache, path=path))
    return run


def _sn_eval(path):
    x, dy = _half(3, 4, 5, 6, offset=3.0), _half(3, 4, 5, 6, seed=1)
    gamma, beta, logits = _half(4, seed=2, offset=1.0), _half(4, seed=3), _half(3, seed=4)
    mean, var = _half(4, seed=5, offset=3.0), np.abs(_half(4, seed=6, offset=1.0))
    y, cache = refnorm.switchable_norm_eval_forward(x, gamma, beta, logits, logits, mean, var,
                                                    path=path)
    return (y, *refnorm.switchable_norm_backward(dy, cache, path=path))


def _avg_pool(path):
    x = _half(2, 3, 6, 5)
    y, cache = refnorm.nn.avg_pool2d_forward(x, kernel_size=(2, 3), stride=1, path=path)
    return y, refnorm.nn.avg_pool2d_backward(_half(*y.shape, seed=1), cache, path=path)


def _conv(path):
    x, w, b = _half(2, 3, 6, 5), _half(4, 3, 3, 3, seed=1), _half(4, seed=2)
    y, cache = refnorm.nn.conv2d_forward(x, w, b, stride=(2, 1), padding=1, path=path)
    return (y, *refnorm.nn.conv2d_backward(_half(*y.shape, seed=3), cache, path=path))


def _max_pool(path):
    x = _half(2, 3, 6, 5)
    y, cache = refnorm.nn.max_pool2d_forward(x, kernel_size=2, stride=1, path=path)
    return y, refnorm.nn.max_pool2d_backward(_half(*y.shape, seed=1), cache, path=path)


def _relu(path):
    # the case first, then a larger one
    tiny = np.array([[1.0, -1.0]], np.float16)
    y, cache = refnorm.nn.relu_forward(tiny, path=path)
    small = refnorm.nn.relu_backward(np.ones_like(tiny), cache, path=path)
    x = _half(3, 4, 5)
    y, cache = refnorm.nn.relu_forward(x, path=path)
    return small, y, refnorm.nn.relu_backward(_half(3, 4, 5, seed=1), cache, path=path)


def _ws(path):
    w, g = _half(4, 3, 3, 3, offset=0.5), _half(4, 3, 3, 3, seed=1)
    w_hat, cache = refnorm.weights.weight_standardization_forward(w, path=path)
    return w_hat, refnorm.weights.weight_standardization_backward(g, cache, path=path)


HALF_CASES = {  # a forward and its backward share one case
    ("batch_norm_forward", "batch_norm_backward"):
        _norm_pair(refnorm.batch_norm_forward, refnorm.batch_norm_backward),
    ("instance_norm_forward", "instance_norm_backward"):
        _norm_pair(refnorm.instance_norm_forward, refnorm.instance_norm_backward),
    ("layer_norm_forward", "layer_norm_backward"):
        _norm_pair(refnorm.layer_norm_forward, refnorm.layer_norm_backward),
    ("group_norm_forward", "group_norm_backward"):
        _norm_pair(refnorm.group_norm_forward, refnorm.group_norm_backward, num_groups=2),
    ("switchable_norm_forward", "switchable_norm_backward"): _sn_float16,
    ("batch_norm_eval_forward",):
        _eval_pair(refnorm.batch_norm_eval_forward, refnorm.batch_norm_backward),
    ("instance_norm_eval_forward",):
        _eval_pair(refnorm.instance_norm_eval_forward, refnorm.instance_norm_backward),
    ("switchable_norm_eval_forward",): _sn_eval,
    ("avg_pool2d_forward", "avg_pool2d_backward"): _avg_pool,
    ("conv2d_forward", "conv2d_backward"): _conv,
    ("max_pool2d_forward", "max_pool2d_backward"): _max_pool,
    ("relu_forward", "relu_backward"): _relu,
    ("weight_standardization_forward", "weight_standardization_backward"): _ws,
}


def test_every_fast_function_has_a_float16_case():
    covered = {name for names in HALF_CASES for name in names}
    assert covered == set(_dispatched_functions())


@pytest.mark.parametrize("names", list(HALF_CASES), ids=lambda names: names[0])
def test_every_fast_function_runs_on_float16_and_equals_the_reference(names):
    """float16 computes in float32 on both paths and returns float16: the two differ by the
    float32 rounding of different summation orders, which can move a float16 result by one
    spacing; three spacings at the output's largest |value| leave room for a backward that
    sums such results."""
    fast, ref = HALF_CASES[names]("fast"), HALF_CASES[names]("reference")
    assert len(fast) == len(ref)
    for i, (a, b) in enumerate(zip(fast, ref, strict=True)):
        assert a.dtype == b.dtype, i
        tol = 3 * float(np.spacing(np.float16(np.max(np.abs(b.astype(np.float32))))))
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=tol,
                                   rtol=0, err_msg=f"output {i}")


# -- every public pure function takes ``path``, or says why not -----------------------------


def _public_pure_functions():
    """The forwards, backwards and the other array operations the packages export."""
    for package in (refnorm.norms, refnorm.nn, refnorm.weights, refnorm.sync):
        for name in package.__all__:
            function = getattr(package, name)
            if inspect.isfunction(function) and (
                    name.endswith(("_forward", "_backward", "_compact", "_graph"))
                    or name in ("softmax_cross_entropy", "im2col", "col2im")):
                yield f"{package.__name__}.{name}", function


def test_every_public_pure_function_takes_path_or_says_why_not():
    missing = [name for name, function in _public_pure_functions()
               if "path" not in inspect.signature(function).parameters
               and "No ``path``:" not in (function.__doc__ or "")]
    assert missing == []
    assert len(list(_public_pure_functions())) > 40  # the walk found the functions


def test_a_documented_path_is_a_real_choice():
    """A function that takes ``path`` documents it, and has a fast variant or names the
    function whose path it follows."""
    for name, function in _public_pure_functions():
        if "path" in inspect.signature(function).parameters:
            assert "path : {" in function.__doc__ or "``path``" in function.__doc__, name
            assert getattr(function, "fast_variant", None) is not None, name


def _cases_on_running_statistics():
    rng = np.random.default_rng(6)
    x = 5 * rng.standard_normal((3, 4, 5, 6)) + 12
    dy, gamma, beta = rng.standard_normal(x.shape), rng.standard_normal(4), rng.standard_normal(4)
    mean, var = 12 + rng.standard_normal(4), 25 * rng.random(4) + 1
    logits = rng.standard_normal(3)
    return {
        "bn": lambda path: refnorm.batch_norm_eval_forward(x, gamma, beta, mean, var, path=path),
        "in": lambda path: refnorm.instance_norm_eval_forward(x, gamma, beta, mean, var,
                                                              path=path),
        "sn": lambda path: refnorm.switchable_norm_eval_forward(x, gamma, beta, logits, -logits,
                                                                mean, var, path=path),
    }, dy


@pytest.mark.parametrize("name", ["bn", "in", "sn"])
def test_inference_forwards_and_their_backward_take_the_path_asked(name, monkeypatch):
    """The inference forward runs the kernels on the fast path, and so does the backward on
    its cache (before, both always ran the reference); both equal the reference in float64."""
    from refnorm.kernels import norms as kernels

    calls = []
    for kernel in ("eval_forward", "eval_backward", "sn_forward", "sn_backward"):
        original = getattr(kernels, kernel)

        def counted(*args, _original=original, _kernel=kernel, **kwargs):
            calls.append(_kernel)
            return _original(*args, **kwargs)
        monkeypatch.setattr(kernels, kernel, counted)
    forwards, dy = _cases_on_running_statistics()
    backward = {"bn": refnorm.batch_norm_backward, "in": refnorm.instance_norm_backward,
                "sn": refnorm.switchable_norm_backward}[name]
    outputs = {}
    for path in ("reference", "fast"):
        y, cache = forwards[name](path)
        outputs[path] = (y, *backward(dy, cache, path=path))
    assert calls == (["sn_forward", "sn_backward"] if name == "sn"
                     else ["eval_forward", "eval_backward"])
    for fast, ref in zip(outputs["fast"], outputs["reference"], strict=True):
        # float64, differing by the summation order only (the logit gradients of SN sum
        # products of statistics of size ~12 and cancel, hence the terms' scale)
        scale = float(np.max(np.abs(ref))) * (1e3 if name == "sn" else 1)
        np.testing.assert_allclose(fast, ref, atol=1e-12 * scale, rtol=0)


@pytest.mark.parametrize("name", ["bn", "in"])
def test_a_nan_input_leaves_the_inference_backward_finite_on_both_paths(name):
    """With running statistics dx = gamma rstd dy does not depend on x: a NaN input gives NaN
    in y and in dgamma, and a finite dx, on both paths."""
    forwards, dy = _cases_on_running_statistics()
    backward = {"bn": refnorm.batch_norm_backward, "in": refnorm.instance_norm_backward}[name]
    x = 5 * np.random.default_rng(7).standard_normal((3, 4, 5, 6)) + 12
    x[1, 2, 3, 4] = np.nan
    ones = np.ones(4)
    forward = {"bn": refnorm.batch_norm_eval_forward, "in": refnorm.instance_norm_eval_forward}
    for path in ("reference", "fast"):
        y, cache = forward[name](x, ones, ones, ones, ones, path=path)
        dx, dgamma, _ = backward(dy, cache, path=path)
        assert np.isnan(y[1, 2, 3, 4]) and np.isnan(dgamma[2]) and np.all(np.isfinite(dx))


def test_group_norm_fast_checks_a_new_group_count_after_a_valid_one():
    from refnorm.norms.group_norm import group_norm_forward

    x = np.random.default_rng(0).standard_normal((2, 6, 3, 3))
    g, b = np.ones(6), np.zeros(6)
    group_norm_forward(x, g, b, num_groups=3, path="fast")   # valid: checked and remembered
    for path in ("reference", "fast"):
        with pytest.raises(ValueError, match="num_groups must be a positive divisor"):
            group_norm_forward(x, g, b, num_groups=4, path=path)


def test_fast_applies_only_when_every_array_qualifies():
    """fast_applies(*arrays): the kernels run on numpy floating arrays only, so one array of
    another namespace, or an integer one, among numpy floats rules them out."""
    xps = pytest.importorskip("array_api_strict")
    assert not dispatch.fast_applies(np.ones(2), xps.ones(2))
    assert not dispatch.fast_applies(np.ones(2), np.ones(2, np.int64))


def test_a_byte_swapped_input_gives_the_references_result_on_the_fast_path():
    """A float64 array in non-native byte order is a floating numpy array the kernels were
    not written for: path='fast' gives the reference's result (to float64 rounding) and
    records the call as the reference."""
    x = 5 * np.random.default_rng(0).standard_normal((2, 4, 3, 3)) + 12
    swapped = x.astype(x.dtype.newbyteorder())
    g, b = np.ones(4), np.zeros(4)
    want, _ = refnorm.batch_norm_forward(x, g, b, path="reference")
    with dispatch.record_paths() as calls:
        y, _ = refnorm.batch_norm_forward(swapped, g, b, path="fast")
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-12 * float(np.max(np.abs(want))))
    assert calls == [("batch_norm_forward", "reference")]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_path_fast_runs_the_kernels_on_every_floating_dtype(dtype):
    """The kernels apply to numpy arrays of a real floating dtype, float16 included:
    record_paths names the fast path for both calls."""
    x = (5 * np.random.default_rng(1).standard_normal((2, 4, 3, 3)) + 12).astype(dtype)
    g, b = np.ones(4, dtype), np.zeros(4, dtype)
    with dispatch.record_paths() as calls:
        y, cache = refnorm.batch_norm_forward(x, g, b, path="fast")
        refnorm.batch_norm_backward(np.ones_like(y), cache, path="fast")
    assert calls == [("batch_norm_forward", "fast"), ("batch_norm_backward", "fast")]


def test_record_paths_blocks_nest_and_the_innermost_receives_the_calls():
    """record_paths: the calls made inside a block go to its own list; an enclosing block
    gets only those made outside the inner one."""
    x, g, b = np.arange(6.0).reshape(2, 3) ** 2, np.ones(3), np.zeros(3)
    with dispatch.record_paths() as outer:
        refnorm.batch_norm_forward(x, g, b, path="fast")
        with dispatch.record_paths() as inner:
            refnorm.layer_norm_forward(x, g, b, path="fast")
            refnorm.layer_norm_forward(x, g, b, path="reference")
        refnorm.batch_norm_forward(x, g, b, path="reference")
    assert inner == [("layer_norm_forward", "fast"), ("layer_norm_forward", "reference")]
    assert outer == [("batch_norm_forward", "fast"), ("batch_norm_forward", "reference")]


def test_weight_standardization_backward_checks_every_new_upstream_shape():
    """The fast backward checks dw_hat's signature once: a dw_hat with as many values as the
    weights but another shape (the transposed (C_in, C_out, ...)), after a valid call with the
    same cache, is refused as the reference refuses it, not reshaped and used."""
    rng = np.random.default_rng(39)
    w = rng.standard_normal((3, 4, 2, 2))
    backward = refnorm.weights.weight_standardization_backward
    _, cache = refnorm.weights.weight_standardization_forward(w, path="fast")
    backward(rng.standard_normal(w.shape), cache, path="fast")  # valid: checked and remembered
    misshapen = rng.standard_normal((4, 3, 2, 2))
    fast = _outcome(lambda: backward(misshapen, cache, path="fast"))
    ref = _outcome(lambda: backward(misshapen, cache, path="reference"))
    assert fast == ref and ref is not None and ref[0] is ValueError


@pytest.mark.parametrize("name", sorted(FORWARDS))
def test_a_checked_signature_is_checked_again_for_another_beta_dtype(name):
    """The signature the fast variants remember holds beta's dtype too: an integer beta
    after a float one of the same shape is refused as the reference refuses it."""
    forward = FORWARDS[name]
    forward(X, G, B, path="fast")  # valid: checked and remembered
    beta = B.astype(np.int64)
    fast = _outcome(lambda: forward(X, G, beta, path="fast"))
    ref = _outcome(lambda: forward(X, G, beta, path="reference"))
    assert fast == ref and ref is not None and ref[0] is TypeError


@pytest.mark.parametrize("name", sorted(FORWARDS))
def test_an_eps_valid_in_float64_is_checked_again_for_a_float32_input(name):
    """eps=1e-50 is a positive float64 but 0 in float32: after a float64 call accepted it,
    the same call on float32 values (parameters unchanged) is refused on both paths, where
    a constant channel would otherwise divide by zero."""
    forward = FORWARDS[name]
    forward(X, G, B, eps=1e-50, path="fast")  # valid in float64: remembered
    x32 = X.astype(np.float32)
    fast = _outcome(lambda: forward(x32, G, B, eps=1e-50, path="fast"))
    ref = _outcome(lambda: forward(x32, G, B, eps=1e-50, path="reference"))
    assert fast == ref and ref is not None and "rounds to 0 in float32" in ref[1]


def test_group_norm_fast_checks_true_as_a_group_count_after_one():
    """num_groups=True equals 1 and hashes as 1, yet a bool is not a count: the reference
    refuses it, and so does the fast path after a valid num_groups=1."""
    refnorm.group_norm_forward(X, G, B, num_groups=1, path="fast")
    fast = _outcome(lambda: refnorm.group_norm_forward(X, G, B, num_groups=True, path="fast"))
    ref = _outcome(lambda: refnorm.group_norm_forward(X, G, B, num_groups=True,
                                                      path="reference"))
    assert fast == ref and ref is not None and ref[0] is TypeError


def test_group_norm_refuses_groups_of_one_value_on_both_paths():
    """(1, 4, 1, 1) in 4 groups is one value per statistic, refused by both paths (in 2
    groups it is two values, accepted by both)."""
    x = X[:1, :, :1, :1]
    outcomes = [_outcome(lambda p=p: refnorm.group_norm_forward(x, G, B, num_groups=4, path=p))
                for p in ("fast", "reference")]
    assert outcomes[0] == outcomes[1]
    assert outcomes[1] is not None and "more than 1 value per statistic" in outcomes[1][1]
    for path in ("fast", "reference"):
        refnorm.group_norm_forward(x, G, B, num_groups=2, path=path)


@pytest.mark.parametrize("forward", ["instance_norm_forward", "instance_norm_eval_forward"])
def test_instance_norm_refuses_an_input_without_spatial_axis_on_both_paths(forward):
    """IN normalizes each sample's channel over its spatial positions: an (N, C) input has
    none, and both paths refuse it for its layout, in training and at inference (where no
    count check would catch it)."""
    x = X[:, :, 0, 0]
    stats = () if forward == "instance_norm_forward" else (np.zeros(4), np.ones(4))
    call = getattr(refnorm, forward)
    outcomes = [_outcome(lambda p=p: call(x, G, B, *stats, path=p))
                for p in ("fast", "reference")]
    assert outcomes[0] == outcomes[1]
    assert outcomes[1] is not None and "with a spatial axis" in outcomes[1][1]


def test_switchable_norm_fast_checks_the_bn_scope_in_training_after_inference():
    """Inference takes the BN scope's statistics as given, so one sample of (N, C) values is
    fine there; training would compute them over one value each and must refuse, on both
    paths, also after the same arguments passed the inference checks."""
    options = SwitchableOptions(scopes=("ln", "bn"))
    x = np.random.default_rng(0).standard_normal((1, 4))
    logits = np.zeros(2)
    refnorm.switchable_norm_eval_forward(x, G, B, logits, logits, np.zeros(4), np.ones(4),
                                         options=options, path="fast")
    outcomes = [_outcome(lambda p=p: refnorm.switchable_norm_forward(
        x, G, B, logits, logits, options=options, path=p)) for p in ("fast", "reference")]
    assert outcomes[0] == outcomes[1]
    assert outcomes[1] is not None and "the BN scope needs more than 1 value" in outcomes[1][1]


def test_switchable_norm_fast_checks_the_logits_shape_after_a_valid_call():
    """Two control parameters for the three default scopes, after a valid call with three:
    both paths refuse with the reference's message (the kernels would index past them)."""
    FORWARDS["sn"](X, G, B, path="fast")  # valid: checked and remembered
    short = np.zeros(2)
    outcomes = [_outcome(lambda p=p: refnorm.switchable_norm_forward(X, G, B, short, short,
                                                                     path=p))
                for p in ("fast", "reference")]
    assert outcomes[0] == outcomes[1]
    assert outcomes[1] is not None and "mean_logits must have shape (3,)" in outcomes[1][1]


def test_the_switchable_cache_holds_a_copy_of_x_on_both_paths():
    """SN's cache keeps h, the input in the compute dtype, never a view of the caller's x
    (refnorm.norms.switchable_norm.prepare_inputs copies): editing x in place after the
    forward changes nothing the cache holds."""
    x = X.copy()
    logits = np.zeros(3)
    for path in ("reference", "fast"):
        _, cache = refnorm.switchable_norm_forward(x, G, B, logits, logits, path=path)
        assert not np.shares_memory(cache.h, x), path


def _mixed_precision_arguments():
    """float16 activations with float32 parameters and running statistics and float64
    logits, as a mixed-precision layer holds its state wider than its activations."""
    rng = np.random.default_rng(0)
    x = (3 + rng.standard_normal((3, 4, 5, 6))).astype(np.float16)
    gamma = (1 + 0.1 * rng.standard_normal(4)).astype(np.float32)
    beta = (0.1 * rng.standard_normal(4)).astype(np.float32)
    # a running mean of 3 + 3e-4 (float16 holds 3.0 or 3.002 there) and a small running
    # variance: rounding them to float16 would move y by about a tenth
    mean = np.full(4, 3.0003, np.float32)
    var = np.full(4, 1e-4, np.float32)
    logits = rng.standard_normal(3)
    return x, gamma, beta, mean, var, logits


MIXED = {
    "bn": lambda p, x, g, b, m, v, lg: refnorm.batch_norm_forward(x, g, b, path=p),
    "in": lambda p, x, g, b, m, v, lg: refnorm.instance_norm_forward(x, g, b, path=p),
    "ln": lambda p, x, g, b, m, v, lg: refnorm.layer_norm_forward(x, g, b, path=p),
    "gn": lambda p, x, g, b, m, v, lg: refnorm.group_norm_forward(x, g, b, num_groups=2,
                                                                  path=p),
    "bn eval": lambda p, x, g, b, m, v, lg: refnorm.batch_norm_eval_forward(x, g, b, m, v,
                                                                             path=p),
    "in eval": lambda p, x, g, b, m, v, lg: refnorm.instance_norm_eval_forward(x, g, b, m, v,
                                                                                path=p),
    "sn": lambda p, x, g, b, m, v, lg: refnorm.switchable_norm_forward(x, g, b, lg, -lg,
                                                                       path=p),
    "sn eval": lambda p, x, g, b, m, v, lg: refnorm.switchable_norm_eval_forward(
        x, g, b, lg, -lg, m, v + 1, path=p),
}
MIXED_BACKWARDS = {"bn": refnorm.batch_norm_backward, "in": refnorm.instance_norm_backward,
                   "ln": refnorm.layer_norm_backward, "gn": refnorm.group_norm_backward,
                   "sn": refnorm.switchable_norm_backward}


def _assert_same_layout(fast, ref, where="cache"):
    """The fast cache holds the reference cache's fields: arrays of the same shapes and
    dtypes (statistics and parameters in the compute dtype), the same other entries."""
    if dataclasses.is_dataclass(ref):
        for field in dataclasses.fields(ref):
            _assert_same_layout(getattr(fast, field.name), getattr(ref, field.name),
                                f"{where}.{field.name}")
    elif isinstance(ref, dict):
        assert set(fast) == set(ref), where
        for key in ref:
            _assert_same_layout(fast[key], ref[key], f"{where}[{key!r}]")
    elif isinstance(ref, np.ndarray):
        assert (fast.shape, fast.dtype) == (ref.shape, ref.dtype), where
    else:
        assert fast == ref, where


@pytest.mark.parametrize("name", sorted(MIXED))
def test_mixed_precision_arguments_give_the_references_values_and_dtypes(name):
    """float16 x with float32 parameters and statistics (and float64 logits): both paths
    compute in float32 from the parameters and statistics as given (not rounded to
    float16), keep the same cache fields in the same dtypes, and return y and dx in
    float16, the parameter gradients in float32 and the logit gradients in float64."""
    args = _mixed_precision_arguments()
    x = args[0]
    dy = np.random.default_rng(9).standard_normal(x.shape).astype(np.float16)
    backward = MIXED_BACKWARDS[name.split()[0]]
    out, caches = {}, {}
    for path in ("reference", "fast"):
        y, caches[path] = MIXED[name](path, *args)
        out[path] = (y, *backward(dy, caches[path], path=path))
    _assert_same_layout(caches["fast"], caches["reference"])
    for i, (fast, ref) in enumerate(zip(out["fast"], out["reference"], strict=True)):
        assert fast.dtype == ref.dtype, (i, fast.dtype, ref.dtype)
        # float32 arithmetic on both sides in another order, rounded once to the output's
        # dtype: a few of its spacings at the largest value (float16 for y and dx), and
        # float32 rounding of sums that cancel for the others
        scale = float(np.max(np.abs(ref.astype(np.float64))))
        tol = max(4 * float(np.spacing(np.asarray(scale, ref.dtype))), 2e-5 * scale)
        np.testing.assert_allclose(fast.astype(np.float64), ref.astype(np.float64),
                                   rtol=0, atol=tol, err_msg=f"output {i}")


def test_use_path_restores_the_choice_when_its_block_raises():
    dispatch.set_path("reference")
    with pytest.raises(RuntimeError, match="inside the block"):
        with dispatch.use_path("fast"):
            assert dispatch.get_path() == "fast"
            raise RuntimeError("inside the block")
    assert dispatch.get_path() == "reference"
    assert refnorm.build("bn", 3).compute_path() == "reference"


def test_record_paths_stops_recording_when_its_block_raises():
    """A block left by an exception no longer receives calls (the bench's recorder of one
    failed step must not collect the next step's calls)."""
    x, g, b = np.arange(6.0).reshape(2, 3) ** 2, np.ones(3), np.zeros(3)
    with pytest.raises(RuntimeError):
        with dispatch.record_paths() as failed:
            refnorm.batch_norm_forward(x, g, b, path="reference")
            raise RuntimeError("a step that failed")
    refnorm.batch_norm_forward(x, g, b, path="fast")
    with dispatch.record_paths() as later:
        refnorm.layer_norm_forward(x, g, b, path="reference")
    assert failed == [("batch_norm_forward", "reference")]
    assert later == [("layer_norm_forward", "reference")]


def test_a_dispatched_function_without_a_fast_variant_refuses_a_bad_path():
    """``dispatched`` is public: a reference registered without ``.fast`` still refuses a
    bad ``path=`` ("a bad path is refused on every call, whichever runs")."""
    @dispatch.dispatched
    def double(x):
        return 2 * x

    np.testing.assert_array_equal(double(np.ones(2), path="fast"), [2.0, 2.0])
    with pytest.raises(ValueError, match=r"path must be 'reference' or 'fast'; got 'Fast'"):
        double(np.ones(2), path="Fast")


@pytest.mark.parametrize("name", ["wn", "np", "trelu", "ws"])
def test_every_dispatched_call_of_a_weight_side_layer_takes_the_layers_path(name):
    """A weight-side layer runs the reference unless asked, and a layer asked for the fast
    path runs every dispatched function it calls there: the convolution for all four, and
    for WS Qiao et al.'s Eq. (2)-(6) and (8)-(9) too, forward and backward alike. (The two
    paths agree to rounding, so only the record tells them apart, except for a constant
    float32 filter: 0 on the fast path, its rounded mean on the reference.)"""
    x = np.random.default_rng(41).standard_normal((2, 3, 5, 5))
    layer = refnorm.build(name, 3, 4, 3, padding=1, dtype=np.float64)
    ws = name == "ws"
    expected = ((["weight_standardization_forward"] if ws else [])
                + ["conv2d_forward", "conv2d_backward"]
                + (["weight_standardization_backward"] if ws else []))
    for path in (None, "fast", "reference"):
        layer.path = path
        with dispatch.record_paths() as calls:
            y = layer.forward(x, training=True)
            layer.backward(np.ones_like(y))
        assert calls == [(f, path or "reference") for f in expected], (path, calls)


def test_weight_standardization_fast_checks_true_as_a_correction_after_one():
    """correction=1 (the official code's unbiased torch.std) is valid; True, equal to 1 and
    hashing as 1, is refused by the reference as not an int: the fast variant, which checks
    a signature once, checks it again rather than take it for the 1 it has seen."""
    w = np.random.default_rng(42).standard_normal((3, 4, 2, 2))
    forward = refnorm.weights.weight_standardization_forward
    forward(w, correction=1, path="fast")  # valid: checked and remembered
    fast = _outcome(lambda: forward(w, correction=True, path="fast"))
    ref = _outcome(lambda: forward(w, correction=True, path="reference"))
    assert fast == ref and ref is not None and ref[0] is TypeError


def test_an_empty_refnorm_path_is_no_choice(monkeypatch):
    """REFNORM_PATH set to the empty string (``REFNORM_PATH= refnorm ...``) counts as unset:
    the default applies, where a misspelt value is refused."""
    monkeypatch.setenv(dispatch.ENV, "")
    assert dispatch.process_choice() is None
    assert dispatch.get_path() == "reference" and dispatch.get_path(default="fast") == "fast"
    y, _ = refnorm.batch_norm_forward(X, G, B)  # no error on a call either
    assert y.shape == X.shape


def test_get_path_checks_its_default():
    """get_path(default) returns a valid default when nothing is chosen and refuses another,
    as every path is refused (the trainer passes default="fast")."""
    assert dispatch.get_path(default="fast") == "fast"
    with pytest.raises(ValueError, match=r"path must be 'reference' or 'fast'; got 'numba'"):
        dispatch.get_path(default="numba")


def test_a_backward_given_dy_by_name_takes_the_fast_path(monkeypatch):
    """The first parameter decides, whatever its name: dy for a backward, by name too."""
    _, cache = refnorm.batch_norm_forward(X, G, B)
    calls = _record_calls(monkeypatch, refnorm.norms.batch_norm.batch_norm_backward)
    refnorm.batch_norm_backward(dy=np.ones_like(X), cache=cache, path="fast")
    assert calls == {"reference": 0, "fast": 1}

"""Softmax cross-entropy: the direct formula, stability for huge logits, the gradient
against finite differences, label checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from refnorm.backend import to_numpy
from refnorm.gradcheck import numerical_vjp
from refnorm.nn import softmax_cross_entropy, softmax_cross_entropy_backward
from tests.core.strategies import float_arrays

U64 = np.finfo(np.float64).eps


def draw(N, K, seed, scale=3.0):
    """Fixed logits and labels for the example tests (hypothesis tests draw their own)."""
    rng = np.random.default_rng(seed)
    return scale * rng.standard_normal((N, K)), rng.integers(0, K, N)


@st.composite
def batches(draw):
    """(logits, labels): logits in [-10, 10] (e^10 is far from overflow, so the direct
    formula is accurate), labels in [0, K)."""
    N, K = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    logits = draw(float_arrays((N, K)))
    labels = draw(arrays(np.int64, (N,), elements=st.integers(0, K - 1)))
    return logits, labels


def loss_rounding(logits):
    """A bound on the rounding error of either loss formula: the log-sum-exp subtracts
    logits of size <= max|z| and sums K exponentials (K u); the direct formula's log of
    p_t, itself off by (K + 2) u relative, is off by that much absolutely."""
    K = logits.shape[1]
    return 4 * U64 * (np.max(np.abs(logits)) + K + 2)


def direct_loss(logits, labels):
    """-(1/N) sum_n log(exp(z[n, t_n]) / sum_k exp(z[n, k])), straight from the definition."""
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return -np.mean(np.log(p[np.arange(len(labels)), labels]))


@given(batch=batches())
def test_loss_matches_the_direct_formula(xp, batch):
    logits, labels = batch
    loss, _ = softmax_cross_entropy(xp.asarray(logits), xp.asarray(labels))
    # A 0-d array of the namespace (numpy alone would reduce to a numpy scalar).
    assert tuple(loss.shape) == () and type(loss) is type(xp.asarray(logits))
    # Logits of size <= 10: the direct formula is accurate, and both are within
    # loss_rounding of the exact loss (a loss near 0, a saturated softmax, is known only to
    # that absolute error).
    assert abs(float(loss) - direct_loss(logits, labels)) <= 2 * loss_rounding(logits)


@given(batch=batches())
def test_gradient_matches_finite_differences(xp, batch):
    logits, labels = batch

    def f(logits):
        return softmax_cross_entropy(xp.asarray(logits), xp.asarray(labels))[0]

    _, cache = softmax_cross_entropy(xp.asarray(logits), xp.asarray(labels))
    analytic = to_numpy(softmax_cross_entropy_backward(cache))
    # The output is one scalar, so an upstream gradient of 1 weights it as well as any.
    h = 1e-6
    numeric = numerical_vjp(f, {"logits": logits}, np.ones(()), "logits", step=h)
    # Central differences of the loss: its rounding (loss_rounding) divided by h, plus the
    # truncation h^2 / 6 |d^3 loss| <= h^2 / 3 (log-sum-exp's third derivatives are <= 2,
    # over N samples). Where the softmax saturates (logits 20 apart) the gradient is ~1e-9,
    # below that noise: there the check can only say "small"; elsewhere it is ~0.1 and a
    # wrong term shows at 1e-2 of it.
    noise = loss_rounding(logits) / h + h * h / 3
    deviation = np.max(np.abs(analytic - numeric))
    assert deviation <= 1e-6 * np.max(np.abs(analytic)) + noise, (deviation, noise)


def test_gradient_is_softmax_minus_onehot_over_n_and_rows_sum_to_zero():
    logits, labels = draw(4, 5, 0)
    _, cache = softmax_cross_entropy(logits, labels)
    dz = softmax_cross_entropy_backward(cache)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(dz, (p - np.eye(5)[labels]) / 4, rtol=1e-12, atol=1e-16)
    np.testing.assert_allclose(dz.sum(axis=1), 0.0, atol=1e-16)


def test_huge_logits_are_stable(xp):
    # exp(1e4) overflows in float64 (the limit is ~709): the naive formula gives nan/inf.
    logits = np.array([[1e4, 0.0, -1e4],
                       [1e4, 1e4, 0.0],
                       [-1e4, 1e4, 1e4 - 1.0]])
    labels = np.array([0, 0, 2])
    with np.errstate(over="ignore", invalid="ignore"):
        assert not np.isfinite(direct_loss(logits, labels))
    loss, cache = softmax_cross_entropy(xp.asarray(logits), xp.asarray(labels))
    # Row 0: log p = -log(1 + e^-1e4 + e^-2e4) = 0 in float64. Row 1: two equal maxima,
    # log p = -log 2. Row 2: log p = -1 - log(1 + e^-1) (the tiny e^-2e4 term vanishes).
    expected = (0.0 + np.log(2.0) + 1.0 + np.log1p(np.exp(-1.0))) / 3
    assert float(loss) == pytest.approx(expected, rel=1e-14)
    dz = to_numpy(softmax_cross_entropy_backward(cache))
    assert np.isfinite(dz).all()
    p2 = np.array([0.0, 1.0, np.exp(-1.0)]) / (1.0 + np.exp(-1.0))
    np.testing.assert_allclose(dz, (np.array([[1.0, 0, 0], [0.5, 0.5, 0], p2])
                                    - np.eye(3)[labels]) / 3, rtol=1e-14, atol=1e-300)


def test_minus_infinite_logit_of_another_class_is_fine():
    # where() rather than onehot * log_p: 0 * -inf would make the loss NaN.
    loss, cache = softmax_cross_entropy(np.array([[0.0, -np.inf]]), np.array([0]))
    assert float(loss) == 0.0
    np.testing.assert_array_equal(softmax_cross_entropy_backward(cache), [[0.0, 0.0]])


def test_a_loss_of_zero_is_plus_zero_as_in_pytorch():
    """-log p of a certain prediction is 0; negating a mean of +0.0 would print it -0.0."""
    loss, _ = softmax_cross_entropy(np.array([[0.0, -np.inf], [0.0, -np.inf]]), np.array([0, 0]))
    assert float(loss) == 0.0 and not np.signbit(loss)
    torch = pytest.importorskip("torch")
    expected = torch.nn.functional.cross_entropy(torch.tensor([[0.0, -np.inf]] * 2),
                                                 torch.tensor([0, 0]))
    assert float(expected) == 0.0 and not np.signbit(expected.numpy())


def test_dtypes_and_any_integer_label_dtype():
    logits = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    for label_dtype in (np.int8, np.uint8, np.int32, np.int64, np.uint64):
        loss, cache = softmax_cross_entropy(logits, np.array([2], dtype=label_dtype))
        assert loss.dtype == np.float32
        assert softmax_cross_entropy_backward(cache).dtype == np.float32
    loss16, _ = softmax_cross_entropy(logits.astype(np.float16), np.array([2]))
    assert loss16.dtype == np.float16


def test_inputs_are_not_modified(xp):
    logits, labels = draw(3, 4, 1)
    z, t = xp.asarray(logits), xp.asarray(labels)
    softmax_cross_entropy_backward(softmax_cross_entropy(z, t)[1])
    np.testing.assert_array_equal(to_numpy(z), logits)
    np.testing.assert_array_equal(to_numpy(t), labels)


Z = np.zeros((3, 4))


@pytest.mark.parametrize(
    ("labels", "error", "match"),
    [
        (np.array([0, 4, 1]), ValueError,
         r"labels must lie in \[0, K\) = \[0, 4\) for logits with K = 4 classes; "
         r"got labels from 0 to 4"),
        (np.array([-1, 0, 1]), ValueError, r"labels must lie in \[0, K\).*from -1 to 1"),
        (np.array([0.0, 1.0, 2.0]), TypeError, r"labels must have an integer dtype; got float64"),
        (np.array([True, False, True]), TypeError, r"labels must have an integer dtype; got bool"),
        ([0, 1, 2], TypeError, r"labels must be an integer array; got list"),
        (np.array([0, 1]), ValueError, r"labels must have shape \(N,\) = \(3,\).*got shape \(2,\)"),
        (np.array([[0, 1, 2]]), ValueError, r"labels must have shape \(N,\) = \(3,\)"),
    ],
)
def test_label_errors(labels, error, match):
    with pytest.raises(error, match=match):
        softmax_cross_entropy(Z, labels)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: softmax_cross_entropy(np.zeros(4), np.array([0])), ValueError,
         r"logits must have layout \(N, K\), 2 dimensions; got shape \(4,\)"),
        (lambda: softmax_cross_entropy(np.zeros((0, 4)), np.zeros(0, int)), ValueError,
         r"logits must hold at least one sample"),
        (lambda: softmax_cross_entropy(np.zeros((1, 2), int), np.array([0])), TypeError,
         r"logits must have a real floating-point dtype; got int64"),
        (lambda: softmax_cross_entropy_backward(None), TypeError,
         r"cache must be a SoftmaxCrossEntropyCache; got NoneType"),
    ],
)
def test_errors_name_the_argument_expected_and_got(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_logits_without_a_class_are_named_so():
    """(2, 0) logits were refused with a message about labels in [0, 0)."""
    with pytest.raises(ValueError, match=r"logits must hold at least one class \(K >= 1\)"):
        softmax_cross_entropy(np.zeros((2, 0)), np.zeros(2, dtype=np.int64))


F16_EPS = float(np.finfo(np.float16).eps)


def _cross_entropy64(z, labels):
    """Loss and dL/dz in float64 straight from the definition (log-sum-exp per row)."""
    m = z.max(axis=1, keepdims=True)
    log_p = z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))
    N = len(labels)
    return -log_p[np.arange(N), labels].mean(), (np.exp(log_p) - np.eye(z.shape[1])[labels]) / N


def test_float16_cross_entropy_is_the_float64_value_rounded_once():
    """float16 logits compute in float32: the loss and every gradient entry are the exact
    (float64) values rounded to float16, up to float32's own rounding."""
    rng = np.random.default_rng(4)
    z16 = (3 * rng.standard_normal((64, 10))).astype(np.float16)
    labels = rng.integers(0, 10, 64)
    loss, cache = softmax_cross_entropy(z16, labels)
    dz = softmax_cross_entropy_backward(cache)
    assert loss.dtype == dz.dtype == np.float16
    loss64, dz64 = _cross_entropy64(z16.astype(np.float64), labels)
    # rounding to float16 is within half a unit of the float16 grid (2^-11 relative for
    # normal values, 2^-25 absolute below 2^-14); float32's error adds ~1e-6 of that
    ulp = np.maximum(np.abs(dz64), 2.0 ** -14) * F16_EPS
    assert np.all(np.abs(dz.astype(np.float64) - dz64) <= 0.5 * ulp * (1 + 1e-3))
    assert abs(float(loss) - loss64) <= 0.5 * abs(loss64) * F16_EPS * (1 + 1e-3)


def test_cross_entropy_rows_far_apart_are_each_stable():
    """The softmax of a row is unchanged by adding a constant to the row: rows shifted by
    -1e4, 0 and +1e4 give the loss and gradient of the unshifted rows, computed from the
    definition. Each row must subtract its own maximum."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal((3, 4))
    labels = np.array([1, 3, 0])
    logits = base + np.array([[-1e4], [0.0], [1e4]])
    loss, cache = softmax_cross_entropy(logits, labels)
    dz = softmax_cross_entropy_backward(cache)
    p = np.exp(base) / np.exp(base).sum(axis=1, keepdims=True)
    expected_loss = -np.mean(np.log(p[np.arange(3), labels]))
    # shifting by 1e4 rounds each logit to a multiple of 2^-39 (ulp of 1e4): ~1e-12 change
    assert float(loss) == pytest.approx(expected_loss, rel=1e-10)
    np.testing.assert_allclose(dz, (p - np.eye(4)[labels]) / 3, rtol=1e-9, atol=1e-14)
    # and against central differences of the loss, with a random upstream gradient g
    g = rng.standard_normal()
    h = 1e-4

    def f(logits):
        return softmax_cross_entropy(logits, labels)[0]

    numeric = numerical_vjp(f, {"logits": logits}, np.asarray(g), "logits", step=h)
    # rounding of the loss (~1e-16 of 1e4 per logit) / h, plus truncation h^2 / 3
    np.testing.assert_allclose(g * dz, numeric, atol=1e-7)


def test_every_integer_label_dtype_of_the_namespace_gives_the_same_loss(xp):
    """Labels of any integer dtype of the array's own namespace, unsigned 64-bit included
    (which the Array API cannot compare with int64 without a cast)."""
    logits = xp.asarray(np.array([[1.0, 2.0, 3.0], [0.5, 0.0, -1.0]]))
    expected, _ = softmax_cross_entropy(logits, xp.asarray([2, 0], dtype=xp.int64))
    for name in ("int8", "uint8", "int16", "uint16", "int32", "uint32", "uint64"):
        loss, cache = softmax_cross_entropy(logits, xp.asarray([2, 0], dtype=getattr(xp, name)))
        assert float(loss) == float(expected), name
        assert tuple(softmax_cross_entropy_backward(cache).shape) == (2, 3)


def test_logits_and_labels_from_two_namespaces_are_refused():
    strict = pytest.importorskip("array_api_strict")
    logits, labels = draw(3, 4, 2)
    for z, t in ((logits, strict.asarray(labels)), (strict.asarray(logits), labels)):
        with pytest.raises(TypeError, match=r"one array namespace"):
            softmax_cross_entropy(z, t)

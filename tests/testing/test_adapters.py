"""refnorm.testing.adapters: a parameter an implementation does not have, or a gradient it
does not give, is reported as such, not as a shape or value mismatch."""

from __future__ import annotations

import numpy as np
import pytest

from refnorm.testing import as_impl, assert_matches, fingerprint
from tests.testing.impls import NumpyBN, numpy_bn_forward


def test_a_backward_returning_none_is_reported_as_none():
    bn = NumpyBN(3)

    def backward(dy, x, gamma, beta):
        dx, dgamma, _ = bn.backward(dy, x, gamma, beta)
        return dx, dgamma, None
    with pytest.raises(AssertionError) as info:
        assert_matches("bn", numpy_bn_forward, backward, num_channels=3)
    assert "On the smallest failing input: dbeta: its backward returned None for the " \
        "gradient of beta" in str(info.value), str(info.value)


def test_a_backward_returning_too_few_gradients_says_how_many():
    bn = NumpyBN(3)
    with pytest.raises(AssertionError) as info:
        assert_matches("bn", numpy_bn_forward, lambda dy, x, g, b: bn.backward(dy, x, g, b)[:2],
                       num_channels=3)
    assert "the vector-Jacobian product gave 2 arrays; bn has 3 inputs (dx, dgamma, dbeta)" \
        in str(info.value), str(info.value)


torch = pytest.importorskip("torch")
torch.set_num_threads(1)


@pytest.mark.parametrize(("keep", "found"), [
    (True, "dvar_logits: the gradient of var_logits (var_weight) is None after backward: the "
           "module's output does not depend on it; refnorm's does"),
    (False, "var_logits: the module has no parameter 'var_weight' for var_logits, so its "
            "output cannot depend on var_logits; refnorm's does"),
], ids=["unused_var_weight", "no_var_weight"])
def test_switchable_norm_with_tied_ratios(keep, found):
    from tests.testing.torch_impls import SwitchNormTied

    with pytest.raises(AssertionError) as info:
        assert_matches("sn", SwitchNormTied(4, keep_var_weight=keep))
    text = str(info.value)
    assert "On the smallest failing input: " + found in text, text
    assert "ratios: found tied (mean ratios for both)" in text, text
    assert "shape" not in text


def test_a_layer_without_affine_parameters_matches():
    """InstanceNorm2d() has no weight or bias: ones and zeros are passed for gamma and beta,
    and their gradients (which it does not have) are not compared."""
    assert_matches("in", torch.nn.InstanceNorm2d(3))
    assert_matches("ln", torch.nn.LayerNorm(5, elementwise_affine=False))


def test_a_layer_without_a_bias_is_told_so():
    with pytest.raises(AssertionError) as info:
        assert_matches("ln", torch.nn.LayerNorm(5, bias=False))
    assert "beta: the module has no parameter 'bias' for beta" in str(info.value)


def test_a_torch_input_gradient_that_is_none_is_reported():
    class Constant(torch.nn.Module):            # ignores its input: x.grad stays None
        num_features = 3

        def forward(self, x):
            return torch.zeros_like(x)

    with pytest.raises(AssertionError) as info:
        assert_matches("bn", Constant())
    assert "On the smallest failing input: dx: the gradient of x (the input) is None after " \
        "backward" in str(info.value), str(info.value)


def test_inference_of_a_callable_without_running_statistics_is_refused():
    """A plain callable computes batch statistics whatever the mode: Impl.forward in inference
    says it has none rather than returning training-mode outputs."""
    impl = as_impl("bn", numpy_bn_forward)
    x, params = np.arange(8.0).reshape(4, 2), (np.ones(2), np.zeros(2))
    assert impl.forward(x, params, training=True).shape == (4, 2)
    with pytest.raises(ValueError, match=r"training must be True for callable numpy_bn_forward, "
                                         r"which keeps no running statistics; got False"):
        impl.forward(x, params, training=False)


@pytest.mark.parametrize("wrap", [tuple, list])
def test_a_forward_returning_its_output_with_a_cache_is_refused_by_name(wrap):
    """A forward returning (y, cache) met numpy's "setting an array element with a sequence"
    deep inside, reported as an error the implementation raised."""
    def forward(x, gamma, beta):
        return wrap((numpy_bn_forward(x, gamma, beta), None))

    with pytest.raises(TypeError, match=rf"callable test_a_forward_returning_its_output_with_a_"
                                        rf"cache_is_refused_by_name.<locals>.forward returned a "
                                        rf"{wrap.__name__} of 2 items; a normalizer's forward "
                                        r"returns its output y alone"):
        fingerprint("bn", forward)

"""refnorm.testing.assert_matches on numpy and dlpack callables."""

from __future__ import annotations

import re

import numpy as np
import pytest

from refnorm.testing import assert_matches
from tests.testing.impls import NumpyBN, numpy_bn_forward


def test_numpy_callable_with_backward_matches():
    bn = NumpyBN(3)
    assert_matches("bn", numpy_bn_forward, lambda dy, x, g, b: bn.backward(dy, x, g, b),
                   num_channels=3)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_low_precision_inputs_match_within_derived_tolerance(dtype):
    def forward(x, gamma, beta):   # computes in float32 as refnorm does, returns x's dtype
        return numpy_bn_forward(x.astype(np.float32), gamma.astype(np.float32),
                                beta.astype(np.float32)).astype(x.dtype)
    assert_matches("bn", forward, dtype=dtype)


def test_failure_names_output_error_index_and_shrunk_input():
    def eps_outside(x, gamma, beta):
        axes = (0,) + tuple(range(2, x.ndim))
        view = (1, -1) + (1,) * (x.ndim - 2)
        x_hat = (x - x.mean(axis=axes, keepdims=True)) / (np.sqrt(x.var(axis=axes,
                                                                        keepdims=True)) + 1e-5)
        return gamma.reshape(view) * x_hat + beta.reshape(view)
    with pytest.raises(AssertionError) as info:
        assert_matches("bn", eps_outside)
    text = str(info.value)
    assert re.search(r"y: max \|error\| \S+ at index \(", text), text
    assert "Smallest failing input (shrunk by hypothesis):\nCase(method='bn'" in text


def test_wrong_dgamma_fails_on_the_gradient():
    bad = NumpyBN(3, dgamma_wrong=True)
    with pytest.raises(AssertionError, match=r"dgamma: max \|error\|"):
        assert_matches("bn", numpy_bn_forward, lambda dy, x, g, b: bad.backward(dy, x, g, b),
                       num_channels=3, spatial=2)


def test_dlpack_callable_through_convert():
    torch = pytest.importorskip("torch")

    def forward(x, gamma, beta):   # takes and returns torch tensors
        return torch.nn.functional.batch_norm(x, None, None, gamma, beta, training=True)
    assert_matches("bn", forward, convert=torch.from_numpy)


def test_refuses_a_callable_of_the_wrong_arity():
    with pytest.raises(TypeError, match="impl must take \\(x, gamma, beta\\)"):
        assert_matches("bn", lambda x: x)

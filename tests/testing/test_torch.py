"""PyTorch's layers fingerprinted (the ``torch`` extra): the conventions PyTorch documents.

PyTorch's documentation of ``BatchNorm*d``/``InstanceNorm*d``: biased variance in the
normalization, eps inside the square root, ``momentum`` (0.1) the weight of the new value,
running variance unbiased; ``GroupNorm``: consecutive channel groups; ``LayerNorm``: biased
variance, eps inside; ``weight_norm``: ``g * v / ||v||`` with no eps.
"""

from __future__ import annotations

import numpy as np
import pytest

from refnorm.testing import assert_matches, fingerprint

torch = pytest.importorskip("torch")
torch.set_num_threads(1)   # tiny tensors: threads only add contention on shared cores

PYTORCH_BN = {"variance": "biased", "eps_placement": "inside_sqrt", "eps": 1e-5,
              "running": "exponential", "momentum_new_weight": 0.1, "momentum_on": "new",
              "running_var": "unbiased", "inference": "running", "gradients": "consistent",
              "offset_precision": "ok", "affine": "per_channel"}


def _assert_conventions(report, expected):
    got = {k: report.conventions.get(k) for k in expected}
    assert got == expected, str(report)


@pytest.mark.parametrize("cls", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
def test_batch_norm(cls):
    module = getattr(torch.nn, cls)(3)
    report = fingerprint("bn", module)
    _assert_conventions(report, PYTORCH_BN)
    assert report.match == ("refnorm.batch_norm_forward(eps=1e-05); running statistics: "
                            "refnorm.core.running.update_running_stats(momentum=0.1)")


def test_batch_norm_momentum_none_is_a_cumulative_average():
    report = fingerprint("bn", torch.nn.BatchNorm2d(3, momentum=None))
    assert report.conventions["running"] == "cumulative", str(report)
    assert report.match is None   # refnorm has no cumulative average


def test_instance_norm_affine_tracked():
    module = torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
    report = fingerprint("in", module)
    _assert_conventions(report, {**PYTORCH_BN, "momentum_new_weight": 0.1})
    assert report.conventions["scope"] == {"channels": [0], "across_samples": False}
    assert report.match is not None, str(report)


def test_instance_norm_default_keeps_no_running_statistics():
    report = fingerprint("in", torch.nn.InstanceNorm2d(3))
    _assert_conventions(report, {"variance": "biased", "eps_placement": "inside_sqrt",
                                 "running": "none", "affine": "none",
                                 "gradients": "consistent"})
    assert report.match == "refnorm.instance_norm_forward(eps=1e-05)", str(report)


def test_group_norm():
    report = fingerprint("gn", torch.nn.GroupNorm(4, 12))
    _assert_conventions(report, {"group_layout": "consecutive", "num_groups": 4,
                                 "variance": "biased", "eps_placement": "inside_sqrt",
                                 "gradients": "consistent"})
    assert report.match == "refnorm.group_norm_forward(num_groups=4, eps=1e-05)", str(report)


def test_layer_norm():
    report = fingerprint("ln", torch.nn.LayerNorm(6))
    _assert_conventions(report, {"variance": "biased", "eps_placement": "inside_sqrt",
                                 "eps": 1e-5, "gradients": "consistent"})
    assert report.match == "refnorm.layer_norm_forward(eps=1e-05)", str(report)


def test_layer_norm_with_a_gain_per_element_is_named_so():
    """LayerNorm((C, H, W)) learns one gain per element, not refnorm's per channel; the
    probes set its gains per channel, so only its parameter's shape tells, and it was
    reported as refnorm's LN."""
    report = fingerprint("ln", torch.nn.LayerNorm((4, 3, 4)))
    assert report.conventions["affine"] == "per_element"
    assert "one gain and bias per element of (4, 3, 4)" in str(report)
    assert report.match is None and "closest: refnorm.layer_norm_forward" in str(report)
    plain = fingerprint("ln", torch.nn.LayerNorm((4, 3, 4), elementwise_affine=False))
    assert plain.match == "refnorm.layer_norm_forward(eps=1e-05)", str(plain)


@pytest.mark.parametrize("shape, per", [(6, "per channel"),
                                        ((4, 3, 4), "one gain per element of (4, 3, 4)")])
def test_layer_norm_without_bias_is_a_gain_without_beta_and_its_gradients_are_its_own(shape,
                                                                                       per):
    """LayerNorm(bias=False) has no beta: it was "affine: other" and its gradients "wrong:
    dbeta (none given)". It follows refnorm's LN with beta = 0 (the closest, to rounding), but
    refnorm's layer has a beta, so it is no match."""
    report = fingerprint("ln", torch.nn.LayerNorm(shape, bias=False))
    rows = {row.topic: row for row in report.rows}
    assert rows["affine"].found == f"gamma * x_hat, no beta, {per}", str(report)
    assert report.conventions["affine"] == "no_beta"
    assert report.conventions["gradients"] == "consistent", str(report)
    assert report.match is None and report.first_divergence().topic == "affine"
    assert "closest: refnorm.layer_norm_forward(eps=1e-05)" in str(report)
    assert report.residual < 1e-10, str(report)  # with a beta drawn it was 0.95


def test_weight_norm_has_no_eps():
    module = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv2d(2, 3, 2))
    report = fingerprint("wn", module)
    _assert_conventions(report, {"eps_placement": "none", "gradients": "consistent"})
    # refnorm needs eps > 0; 1e-300 is below float64 resolution of any filter norm here
    assert report.match == "refnorm.weights.weight_norm_forward(eps=1e-300)", str(report)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_torch_layers_pass_assert_matches(dtype):
    assert_matches("bn", torch.nn.BatchNorm2d(3), dtype=dtype)
    assert_matches("gn", torch.nn.GroupNorm(2, 4), dtype=dtype)
    assert_matches("ln", torch.nn.LayerNorm(5), dtype=dtype)
    assert_matches("in", torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
                   dtype=dtype)


def test_torch_weight_norm_differs_by_its_missing_eps_and_at_a_zero_filter():
    module = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(4, 3))
    with pytest.raises(AssertionError, match=r"y: max \|error\|"):
        assert_matches("wn", module)
    # with refnorm's eps below resolution, what remains is the zero filter: 0/0 in torch,
    # the finite limit 0 in refnorm; hypothesis shrinks to it
    with pytest.raises(AssertionError, match=r"got nan, refnorm 0.0"):
        assert_matches("wn", module, eps=1e-300)


def test_a_torch_module_is_copied_never_changed():
    """docs/testing.md: the module given is copied per dtype; its parameters, buffers, mode
    and gradients are as they were after fingerprint and assert_matches."""
    module = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        module.weight.mul_(2.0)
        module.running_var.fill_(3.0)
    module.eval()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    fingerprint("bn", module)
    assert_matches("bn", module, max_examples=5)
    after = module.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not module.training and all(p.grad is None for p in module.parameters())


def test_layer_norm_with_a_gain_per_element_has_consistent_gradients():
    torch = pytest.importorskip("torch")
    from refnorm.testing import fingerprint

    report = fingerprint("ln", torch.nn.LayerNorm((4, 3, 4)))
    assert report.conventions["affine"] == "per_element"
    assert report.conventions["gradients"] == "consistent", str(report)


class _WarmStartBN(torch.nn.BatchNorm2d):
    """BN whose running average weights the t-th batch 1/t until that falls below 0.6, then
    0.6: a cumulative start, not a cumulative average (1, then 0.6, not 1/2)."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        self.num_batches_tracked += 1
        weight = max(1.0 / float(self.num_batches_tracked), 0.6)
        return torch.nn.functional.batch_norm(x, self.running_mean, self.running_var,
                                              self.weight, self.bias, True, weight, self.eps)


def test_a_running_average_that_only_starts_cumulative_is_not_named_cumulative():
    report = fingerprint("bn", _WarmStartBN(3))
    assert report.conventions["running"] == "other", str(report)
    assert "weights 1 then 0.6" in str(report)
    assert report.match is None, str(report)


def test_batch_norm_with_a_large_eps_matches_with_that_eps():
    """BatchNorm2d(eps=100): its variance was read as "scaled by 1.01" and its eps placement
    as "unknown" (eps / s^2 at the top of the ladder); refnorm with eps = 100 matches it."""
    report = fingerprint("bn", torch.nn.BatchNorm2d(3, eps=100.0))
    _assert_conventions(report, {**PYTORCH_BN, "eps": 100.0})
    assert report.match is not None and report.match.startswith(
        "refnorm.batch_norm_forward(eps=100.0)"), str(report)


def test_a_module_with_frozen_parameters_has_their_gradients_probed():
    """A frozen BN (requires_grad False, as when fine-tuning) was reported as giving no
    dgamma and dbeta, "the module's output does not depend on it", and matching nothing;
    the caller's module stays frozen."""
    module = torch.nn.BatchNorm2d(3).requires_grad_(False)
    report = fingerprint("bn", module)
    assert report.conventions["gradients"] == "consistent", str(report)
    assert report.match is not None, str(report)
    assert_matches("bn", module, max_examples=5)
    assert not any(p.requires_grad for p in module.parameters())

"""Switchable Normalization Appendix A, multiple GPUs, Eq. (15)-(25): which printed formulas
are right (verdicts derived in refnorm/errata/sn_multi_gpu.py)."""

from __future__ import annotations

import numpy as np
import pytest

from refnorm.errata import sn_multi_gpu

AGREE = {"Eq. (15)", "Eq. (16)", "Eq. (17)", "Eq. (18)", "Eq. (19)", "Eq. (20)",
         "Eq. (21), corrected", "Eq. (22)-(25)"}
DISAGREE = {"Eq. (21), variance", "Eq. (21), mean", "Eq. (22)-(25) with Eq. (21)"}
SHARD_DEPENDENT = "Eq. (22)-(25), P N H W"


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shards", [(2, 3), (1, 4, 2), (3, 3)])
def test_printed_multi_gpu_verdicts(seed, shards):
    findings = {f.equation: f for f in sn_multi_gpu.check_multi_gpu(seed, shards)}
    assert set(findings) == AGREE | DISAGREE | {SHARD_DEPENDENT}
    for eq in AGREE:
        assert findings[eq].agrees, findings[eq]
    for eq in DISAGREE:
        assert not findings[eq].agrees and findings[eq].max_rel_error > 0.1, findings[eq]
    # P N H W is the whole batch's count exactly when every device holds N samples.
    equal = len(set(shards)) == 1
    assert findings[SHARD_DEPENDENT].agrees is equal, findings[SHARD_DEPENDENT]
    if not equal:
        assert findings[SHARD_DEPENDENT].max_rel_error > 1e-3


def test_printed_eq21_is_the_formula_as_printed():
    """The transcription itself, against its docstring: dL/dsigma^2 = -1/(2 sqrt(s + eps))
    sum dL/dh~ h~ - gamma/(2 sqrt(s + eps)) sum dL/dh^ h~ and dL/dmu = -1/sqrt(s + eps) sum
    dL/dh~ - gamma/sqrt(s + eps) sum dL/dh^, with dL/dh~ = gamma dL/dh^ (a verdict of
    "disagrees" holds for any wrong transcription too)."""
    from refnorm.errata.sn_multi_gpu import printed_eq21

    rng = np.random.default_rng(0)
    dy, xt = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))
    var = rng.uniform(0.5, 2.0, (2, 3, 1))
    gamma, eps = np.array([0.5, 2.0, -1.5]), 1e-5
    g, root = gamma.reshape(1, -1, 1), np.sqrt(var + eps)
    s_xt = np.sum(dy * xt, axis=2, keepdims=True)
    s = np.sum(dy, axis=2, keepdims=True)
    dvar, dmu = printed_eq21(dy, xt, var, gamma, eps)
    np.testing.assert_allclose(dvar, -g * s_xt / (2 * root) - g * s_xt / (2 * root), rtol=1e-12)
    np.testing.assert_allclose(dmu, -g * s / root - g * s / root, rtol=1e-12)


@pytest.mark.parametrize("which", [1, 2], ids=["dvar", "dmu"])
def test_the_corrected_eq21_row_checks_both_statistic_gradients(which, monkeypatch):
    """"Eq. (21), corrected" stands for refnorm's dL/dsigma^2_p *and* dL/dmu_p: either 1 %
    off makes the row disagree."""
    original = sn_multi_gpu.statistic_gradients

    def off(dy, cache):
        out = list(original(dy, cache))
        out[which] = 1.01 * out[which]
        return tuple(out)

    monkeypatch.setattr(sn_multi_gpu, "statistic_gradients", off)
    found = {f.equation: f for f in sn_multi_gpu.check_multi_gpu(0, (2, 3))}
    assert not found["Eq. (21), corrected"].agrees, found["Eq. (21), corrected"]


def test_pnhw_takes_each_devices_own_n():
    """Shards (2, 1, 3): P times the *first* device's N is the batch (3 * 2 = 6), but Eq.
    (24)-(25) read N as each device's own batch, 3 * 1 and 3 * 3 on the others: the printed
    count is still wrong there."""
    found = {f.equation: f for f in sn_multi_gpu.check_multi_gpu(0, (2, 1, 3))}
    pnhw = found["Eq. (22)-(25), P N H W"]
    assert not pnhw.agrees and pnhw.max_rel_error > 1e-3, pnhw
    assert found["Eq. (22)-(25)"].agrees, found["Eq. (22)-(25)"]

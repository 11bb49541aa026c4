"""The micro-batch study: its grid, its report, and the verdicts it gives the papers' claims."""

from __future__ import annotations

import re

import pytest

from refnorm.train.study import (
    QUICK,
    StudyConfig,
    claims,
    job_configs,
    parse_method,
    run_study,
)


def test_study_report_has_every_cell(tmp_path):
    study = StudyConfig(methods=("bn", "gn", "sn", "wn"), batch_sizes=(4, 16), update_size=16,
                        epochs=1, train_subset=96)
    report = run_study(study, tmp_path, jobs=1, log=lambda line: None)
    text = report.read_text()
    table = [line for line in text.splitlines() if line.startswith("| ") and "batch" not in line]
    assert len(table) == 4
    assert all(cell.strip() and "nan" not in cell for row in table for cell in row.split("|")[1:-1])
    # bn, gn, sn and wn with two batch sizes: BN's drop, GN and SN robust, SN's ratios, WN
    # against BN (GN+WS is not in the grid).
    verdicts = [line for line in text.splitlines() if line.startswith("- ")]
    assert len(verdicts) == 5, verdicts
    for png in ("accuracy_vs_batch.png", "sn_ratios.png", "wn_vs_bn.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("method", "parsed"),
    [("bn", ("bn", None)), ("gn+ws", ("gn", "ws")), ("wn", ("none", "wn")),
     ("none+trelu", ("none", "trelu"))],
)
def test_parse_method(method, parsed):
    assert parse_method(method) == parsed


@pytest.mark.parametrize("bad", ["xn", "gn+xs", "gn+ws+wn"])
def test_parse_method_rejects_unknown_methods(bad):
    with pytest.raises(ValueError, match=f"unknown method '{re.escape(bad)}'"):
        parse_method(bad)


def test_a_batch_size_must_divide_the_update_size():
    with pytest.raises(ValueError, match="every batch size must divide update_size=64; got 3"):
        StudyConfig(batch_sizes=(2, 3))


def test_job_configs_keep_the_update_size_fixed():
    jobs = job_configs(QUICK)
    assert len(jobs) == len(QUICK.methods) * len(QUICK.batch_sizes) * len(QUICK.seeds)
    assert {j.batch_size * j.accumulation for j in jobs} == {QUICK.update_size}
    gnws = [j for j in jobs if (j.norm, j.weight) == ("gn", "ws")]
    assert sorted(j.batch_size for j in gnws) == sorted(QUICK.batch_sizes)


def _cells(test, train=None):
    """Cells as summarize() builds them, from {(method, batch): test accuracy}."""
    train = train or {}
    return {key: {"test": [acc], "train": [train.get(key, acc)], "ratios": [{}],
                  "histories": [[]]} for key, acc in test.items()}


def _verdicts(study, cells):
    return {c.claim.split(" ")[0]: c.supported for c in claims(study, cells)}


def test_claims_follow_the_numbers():
    study = StudyConfig(methods=("bn", "gn"), batch_sizes=(2, 32), update_size=32)
    bn_degrades = _cells({("bn", 32): 0.95, ("bn", 2): 0.85, ("gn", 32): 0.94, ("gn", 2): 0.94})
    assert _verdicts(study, bn_degrades) == {"BN": True, "GN": True}
    # BN loses 1 point only (the threshold is 2) and GN loses more than BN.
    flat = _cells({("bn", 32): 0.95, ("bn", 2): 0.94, ("gn", 32): 0.95, ("gn", 2): 0.93})
    assert _verdicts(study, flat) == {"BN": False, "GN": False}


def test_wn_claim_needs_a_larger_train_test_gap_than_bn():
    study = StudyConfig(methods=("bn", "wn"), batch_sizes=(2, 32), update_size=32)
    test = {("bn", 32): 0.90, ("bn", 2): 0.80, ("wn", 32): 0.85, ("wn", 2): 0.85}
    gap = _cells(test, train={("bn", 32): 0.92, ("wn", 32): 0.97})
    assert _verdicts(study, gap)["WN"] is True
    no_gap = _cells(test, train={("bn", 32): 0.97, ("wn", 32): 0.86})
    assert _verdicts(study, no_gap)["WN"] is False


def test_one_seed_claims_carry_the_caveat_and_several_do_not():
    cells = _cells({("bn", 32): 0.95, ("bn", 2): 0.85})
    one = claims(StudyConfig(methods=("bn",), batch_sizes=(2, 32), update_size=32), cells)
    three = claims(StudyConfig(methods=("bn",), batch_sizes=(2, 32), update_size=32,
                               seeds=(0, 1, 2)), cells)
    assert "one seed" in one[0].evidence and "one seed" not in three[0].evidence

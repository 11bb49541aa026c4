"""The micro-batch study: its grid, its report, and the verdicts it gives the papers' claims."""

from __future__ import annotations

import os
import re
import signal

import numpy as np
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
    study = StudyConfig(methods=("bn", "syncbn", "gn", "sn", "wn"), batch_sizes=(4, 16),
                        update_size=16, epochs=1, train_subset=96, seeds=(0,))
    report = run_study(study, tmp_path, jobs=1, log=lambda line: None)
    text = report.read_text()
    assert "| method | 4, 4 | 1, 16 |" in text  # (#devices, #samples per device)
    table = [line for line in text.splitlines()
             if line.startswith("| ") and "method" not in line]
    assert len(table) == 5
    assert all(cell.strip() and "nan" not in cell for row in table for cell in row.split("|")[1:-1])
    # BN's drop, GN and SN robust, SN's ratios, WN against BN, SyncBN recovering BN (GN+WS
    # and SyncSN are not in the grid); one seed: reported, not judged.
    verdicts = [line for line in text.splitlines() if line.startswith("- ")]
    assert len(verdicts) == 6, verdicts
    assert all("**not judged**" in v for v in verdicts)
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
    assert {j.update_size for j in jobs} == {QUICK.update_size}
    assert {(j.devices, j.batch_size) for j in jobs} == {(16, 2), (1, 32)}
    gnws = [j for j in jobs if (j.norm, j.weight) == ("gn", "ws")]
    assert sorted(j.batch_size for j in gnws) == sorted(QUICK.batch_sizes)


def test_the_quick_and_full_grids_are_the_readmes():
    """README "Two commands": ``./run.sh`` (``study --quick``) trains BN, SyncBN, GN, SN, GN+WS
    and WN at 32 samples per update, one seed; ``./run.sh study`` the full grid, BN, SyncBN,
    GN, SN, SyncSN, GN+WS, LN and WN at 2, 4, 16 and 64 samples per device, 3 seeds."""
    assert set(QUICK.methods) == {"bn", "syncbn", "gn", "sn", "gn+ws", "wn"}
    assert (QUICK.update_size, len(QUICK.seeds)) == (32, 1)
    full = StudyConfig()
    assert set(full.methods) == {"bn", "syncbn", "gn", "sn", "syncsn", "gn+ws", "ln", "wn"}
    assert (full.batch_sizes, len(full.seeds)) == ((2, 4, 16, 64), 3)


def _cells(test, train=None):
    """Cells as summarize() builds them, from {(method, batch): [test accuracy per seed]}."""
    train = train or {}
    return {key: {"test": list(acc), "train": list(train.get(key, acc)),
                  "ratios": [{}] * len(acc), "histories": [[]] * len(acc),
                  "seeds": list(range(len(acc)))}
            for key, acc in test.items()}


THREE = {"seeds": (0, 1, 2)}


def _verdicts(study, cells):
    return {c.claim.split(" ")[0]: c.supported for c in claims(study, cells)}


def test_claims_follow_the_numbers_over_three_seeds():
    study = StudyConfig(methods=("bn", "gn"), batch_sizes=(2, 32), update_size=32, **THREE)
    bn_degrades = _cells({("bn", 32): [0.95, 0.96, 0.95], ("bn", 2): [0.85, 0.86, 0.84],
                          ("gn", 32): [0.94, 0.94, 0.95], ("gn", 2): [0.94, 0.95, 0.94]})
    assert _verdicts(study, bn_degrades) == {"BN": True, "GN": True}
    # BN's drop (1.3 points) is within two standard errors of its per-seed differences
    # (-2, 1 and 5 points): not a drop.
    noisy = _cells({("bn", 32): [0.95, 0.91, 0.99], ("bn", 2): [0.97, 0.90, 0.94],
                    ("gn", 32): [0.95, 0.95, 0.95], ("gn", 2): [0.93, 0.93, 0.93]})
    assert _verdicts(study, noisy) == {"BN": False, "GN": False}


def test_a_difference_counts_when_it_exceeds_two_standard_errors():
    from refnorm.train.study import Estimate, _significant

    a = {"test": [0.90, 0.92, 0.94], "seeds": [0, 1, 2]}
    b = {"test": [0.84, 0.79, 0.82], "seeds": [2, 0, 1]}  # paired by seed, not by position
    d = Estimate.paired(a, b)  # per seed: 11, 10 and 10 points
    assert d.mean == pytest.approx(31 / 3) and d.n == 3
    assert d.se == pytest.approx(np.std([11, 10, 10], ddof=1) / np.sqrt(3))
    assert _significant(d) and not _significant(Estimate(3.0, 1.6, 3))


def test_runs_of_one_seed_are_paired():
    """The runs of one seed share their training subset and data order: a drop the same in
    every seed counts, however much the seeds differ from each other (treated as independent
    means, this SN drop of 2.3 points would have a standard error of 3.6 and not count)."""
    study = StudyConfig(methods=("bn", "sn"), batch_sizes=(2, 32), update_size=32, **THREE)
    cells = _cells({("bn", 32): [0.95, 0.90, 0.99], ("bn", 2): [0.90, 0.85, 0.94],
                    ("sn", 32): [0.93, 0.88, 0.97], ("sn", 2): [0.906, 0.86, 0.945]})
    found = {c.claim.split(" ")[0]: c for c in claims(study, cells)}
    assert found["SN"].supported is False and "SN drops 2.3 ± 0.2 points" in found["SN"].evidence


def test_a_claim_is_judged_on_the_seeds_its_cells_share_and_never_on_nan():
    study = StudyConfig(methods=("bn",), batch_sizes=(2, 32), update_size=32, **THREE)
    missing = _cells({("bn", 32): [0.95, 0.96, 0.95], ("bn", 2): [0.85, 0.86, 0.84]})
    missing[("bn", 2)] = {**missing[("bn", 2)], "test": [0.85, 0.86], "seeds": [0, 1]}
    (claim,) = claims(study, missing)
    assert claim.supported is None and "2 seeds: not judged" in claim.evidence
    nan = _cells({("bn", 32): [0.95, 0.96, float("nan")], ("bn", 2): [0.85, 0.86, 0.84]})
    (claim,) = claims(study, nan)
    assert claim.supported is None and "not a number: not judged" in claim.evidence


def test_bn_improving_at_micro_batches_is_not_bn_degrading():
    study = StudyConfig(methods=("bn", "gn"), batch_sizes=(2, 32), update_size=32, **THREE)
    cells = _cells({("bn", 32): [0.80, 0.81, 0.80], ("bn", 2): [0.95, 0.96, 0.95],
                    ("gn", 32): [0.94, 0.94, 0.95], ("gn", 2): [0.94, 0.95, 0.94]})
    assert _verdicts(study, cells) == {"BN": False, "GN": False}


def test_a_grid_must_not_repeat_a_setting():
    with pytest.raises(ValueError, match=r"batch_sizes must not repeat a value; got \(32, 32\)"):
        StudyConfig(batch_sizes=(32, 32), update_size=32)


def test_wn_claim_needs_bn_train_accuracy_and_a_lower_test_accuracy():
    study = StudyConfig(methods=("bn", "wn"), batch_sizes=(2, 32), update_size=32, **THREE)
    test = {("bn", 32): [0.90, 0.91, 0.90], ("bn", 2): [0.80, 0.80, 0.81],
            ("wn", 32): [0.85, 0.85, 0.86], ("wn", 2): [0.85, 0.85, 0.86]}
    gap = _cells(test, train={("bn", 32): [0.92, 0.93, 0.92], ("wn", 32): [0.97, 0.97, 0.98]})
    assert _verdicts(study, gap)["WN"] is True
    no_gap = _cells(test, train={("bn", 32): [0.97, 0.98, 0.97], ("wn", 32): [0.86, 0.86, 0.87]})
    assert _verdicts(study, no_gap)["WN"] is False


def test_synchronized_claims():
    study = StudyConfig(methods=("bn", "syncbn", "sn", "syncsn"), batch_sizes=(2, 32),
                        update_size=32, **THREE)
    cells = _cells({("bn", 32): [0.95, 0.96, 0.95], ("bn", 2): [0.85, 0.86, 0.84],
                    ("syncbn", 2): [0.95, 0.96, 0.95], ("syncbn", 32): [0.95, 0.96, 0.95],
                    ("sn", 2): [0.90, 0.91, 0.90], ("sn", 32): [0.92, 0.92, 0.93],
                    ("syncsn", 2): [0.92, 0.93, 0.92], ("syncsn", 32): [0.92, 0.92, 0.93]})
    assert _verdicts(study, cells)["SyncBN"] is True and _verdicts(study, cells)["SyncSN"] is True
    worse = {**cells, **_cells({("syncbn", 2): [0.88, 0.87, 0.88],
                                ("syncsn", 2): [0.85, 0.86, 0.85]})}
    assert _verdicts(study, worse)["SyncBN"] is False and _verdicts(study, worse)["SyncSN"] is False


@pytest.mark.parametrize("seeds", [(0,), (0, 1)])
def test_fewer_than_three_seeds_are_not_judged(seeds):
    cells = _cells({("bn", 32): [0.95] * len(seeds), ("bn", 2): [0.85] * len(seeds)})
    (claim,) = claims(StudyConfig(methods=("bn",), batch_sizes=(2, 32), update_size=32,
                                  seeds=seeds), cells)
    assert claim.supported is None and "not judged" in claim.evidence


@pytest.mark.parametrize("seeds", [(0,), (0, 1, 2)])
def test_a_claim_comparing_two_settings_is_not_assessed_on_one(seeds):
    # with one batch size the "small" and "large" settings are the same runs
    study = StudyConfig(methods=("bn", "gn", "wn"), batch_sizes=(32,), update_size=32,
                        seeds=seeds)
    acc = [0.9, 0.91, 0.9][:len(seeds)]
    cells = _cells({("bn", 32): acc, ("gn", 32): acc, ("wn", 32): acc})
    found = {c.claim.split(" ")[0]: c for c in claims(study, cells)}
    for name in ("BN", "GN"):
        assert found[name].supported is None and not found[name].assessable
        assert "the grid has one setting, (1, 32): not assessable" in found[name].evidence
    assert found["WN"].assessable  # one setting is all it compares


def test_a_report_says_not_assessable(tmp_path):
    from refnorm.train.study import write_report

    study = StudyConfig(methods=("bn",), batch_sizes=(32,), update_size=32, seeds=(0,))
    history = [{"epoch": 1, "test_acc": 0.9, "train_acc": 0.95}]
    runs = [{"config": {"norm": "bn", "weight": None, "batch_size": 32, "seed": 0},
             "history": history, "seconds": 1.0}]
    write_report(study, runs, tmp_path, 1.0)
    report = (tmp_path / "report.md").read_text()
    assert "**not assessable** by this grid" in report and "**supported**" not in report


def test_a_study_folder_problem_comes_before_any_run(tmp_path, monkeypatch):
    import refnorm.train.study as study_module
    from refnorm.train.folder import OutputFolderError

    def never(*args, **kwargs):
        raise AssertionError("a run started before the folder was checked")

    monkeypatch.setattr(study_module, "_run", never)
    (tmp_path / "report.md").mkdir()
    study = StudyConfig(methods=("bn",), batch_sizes=(32,), update_size=32, seeds=(0,))
    with pytest.raises(OutputFolderError, match="report.md is a folder, where the study"):
        run_study(study, tmp_path, jobs=1)


def test_a_run_its_data_cannot_train_stops_the_study_before_any_run(tmp_path, monkeypatch):
    """On 4x4 images IN's statistics at the third block span one value: the grid is refused
    before its BN runs train (they trained first, and the study then failed on IN)."""
    import refnorm.train.study as study_module
    from refnorm.train.config import TrainConfig
    from refnorm.train.loop import train
    from tests.train.test_data import write_mnist

    rng = np.random.default_rng(0)
    write_mnist(tmp_path / "tiny", [rng.integers(0, 256, (40, 4, 4), dtype=np.uint8),
                                    rng.integers(0, 10, 40, dtype=np.uint8),
                                    rng.integers(0, 256, (8, 4, 4), dtype=np.uint8),
                                    rng.integers(0, 10, 8, dtype=np.uint8)])
    data = f"mnist:{tmp_path / 'tiny'}"
    with pytest.raises(ValueError) as alone:  # what the IN run says when it trains alone
        train(TrainConfig(norm="in", data=data, batch_size=4, accumulation=2), progress=False)

    def never(*args, **kwargs):
        raise AssertionError("a run started before every run's data was checked")

    monkeypatch.setattr(study_module, "_run", never)
    study = StudyConfig(methods=("bn", "in"), batch_sizes=(4,), update_size=8, seeds=(0,),
                        data=data)
    with pytest.raises(ValueError) as refused:
        run_study(study, tmp_path / "study", jobs=1)
    assert str(refused.value) == str(alone.value)
    assert "at block 3, where --norm in computes" in str(refused.value)
    assert not (tmp_path / "study").exists()  # refused before its folder was made


def test_a_report_marks_a_missing_cell_and_reads_one_seed_no_further(tmp_path):
    from refnorm.train.study import write_report

    study = StudyConfig(methods=("bn", "gn"), batch_sizes=(2, 32), update_size=32, seeds=(0,))

    def run(norm, batch, test, train):
        return {"config": {"norm": norm, "weight": None, "batch_size": batch, "seed": 0},
                "history": [{"epoch": 1, "test_acc": test, "train_acc": train}],
                "seconds": 1.0}

    # gn at batch 2 is missing (a study stopped early); gn trails bn by 20 points at 32
    runs = [run("bn", 32, 0.95, 0.99), run("bn", 2, 0.85, 0.9), run("gn", 32, 0.75, 0.8)]
    write_report(study, runs, tmp_path, 1.0)
    report = (tmp_path / "report.md").read_text()
    assert "| gn | — | 75.0 |" in report
    assert "GN trails BN by 20.0 points" in report and "1 seed: not read further" in report
    assert "not worse generalization" not in report


def test_job_configs_train_every_seed_of_every_cell():
    """Each (method, setting) is trained once per seed of the grid, with that seed."""
    study = StudyConfig(methods=("bn", "gn+ws"), batch_sizes=(2, 32), update_size=32, **THREE)
    seeds: dict = {}
    for job in job_configs(study):
        seeds.setdefault((job.norm, job.weight, job.batch_size), []).append(job.seed)
    assert len(seeds) == 4
    assert all(sorted(s) == [0, 1, 2] for s in seeds.values()), seeds


def test_a_grid_must_not_repeat_a_seed():
    """Two runs of one seed would be pooled as two seeds (and their differences paired twice)."""
    with pytest.raises(ValueError, match=r"seeds must not repeat a value; got \(0, 0, 1\)"):
        StudyConfig(seeds=(0, 0, 1))


def test_a_claim_is_judged_on_the_fewest_seeds_of_its_differences():
    """GN's robustness rests on GN's drop and BN's: with GN run on 2 seeds and BN on 3, the
    claim has 2 seeds behind it and is not judged."""
    study = StudyConfig(methods=("bn", "gn"), batch_sizes=(2, 32), update_size=32, **THREE)
    cells = _cells({("bn", 32): [0.95, 0.96, 0.95], ("bn", 2): [0.85, 0.86, 0.84],
                    ("gn", 32): [0.94, 0.94], ("gn", 2): [0.94, 0.95]})
    found = {c.claim.split(" ")[0]: c for c in claims(study, cells)}
    assert found["BN"].supported is True
    assert found["GN"].supported is None
    assert "2 seeds: not judged" in found["GN"].evidence


def test_gn_ws_is_compared_with_bn_at_the_large_setting():
    """GN+WS at the micro-batch setting must match BN at the large one (WS Fig. 1): 5 points
    below it in every seed is not supported, however far above BN at micro-batches."""
    study = StudyConfig(methods=("bn", "gn+ws"), batch_sizes=(2, 32), update_size=32, **THREE)
    bn = {("bn", 32): [0.95, 0.96, 0.95], ("bn", 2): [0.80, 0.81, 0.80]}
    below = _cells({**bn, ("gn+ws", 2): [0.90, 0.91, 0.90], ("gn+ws", 32): [0.9, 0.9, 0.9]})
    assert _verdicts(study, below)["GN+WS"] is False
    level = _cells({**bn, ("gn+ws", 2): [0.95, 0.95, 0.96], ("gn+ws", 32): [0.9, 0.9, 0.9]})
    assert _verdicts(study, level)["GN+WS"] is True


def _with_bn_ratios(cells, ratios):
    """``cells`` with SN's learned BN ratios per seed: {batch: [ratio per seed]}."""
    for b, per_seed in ratios.items():
        cells[("sn", b)]["ratios"] = [
            {"sn1_mean_bn": r, "sn1_var_bn": r, "sn1_mean_in": (1 - r) / 2,
             "sn1_var_in": (1 - r) / 2, "sn1_mean_ln": (1 - r) / 2, "sn1_var_ln": (1 - r) / 2}
            for r in per_seed]
    return cells


def test_sn_ratios_moving_away_from_bn_at_micro_batches_support_the_claim():
    """SN Fig. 4: as the batch shrinks the BN share of SN's ratios falls. A share of 0.6 at
    (1, 32) and 0.3 at (16, 2) supports it; the reverse does not."""
    study = StudyConfig(methods=("sn",), batch_sizes=(2, 32), update_size=32, **THREE)
    acc = {("sn", 2): [0.9, 0.9, 0.9], ("sn", 32): [0.9, 0.9, 0.9]}
    away = _with_bn_ratios(_cells(acc), {32: [0.60, 0.62, 0.61], 2: [0.30, 0.33, 0.31]})
    assert _verdicts(study, away)["SN's"] is True
    toward = _with_bn_ratios(_cells(acc), {32: [0.30, 0.33, 0.31], 2: [0.60, 0.62, 0.61]})
    assert _verdicts(study, toward)["SN's"] is False


def test_syncsn_level_with_sn_is_at_least_as_good():
    """'At least as good' (SN Table 7): SyncSN within noise of SN at micro-batches supports
    it; only a significant shortfall does not."""
    study = StudyConfig(methods=("sn", "syncsn"), batch_sizes=(2, 32), update_size=32, **THREE)
    cells = _cells({("sn", 2): [0.91, 0.91, 0.91], ("sn", 32): [0.92, 0.92, 0.93],
                    ("syncsn", 2): [0.90, 0.92, 0.91], ("syncsn", 32): [0.92, 0.92, 0.93]})
    assert _verdicts(study, cells)["SyncSN"] is True


def test_syncsn_claim_is_assessed_on_one_setting():
    """SyncSN against SN compares two methods at one setting: a grid of one batch size can
    judge it (as it judges the WN claim)."""
    study = StudyConfig(methods=("sn", "syncsn"), batch_sizes=(32,), update_size=32, **THREE)
    cells = _cells({("sn", 32): [0.91, 0.92, 0.91], ("syncsn", 32): [0.91, 0.92, 0.91]})
    found = {c.claim.split(" ")[0]: c for c in claims(study, cells)}
    assert found["SyncSN"].assessable and found["SyncSN"].supported is True


def _one_epoch_run(norm, batch, seed, test, train):
    return {"config": {"norm": norm, "weight": None, "batch_size": batch, "seed": seed},
            "history": [{"epoch": 1, "test_acc": test, "train_acc": train}], "seconds": 1.0}


def test_report_table_gives_the_sample_standard_deviation(tmp_path):
    """The table's ± is the sample standard deviation over seeds (ddof 1, as the report says):
    90, 92 and 94% give 92.0 ± 2.0."""
    from refnorm.train.study import write_report

    study = StudyConfig(methods=("bn",), batch_sizes=(32,), update_size=32, **THREE)
    runs = [_one_epoch_run("bn", 32, s, acc, 0.99) for s, acc in enumerate((0.90, 0.92, 0.94))]
    write_report(study, runs, tmp_path, 1.0)
    assert "| bn | 92.0 ± 2.0 |" in (tmp_path / "report.md").read_text()


def test_report_reads_train_accuracy_from_the_runs(tmp_path):
    """The report's train accuracies are the runs' last train accuracies, not their test
    accuracies."""
    from refnorm.train.study import write_report

    study = StudyConfig(methods=("bn", "gn"), batch_sizes=(32,), update_size=32, seeds=(0,))
    runs = [_one_epoch_run("bn", 32, 0, 0.95, 0.99), _one_epoch_run("gn", 32, 0, 0.75, 0.80)]
    write_report(study, runs, tmp_path, 1.0)
    assert "Its train accuracy is 80.0% (BN 99.0%)" in (tmp_path / "report.md").read_text()


def test_convergence_note_reads_three_seeds_of_train_accuracy():
    """GN trailing BN in test accuracy: significantly lower train accuracy means it is still
    fitting the training set; train accuracy level with BN's means the gap is generalization."""
    from refnorm.train.study import convergence_note

    study = StudyConfig(methods=("bn", "gn"), batch_sizes=(32,), update_size=32, **THREE)
    test = {("bn", 32): [0.95, 0.96, 0.95], ("gn", 32): [0.85, 0.86, 0.85]}
    slow = _cells(test, train={("bn", 32): [0.99, 0.99, 0.99], ("gn", 32): [0.80, 0.82, 0.81]})
    assert "still fitting the training set" in convergence_note(study, slow)
    fits = _cells(test, train={("bn", 32): [0.99, 0.99, 0.99], ("gn", 32): [0.99, 0.98, 0.99]})
    assert "the gap is in generalization" in convergence_note(study, fits)


def test_a_grid_must_name_a_known_launcher():
    with pytest.raises(ValueError, match="launcher must be one of inprocess, mpi; got 'slurm'"):
        StudyConfig(launcher="slurm")


def test_gn_ws_above_bn_at_the_large_setting_matches_it():
    """'Matches' is 'not significantly worse' (WS Fig. 1): GN+WS at micro-batches 3 points
    above BN at the large setting in every seed supports the claim."""
    study = StudyConfig(methods=("bn", "gn+ws"), batch_sizes=(2, 32), update_size=32, **THREE)
    cells = _cells({("bn", 32): [0.90, 0.91, 0.90], ("bn", 2): [0.80, 0.81, 0.80],
                    ("gn+ws", 2): [0.93, 0.94, 0.93], ("gn+ws", 32): [0.93, 0.94, 0.93]})
    assert _verdicts(study, cells)["GN+WS"] is True


def test_wn_training_as_well_as_bn_and_testing_as_well_is_not_the_claim():
    """Gitman & Ginsburg: WN tests worse than BN. WN level with BN in test accuracy (and
    higher in train accuracy) does not support it."""
    study = StudyConfig(methods=("bn", "wn"), batch_sizes=(2, 32), update_size=32, **THREE)
    test = {("bn", 32): [0.90, 0.91, 0.90], ("bn", 2): [0.80, 0.80, 0.81],
            ("wn", 32): [0.90, 0.91, 0.90], ("wn", 2): [0.90, 0.91, 0.90]}
    level = _cells(test, train={("bn", 32): [0.92, 0.93, 0.92], ("wn", 32): [0.97, 0.97, 0.98]})
    assert _verdicts(study, level)["WN"] is False


@pytest.mark.parametrize(("gn", "noted"), [(0.89, True), (0.91, False)])
def test_convergence_note_is_written_for_a_gap_over_five_points(gn, noted):
    """BN at 95%: GN at 89% trails it by 6 points (a note), at 91% by 4 (none)."""
    from refnorm.train.study import convergence_note

    study = StudyConfig(methods=("bn", "gn"), batch_sizes=(32,), update_size=32, seeds=(0,))
    note = convergence_note(study, _cells({("bn", 32): [0.95], ("gn", 32): [gn]}))
    assert (note is not None) == noted
    if noted:
        assert note.startswith("GN trails BN by 6.0 points at (1, 32).")


def test_convergence_note_gives_the_last_epochs_gain_in_test_accuracy():
    """The gain is the last epoch's: GN's test accuracy 70, 80, 85% over three epochs rose 5
    points in the last one (15 since the first)."""
    from refnorm.train.study import convergence_note

    study = StudyConfig(methods=("bn", "gn"), batch_sizes=(32,), update_size=32, seeds=(0,))
    cells = _cells({("bn", 32): [0.95], ("gn", 32): [0.85]})
    cells[("gn", 32)]["histories"] = [[{"test_acc": a} for a in (0.70, 0.80, 0.85)]]
    assert "still rose 5.0 points in the last epoch" in convergence_note(study, cells)


def test_report_names_the_rows_that_are_flat_by_construction(tmp_path):
    """A method without batch statistics (GN+WS, and WN alone: no activation normalizer)
    trains alike at every setting; BN and SyncBN do not, and are not named."""
    from refnorm.train.study import write_report

    study = StudyConfig(methods=("bn", "wn", "syncbn", "gn+ws"), batch_sizes=(32,),
                        update_size=32, seeds=(0,))
    runs = [{"config": {"norm": norm, "weight": weight, "batch_size": 32, "seed": 0},
             "history": [{"epoch": 1, "test_acc": 0.9, "train_acc": 0.9}], "seconds": 1.0}
            for norm, weight in (("bn", None), ("none", "wn"), ("syncbn", None), ("gn", "ws"))]
    write_report(study, runs, tmp_path, 1.0)
    assert "\nwn, gn+ws never compute statistics across samples:" in (
        tmp_path / "report.md").read_text()


def test_sn_ratio_evidence_gives_the_shares_and_their_paired_difference():
    """BN shares 0.60, 0.62, 0.61 at (1, 32) and 0.30, 0.33, 0.31 at (16, 2): means 0.61 and
    0.31, per-seed differences 0.30, 0.29, 0.30 (mean 0.297, standard error 0.0033)."""
    study = StudyConfig(methods=("sn",), batch_sizes=(2, 32), update_size=32, **THREE)
    acc = {("sn", 2): [0.9, 0.9, 0.9], ("sn", 32): [0.9, 0.9, 0.9]}
    cells = _with_bn_ratios(_cells(acc), {32: [0.60, 0.62, 0.61], 2: [0.30, 0.33, 0.31]})
    (claim,) = claims(study, cells)
    assert ("0.31 at (16, 2) vs 0.61 at (1, 32) (difference 0.297 ± 0.003)"
            in claim.evidence)


def test_accuracy_plot_bars_are_the_sample_standard_deviation(tmp_path, saved_figures):
    """90, 92 and 94% over three seeds: a point at 92 with a bar from 90 to 94 (± 2.0, the
    table's ddof-1 deviation)."""
    from refnorm.train.study import write_report

    study = StudyConfig(methods=("bn",), batch_sizes=(32,), update_size=32, **THREE)
    runs = [_one_epoch_run("bn", 32, s, acc, 0.99) for s, acc in enumerate((0.90, 0.92, 0.94))]
    write_report(study, runs, tmp_path, 1.0)
    (fig,) = saved_figures
    (ax,) = fig.axes
    (bars,) = ax.containers
    point, _, (bar,) = bars.lines
    assert list(point.get_ydata()) == pytest.approx([92.0])
    ((_, low), (_, high)), = bar.get_segments()
    assert (low, high) == pytest.approx((90.0, 94.0))


def test_wn_vs_bn_plot_draws_the_large_settings_epochs(tmp_path, saved_figures):
    """Gitman & Ginsburg Fig. 3 at the large setting (1, 32): each method's train and test
    accuracy per epoch, from its run at batch 32, not at batch 2."""
    from refnorm.train.study import write_report

    study = StudyConfig(methods=("bn", "wn"), batch_sizes=(2, 32), update_size=32, seeds=(0,))

    def run(norm, weight, batch, first, last):
        history = [{"epoch": e, "train_acc": acc + 0.01, "test_acc": acc}
                   for e, acc in ((1, first), (2, last))]
        return {"config": {"norm": norm, "weight": weight, "batch_size": batch, "seed": 0},
                "history": history, "seconds": 1.0}

    runs = [run("bn", None, 2, 0.50, 0.60), run("bn", None, 32, 0.70, 0.80),
            run("none", "wn", 2, 0.30, 0.40), run("none", "wn", 32, 0.10, 0.20)]
    write_report(study, runs, tmp_path, 1.0)
    fig = saved_figures[-1]
    (ax,) = fig.axes
    assert ax.get_title() == "(1, 32) (#devices, #samples per device), seed 0"
    drawn = {line.get_label(): [round(y, 6) for y in line.get_ydata()]
             for line in ax.get_lines()}
    assert drawn == {"bn train": [71.0, 81.0], "bn test": [70.0, 80.0],
                     "wn train": [11.0, 21.0], "wn test": [10.0, 20.0]}


def test_report_numbers_are_the_saved_runs(tmp_path):
    """runs.json holds every run of the grid (its configuration and per-epoch history), and
    the report's table is the mean ± sample standard deviation of their last test accuracies,
    recomputed here from runs.json."""
    import json
    import statistics

    study = StudyConfig(methods=("bn", "gn"), batch_sizes=(8, 16), update_size=16, epochs=1,
                        train_subset=64, seeds=(0, 1))
    report = run_study(study, tmp_path, jobs=1, log=lambda line: None).read_text()
    assert "seeds [0, 1]; 8 runs in " in report
    assert "Mean ± sample standard deviation over seeds (ddof 1" in report
    runs = json.loads((tmp_path / "runs.json").read_text())
    grid = {(r["config"]["norm"], r["config"]["batch_size"], r["config"]["seed"]) for r in runs}
    assert grid == {(m, b, s) for m in ("bn", "gn") for b in (8, 16) for s in (0, 1)}
    assert all(len(r["history"]) == 1 for r in runs)
    for method in ("bn", "gn"):
        cells = []
        for b in (8, 16):
            acc = [100 * r["history"][-1]["test_acc"] for r in runs
                   if (r["config"]["norm"], r["config"]["batch_size"]) == (method, b)]
            cells.append(f"{statistics.mean(acc):.1f} ± {statistics.stdev(acc):.1f}")
        assert f"| {method} | {cells[0]} | {cells[1]} |" in report


def test_a_grid_of_wn_without_bn_has_no_wn_vs_bn_plot(tmp_path):
    """The WN vs BN plot (Gitman & Ginsburg Fig. 3) needs both; a grid of WN alone still
    gets its table and accuracy plot."""
    from refnorm.train.study import write_report

    study = StudyConfig(methods=("wn",), batch_sizes=(32,), update_size=32, seeds=(0,))
    runs = [{"config": {"norm": "none", "weight": "wn", "batch_size": 32, "seed": 0},
             "history": [{"epoch": 1, "test_acc": 0.9, "train_acc": 0.95}], "seconds": 1.0}]
    write_report(study, runs, tmp_path, 1.0)
    report = (tmp_path / "report.md").read_text()
    assert "| wn | 90.0 |" in report and "wn_vs_bn.png" not in report
    assert not (tmp_path / "wn_vs_bn.png").exists()


def test_sn_ratios_are_plotted_when_a_setting_of_sn_is_missing(tmp_path):
    """A study stopped early may hold SN at one setting only: its ratios are still drawn."""
    from refnorm.train.study import write_report

    study = StudyConfig(methods=("sn",), batch_sizes=(2, 32), update_size=32, seeds=(0,))
    ratios = {f"sn1_{kind}_{scope}": 1 / 3 for kind in ("mean", "var")
              for scope in ("in", "ln", "bn")}
    runs = [{"config": {"norm": "sn", "weight": None, "batch_size": 32, "seed": 0},
             "history": [{"epoch": 1, "test_acc": 0.9, "train_acc": 0.95, **ratios}],
             "seconds": 1.0}]
    write_report(study, runs, tmp_path, 1.0)
    assert "![SN ratios per layer](sn_ratios.png)" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "sn_ratios.png").read_bytes()[:4] == b"\x89PNG"


def test_the_mpi_launcher_sends_runs_on_several_devices_to_mpiexec(monkeypatch):
    """With launcher "mpi" a run on 2 devices is started under mpiexec; a run on one device
    trains in this process."""
    from types import SimpleNamespace

    import refnorm.train.study as study_module
    from refnorm.train.config import TrainConfig

    started = []
    history = [{"epoch": 1, "test_acc": 0.5}]
    monkeypatch.setattr(study_module, "run_under_mpiexec",
                        lambda config: started.append(("mpiexec", config.devices)) or history)
    monkeypatch.setattr(study_module, "train", lambda config, **kw: started.append(
        ("in-process", config.devices)) or SimpleNamespace(interrupted=False, history=history))
    for devices in (2, 1):
        run = study_module._run(TrainConfig(devices=devices, batch_size=2), "mpi")
        assert run["history"] == history and run["config"]["devices"] == devices
    assert started == [("mpiexec", 2), ("in-process", 1)]


def test_a_method_has_one_name_however_it_is_spelled(tmp_path):
    """"none+ws" is WS alone, as its runs are labelled ("ws b=32"): the grid names it "ws",
    its report row holds its runs, and "wn" with "none+wn" is one method given twice."""
    from refnorm.train.study import write_report

    assert StudyConfig(methods=("none+ws", "bn")).methods == ("ws", "bn")
    with pytest.raises(ValueError, match=r"methods must not repeat a value; got \('wn', 'wn'\)"):
        StudyConfig(methods=("wn", "none+wn"))
    study = StudyConfig(methods=("none+ws",), batch_sizes=(32,), update_size=32, seeds=(0,))
    runs = [{"config": {"norm": "none", "weight": "ws", "batch_size": 32, "seed": 0},
             "history": [{"epoch": 1, "test_acc": 0.9, "train_acc": 0.95}], "seconds": 1.0}]
    write_report(study, runs, tmp_path, 1.0)
    assert "| ws | 90.0 |" in (tmp_path / "report.md").read_text()


def test_the_mpi_launcher_without_mpiexec_is_refused_before_any_run(tmp_path, monkeypatch):
    """Its first run on one device would train in-process, and the grid fail at its first run
    on several: refused before any run, leaving no folder behind."""
    import refnorm.launch
    import refnorm.train.study as study_module

    def never(*args, **kwargs):
        raise AssertionError("a run started before mpiexec was looked for")

    monkeypatch.setattr(refnorm.launch, "find_mpiexec", lambda: None)
    monkeypatch.setattr(study_module, "_run", never)
    study = StudyConfig(methods=("bn",), batch_sizes=(16, 2), update_size=16, seeds=(0,),
                        train_subset=64, launcher="mpi")
    with pytest.raises(ValueError, match=r"launcher 'mpi' needs mpiexec"):
        run_study(study, tmp_path / "study", jobs=1)
    assert not (tmp_path / "study").exists()


def test_convergence_note_says_when_the_last_epoch_lost_test_accuracy():
    """GN's test accuracy 80, 90, 85% over three epochs fell 5 points in the last one."""
    from refnorm.train.study import convergence_note

    study = StudyConfig(methods=("bn", "gn"), batch_sizes=(32,), update_size=32, seeds=(0,))
    cells = _cells({("bn", 32): [0.95], ("gn", 32): [0.85]})
    cells[("gn", 32)]["histories"] = [[{"test_acc": a} for a in (0.80, 0.90, 0.85)]]
    note = convergence_note(study, cells)
    assert "its test accuracy fell 5.0 points in the last epoch" in note and "rose" not in note


@pytest.mark.parametrize("stop", [RuntimeError("a run failed"), KeyboardInterrupt()])
def test_a_study_that_stops_removes_the_folders_it_made(tmp_path, monkeypatch, stop):
    """A run's error (or an interrupt) before the report: the folders the study created for
    ``out`` go while empty, as a training run's do; a folder that was there stays."""
    import refnorm.train.study as study_module

    def fails(*args, **kwargs):
        raise stop

    monkeypatch.setattr(study_module, "_run", fails)
    study = StudyConfig(methods=("bn",), batch_sizes=(32,), update_size=32, seeds=(0,))
    with pytest.raises(type(stop)):
        run_study(study, tmp_path / "made" / "here", jobs=1)
    assert not (tmp_path / "made").exists()
    with pytest.raises(type(stop)):
        run_study(study, tmp_path, jobs=1)
    assert tmp_path.is_dir()


def test_a_plot_the_report_does_not_draw_is_not_left_from_an_earlier_study(tmp_path):
    """A second study into the same folder, without SN and WN: the first study's SN-ratio
    and WN-vs-BN plots would sit beside a report that does not show them."""
    from refnorm.train.study import write_report

    for name in ("sn_ratios.png", "wn_vs_bn.png"):
        (tmp_path / name).write_bytes(b"an earlier study's plot")
    study = StudyConfig(methods=("bn",), batch_sizes=(32,), update_size=32, seeds=(0,))
    runs = [{"config": {"norm": "bn", "weight": None, "batch_size": 32, "seed": 0},
             "history": [{"epoch": 1, "test_acc": 0.9, "train_acc": 0.95}], "seconds": 1.0}]
    write_report(study, runs, tmp_path, 1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy_vs_batch.png", "report.md"]


def test_report_sentences_agree_with_one_method_and_one_epoch(tmp_path):
    """One method without batch statistics is "it", one epoch is not "1 epochs"."""
    from refnorm.train.study import write_report

    study = StudyConfig(methods=("bn", "gn"), batch_sizes=(32,), update_size=32, seeds=(0,),
                        epochs=1)
    runs = [{"config": {"norm": norm, "weight": None, "batch_size": 32, "seed": 0},
             "history": [{"epoch": 1, "test_acc": 0.9, "train_acc": 0.9}], "seconds": 1.0}
            for norm in ("bn", "gn")]
    write_report(study, runs, tmp_path, 1.0)
    report = (tmp_path / "report.md").read_text()
    assert "\ngn never computes statistics across samples:" in report
    assert "so its row is flat by construction" in report
    assert " 1 epoch; " in report and "1 epochs" not in report


def test_a_grid_that_tests_no_claim_says_so_under_the_claims_heading(tmp_path):
    """GN alone at one setting holds no claim's cells: the section says so instead of
    standing empty, and one run is "1 run"."""
    from refnorm.train.study import write_report

    study = StudyConfig(methods=("gn",), batch_sizes=(32,), update_size=32, seeds=(0,))
    runs = [{"config": {"norm": "gn", "weight": None, "batch_size": 32, "seed": 0},
             "history": [{"epoch": 1, "test_acc": 0.9, "train_acc": 0.9}], "seconds": 1.0}]
    write_report(study, runs, tmp_path, 1.0)
    report = (tmp_path / "report.md").read_text()
    assert "## The papers' claims, against this run\n\nNone: each needs cells this grid does " \
           "not hold" in report
    assert " 1 run in " in report


def test_a_study_on_a_folder_another_run_holds_is_refused_before_any_run(tmp_path, monkeypatch):
    """One writer per folder: a study, like a training run, takes the folder's lock, and a
    live holder (another study or run) makes it stop before its first run."""
    import refnorm.train.study as study_module
    from refnorm.train.folder import FolderBusy, FolderLock

    def never(*args, **kwargs):
        raise AssertionError("a run started in a folder another run holds")

    monkeypatch.setattr(study_module, "_run", never)
    study = StudyConfig(methods=("bn",), batch_sizes=(32,), update_size=32, seeds=(0,))
    with FolderLock(tmp_path), pytest.raises(FolderBusy, match=str(os.getpid())):
        run_study(study, tmp_path, jobs=1)


@pytest.mark.parametrize(("status", "signum"), [(130, signal.SIGINT), (143, signal.SIGTERM)])
def test_a_run_under_mpiexec_stopped_by_a_signal_stops_the_study(monkeypatch, status, signum):
    """mpiexec's status 130 or 143 (its ranks stopped by SIGINT or SIGTERM, no error.json)
    raises Interrupted with that signal, as an interrupted in-process run does: the run did
    not finish, and its metrics.json holds only the epochs before the stop."""
    import subprocess

    import refnorm.train.study as study_module
    from refnorm.train.config import TrainConfig
    from refnorm.train.interrupt import Interrupted

    monkeypatch.setattr(study_module, "_mpiexec", lambda: "mpiexec")
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: subprocess.CompletedProcess(
        args, status, "", ""))
    with pytest.raises(Interrupted) as stop:
        study_module.run_under_mpiexec(TrainConfig(devices=2, batch_size=2))
    assert stop.value.signum == signum


def test_job_configs_train_with_the_grids_rate_subset_and_dtype():
    """Every run of the grid trains as the study says: its epochs, learning rate, training
    subset, dtype and data, whatever its method, setting and seed."""
    study = StudyConfig(methods=("bn", "gn+ws"), batch_sizes=(2, 8), update_size=8, epochs=2,
                        seeds=(0, 1), lr=0.01, train_subset=96, dtype="float64")
    jobs = job_configs(study)
    assert len(jobs) == 2 * 2 * 2
    assert {(j.epochs, j.lr, j.train_subset, j.dtype, j.data) for j in jobs} == {
        (2, 0.01, 96, "float64", "digits")}


def test_report_names_instance_norm_among_the_flat_rows(tmp_path):
    """IN normalizes each sample's channels over its own H x W (no statistic across samples),
    so its row, as GN's and LN's, is flat by construction."""
    from refnorm.train.study import write_report

    study = StudyConfig(methods=("bn", "in"), batch_sizes=(32,), update_size=32, seeds=(0,))
    runs = [_one_epoch_run(norm, 32, 0, 0.9, 0.9) for norm in ("bn", "in")]
    write_report(study, runs, tmp_path, 1.0)
    assert "\nin never computes statistics across samples:" in (
        tmp_path / "report.md").read_text()


def test_a_report_of_one_seed_gives_no_standard_deviation_note(tmp_path):
    """One seed has no spread: the table has no ± and the report says nothing of a standard
    deviation over seeds."""
    from refnorm.train.study import write_report

    study = StudyConfig(methods=("bn",), batch_sizes=(32,), update_size=32, seeds=(0,))
    write_report(study, [_one_epoch_run("bn", 32, 0, 0.9, 0.95)], tmp_path, 1.0)
    report = (tmp_path / "report.md").read_text()
    assert "| bn | 90.0 |" in report
    assert "standard deviation" not in report and "±" not in report


def test_claim_evidence_quotes_test_accuracy_and_one_seed_has_no_error():
    """BN at 95% (test; 99% train) at (1, 32) and 85% (97% train) at (16, 2): the evidence
    gives the test accuracies and their 10-point drop, with no ± for one seed."""
    study = StudyConfig(methods=("bn",), batch_sizes=(2, 32), update_size=32, seeds=(0,))
    cells = _cells({("bn", 32): [0.95], ("bn", 2): [0.85]},
                   train={("bn", 32): [0.99], ("bn", 2): [0.97]})
    (claim,) = claims(study, cells)
    assert claim.evidence.startswith(
        "BN 95.0% at (1, 32) vs 85.0% at (16, 2): a drop of 10.0 points; 1 seed: not judged")


def test_syncbn_significantly_above_bn_does_not_recover_it():
    """'Recovers' is 'no significant difference' (the evidence's criterion): SyncBN 5 points
    above BN at the large setting in every seed is a difference, not a recovery."""
    study = StudyConfig(methods=("bn", "syncbn"), batch_sizes=(2, 32), update_size=32, **THREE)
    cells = _cells({("bn", 32): [0.90, 0.91, 0.90], ("bn", 2): [0.85, 0.86, 0.84],
                    ("syncbn", 2): [0.95, 0.96, 0.95], ("syncbn", 32): [0.90, 0.91, 0.90]})
    assert _verdicts(study, cells)["SyncBN"] is False


def test_syncbn_is_compared_with_bn_on_one_device_with_the_whole_update():
    """SyncBN at (P, b) pools the statistics of all P x b samples, as BN on one device with
    the whole update: SyncBN at (P, 2) recovers BN at (1, 2P). A grid whose largest setting
    still splits the update, (2, 4) of 8 samples, holds no such BN: the claim is left out."""
    acc = {("bn", 4): [0.90, 0.91, 0.90], ("bn", 2): [0.85, 0.86, 0.84],
           ("syncbn", 2): [0.95, 0.96, 0.95], ("syncbn", 4): [0.95, 0.96, 0.95]}
    split = StudyConfig(methods=("bn", "syncbn"), batch_sizes=(2, 4), update_size=8, **THREE)
    assert "SyncBN" not in _verdicts(split, _cells(acc))
    whole = StudyConfig(methods=("bn", "syncbn"), batch_sizes=(2, 4, 8), update_size=8,
                        **THREE)
    cells = _cells({**acc, ("bn", 8): [0.95, 0.96, 0.95], ("syncbn", 8): [0.95, 0.96, 0.95]})
    found = {c.claim.split(" ")[0]: c for c in claims(whole, cells)}
    assert found["SyncBN"].claim.startswith("SyncBN at (4, 2) recovers BN at (1, 8)")
    assert found["SyncBN"].supported is True


@pytest.mark.parametrize(("changes", "error", "message"), [
    ({"methods": ()}, ValueError, r"methods must hold at least one value; got \(\)"),
    ({"batch_sizes": ()}, ValueError, r"batch_sizes must hold at least one value; got \(\)"),
    ({"seeds": ()}, ValueError, r"seeds must hold at least one value; got \(\)"),
    ({"batch_sizes": (0, 2)}, ValueError, r"every batch size must be an int >= 1; got 0"),
    ({"batch_sizes": (2.0,)}, TypeError, r"every batch size must be an int >= 1; got 2.0"),
    ({"update_size": 0, "batch_sizes": (2,)}, ValueError,
     r"update_size must be an int >= 1; got 0"),
])
def test_a_grid_without_runs_or_with_a_size_below_one_is_refused(changes, error, message):
    """A grid with no method, setting or seed trains nothing (and a report of no setting
    failed after writing runs.json); a batch size of 0 divided the update size by zero."""
    with pytest.raises(error, match=message):
        StudyConfig(**changes)

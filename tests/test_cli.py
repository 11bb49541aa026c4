"""The ``refnorm`` command line."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from refnorm import registry
from refnorm.cli import format_table, main, summarize
from refnorm.gradcheck import CaseResult, GradError
from refnorm.layer import CheckCase
from refnorm.norms import BatchNorm
from refnorm.train.checkpoint import CHECKPOINT


def test_gradcheck_all_json_lists_every_normalizer_and_gradient(capsys):
    assert main(["gradcheck", "--all", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    pairs = {(r["normalizer"], r["gradient"]) for r in rows}
    assert pairs >= {(n, g) for n in ("bn", "in", "ln", "gn") for g in ("x", "gamma", "beta")}
    for row in rows:
        assert row["max_rel_error"] < 1e-6 and row["passed"] is True
        assert row["max_rel_error"] == max(c["max_rel_error"] for c in row["cases"])
        assert row["tolerance"] == 1e-6
        for case in row["cases"]:  # check_vjp's measure, with its floor and the raw ratio
            assert case["fd_noise"] > 0 and case["raw_rel_error"] >= case["max_rel_error"]


def _case(error: GradError) -> list[CaseResult]:
    return [CaseResult("sn", (2, 3), {}, True, {"mean_logits": error})]


def test_gradcheck_rows_use_the_noise_floor():
    # A deviation within the floor passes although the pure ratio (1e-4) is far above 1e-6;
    # the same deviation with no floor fails.
    within = GradError(0.0, 1e-9, scale=1e-5, fd_noise=2e-9)
    row = summarize(_case(within), 1e-6)[0]
    assert row["passed"] is True and row["cases"][0]["raw_rel_error"] == pytest.approx(1e-4)
    assert row["noise_ratio"] == pytest.approx(0.5)
    beyond = GradError(1e-4, 1e-9, scale=1e-5, fd_noise=0.0)
    assert summarize(_case(beyond), 1e-6)[0]["passed"] is False


def test_an_error_equal_to_the_tolerance_passes_and_a_nan_fails():
    """--tolerance is the largest acceptable error: equal to it passes; NaN is no error bound
    (NaN <= tolerance is False, but so is NaN > tolerance)."""
    at = GradError(1e-6, 1e-6, scale=1.0, fd_noise=0.0)
    assert summarize(_case(at), 1e-6)[0]["passed"] is True
    nan = GradError(math.nan, math.nan, scale=1.0, fd_noise=0.0)
    assert summarize(_case(nan), 1e-6)[0]["passed"] is False


def test_deviation_over_noise_is_infinite_over_a_zero_floor_and_zero_when_exact():
    """deviation/noise: a deviation over a floor of 0 is beyond any number of floors (inf); an
    exact agreement is 0 whatever the floor, 0 included (not 0/0)."""
    beyond = GradError(1e-4, 1e-9, scale=1e-5, fd_noise=0.0)
    assert summarize(_case(beyond), 1e-6)[0]["cases"][0]["noise_ratio"] == math.inf
    exact = GradError(0.0, 0.0, scale=1.0, fd_noise=0.0)
    row = summarize(_case(exact), 1e-6)[0]
    assert row["noise_ratio"] == 0.0 and row["cases"][0]["noise_ratio"] == 0.0


def test_gradcheck_table_shows_the_tolerance_it_applies():
    """--tolerance 1.5e-6: the table reads 1.5e-06, the bound its FAIL was judged by (it read
    2e-06, above the failing error 1.70e-06)."""
    beyond = GradError(1.7e-6, 1.7e-6, scale=1.0, fd_noise=0.0)
    line = format_table(summarize(_case(beyond), 1.5e-6)).splitlines()[2].split()
    assert line[2] == "1.70e-06" and line[-1] == "FAIL"
    assert float(line[4]) == 1.5e-6


def test_gradcheck_table_counts_the_cases_of_each_gradient():
    """One gradient checked on three cases: one row whose "cases" column reads 3."""
    error = GradError(0.0, 0.0, scale=1.0, fd_noise=1e-9)
    results = [CaseResult("sn", shape, {}, True, {"mean_logits": error})
               for shape in ((2, 3), (4, 3), (2, 3, 5))]
    table = format_table(summarize(results, 1e-6)).splitlines()
    assert table[2].split()[5] == "3" and "all 1 gradients within the tolerance" in table[-1]


def test_gradcheck_table(capsys):
    assert main(["gradcheck", "ln", "gn"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["normalizer", "gradient", "error", "deviation/noise",
                                           "tolerance", "cases", "status"]
    assert "all 6 gradients within the tolerance" in out
    assert " bn " not in out


class _WrongBackwardBatchNorm(BatchNorm):
    """BatchNorm whose backward forgets the mean term: refnorm gradcheck must fail it."""

    check_cases = (CheckCase((4, 2)),)

    def _backward(self, dy, cache):
        dx, grads = super()._backward(dy, cache)
        return dx + 0.1 * cache.gamma * cache.rstd.reshape(-1) * np.mean(dy, axis=0), grads


@pytest.fixture
def wrong_layer_registered(monkeypatch):
    table = {**registry._TABLE, "wrong": _WrongBackwardBatchNorm}
    monkeypatch.setattr(registry, "_TABLE", table)
    return "wrong"


def test_gradcheck_fails_a_wrong_backward(capsys, wrong_layer_registered):
    assert main(["gradcheck", wrong_layer_registered, "--json"]) == 1
    rows = {r["gradient"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["x"]["passed"] is False and rows["x"]["max_rel_error"] > 1e-3
    assert rows["gamma"]["passed"] is True
    assert main(["gradcheck", wrong_layer_registered]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "1 of 3 gradients exceed the tolerance" in out


class _NaNBackwardBatchNorm(BatchNorm):
    """BatchNorm whose dx is NaN: its error is infinite."""

    check_cases = (CheckCase((4, 2)),)

    def _backward(self, dy, cache):
        dx, grads = super()._backward(dy, cache)
        return dx * np.nan, grads


def test_gradcheck_json_writes_an_infinite_error_as_a_string(capsys, monkeypatch):
    """JSON has no infinity: json.dumps wrote the bare token Infinity, which parsers other
    than Python's refuse (RFC 8259)."""
    monkeypatch.setattr(registry, "_TABLE", {**registry._TABLE, "nanbn": _NaNBackwardBatchNorm})
    assert main(["gradcheck", "nanbn", "--json"]) == 1

    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    rows = {r["gradient"]: r for r in json.loads(capsys.readouterr().out,
                                                 parse_constant=refuse)}
    assert rows["x"]["max_rel_error"] == "inf" and rows["x"]["passed"] is False
    assert rows["gamma"]["passed"] is True


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["gradcheck"], "name at least one normalizer, or pass --all"),
        (["gradcheck", "bn", "--all"], "give NAMEs or --all, not both"),
        (["gradcheck", "xn"], "unknown normalizer(s) 'xn'"),
        (["gradcheck", ""], "unknown normalizer(s) ''; expected"),  # named, even when empty
    ],
)
def test_gradcheck_usage_errors(argv, message, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(f"refnorm gradcheck: error: {message}")


def test_gradcheck_judges_by_the_tolerance_given(capsys, wrong_layer_registered):
    """The wrong backward's relative error is at most 2 (|a - n| / max(|a|, |n|) <= 2): under
    --tolerance 2 every gradient passes, and each row carries the tolerance given."""
    assert main(["gradcheck", wrong_layer_registered, "--json", "--tolerance", "2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(r["passed"] and r["tolerance"] == 2.0 for r in rows)


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "gradcheck" in capsys.readouterr().out


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "refnorm"
    assert script.exists(), "pip install -e . installs the console script beside python"
    out = subprocess.run([str(script), "gradcheck", "bn", "--json"], capture_output=True,
                         text=True, check=True).stdout
    assert {r["gradient"] for r in json.loads(out)} == {"x", "gamma", "beta"}


def test_python_dash_m():
    proc = subprocess.run([sys.executable, "-m", "refnorm", "gradcheck", "in"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "all 3 gradients within the tolerance" in proc.stdout


# -- refnorm train ----------------------------------------------------------------------------


def test_cli_train_and_resume(tmp_path, capsys):
    args = ["train", "--epochs", "1", "--batch-size", "32", "--out", str(tmp_path)]
    assert main(args) == 0
    assert "final test accuracy" in capsys.readouterr().out
    assert main(args + ["--resume"]) == 0  # nothing left to do: same parameters


def test_cli_missing_data_files_are_named(tmp_path, capsys):
    assert main(["train", "--data", f"mnist:{tmp_path}", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte" in err and "t10k-labels-idx1-ubyte" in err


def test_cli_corrupted_checkpoint(tmp_path, capsys):
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    assert main(["train", "--epochs", "1", "--out", str(tmp_path), "--resume"]) == 2
    assert "corrupted or not a refnorm checkpoint" in capsys.readouterr().err


# -- refnorm study ----------------------------------------------------------------------------


def test_cli_study_passes_its_grid_on(tmp_path, capsys, monkeypatch):
    # The study itself is tested in tests/train/test_study.py; here: the options arrive.
    import refnorm.train.study as study_module

    seen = {}

    def fake_run_study(study, out, *, jobs, log):
        seen.update(study=study, out=out, jobs=jobs)
        return Path(out) / "report.md"

    monkeypatch.setattr(study_module, "run_study", fake_run_study)
    args = ["study", "--quick", "--methods", "gn, gn+ws", "--batch-sizes", "8,16",
            "--update-size", "16", "--epochs", "2", "--seeds", "3", "--jobs", "1",
            "--out", str(tmp_path)]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == f"report: {tmp_path / 'report.md'}"
    study = seen["study"]
    assert (study.methods, study.batch_sizes, study.update_size, study.epochs, study.seeds) == (
        ("gn", "gn+ws"), (8, 16), 16, 2, (0, 1, 2))
    assert study.train_subset == study_module.QUICK.train_subset  # the rest from --quick
    assert seen["jobs"] == 1 and seen["out"] == str(tmp_path)


def test_cli_study_rejects_a_batch_size_that_does_not_divide(tmp_path, capsys):
    args = ["study", "--batch-sizes", "3", "--update-size", "16", "--out", str(tmp_path)]
    assert main(args) == 2
    assert "every batch size must divide update_size=16" in capsys.readouterr().err


# -- argument errors: one line, exit 2 --------------------------------------------------------


BAD_VALUES = {
    "train": {
        "--batch-size": ["0", "-3", "a", "1.5", ""], "--accumulation": ["0", "x"],
        "--epochs": ["0", "-1", "ten"], "--lr": ["0", "-0.1", "nan", "inf", "x"],
        "--weight-decay": ["-1", "nan", "inf"], "--seed": ["-1", "x", "1e3"],
        "--groups": ["0", "y"], "--norm": ["xn", ""], "--weight": ["xx"],
        "--schedule": ["step"], "--sn-inference": ["mean"], "--out": ["", " "],
        "--data": ["imagenet", "mnist:", ""], "--devices": ["0", "-2", "1.5", "two", ""],
    },
    "study": {
        "--batch-sizes": ["a,b", "2,,4", "0", "-2", ""], "--seeds": ["0", "-1", "x"],
        "--update-size": ["0", "x"], "--epochs": ["0"], "--jobs": ["0", "x"],
        "--methods": ["bn,,gn", "xn", ""], "--out": [""], "--launcher": ["slurm"],
    },
    "gradcheck": {"--tolerance": ["nan", "0", "-1", "inf", "x"],
                  "--seed": ["-1", "x", " 3", "3_0", "\u0663"]},  # int() takes the last three
}


def _cases():
    for command, options in BAD_VALUES.items():
        for option, values in options.items():
            for value in values:
                yield command, option, value


@pytest.mark.parametrize(("command", "option", "value"), list(_cases()))
def test_every_bad_value_is_one_line_and_exit_2(command, option, value, capsys, tmp_path,
                                                monkeypatch):
    import refnorm.train.loop as trainer_module
    import refnorm.train.study as study_module

    def never(*args, **kwargs):
        raise AssertionError("training started despite a bad argument")

    monkeypatch.setattr(trainer_module, "run_epoch", never)
    monkeypatch.setattr(study_module, "_run", never)
    argv = [command, option, value]
    argv += ["bn"] if command == "gradcheck" else []
    argv += ["--out", str(tmp_path / "o")] if option != "--out" and command != "gradcheck" else []
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # the error is the first line (and the only one)
    assert err[0].startswith(f"refnorm {command}: error: "), err
    if option not in ("--data", "--methods") or value == "":
        assert option in err[0] or "--out" in err[0] or "folder" in err[0], err


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--seed", "-1"], "argument --seed: expected an integer >= 0; got '-1'"),
    (["study", "--batch-sizes", "a,b"], "argument --batch-sizes: expected comma-separated "
                                        "integers >= 1 (e.g. 2,4,16); got 'a,b'"),
    (["study", "--seeds", "0"], "argument --seeds: expected an integer >= 1; got '0'"),
    (["study", "--methods", "bn,,gn"], "argument --methods: expected comma-separated names "
                                       "(e.g. bn,gn+ws); got 'bn,,gn'"),
    (["gradcheck", "bn", "--tolerance", "nan"], "argument --tolerance: expected a finite "
                                                "number > 0; got 'nan'"),
])
def test_the_reported_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert capsys.readouterr().err == (f"refnorm {argv[0]}: error: {message} "
                                       f"(see refnorm {argv[0]} --help)\n")


# -- train: exit statuses --------------------------------------------------------------------


def test_cli_train_non_finite_exits_3(tmp_path, capsys):
    # lr 1e30: the first update makes the weights huge; the second step's BN variance
    # overflows float32, caught before any checkpoint.
    assert main(["train", "--lr", "1e30", "--epochs", "1", "--out", str(tmp_path)]) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("refnorm train: in step 2 of epoch 1: layer 1 (BatchNorm): the "
                          "variance of x overflows")  # the layer and the array, named
    assert err.endswith("; the run stopped; no checkpoint was written")
    assert not (tmp_path / CHECKPOINT).exists()


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: d.write_text("x"), "is a file, not a folder"),
])
def test_cli_out_refused_before_training(tmp_path, capsys, make, message):
    out = tmp_path / "out"
    make(out)
    assert main(["train", "--epochs", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"refnorm train: error: the output folder {out} {message}"
    assert not any(line.startswith("epoch") for line in err)


def _idx(path: Path, array: np.ndarray) -> None:
    magic = 2051 if array.ndim == 3 else 2049
    header = magic.to_bytes(4, "big") + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize(("train_hw", "n_test", "message"), [
    (8, 0, "the test set of mnist is empty"),
    (2, 4, "images of 2x2 are too small for 3 blocks: their 2 2x2 max-pools need at least 4x4"),
])
def test_cli_unusable_data_refused_before_training(tmp_path, capsys, train_hw, n_test, message):
    rng = np.random.default_rng(0)
    _idx(tmp_path / "train-images-idx3-ubyte", rng.integers(0, 256, (64, train_hw, train_hw)))
    _idx(tmp_path / "train-labels-idx1-ubyte", rng.integers(0, 10, 64))
    _idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, train_hw, train_hw)))
    _idx(tmp_path / "t10k-labels-idx1-ubyte", rng.integers(0, 10, n_test))
    out = tmp_path / "out"
    assert main(["train", "--data", f"mnist:{tmp_path}", "--epochs", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"refnorm train: error: {message}"), err
    assert not any(line.startswith("epoch") for line in err)


def test_cli_hand_edited_checkpoint_is_refused_by_name(tmp_path, capsys):
    args = ["train", "--epochs", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    path = tmp_path / CHECKPOINT
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k != "param/0/w"}
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    capsys.readouterr()
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"refnorm train: error: checkpoint {path} does not match the model: "
                   "lacks param/0/w")


@pytest.mark.parametrize(("value", "refused"), [
    (0, "batch_size must be "),                                   # a ValueError
    ("64", "batch_size must be an int >= 1; got '64'"),           # a TypeError
])
def test_a_refused_value_in_a_checkpoints_configuration_names_the_checkpoint(value, refused,
                                                                             tmp_path, capsys):
    args = ["train", "--epochs", "1", "--batch-size", "64", "--out", str(tmp_path)]
    assert main(args) == 0
    path = tmp_path / CHECKPOINT
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays["meta"].tobytes())
    meta["config"]["batch_size"] = value
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"refnorm train: error: checkpoint {path} holds a configuration "
                          f"refnorm refuses ({refused}"), err


def test_resume_in_a_folder_another_run_holds_says_so(tmp_path, capsys):
    """A run that has not saved its first checkpoint yet holds the folder: a --resume there
    said "no checkpoint to resume from" (it read the checkpoint before the lock)."""
    from refnorm.train.folder import FolderLock

    with FolderLock(tmp_path):
        assert main(["train", "--out", str(tmp_path), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"refnorm train: error: the output folder {tmp_path} is in use by another "
                   f"run (pid {os.getpid()}; lock file {tmp_path / 'train.lock'}); wait for it "
                   "to finish or choose another output folder")


def test_lessons_command_writes_student_copies(tmp_path, capsys):
    assert main(["lessons", "--student", str(tmp_path / "student")]) == 0
    written = sorted(p.name for p in (tmp_path / "student").glob("*.ipynb"))
    assert "01_batch_norm.ipynb" in written and "02_group_norm.ipynb" in written
    assert "blanked" in capsys.readouterr().out


def test_more_devices_than_the_training_set_can_feed(tmp_path, capsys):
    args = ["train", "--devices", "400", "--batch-size", "8", "--epochs", "1", "--out",
            str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith("refnorm train: error: one update needs devices * batch_size * "
                                "accumulation = 3200 samples; the training set has 1438")


# -- resume needs only --out; a folder's checkpoint is not replaced silently -------------------


def test_resume_needs_only_the_output_folder(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--norm", "gn", "--batch-size", "64", "--epochs", "1", "--seed",
                 "3", "--out", out]) == 0
    capsys.readouterr()
    assert main(["train", "--out", out, "--resume"]) == 0
    err = capsys.readouterr().err
    assert err.splitlines()[0] == (f"resuming gn batch 64 x 1 accumulation, 1 epochs, lr 0.05, "
                                   f"seed 3 after epoch 1 -> {out}")
    # an option given must still match the checkpoint
    assert main(["train", "--out", out, "--resume", "--seed", "4"]) == 2
    assert "seed: checkpoint 3, this run 4" in capsys.readouterr().err


def test_a_new_run_does_not_replace_a_checkpoint_unasked(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["train", "--batch-size", "64", "--epochs", "1", "--out", out]
    assert main([*args, "--norm", "gn"]) == 0
    before = (tmp_path / "run" / CHECKPOINT).read_bytes()
    capsys.readouterr()
    assert main([*args, "--norm", "bn"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"refnorm train: error: {out} holds the checkpoint (epoch 1, step 0) of "
                   "another configuration (norm 'gn' there, 'bn' here); choose another --out, "
                   "or replace it with --overwrite")
    assert main([*args, "--norm", "gn"]) == 2  # the same configuration: resume or overwrite
    assert "continue it with --resume, or start again with --overwrite" in (
        capsys.readouterr().err)
    assert (tmp_path / "run" / CHECKPOINT).read_bytes() == before
    assert main([*args, "--norm", "bn", "--overwrite"]) == 0
    assert (tmp_path / "run" / CHECKPOINT).read_bytes() != before


# -- one voice: every error is "refnorm <command>: error: ..." ---------------------------------


@pytest.mark.parametrize(("argv", "message"), [
    (["gradcheck", "bn", "--all"], "refnorm gradcheck: error: give NAMEs or --all, not both"),
    (["gradcheck", "xn"], "refnorm gradcheck: error: unknown normalizer(s) 'xn'; expected some"),
    (["conform", "nosuchmod:Foo", "--method", "bn"],
     "refnorm conform: error: cannot import the module 'nosuchmod' of 'nosuchmod:Foo' "
     "(ModuleNotFoundError: No module named 'nosuchmod')"),
    (["conform", "numpy:NoSuchThing", "--method", "bn"],
     "refnorm conform: error: numpy has no attribute 'NoSuchThing' (from 'numpy:NoSuchThing')"),
])
def test_every_command_speaks_in_one_voice(argv, message, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(message)


def test_lessons_to_a_file_is_one_sentence(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("x")
    assert main(["lessons", "--student", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("refnorm lessons: error: ") and "\n" not in err


@pytest.mark.parametrize(("argv", "refused"), [
    (["study", "--seed", "5"], "unrecognized arguments: --seed 5"),
    (["train", "--epoch", "1"], "unrecognized arguments: --epoch 1"),
    (["gradcheck", "bn", "--tol", "1e-3"], "unrecognized arguments: --tol 1e-3"),
    (["bench", "--rep", "3"], "unrecognized arguments: --rep 3"),
    (["lessons", "--stud", "x"], "the following arguments are required: --student")])
def test_an_abbreviated_option_is_refused_not_taken_for_a_longer_one(argv, refused, capsys,
                                                                     monkeypatch, tmp_path):
    """argparse takes a unique prefix for the option: `study --seed 5` ran `--seeds 5`, five
    seeds of every run where one was meant. Every refnorm command refuses it in one line."""
    import refnorm.train.loop as trainer_module
    import refnorm.train.study as study_module

    def never(*args, **kwargs):
        raise AssertionError("started despite an unknown option")

    monkeypatch.setattr(trainer_module, "run_epoch", never)
    monkeypatch.setattr(study_module, "_run", never)
    monkeypatch.chdir(tmp_path)  # taken as --student, "x" was a folder of lessons written here
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    assert status == 2
    assert capsys.readouterr().err.splitlines() == [
        f"refnorm {argv[0]}: error: {refused} (see refnorm {argv[0]} --help)"]


def test_a_train_error_naming_a_path_with_a_line_break_is_one_line(tmp_path, capsys):
    missing = tmp_path / "two\nlines"
    assert main(["train", "--data", f"mnist:{missing}", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"refnorm train: error: {tmp_path}/two lines ") and err.count("\n") == 1


def test_a_data_error_comes_first_and_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["train", "--data", f"mnist:{tmp_path / 'missing'}", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("refnorm train: error: ")
    assert not out.exists()


def test_train_help_gives_every_default():
    from refnorm.cli import _parser

    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    train = sub.choices["train"]
    flags = {"--help", "--resume", "--overwrite"}  # switches: off unless given
    options = [a for a in train._actions if a.option_strings and not flags & set(a.option_strings)]
    assert len(options) >= 17
    for action in options:
        assert "default" in (action.help or ""), action.option_strings


def test_bench_help_offers_the_gpu_bench(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "--device {cpu,gpu}" in capsys.readouterr().out


def test_train_and_study_outputs_get_the_same_permissions(tmp_path):
    assert main(["train", "--batch-size", "64", "--epochs", "1", "--out",
                 str(tmp_path / "t")]) == 0
    assert main(["study", "--methods", "bn", "--batch-sizes", "16", "--update-size", "16",
                 "--epochs", "1", "--seeds", "1", "--jobs", "1", "--out",
                 str(tmp_path / "s")]) == 0
    modes = {p.name: p.stat().st_mode & 0o777 for d in ("t", "s")
             for p in (tmp_path / d).iterdir() if p.is_file() and not p.name.startswith(".")}
    assert len(set(modes.values())) == 1, modes


# -- options that cannot be honoured: refused, one line, exit 2 ------------------------------


def _never_train(monkeypatch):
    import refnorm.train.loop as trainer_module
    import refnorm.train.study as study_module

    def never(*args, **kwargs):
        raise AssertionError("training started despite a problem found before it")

    monkeypatch.setattr(trainer_module, "run_epoch", never)
    monkeypatch.setattr(study_module, "_run", never)


@pytest.mark.parametrize(("options", "message"), [
    (["--norm", "bn", "--groups", "3"],
     "--groups applies to --norm gn; this run's norm is bn: leave --groups out"),
    (["--norm", "gn", "--sn-inference", "moving_average"],
     "--sn-inference applies to --norm sn or syncsn; this run's norm is gn: leave "
     "--sn-inference out"),
    (["--resume", "--overwrite"],
     "give --resume (continue the run in --out) or --overwrite (start it again), not both"),
])
def test_train_refuses_options_it_would_ignore(options, message, tmp_path, capsys, monkeypatch):
    _never_train(monkeypatch)
    assert main(["train", *options, "--epochs", "1", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"refnorm train: error: {message}\n"


def test_train_takes_the_options_of_its_norm(tmp_path, capsys, monkeypatch):
    import refnorm.cli as cli

    seen = {}
    monkeypatch.setattr(cli, "_train", lambda config, *a, **k: seen.setdefault("c", config) and 0)
    assert main(["train", "--norm", "gn", "--groups", "8", "--out", str(tmp_path)]) == 0
    assert main(["train", "--norm", "syncsn", "--sn-inference", "moving_average", "--out",
                 str(tmp_path / "s")]) == 0
    assert seen["c"].num_groups == 8


@pytest.mark.parametrize(("options", "message"), [
    (["--norm", "in"], "images of 4x4 leave 1x1 maps at block 3, where --norm in computes "
                       "each statistic over one sample's map of one channel: one value"),
    (["--norm", "sn"], "images of 4x4 leave 1x1 maps at block 3, where --norm sn computes"),
    (["--norm", "bn", "--batch-size", "1"],
     "images of 4x4 leave 1x1 maps at block 3, where --norm bn computes each statistic over "
     "the maps of one channel over batch_size=1 sample(s): one value"),
])
def test_one_value_per_statistic_is_refused_before_training(options, message, tmp_path, capsys,
                                                            monkeypatch):
    # 4x4 images pass the max-pools (4x4, 2x2, 1x1), but these normalizers need more than one
    # value per statistic in every block (README: images too small are found before training)
    rng = np.random.default_rng(0)
    for kind, n in (("train", 64), ("t10k", 8)):
        _idx(tmp_path / f"{kind}-images-idx3-ubyte", rng.integers(0, 256, (n, 4, 4)))
        _idx(tmp_path / f"{kind}-labels-idx1-ubyte", rng.integers(0, 10, n))
    _never_train(monkeypatch)
    argv = ["train", "--data", f"mnist:{tmp_path}", "--epochs", "1", "--out",
            str(tmp_path / "out"), *options]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"refnorm train: error: {message}"), err
    assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_images_whose_maps_keep_two_values_are_accepted(tmp_path):
    from refnorm.train.config import TrainConfig
    from refnorm.train.loop import _check_statistics

    for norm in ("in", "sn", "ln", "gn", "syncsn", "none"):
        _check_statistics(TrainConfig(norm=norm), (8, 4))  # 2x1 maps at the last block
    _check_statistics(TrainConfig(norm="ln"), (4, 4))  # LN: 32 channels of a 1x1 map
    _check_statistics(TrainConfig(norm="gn", num_groups=16), (4, 4))  # 2 channels a group
    _check_statistics(TrainConfig(norm="bn", batch_size=2), (4, 4))
    _check_statistics(TrainConfig(norm="syncbn", batch_size=1, devices=2), (4, 4))


def test_a_folder_where_the_checkpoint_goes_is_refused_before_training(tmp_path, capsys,
                                                                       monkeypatch):
    (tmp_path / CHECKPOINT).mkdir()
    _never_train(monkeypatch)
    for extra in ([], ["--overwrite"]):
        assert main(["train", "--epochs", "1", "--out", str(tmp_path), *extra]) == 2
        assert capsys.readouterr().err == (
            f"refnorm train: error: {tmp_path / CHECKPOINT} is a folder, where the run writes "
            f"its {CHECKPOINT} file: remove it or choose another --out\n")


def test_an_overflowing_update_says_it_once(tmp_path, capsys):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", "--lr", "1e300", "--norm", "none", "--epochs", "1", "--out",
                     str(tmp_path)]) == 3
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == []
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("refnorm train: layer 0 (Conv2d) parameter w became")


# -- study: its folder is checked before training ---------------------------------------------


@pytest.mark.parametrize(("make", "out", "message"), [
    (lambda d: (d / "f").write_text("x"), "f", "the output folder {d}/f is a file, not a folder"),
    (lambda d: (d / "f").write_text("x"), "f/below",
     "the output folder {d}/f/below cannot be created: {d}/f is a file"),
    (lambda d: (d / "o" / "runs.json").mkdir(parents=True), "o",
     "{d}/o/runs.json is a folder, where the study writes its runs.json file: remove it or "
     "choose another --out"),
])
def test_study_output_problems_are_one_line_before_training(make, out, message, tmp_path,
                                                            capsys, monkeypatch):
    make(tmp_path)
    _never_train(monkeypatch)
    assert main(["study", "--quick", "--jobs", "1", "--out", str(tmp_path / out)]) == 2
    assert capsys.readouterr().err == (
        f"refnorm study: error: {message.format(d=tmp_path)}\n")


def test_a_quick_study_on_data_with_too_few_samples_says_what_it_needs(tmp_path, capsys,
                                                                       monkeypatch):
    """The quick study draws 768 training samples per run, a number none of its options sets:
    the refusal says so, rather than "give at most that many"."""
    from tests.train.test_data import mnist_arrays, write_mnist

    write_mnist(tmp_path / "small", mnist_arrays(n_train=500))
    _never_train(monkeypatch)
    assert main(["study", "--quick", "--jobs", "1", "--data", f"mnist:{tmp_path / 'small'}",
                 "--out", str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err == (
        f"refnorm study: error: train_subset is 768, but mnist:{tmp_path / 'small'} has 500 "
        f"training samples: the study trains each run on 768 of them; give data with at least "
        f"that many\n")


def test_study_help_gives_every_default(capsys):
    from refnorm.train.study import QUICK, StudyConfig

    with pytest.raises(SystemExit):
        main(["study", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    grid = StudyConfig()
    assert f"(default {','.join(grid.methods)}; --quick {','.join(QUICK.methods)})" in text
    assert "syncbn" in grid.methods and "syncsn" in grid.methods
    assert f"(default {','.join(map(str, grid.batch_sizes))}; --quick" in text
    assert f"(default {grid.update_size}; --quick {QUICK.update_size})" in text
    assert f"(default {grid.epochs}; --quick {QUICK.epochs})" in text


# -- gradcheck ---------------------------------------------------------------------------------


def test_gradcheck_checks_a_name_once_and_shows_its_seed_default(capsys):
    assert main(["gradcheck", "ln", "ln", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["gradient"] for r in rows] == ["x", "gamma", "beta"]
    with pytest.raises(SystemExit):
        main(["gradcheck", "--help"])
    assert "(default 0)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("argv", [["gradcheck"], ["train"], ["study"], ["bench"],
                                  ["lessons", "--student", "x"],
                                  ["conform", "a:b", "--method", "bn"]])
def test_an_unknown_option_points_to_the_sub_commands_help(argv, capsys):
    command = argv[0]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--bogus"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == (f"refnorm {command}: error: unrecognized arguments: "
                                       f"--bogus (see refnorm {command} --help)\n")


def test_an_unrecognized_argument_with_a_line_break_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "two\nlines"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == ("refnorm train: error: unrecognized arguments: two lines "
                                       "(see refnorm train --help)\n")


def test_conform_without_hypothesis_names_the_extra(monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "hypothesis" else find_spec(name, *a))
    assert main(["conform", "tests.testing.impls:NumpyBN", "--method", "bn"]) == 2
    assert capsys.readouterr() == ("", "refnorm conform: error: refnorm.testing needs "
                                       "hypothesis; install it with pip install "
                                       "'refnorm[testing]'\n")


# -- conform: every failure of the user's layer is one line, exit 2 ----------------------------


@pytest.mark.parametrize(("argv", "message"), [
    (["numpy:pi", "--method", "bn"],
     "numpy:pi is a float, not a class or function that builds a layer"),
    (["refnorm.norms:GroupNorm", "--method", "gn"],
     "building the layer as refnorm.norms:GroupNorm(12) failed: ValueError: num_groups must "
     "be a positive divisor"),
    (["refnorm.norms:BatchNorm", "--method", "bn", "--args", "'a'"],
     "building the layer as refnorm.norms:BatchNorm('a') failed: TypeError: num_channels"),
    (["refnorm.norms:BatchNorm", "--method", "bn", "--args", "{[]: 1}"],
     "--args: expected the factory's positional arguments as a Python literal (e.g. '3, 12'); "
     "got '{[]: 1}' (TypeError: "),
    (["tests.testing.impls:NumpyBN", "--method", "bn", "--args", "4", "--channels", "5"],
     "running the layer built by tests.testing.impls:NumpyBN with --channels 5 on the "
     "--method bn probes failed: "),
])
def test_conform_names_what_failed(argv, message, capsys):
    from refnorm.testing import cli as conform

    assert conform.main(["conform", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"refnorm conform: error: {message}"), err
    assert err.count("\n") == 1


@pytest.mark.parametrize("channels", ["0", "-2"])
def test_conform_refuses_channels_below_one(channels, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["conform", "tests.testing.impls:NumpyBN", "--method", "bn", "--channels",
              channels])
    assert exc.value.code == 2
    assert capsys.readouterr().err == (f"refnorm conform: error: argument --channels: expected "
                                       f"an integer >= 1; got '{channels}' (see refnorm "
                                       f"conform --help)\n")


def test_conform_runs_as_a_program_of_its_own(capsys):
    from refnorm.testing import cli as conform

    assert conform.main(["tests.testing.impls:NumpyBN", "--method", "bn"]) == 0
    assert "matches refnorm" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["train", "study"])
def test_train_and_study_on_a_gpu_without_one_stop_in_one_sentence(command, tmp_path, capsys):
    """README: without a GPU, --device gpu stops in one sentence saying what was looked for,
    before anything is written."""
    from refnorm.backend import gpu_available, gpu_problem

    if gpu_available():
        pytest.skip("a GPU is here: tests/gpu/ runs these on it")
    out = tmp_path / "out"
    assert main([command, "--device", "gpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"refnorm {command}: error: --device gpu: {gpu_problem()}"
    assert not out.exists()


class _Reached(Exception):
    pass


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_train_path_option_is_the_process_path_the_trainer_sees(monkeypatch, tmp_path, path):
    """``--path`` overrides $REFNORM_PATH for the run: by the time the trainer starts, it is
    the process-wide choice (nothing ran the option end to end)."""
    from refnorm import dispatch
    from refnorm.train import loop

    monkeypatch.setenv("REFNORM_PATH", "fast" if path == "reference" else "reference")
    seen = {}

    def fake_train(config, **kw):
        seen["choice"] = dispatch.process_choice()
        raise _Reached

    monkeypatch.setattr(loop, "train", fake_train)
    with pytest.raises(_Reached):
        main(["train", "--path", path, "--epochs", "1", "--out", str(tmp_path / "run")])
    assert seen["choice"] == path


def test_a_diverged_study_run_exits_3_with_one_line(monkeypatch, tmp_path, capsys):
    from refnorm.train import study
    from refnorm.train.finite import NonFinite

    def diverge(*args, **kwargs):
        raise NonFinite("the loss", float("nan"), where="in step 2 of epoch 1")

    monkeypatch.setattr(study, "run_study", diverge)
    assert main(["study", "--quick", "--out", str(tmp_path / "s")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("refnorm study: ")
    assert err[0].endswith("; no report was written") and "the loss" in err[0]


def test_gradcheck_passes_its_seed_on(monkeypatch, capsys):
    from refnorm import cli

    seen = []

    def fake(name, *, seed):
        seen.append((name, seed))
        return []

    monkeypatch.setattr(cli, "check_registered", fake)
    assert cli.main(["gradcheck", "bn", "--seed", "7", "--json"]) == 0
    assert seen == [("bn", 7)]


@pytest.mark.parametrize("command", ["train", "study"])
def test_train_and_study_without_matplotlib_stop_before_training(command, tmp_path, capsys,
                                                                   monkeypatch):
    """matplotlib comes with the train extra, not with refnorm: without it a run or a study
    stops in one sentence naming the extra, before the first step and before writing anything
    (it once trained, then raised a traceback at its first plot)."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    out = tmp_path / "out"
    args = [command, "--out", str(out)] + (["--quick"] if command == "study" else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"refnorm {command}: error: ") and err.count("\n") == 1
    assert "matplotlib" in err and "pip install 'refnorm[train]'" in err
    assert not out.exists()


@pytest.mark.parametrize("argv", [["gradcheck", "bn"], ["--help"], ["train", "--help"]])
def test_a_reader_that_left_gives_141_not_a_traceback_or_1(argv):
    """`refnorm gradcheck --all | head -1` (README): stdout's reader is gone before the command
    writes; the command ends quietly with 141 (as SIGPIPE would), never with 1, which
    gradcheck uses for a gradient beyond its tolerance. The help, printed by argparse, too
    (it exited 0: its text sat in the buffer until the exit's flush, which fails silently)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader left before the first line: every write fails (EPIPE)
    try:
        done = subprocess.run([sys.executable, "-m", "refnorm", *argv],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)
    assert done.returncode == 141 and done.stderr == "", done.stderr


def test_conform_finds_a_module_in_the_current_folder(tmp_path):
    """The refnorm command, like `python -m`, imports MODULE of MODULE:FACTORY from the current
    folder (a console script does not put it on sys.path by itself)."""
    command = shutil.which("refnorm", path=str(Path(sys.executable).parent))
    if command is None:
        pytest.skip("the refnorm console script is not installed beside this Python")
    (tmp_path / "mylayers.py").write_text(textwrap.dedent("""
        import refnorm

        def make_bn(channels):
            def bn(x, gamma, beta):
                return refnorm.batch_norm_forward(x, gamma, beta, eps=1e-5)[0]
            return bn
    """))
    done = subprocess.run([command, "conform", "mylayers:make_bn", "--method", "bn"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "matches refnorm" in done.stdout, done.stderr


@pytest.mark.parametrize("quiet", [False, True])
def test_only_the_rank_that_speaks_prints_the_final_accuracy(quiet, tmp_path, monkeypatch,
                                                             capsys):
    """Under mpiexec every rank but 0 trains quietly (README: rank 0 speaks for all): the
    final accuracy line is printed once per job, not once per rank."""
    import types

    import refnorm.cli as cli
    import refnorm.train.loop as loop

    history = [{"test_acc": 0.5, "train_acc": 0.25}]
    monkeypatch.setattr(loop, "train", lambda config, **kwargs: types.SimpleNamespace(
        interrupted=False, signal=None, history=history))
    args = argparse.Namespace(out=str(tmp_path), resume=False, overwrite=False)
    assert cli._train(None, args, None, quiet=quiet) == 0
    out = capsys.readouterr().out
    assert out == ("" if quiet else f"final test accuracy 0.5000 (train 0.2500); metrics and "
                                     f"curves in {tmp_path}\n")


def test_train_takes_no_weight_decay(tmp_path, monkeypatch):
    """--weight-decay 0 (no decay) is a valid value (the option is a number >= 0): it is passed
    on as 0, not refused as a learning rate of 0 is."""
    import refnorm.cli as cli

    seen = {}
    monkeypatch.setattr(cli, "_train", lambda config, *a, **k: seen.setdefault("c", config) and 0)
    assert main(["train", "--weight-decay", "0", "--out", str(tmp_path)]) == 0
    assert seen["c"].weight_decay == 0.0


def test_train_writes_into_the_folder_its_help_names(tmp_path, monkeypatch, capsys):
    """Without --out, a run's files land in the folder that `refnorm train --help` gives as
    --out's default, relative to the current folder."""
    import re

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    default = re.search(r"--out OUT output directory \(default (\S+?)\)", text)
    assert default, text
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--epochs", "1", "--batch-size", "64"]) == 0
    assert (tmp_path / default.group(1) / CHECKPOINT).is_file()
    assert (tmp_path / default.group(1) / "metrics.json").is_file()


def test_cli_study_passes_its_compute_options_on(tmp_path, capsys, monkeypatch):
    """--launcher, --dtype and --data arrive in the study's grid, and --path is the process's
    choice (the workers inherit it) by the time the study starts."""
    import refnorm.train.study as study_module
    from refnorm import dispatch

    monkeypatch.setenv("REFNORM_PATH", "fast")
    seen = {}

    def fake_run_study(study, out, *, jobs, log):
        seen.update(study=study, path=dispatch.process_choice())
        return Path(out) / "report.md"

    monkeypatch.setattr(study_module, "run_study", fake_run_study)
    data = f"mnist:{tmp_path / 'idx'}"
    assert main(["study", "--quick", "--launcher", "mpi", "--dtype", "float64", "--data", data,
                 "--path", "reference", "--out", str(tmp_path / "s")]) == 0
    study = seen["study"]
    assert study.launcher == "mpi"
    assert study.dtype == "float64"
    assert study.data == data
    assert seen["path"] == "reference"


def test_device_auto_without_a_gpu_trains_on_the_cpu(tmp_path, monkeypatch):
    """--device auto takes the GPU only when there is one: without one the run goes on, on the
    CPU (only --device gpu is refused)."""
    import refnorm.cli as cli
    from refnorm.backend import gpu_available

    if gpu_available():
        pytest.skip("a GPU is here: auto takes it")
    seen = {}
    monkeypatch.setattr(cli, "_train", lambda config, *a, **k: seen.setdefault("c", config) and 0)
    assert main(["train", "--device", "auto", "--out", str(tmp_path)]) == 0
    assert seen["c"].device == "cpu"


def test_gradcheck_row_shows_the_worst_deviation_over_the_noise_floor():
    """format_table's "deviation/noise" is the worst case's, as its "error" is."""
    results = [
        CaseResult("bn", (2, 3), {}, True, {"x": GradError(0.0, 1e-9, scale=1.0, fd_noise=4e-9)}),
        CaseResult("bn", (4, 3), {}, False, {"x": GradError(0.0, 3e-9, scale=1.0,
                                                            fd_noise=4e-9)}),
    ]
    row = summarize(results, 1e-6)[0]
    assert [c["noise_ratio"] for c in row["cases"]] == pytest.approx([0.25, 0.75])
    assert row["noise_ratio"] == pytest.approx(0.75)


@pytest.mark.parametrize("command", ["train", "study"])
def test_device_auto_with_a_gpu_runs_on_the_gpu(command, tmp_path, monkeypatch):
    """--device auto: "the GPU when CuPy finds one" (the probe is stubbed to find one)."""
    import refnorm.backend as backend
    import refnorm.cli as cli
    import refnorm.train.study as study_module

    monkeypatch.setattr(backend, "gpu_problem", lambda: None)
    monkeypatch.setattr(backend, "gpu_available", lambda: True)
    seen = {}

    def fake_train(config, *args, **kwargs):
        seen["device"] = config.device
        return 0

    def fake_run_study(study, out, *, jobs, log):
        seen["device"] = study.device
        return Path(out) / "report.md"

    monkeypatch.setattr(cli, "_train", fake_train)
    monkeypatch.setattr(study_module, "run_study", fake_run_study)
    extra = ["--quick"] if command == "study" else []
    assert main([command, *extra, "--device", "auto", "--out", str(tmp_path / "o")]) == 0
    assert seen["device"] == "gpu"


def test_train_without_options_trains_the_configurations_defaults(tmp_path, monkeypatch):
    """Each option left out takes TrainConfig's default (weight decay 5e-4, 4 GN groups, ...),
    the defaults `refnorm train --help` names."""
    import refnorm.cli as cli
    from refnorm.train.config import TrainConfig

    seen = {}
    monkeypatch.setattr(cli, "_train", lambda config, *a, **k: seen.setdefault("c", config) and 0)
    assert main(["train", "--out", str(tmp_path)]) == 0
    assert seen["c"] == TrainConfig()

"""The ``refnorm`` command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from refnorm import registry
from refnorm.cli import main
from refnorm.norms import BatchNorm, CheckCase


def test_gradcheck_all_json_lists_every_normalizer_and_gradient(capsys):
    assert main(["gradcheck", "--all", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    pairs = {(r["normalizer"], r["gradient"]) for r in rows}
    assert pairs >= {(n, g) for n in ("bn", "in", "ln", "gn") for g in ("x", "gamma", "beta")}
    for row in rows:
        assert row["max_rel_error"] < 1e-6 and row["passed"] is True
        assert row["max_rel_error"] == max(c["max_rel_error"] for c in row["cases"])
        assert row["tolerance"] == 1e-6


def test_gradcheck_table(capsys):
    assert main(["gradcheck", "ln", "gn"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["normalizer", "gradient", "max", "rel", "error",
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
    table = {**registry._TABLE, "wrong": (__name__, "_WrongBackwardBatchNorm")}
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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["gradcheck"], "name at least one normalizer, or pass --all"),
        (["gradcheck", "bn", "--all"], "give NAMEs or --all, not both"),
        (["gradcheck", "xn"], "unknown normalizer(s) xn"),
    ],
)
def test_gradcheck_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


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

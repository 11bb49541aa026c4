"""``refnorm conform`` (refnorm.testing.cli)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from refnorm.testing.cli import main


def test_conform_on_a_numpy_bn_with_eps_outside_the_root(capsys):
    status = main(["conform", "tests.testing.impls:eps_outside_bn", "--method", "bn"])
    out = capsys.readouterr().out
    assert status == 1
    assert "added to the std, sqrt(var) + eps" in out and "matches no known convention" in out


def test_conform_json(capsys):
    status = main(["conform", "tests.testing.impls:NumpyBN", "--method", "bn", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert status == 0
    assert report["conventions"]["eps_placement"] == "inside_sqrt"
    assert report["match"].startswith("refnorm.batch_norm_forward(eps=1e-05)")


def test_conform_torch_batch_norm(capsys):
    pytest.importorskip("torch")
    status = main(["conform", "torch.nn:BatchNorm2d", "--method", "bn"])
    out = capsys.readouterr().out
    assert status == 0
    assert "matches refnorm: refnorm.batch_norm_forward(eps=1e-05)" in out


def test_conform_bad_target_is_a_usage_error(capsys):
    assert main(["conform", "tests.testing.impls", "--method", "bn"]) == 2
    assert "MODULE:FACTORY" in capsys.readouterr().err


def test_conform_without_torch_names_the_extra():
    code = ("import sys; sys.modules['torch'] = None; "  # `import torch` fails, as uninstalled
            "from refnorm.testing.cli import main; "
            "sys.exit(main(['conform', 'torch.nn:BatchNorm2d', '--method', 'bn']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "cannot import the module 'torch.nn'" in done.stderr
    assert "pip install 'refnorm[torch]'" in done.stderr

"""``refnorm conform`` (refnorm.testing.cli)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

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


def test_conform_reports_whatever_the_factory_raises_in_one_line(capsys):
    """The factory is the user's code: a KeyError (not only a TypeError or ValueError) is
    reported in one line, exit 2, not a traceback."""
    assert main(["conform", "operator:getitem", "--method", "bn", "--args", "{}, 'gamma'"]) == 2
    err = capsys.readouterr().err
    assert err == ("refnorm conform: error: building the layer as operator:getitem({}, "
                   "'gamma') failed: KeyError: 'gamma'\n")


def test_conform_calls_a_factory_without_arguments_when_args_is_empty(tmp_path, monkeypatch,
                                                                      capsys):
    """--args holds the factory's positional arguments: an empty one is none at all (left
    out, the factory gets C)."""
    (tmp_path / "zero_arg_factory.py").write_text(textwrap.dedent("""
        from tests.testing.impls import NumpyBN

        def make_bn():
            return NumpyBN(4)
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["conform", "zero_arg_factory:make_bn", "--method", "bn", "--args", ""]) == 0
    assert "matches refnorm" in capsys.readouterr().out
    assert main(["conform", "zero_arg_factory:make_bn", "--method", "bn"]) == 2
    assert capsys.readouterr().err.endswith(
        "make_bn() takes 0 positional arguments but 1 was given (give the factory's "
        "positional arguments with --args)\n")


def test_conform_gives_no_args_hint_for_a_target_that_cannot_be_called(capsys):
    assert main(["conform", "math:pi", "--method", "bn"]) == 2
    assert capsys.readouterr().err == ("refnorm conform: error: math:pi is a float, not a "
                                       "class or function that builds a layer\n")


def test_conform_gives_the_factory_four_channels_unless_told(tmp_path, monkeypatch, capsys):
    """docs/testing.md: with --args left out, the factory gets C, --channels or 4 (12 for GN)."""
    (tmp_path / "recording_factory.py").write_text(textwrap.dedent("""
        from tests.testing.impls import NumpyBN

        built = []

        def make_bn(C):
            built.append(C)
            return NumpyBN(C)
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["conform", "recording_factory:make_bn", "--method", "bn"]) == 0
    assert main(["conform", "recording_factory:make_bn", "--method", "bn", "--channels", "6"]) == 0
    assert "matches refnorm" in capsys.readouterr().out
    assert sys.modules["recording_factory"].built == [4, 6]


@pytest.mark.parametrize(("source", "target", "message"), [
    ("raise RuntimeError('boom')\n", "brokenmod:make", "(RuntimeError: boom)"),
    ("def make(:\n", "brokenmod:make", "(SyntaxError: "),
    (None, ".brokenmod:make", "(TypeError: "),
])
def test_conform_reports_a_module_that_cannot_be_imported_in_one_line(source, target, message,
                                                                      tmp_path, monkeypatch,
                                                                      capsys):
    """The user's module is the user's code: whatever its import raises (or a relative module
    name, which import_module cannot resolve) is one line, exit 2, not a traceback."""
    if source is not None:
        (tmp_path / "brokenmod.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "brokenmod", raising=False)
    assert main(["conform", target, "--method", "bn"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"refnorm conform: error: cannot import the module "
                          f"{target.partition(':')[0]!r} of {target!r} {message}"), err
    assert err.count("\n") == 1


def test_conform_refuses_args_that_close_the_argument_list(capsys):
    """--args "4)#": the ")" closes the tuple the arguments are read into and the "#" comments
    out the rest, leaving the int 4, not a tuple of arguments: refused in one line (it was a
    TypeError traceback)."""
    assert main(["conform", "tests.testing.impls:NumpyBN", "--method", "bn", "--args",
                 "4)#"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("refnorm conform: error: --args: expected the factory's positional "
                          "arguments as a Python literal (e.g. '3, 12'); got '4)#'"), err
    assert err.count("\n") == 1


def test_conform_as_a_program_of_its_own_reports_usage_errors_in_one_line(capsys):
    """python -m refnorm.testing.cli speaks as refnorm conform: one line, exit 2."""
    with pytest.raises(SystemExit) as exc:
        main(["tests.testing.impls:NumpyBN"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == ("refnorm conform: error: the following arguments are "
                                       "required: --method (see refnorm conform --help)\n")


def test_conform_json_writes_an_infinite_residual_as_a_string(tmp_path, monkeypatch, capsys):
    """A BN with no eps gives NaN on the constant check input (refnorm, eps = 1e-300: 0), a
    residual of inf, which json.dumps wrote as the bare token Infinity: not JSON (RFC 8259),
    refused by every parser but Python's."""
    (tmp_path / "no_eps_factory.py").write_text(textwrap.dedent("""
        import numpy as np

        def make_bn(C):
            def bn(x, gamma, beta):
                axes, view = (0, 2, 3), (1, -1, 1, 1)
                mu, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
                with np.errstate(invalid="ignore", divide="ignore"):
                    return gamma.reshape(view) * (x - mu) / np.sqrt(var) + beta.reshape(view)
            return bn
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["conform", "no_eps_factory:make_bn", "--method", "bn", "--json"]) == 1

    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    report = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert report["conventions"]["eps_placement"] == "none"
    assert report["residual"] == "inf"

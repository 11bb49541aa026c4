"""The promises of the README and the docs name the tests that keep them: every named test exists.

The README cites tests as ``(`tests/x/test_y.py`: `test_a`, `test_b`; `tests/z.py`: ...)``;
each cited test function must be defined in the file cited before it.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def cited_tests(name: str = "README.md") -> list[tuple[str, str]]:
    text = " ".join(ROOT.joinpath(name).read_text().split())
    cited = []
    for match in re.finditer(r"`(tests/[\w/]+\.py)`: ((?:`test_\w+`(?:, | and |,? ?)?)+)", text):
        for test in re.findall(r"`(test_\w+)`", match.group(2)):
            cited.append((match.group(1), test))
    return cited


def test_the_readme_cites_tests():
    assert len(cited_tests()) >= 20


def test_every_cited_test_exists():
    """In the README and in every page of the docs."""
    pages = ["README.md", *(str(p.relative_to(ROOT)) for p in sorted(ROOT.glob("docs/*.md")))]
    missing = []
    for path, name in (c for page in pages for c in cited_tests(page)):
        tree = ast.parse(ROOT.joinpath(path).read_text())
        defined = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
        if name not in defined:
            missing.append(f"{path}::{name}")
    assert not missing, f"the README or the docs cite tests that do not exist: {missing}"


def test_no_file_keeps_a_merge_conflict():
    """A merge's conflict markers (a line of seven '<' or '>' and a label) never stay in the
    sources, the docs or the lessons (a README once kept one; seven '=' also underline
    reStructuredText headings, so that line is not looked for)."""
    marker = re.compile(r"^(<{7}|>{7}) \S+", re.MULTILINE)
    found = []
    for folder in ("refnorm", "tests", "docs", "lessons", "scripts", ".ci"):
        for path in ROOT.joinpath(folder).rglob("*"):
            if "_build" in path.parts or not path.is_file():
                continue
            if path.suffix not in {".py", ".md", ".rst", ".ipynb", ".toml", ".sh", ".txt",
                                   ".cfg", ".css", ".html", ""}:
                continue
            text = path.read_text(errors="replace")
            found += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in marker.finditer(text)]
    for name in ("README.md", "pyproject.toml", "run.sh", "test.sh"):
        text = ROOT.joinpath(name).read_text()
        found += [f"{name}: {m.group(0)}" for m in marker.finditer(text)]
    assert not found, f"merge conflict markers left in: {found}"


def test_the_gpu_page_names_the_wheel_the_gpu_extra_installs():
    """docs/gpu.md: `refnorm[gpu]` installs cupy-cuda12x, and CuPy 14.1 or later."""
    extra = re.search(r"^gpu = \[\s*\"([a-z0-9-]+)>=([0-9.]+)\",\s*\]",
                      ROOT.joinpath("pyproject.toml").read_text(), re.MULTILINE)
    assert extra is not None
    page = ROOT.joinpath("docs", "gpu.md").read_text()
    assert f'installs the first, `{extra.group(1)}`' in page
    assert f"needs CuPy {extra.group(2)} or later" in page


def test_the_readme_names_the_path_test_sh_runs_each_suite_again_on():
    """README "Two commands": after the whole suite, ./test.sh runs the layer suites again on
    the fast path (they default to the reference) and the trainer suite on the reference
    path (it defaults to the fast one), as its ``REFNORM_PATH=...`` lines do."""
    script = ROOT.joinpath("test.sh").read_text().replace("\\\n", " ")
    reruns = dict(re.findall(r"^REFNORM_PATH=(\w+) (.*)$", script, re.MULTILINE))
    assert "tests/test_layer.py" in reruns["fast"].split()
    assert "tests/train/test_loop.py" in reruns["reference"].split()
    readme = " ".join(ROOT.joinpath("README.md").read_text().split())
    assert ("the layer suites once more on the fast path and the trainer suite on the "
            "reference path") in readme


def test_test_sh_installs_pytorchs_cpu_build():
    """README "Two commands": ``.venv`` holds PyTorch's CPU build. On Linux PyPI serves
    torch's CUDA build; test.sh adds PyTorch's CPU index, whose ``+cpu`` local version pip
    prefers to the public one of the same number."""
    script = ROOT.joinpath("test.sh").read_text().replace("\\\n", " ")
    install = re.search(r'pip install .*"torch==([\d.]+)".*', script)
    assert install is not None
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in install.group(0)
    assert "PyTorch's CPU build" in " ".join(ROOT.joinpath("README.md").read_text().split())


def _blocks(page: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", page, re.MULTILINE | re.DOTALL)


def test_the_readmes_first_example_runs_and_computes_what_its_comments_say(capsys):
    """The README's opening example, run as printed: GN's dgamma is sum(dy * x_hat) with x_hat
    standardized over each sample's group of 2 channels (biased variance, eps inside the
    root), and one training step of BN moves the running variance from 1 a tenth of the way
    to the unbiased batch variance (PyTorch's convention)."""
    code = _blocks(ROOT.joinpath("README.md").read_text(), "python")[0]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    printed = capsys.readouterr().out
    x, dy = scope["x"], scope["dy"]
    groups = x.reshape(8, 3, 2 * 4 * 4)
    x_hat = ((groups - groups.mean(axis=2, keepdims=True))
             / np.sqrt(groups.var(axis=2, keepdims=True) + 1e-5)).reshape(x.shape)
    np.testing.assert_allclose(scope["dgamma"], (dy * x_hat).sum(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(scope["dbeta"], dy.sum(axis=(0, 2, 3)), rtol=1e-12)
    running_var = 0.9 + 0.1 * x.var(axis=(0, 2, 3), ddof=1)
    np.testing.assert_allclose(scope["layer"].state["running_var"], running_var, rtol=1e-12)
    assert printed.count("[") == 2 and scope["dx"].shape == x.shape


def test_the_testing_pages_worked_example_prints_what_the_page_shows():
    """docs/testing.md, "A worked example": the planted bug fails with the message shown,
    and `print(fingerprint("bn", my_bn))` gives the table shown."""
    pytest.importorskip("hypothesis")
    page = ROOT.joinpath("docs", "testing.md").read_text()
    example = page.split("## A worked example", 1)[1].split("## The probes", 1)[0]
    (code,), (message, table) = _blocks(example, "python"), _blocks(example, "text")
    namespace: dict = {}
    with pytest.raises(AssertionError) as failure:
        exec(code, namespace)  # noqa: S102 - the page's own example
    assert str(failure.value) + "\n" == message
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec('print(fingerprint("bn", my_bn))', namespace)  # noqa: S102
    assert [line.rstrip() for line in out.getvalue().splitlines()] == \
        [line.rstrip() for line in table.splitlines()]


def test_the_testing_pages_conform_table_is_what_the_command_prints(capsys):
    """docs/testing.md: "The table `refnorm conform torch.nn:BatchNorm2d --method bn` prints"."""
    pytest.importorskip("torch")
    from refnorm.testing.cli import main

    page = ROOT.joinpath("docs", "testing.md").read_text()
    shown = _blocks(page.split("--method bn` prints:", 1)[1], "text")[0]
    assert main(["conform", "torch.nn:BatchNorm2d", "--method", "bn"]) == 0
    assert capsys.readouterr().out == shown

"""What ``pip install`` of a release gives: the sdist holds the whole source, the wheel built
from it holds everything refnorm reads at run time, and the installed wheel, away from this
checkout, writes the students' lessons (``refnorm lessons --student DIR``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tracked() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout (the files a release is made of)")
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout.decode()
    return [name for name in listing.split("\0") if name]


def _build(hook: str, source: Path, into: Path) -> Path:
    """Run setuptools' PEP 517 ``hook`` in ``source`` (a fresh interpreter, no network)."""
    code = f"from setuptools import build_meta as b; print(b.{hook}({str(into)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return into / done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("setuptools", minversion="77")  # pyproject.toml's build requirement
    tracked = _tracked()
    base = tmp_path_factory.mktemp("release")
    source = base / "checkout"
    for name in tracked:  # the tracked files alone, as a fresh clone has them
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_symlink():
            os.symlink(os.readlink(ROOT / name), target)
        elif (ROOT / name).exists():
            shutil.copy2(ROOT / name, target)
    sdist = _build("build_sdist", source, base / "dist")
    with tarfile.open(sdist) as tar:
        tar.extractall(base / "unpacked", filter="data")
    (unpacked,) = (base / "unpacked").iterdir()
    wheel = _build("build_wheel", unpacked, base / "dist")  # as pip builds it from the sdist
    return {"sdist": sdist, "wheel": wheel, "base": base}


def test_the_sdist_is_the_whole_source(release):
    with tarfile.open(release["sdist"]) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = {name for name in _tracked()
              if not name.startswith(".ci/") and name != ".gitignore"}
    assert not wanted - names, f"missing from the sdist: {sorted(wanted - names)}"
    assert not [n for n in names if "__pycache__" in n or n.endswith((".nbi", ".nbc"))]


def test_the_wheel_holds_what_refnorm_reads_at_run_time(release):
    with zipfile.ZipFile(release["wheel"]) as whl:
        names = set(whl.namelist())
    lessons = {f"refnorm/lessons/notebooks/{p.name}" for p in (ROOT / "lessons").glob("*.ipynb")}
    assert lessons and lessons <= names, sorted(lessons - names)
    assert {"refnorm/train/datasets/digits.npz", "refnorm/train/datasets/README.md"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not [n for n in names if not n.startswith(("refnorm/", "refnorm-"))]


def test_the_installed_wheel_writes_the_students_lessons(release):
    base = release["base"]
    target, student = base / "site", base / "student"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-index", "--disable-pip-version-check", "--target", str(target),
                    str(release["wheel"])], check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import json, refnorm, sys; from refnorm.lessons import main; "
            "status = main(['--student', sys.argv[1]]); "
            "print(json.dumps([refnorm.__file__, status]))")
    done = subprocess.run([sys.executable, "-c", code, str(student)], cwd=base, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    where, status = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(where).is_relative_to(target) and status == 0  # the wheel's, not this checkout's
    written = sorted(p.name for p in student.glob("*.ipynb"))
    assert written == sorted(p.name for p in (ROOT / "lessons").glob("*.ipynb"))

"""Where numba keeps the compiled kernels when it can write neither beside refnorm nor in the
user's cache folder: a read-only install run by a user without a writable home (a service
account, ``docker run -u``). numba then refuses to compile at all ("no locator available");
refnorm gives it a private folder in the temporary directory instead.

Each case runs a fresh interpreter on a copy of the package whose ``kernels/__pycache__`` is a
file and whose HOME lies under a file: numba's own checks of both places fail there for any
user, root included, as they do for an unprivileged user on a read-only install."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import refnorm

pytestmark = pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX users and modes")

CALL = ("import numpy as np; from refnorm.kernels import nn; "
        "y, _ = nn.relu_forward(np.arange(-3, 5, dtype=np.float32)); print(float(y.sum()))")


@pytest.fixture(scope="module")
def unwritable_install(tmp_path_factory) -> Path:
    """A copy of refnorm where numba can cache nowhere it looks by itself."""
    root = tmp_path_factory.mktemp("install")
    shutil.copytree(Path(refnorm.__file__).parent, root / "refnorm",
                    ignore=shutil.ignore_patterns("__pycache__", "notebooks"))
    (root / "refnorm" / "kernels" / "__pycache__").write_text("")  # a file, not a folder
    (root / "home-is-under-this-file").write_text("")
    return root


def run(install: Path, tmpdir: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME", "PYTHONPATH")}
    env.update(HOME=str(install / "home-is-under-this-file" / "home"), TMPDIR=str(tmpdir),
               PYTHONPATH=str(install))
    return subprocess.run([sys.executable, "-c", CALL], env=env, capture_output=True,
                          text=True, timeout=300, cwd=install)


def cached(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.suffix in (".nbi", ".nbc")]


def test_the_kernels_compile_and_stay_cached_in_a_private_folder(unwritable_install, tmp_path):
    first = run(unwritable_install, tmp_path)
    assert first.returncode == 0 and first.stdout.strip() == "10.0", first.stderr
    folder = tmp_path / f"refnorm-numba-cache-{os.getuid()}"
    info = folder.stat()
    assert info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == 0o700
    compiled = sorted(cached(folder))
    assert compiled
    again = run(unwritable_install, tmp_path)  # loads what the first run compiled
    assert again.returncode == 0 and "compiling" not in again.stderr, again.stderr
    assert sorted(cached(folder)) == compiled  # nothing compiled a second time


def test_a_folder_others_can_write_is_never_used(unwritable_install, tmp_path):
    """numba loads its cache's files as code: a folder of that name that another user made,
    or anyone may write, is left alone, and the run caches in a fresh private one."""
    planted = tmp_path / f"refnorm-numba-cache-{os.getuid()}"
    planted.mkdir()
    planted.chmod(0o777)
    done = run(unwritable_install, tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "10.0", done.stderr
    assert not any(planted.iterdir())
    fresh = [p for p in tmp_path.glob("refnorm-numba-cache-*") if p != planted]
    assert len(fresh) == 1 and stat.S_IMODE(fresh[0].stat().st_mode) == 0o700
    assert cached(fresh[0])


def test_the_private_cache_folder_is_not_one_its_group_can_write(tmp_path, monkeypatch):
    """numba loads its cache's files as code: a folder of the private name that the user's
    group (or anyone) may write is never used; a fresh 0700 folder is made instead, and the
    user's own 0700 folder is kept."""
    from refnorm.kernels import norms

    monkeypatch.setattr(norms.tempfile, "tempdir", str(tmp_path))
    planted = tmp_path / f"refnorm-numba-cache-{os.getuid()}"
    planted.mkdir()
    for mode in (0o770, 0o707):
        planted.chmod(mode)
        chosen = norms.private_cache_folder()
        assert chosen != str(planted), oct(mode)
        assert stat.S_IMODE(os.stat(chosen).st_mode) == 0o700
    planted.chmod(0o700)
    assert norms.private_cache_folder() == str(planted)


@pytest.mark.parametrize("planted_as", ["file", "link to a private folder", "another user's"])
def test_a_private_name_that_is_not_this_users_own_folder_is_never_used(planted_as, tmp_path,
                                                                        monkeypatch):
    """The private name is used only where it is a folder (not a file, not a link, which
    another user could have pointed anywhere) owned by this user; otherwise a fresh 0700
    folder is made (docs/performance.md, "First run")."""
    from refnorm.kernels import norms

    uid = os.getuid()
    if planted_as == "another user's":  # the folder is ours: seen by a user one uid further
        uid += 1
        monkeypatch.setattr(norms.os, "getuid", lambda: uid)
    monkeypatch.setattr(norms.tempfile, "tempdir", str(tmp_path))
    planted = tmp_path / f"refnorm-numba-cache-{uid}"
    if planted_as == "file":
        planted.write_text("")
        planted.chmod(0o600)
    elif planted_as == "link to a private folder":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        planted.symlink_to(tmp_path / "elsewhere")
    else:
        planted.mkdir(mode=0o700)
    chosen = norms.private_cache_folder()
    assert chosen != str(planted)
    assert Path(chosen).parent == tmp_path and not Path(chosen).is_symlink()
    assert Path(chosen).is_dir() and stat.S_IMODE(os.stat(chosen).st_mode) == 0o700

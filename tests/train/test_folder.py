"""The output folder: checked before training, locked by one run, written atomically."""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from refnorm.train import checkpoint, loop
from refnorm.train import folder as folder_module
from refnorm.train.checkpoint import CHECKPOINT
from refnorm.train.config import TrainConfig
from refnorm.train.folder import (
    LOCK,
    FolderBusy,
    FolderLock,
    OutputFolderError,
    atomic_write,
    check_room,
)
from refnorm.train.loop import prepare_data, train

CONFIG = TrainConfig(norm="bn", batch_size=4, accumulation=2, epochs=2, widths=(4, 4),
                     train_subset=32)


@pytest.fixture(scope="module")
def data():
    full = prepare_data(CONFIG)
    return dataclasses.replace(full, x_test=full.x_test[:40], y_test=full.y_test[:40])


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if an optimizer step starts: the folder must be refused before
    training (the loop's steps go through ``run_step``)."""
    def step(*args, **kwargs):
        raise AssertionError("a training step ran before the folder was checked")

    monkeypatch.setattr(loop, "run_step", step)


def _no_leftovers(path: Path) -> None:
    if path.is_dir():
        assert not list(path.glob(".*.tmp")) and not (path / LOCK).exists()


# -- checked before training ----------------------------------------------------------------------


def test_out_is_a_file(tmp_path, data, no_training):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputFolderError, match=r"^the output folder .*/f is a file, not a "
                                                r"folder$"):
        train(CONFIG, out=tmp_path / "f", progress=False, data=data)


def test_a_name_the_file_system_refuses_is_one_sentence(tmp_path, data, no_training):
    with pytest.raises(OutputFolderError, match=r"^the output folder .*/a{256} cannot be "
                                                r"created: File name too long$"):
        train(CONFIG, out=tmp_path / ("a" * 256), progress=False, data=data)


def test_a_folder_where_the_lock_file_goes_is_one_sentence(tmp_path, data, no_training):
    (tmp_path / LOCK).mkdir()
    with pytest.raises(OutputFolderError, match=r"^.*/train\.lock is a folder, where a run "
                                                r"keeps its lock file: remove it"):
        train(CONFIG, out=tmp_path, progress=False, data=data)


def test_out_under_a_file(tmp_path, data, no_training):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputFolderError, match=r"^the output folder .*/f/run cannot be "
                                                r"created: .*/f is a file$"):
        train(CONFIG, out=tmp_path / "f" / "run", progress=False, data=data)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_out_unwritable(tmp_path, data, no_training, monkeypatch, code):
    # We run as root, for whom permission bits do not stop a write; the refusal the file
    # system gives (read-only, permission denied) is simulated at os.open, which both the lock
    # file and the temporary files go through. test_out_on_a_read_only_file_system does it for
    # real where a mount namespace is allowed.
    real_open = os.open

    def refusing_open(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path)):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    with pytest.raises(OutputFolderError, match=rf"^cannot write to the output folder "
                                                rf"{tmp_path}: {os.strerror(code)}$"):
        train(CONFIG, out=tmp_path, progress=False, data=data)


def test_out_on_a_full_disk(tmp_path, data, no_training, monkeypatch):
    # A nearly full disk: the lock file (a few bytes) fits, check_room's trial file as large
    # as the run's outputs does not. The error names the size; no temporary file and no lock
    # stay.
    real_fsync = os.fsync

    def full(fd):
        if os.fstat(fd).st_size > 1024:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputFolderError, match=r"^cannot write \d+ KiB \(what this run writes\) "
                                                r"to the output folder .*: the disk is full "
                                                r"\(no space left on device\)$"):
        train(CONFIG, out=tmp_path, progress=False, data=data)
    _no_leftovers(tmp_path)


def test_disk_full_during_the_run_keeps_the_last_checkpoint(tmp_path, data, monkeypatch):
    # The folder check passed, then the disk filled up: epoch 2's checkpoint cannot be
    # written. One sentence; epoch 1's checkpoint stays, and no temporary file.
    calls = {"n": 0}
    real_savez = checkpoint.np.savez

    def savez(f, **arrays):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_savez(f, **arrays)

    monkeypatch.setattr(checkpoint.np, "savez", savez)
    with pytest.raises(OutputFolderError, match=r"the disk is full .*; the checkpoint after "
                                                r"epoch 1 in .* is kept"):
        train(CONFIG, out=tmp_path, progress=False, data=data)
    monkeypatch.undo()
    _no_leftovers(tmp_path)
    assert checkpoint.read_checkpoint(tmp_path / CHECKPOINT).meta["epoch"] == 1


def test_disk_full_at_the_lock_file(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputFolderError, match=r"^cannot write to the output folder .*: the "
                                                r"disk is full \(no space left on device\)$"):
        FolderLock(tmp_path).__enter__()
    assert not list(tmp_path.iterdir())


def test_check_room_writes_as_much_as_asked(tmp_path, monkeypatch):
    written = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (written.append(os.fstat(fd).st_size),
                                                 real_fsync(fd)))
    check_room(tmp_path, 3 * 2**20 + 5)
    assert written == [3 * 2**20 + 5] and not list(tmp_path.iterdir())


def _unshare_available() -> bool:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _unshare_available(), reason="needs a private mount namespace (root)")
@pytest.mark.parametrize(("options", "message"), [
    ("ro", "Read-only file system"),
    ("size=64k", r"cannot write \d+ KiB .*the disk is full"),
])
def test_cli_out_on_a_read_only_or_full_file_system(tmp_path, options, message):
    # A real read-only and a real 64 KiB file system (tmpfs in a private mount namespace, so
    # nothing outside this process sees it); the default network's outputs need ~400 KiB.
    mount = tmp_path / "mnt"
    mount.mkdir()
    script = (f"mount -t tmpfs -o {options} tmpfs {mount} && exec {sys.executable} -m refnorm "
              f"train --epochs 1 --out {mount}/run")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("refnorm train: error: ") and "Traceback" not in proc.stderr
    assert __import__("re").search(message, last), last
    assert "epoch 1" not in proc.stderr


# -- one writer -----------------------------------------------------------------------------------


def test_lock_is_exclusive_and_released(tmp_path):
    with FolderLock(tmp_path):
        assert (tmp_path / LOCK).read_text() == f"{os.getpid()}\n"
        with pytest.raises(FolderBusy, match=rf"in use by another run \(pid {os.getpid()}; "
                                             rf"lock file .*{LOCK}\)"):
            FolderLock(tmp_path).__enter__()
        assert (tmp_path / LOCK).exists()  # the refused run leaves the holder's lock alone
    assert not (tmp_path / LOCK).exists()


def test_a_stale_lock_is_taken_over_with_a_notice(tmp_path, data, capsys):
    # A run killed with SIGKILL leaves its lock file and its temporary files behind.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK).write_text(f"{dead.pid}\n")
    (tmp_path / f".{CHECKPOINT}.abc123.tmp").write_bytes(b"half")
    train(CONFIG, out=tmp_path, progress=False, data=data)
    err = capsys.readouterr().err
    assert f"taking over the lock of {tmp_path} left by pid {dead.pid}, which no longer " \
           "holds it (a run that was killed)" in err
    _no_leftovers(tmp_path)


def test_a_lock_whose_pid_now_runs_another_program_is_taken_over_without_calling_it_dead(
        tmp_path, data, capsys):
    """The pid written in a killed run's lock may since belong to another process (pid 1
    here): the lock is free (nobody holds its flock) and the notice does not claim that pid
    is gone."""
    (tmp_path / LOCK).write_text("1\n")
    train(CONFIG, out=tmp_path, progress=False, data=data)
    err = capsys.readouterr().err
    assert "left by pid 1, which no longer holds it" in err and "no longer running" not in err
    _no_leftovers(tmp_path)


def test_lock_released_when_the_run_fails(tmp_path, data):
    bad = dataclasses.replace(data, x_test=data.x_test[:0], y_test=data.y_test[:0])
    with pytest.raises(ValueError, match="test set"):
        train(CONFIG, out=tmp_path, progress=False, data=bad)
    _no_leftovers(tmp_path)


def test_two_processes_on_one_folder(tmp_path):
    first = subprocess.Popen([sys.executable, "-m", "refnorm", "train", "--epochs", "30",
                              "--out", str(tmp_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600  # only ends a test whose first run never starts
        while not (tmp_path / LOCK).exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.02)
        second = subprocess.run([sys.executable, "-m", "refnorm", "train", "--epochs", "1",
                                 "--out", str(tmp_path)], capture_output=True, text=True,
                                timeout=600)
        assert second.returncode == 2
        # "at once": before the run's first line ("training bn batch 32 ..."), which comes
        # before the data is loaded; its one line is the refusal.
        assert second.stderr.strip().splitlines() == [
            f"refnorm train: error: the output folder {tmp_path} is in use by another run "
            f"(pid {first.pid}; lock file {tmp_path / LOCK}); wait for it to finish or choose "
            "another output folder"]
        assert first.poll() is None  # the holder goes on
    finally:
        first.terminate()
        first.communicate(timeout=600)
    assert first.returncode == 143 and not (tmp_path / LOCK).exists()


# -- atomic writes --------------------------------------------------------------------------------


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_bytes(b"old")

    def half_then_fail(f):
        f.write(b"new, half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old" and list(tmp_path.iterdir()) == [path]


def test_temporary_files_have_unique_names(tmp_path, monkeypatch):
    names = []
    real = folder_module.tempfile.mkstemp

    def mkstemp(**kwargs):
        fd, name = real(**kwargs)
        names.append(name)
        return fd, name

    monkeypatch.setattr(folder_module.tempfile, "mkstemp", mkstemp)
    for _ in range(2):
        atomic_write(tmp_path / "a", lambda f: f.write(b"x"))
    assert len(set(names)) == 2 and all(Path(n).parent == tmp_path for n in names)


def test_a_failed_rename_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    from refnorm.train import folder

    path = tmp_path / "metrics.json"
    path.write_bytes(b"old")

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(folder.os, "replace", refuse)
    with pytest.raises(PermissionError):
        folder.atomic_write(path, lambda f: f.write(b"new"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    assert path.read_bytes() == b"old"


_HOLD = ("import sys\nfrom pathlib import Path\nfrom refnorm.train.folder import FolderLock\n"
         "with FolderLock(Path(sys.argv[1])):\n"
         "    print('locked', flush=True)\n"
         "    sys.stdin.read()\n")


def test_release_leaves_a_lock_that_is_not_its_own(tmp_path):
    """A run whose lock file had been removed and retaken by another run removed that run's lock."""
    first = FolderLock(tmp_path).__enter__()
    (tmp_path / LOCK).unlink()  # removed behind the holder's back (a user cleaning up)
    other = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline() == "locked\n"
        first.release()
        assert (tmp_path / LOCK).read_text() == f"{other.pid}\n"
        with pytest.raises(FolderBusy, match=rf"pid {other.pid};"):
            FolderLock(tmp_path).__enter__()
    finally:
        other.communicate(input="", timeout=600)
    assert other.returncode == 0 and not (tmp_path / LOCK).exists()


def test_a_stale_lock_with_a_longer_line_is_rewritten_whole(tmp_path):
    """Taking over a stale lock whose line was longer than this pid's left the old line's tail in
    the file."""
    (tmp_path / LOCK).write_text("40000000000\n")  # no process holds its flock: stale
    notices = []
    with FolderLock(tmp_path, notice=notices.append):
        assert (tmp_path / LOCK).read_text() == f"{os.getpid()}\n"
    assert len(notices) == 1 and "pid 40000000000" in notices[0]


@pytest.mark.parametrize("name", ["metrics.json", "metrics.csv", "curves.png"])
def test_a_folder_where_an_output_file_goes_is_refused_before_training(tmp_path, data, no_training,
                                                                        name):
    (tmp_path / name).mkdir()
    with pytest.raises(OutputFolderError, match=rf"{name} is a folder, where the run writes "
                                                rf"its {name} file"):
        train(CONFIG, out=tmp_path, progress=False, data=data)


def test_an_atomic_write_gives_the_file_the_mode_open_would(tmp_path):
    """mkstemp creates its files 0600; the file put in place must have what open() gives
    under the process's umask (0644 under 022), as a plain file has."""
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "metrics.json", lambda f: f.write(b"{}"))
        (tmp_path / "plain").write_bytes(b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o644


# -- a run that writes nothing leaves nothing -----------------------------------------------------


def test_a_run_that_stops_before_writing_removes_the_folders_it_made(tmp_path, data):
    """A run that diverges in its first epoch writes no checkpoint: the folders it created for
    its outputs (``a/b`` here) are removed again, the folder above them stays."""
    out = tmp_path / "a" / "b"
    with pytest.raises(loop.NonFinite, match="no checkpoint was written"):
        train(dataclasses.replace(CONFIG, lr=1e30), out=out, progress=False, data=data)
    assert not (tmp_path / "a").exists()
    assert tmp_path.is_dir()


def test_a_folder_that_was_there_stays_when_the_run_writes_nothing(tmp_path, data):
    def stop(epoch, step, model):
        raise RuntimeError("stopped by the caller")

    with pytest.raises(RuntimeError, match="stopped by the caller"):
        train(CONFIG, out=tmp_path, progress=False, data=data, on_step=stop)
    assert tmp_path.is_dir() and list(tmp_path.iterdir()) == []


def test_a_made_folder_with_a_file_of_the_run_stays(tmp_path, data):
    """A run stopped in its second epoch has written the first epoch's checkpoint: its
    folder stays, with the checkpoint and without the lock."""
    def stop(epoch, step, model):  # epochs count from 0
        if epoch == 1:
            raise RuntimeError("stopped by the caller")

    out = tmp_path / "new"
    with pytest.raises(RuntimeError, match="stopped by the caller"):
        train(CONFIG, out=out, progress=False, data=data, on_step=stop)
    assert (out / CHECKPOINT).is_file() and not (out / LOCK).exists()

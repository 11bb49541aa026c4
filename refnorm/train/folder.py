"""A training run's output folder: checked before training, owned by one run, written atomically.

- :func:`prepare_folder` creates the folder or says in one sentence why it cannot: the path
  is a file, lies under a file, or the file system refuses it. A run that leaves without
  writing anything removes the folders it created (:func:`remove_if_empty`).
- :func:`check_room` writes (and removes) a temporary file as large as what the run will
  write, so that a read-only or full disk is found before the first epoch.
- :class:`FolderLock` makes the run the folder's only writer. The lock file ``train.lock``
  holds the owner's pid; it is created with ``O_CREAT | O_EXCL`` and also held with
  ``flock`` for the whole run, so a lock left by a killed run (SIGKILL, power loss) is
  recognized as stale even when its pid has been reused, and taken over with a notice. A
  second run on the folder stops at once, naming the holder.
- :func:`atomic_write` replaces a file all at once through a uniquely named temporary file
  beside it (``tempfile.mkstemp``), removed on every exit path; the temporary files of a
  killed run are removed when the next run takes the lock.
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

try:  # POSIX; elsewhere the lock falls back to asking whether its pid is alive
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

LOCK = "train.lock"
TMP_SUFFIX = ".tmp"
_CHUNK = 1 << 20


class OutputFolderError(ValueError):
    """The output folder cannot be used: a file, unwritable, full, or another run's."""


class FolderBusy(OutputFolderError):
    """Another run holds the folder's lock."""


def prepare_folder(out: str | Path) -> Path:
    """Create ``out`` (and its parents) if needed; return it as a Path.

    Raises
    ------
    OutputFolderError
        If ``out`` is a file, lies under a file, or cannot be created (the reason named).
    """
    folder = Path(out)
    try:  # exists() itself raises for a name the file system refuses (too long, ...)
        if folder.exists() and not folder.is_dir():
            raise OutputFolderError(f"the output folder {folder} is a file, not a folder")
        for parent in folder.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise OutputFolderError(f"the output folder {folder} cannot be created: "
                                            f"{parent} is a file")
                break
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputFolderError(f"the output folder {folder} cannot be created: "
                                f"{_reason(exc)}") from None
    return folder


def new_folders(out: str | Path) -> list[Path]:
    """The folders :func:`prepare_folder` would create for ``out``, the deepest first."""
    folder = Path(out)
    try:
        return [p for p in (folder, *folder.parents) if not p.exists()]
    except OSError:  # a name the file system refuses: prepare_folder says why
        return []


def remove_if_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (the deepest first, as :func:`new_folders` gives them) while they are
    empty: what a run created and left without writing anything in (refused or stopped
    before its first checkpoint). A folder that is not empty, and those above it, stay."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def check_room(folder: Path, nbytes: int) -> None:
    """Write ``nbytes`` to a temporary file in ``folder``, flush it to disk and remove it.

    Raises
    ------
    OutputFolderError
        If the folder is not writable or has no room for ``nbytes`` (one sentence).
    """
    def zeros(f: IO[bytes]) -> None:
        left = nbytes
        while left > 0:
            f.write(bytes(min(left, _CHUNK)))
            left -= _CHUNK

    try:
        tmp = _write_temp(folder / ".room-check", zeros)
        tmp.unlink()
    except OSError as exc:
        raise OutputFolderError(f"cannot write {_size(nbytes)} (what this run writes) to the "
                                f"output folder {folder}: {_reason(exc)}") from None


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Replace ``path`` all at once: ``write(f)`` fills a uniquely named temporary file beside
    it, which is flushed to disk and renamed over ``path`` (``os.replace`` is atomic). A
    failure or an exception leaves ``path`` as it was and no temporary file."""
    tmp = _write_temp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_temp(path: Path, write: Callable[[IO[bytes]], object]) -> Path:
    """A temporary file ``.<name>.<random>.tmp`` beside ``path``, filled by ``write`` and
    flushed to disk; removed again if anything fails."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # as open() would create it (mkstemp gives 0600)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: Path, names: tuple[str, ...]) -> list[Path]:
    """Remove the temporary files a killed run left for ``names``; return them.

    Only call it while holding the folder's lock: then no live run is writing them.
    """
    stale = [p for name in names for p in folder.glob(f".{name}.*{TMP_SUFFIX}")]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


class FolderLock:
    """The exclusive lock of an output folder, as a context manager.

    Parameters
    ----------
    folder : Path
        An existing folder.
    notice : callable
        Receives the one-line notice when a stale lock is taken over.

    Raises
    ------
    FolderBusy
        On entry, if a live run holds the lock (its pid is named).
    OutputFolderError
        On entry, if the lock file cannot be created (an unwritable folder).
    """

    def __init__(self, folder: Path, *, notice: Callable[[str], object] = print) -> None:
        self.path = folder / LOCK
        self.notice = notice
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        for _ in range(10):  # a retry only when another run removed its lock meanwhile
            fd = self._open()
            if fd is not None:
                self._fd = fd
                return self
        raise FolderBusy(f"the output folder {self.path.parent} is being locked and unlocked "
                         f"by other runs; try again")

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Remove the lock file and let go of the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                self.path.unlink()
        finally:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> int | None:
        """Our locked, pid-holding lock file descriptor; None to retry."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            created = True
        except FileExistsError:
            try:
                fd = os.open(self.path, os.O_RDWR)
            except FileNotFoundError:
                return None  # its owner removed it meanwhile
            except IsADirectoryError:
                raise OutputFolderError(f"{self.path} is a folder, where a run keeps its lock "
                                        "file: remove it or choose another output "
                                        "folder") from None
            created = False
        except OSError as exc:
            raise OutputFolderError(f"cannot write to the output folder {self.path.parent}: "
                                    f"{_reason(exc)}") from None
        if not _try_flock(fd) or not (created or _stale_by_pid(fd)):
            holder = _holder(fd)
            os.close(fd)  # never removed here: it is the holder's
            raise FolderBusy(f"the output folder {self.path.parent} is in use by another "
                             f"run ({holder}; lock file {self.path}); wait for it to finish "
                             "or choose another output folder")
        if not _same_file(fd, self.path):
            os.close(fd)
            return None  # we locked a lock file its owner had just removed
        try:
            if not created:
                self.notice(f"taking over the lock of {self.path.parent} left by "
                            f"{_holder(fd)}, which no longer holds it (a run that was killed)")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            os.fsync(fd)
        except OSError as exc:
            self.path.unlink(missing_ok=True)  # ours: we hold its flock
            os.close(fd)
            raise OutputFolderError(f"cannot write to the output folder {self.path.parent}: "
                                    f"{_reason(exc)}") from None
        except BaseException:
            self.path.unlink(missing_ok=True)  # ours: we hold its flock
            os.close(fd)
            raise
        return fd


def check_not_busy(folder: Path) -> None:
    """Refuse, as :class:`FolderLock` would, a folder whose lock another live run holds,
    without taking it: for the reads that come before the lock (``refnorm train --resume``
    reads the checkpoint's configuration first, which a running run may not have written).

    Raises
    ------
    FolderBusy
        If another process holds the flock of ``folder``'s lock file.
    """
    path = Path(folder) / LOCK
    if fcntl is None:  # pragma: no cover - FolderLock's pid check decides
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no lock file (or none readable): FolderLock decides
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusy(f"the output folder {path.parent} is in use by another run "
                             f"({_holder(fd)}; lock file {path}); wait for it to finish or "
                             "choose another output folder") from None
        except OSError:  # pragma: no cover - a file system without flock
            pass
    finally:
        os.close(fd)


def _try_flock(fd: int) -> bool:
    """Take the exclusive flock without waiting; False if another process holds it. Where
    flock does not exist or the file system refuses it, True (the pid check decides)."""
    if fcntl is None:  # pragma: no cover
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # pragma: no cover - e.g. ENOLCK on some network file systems
        return True
    return True


def _stale_by_pid(fd: int) -> bool:
    """An existing lock file whose flock we got: stale unless flock is unavailable and its
    pid is alive."""
    if fcntl is not None:
        return True
    pid = _pid(fd)  # pragma: no cover
    return pid is None or not _alive(pid)  # pragma: no cover


def _pid(fd: int) -> int | None:
    text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def _holder(fd: int) -> str:
    pid = _pid(fd)
    return f"pid {pid}" if pid is not None else "a process whose pid the lock file lacks"


def _alive(pid: int) -> bool:  # pragma: no cover - used only without flock
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "the disk is full (no space left on device)"
    return exc.strerror or str(exc)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.0f} KiB"


def warn(message: str) -> None:
    """A one-line notice on stderr."""
    print(message, file=sys.stderr)

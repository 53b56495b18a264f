"""Write-to-temp-then-rename helpers and a simple exclusive file lock.

Every output metroem writes goes through :func:`atomic_path`: the data is written to a hidden
temporary file in the destination folder and ``os.replace``d onto the final name only when the
writer finished without an exception, so a final name never holds half-written data (a crash, an
error or Ctrl-C leaves nothing, or at worst a hidden ``.name.tmp-*`` file after ``kill -9``).

:class:`FileLock` keeps two processes from writing the same output at once. It is a plain
``O_CREAT | O_EXCL`` lock file holding the owner's pid; a lock left by a dead process is taken
over. It is advisory and meant for one machine (pids are not comparable across hosts).

A full disk (``ENOSPC``, ``EDQUOT``) or a file-size limit (``EFBIG``) while writing inside
:func:`atomic_path` becomes a one-line :class:`MetroemError`; the temporary file is removed and
the final name keeps its old content. :class:`WriteGuard` lets a C library (HDF5) write through
Python and keeps it from ever seeing such a failure midway, which HDF5 does not survive.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import time
from collections.abc import Iterator

from metroem.errors import MetroemError

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "replace_dir",
    "temp_name",
    "FileLock",
    "lock_path_for",
    "WriteGuard",
    "DISK_FULL_ERRNOS",
    "remove_stale_temps",
]

# Errors that mean "no room to write": a full disk, a full quota, a file-size limit.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

# A lock file whose content is not a pid (its writer died between create and write) counts as
# stale once it is this old.
_UNREADABLE_LOCK_GRACE_S = 5.0


def temp_name(final_path: str) -> str:
    """The hidden temporary sibling used while writing ``final_path``; it keeps the final
    extension, for writers that check it (torch.export warns about a ``.pt2`` that is not)."""
    folder, name = os.path.split(os.path.abspath(final_path))
    ext = os.path.splitext(name)[1]
    return os.path.join(folder, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{ext}")


@contextlib.contextmanager
def atomic_path(final_path: str) -> Iterator[str]:
    """Yield a temporary path next to ``final_path``; rename it into place on success.

    On any exception (KeyboardInterrupt included) the temporary file is removed and the
    exception propagates; ``final_path`` is untouched. The caller must create the temporary
    file inside the ``with`` block.
    """
    tmp = temp_name(final_path)
    try:
        yield tmp
    except OSError as e:
        _remove_quietly(tmp)
        if e.errno in DISK_FULL_ERRNOS:
            raise _disk_full(final_path, e) from e
        raise
    except BaseException:
        _remove_quietly(tmp)
        raise
    if not os.path.exists(tmp):
        raise FileNotFoundError(f"atomic_path: nothing was written to {tmp} for {final_path}")
    try:
        os.replace(tmp, final_path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def atomic_write_bytes(final_path: str, data: bytes) -> None:
    """Write ``data`` to ``final_path`` atomically (fsynced temp file, then rename)."""
    with atomic_path(final_path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename the finished folder ``tmp`` onto ``final``; an existing ``final`` is moved aside
    first and deleted after, so ``final`` is always either the old or the new folder."""
    old = None
    if os.path.exists(final):
        old = temp_name(str(final)) + "-old"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temps(final_path: str) -> list[str]:
    """Delete the temporary siblings ``.name.tmp-PID-*`` of ``final_path`` whose writer (PID)
    is dead (killed mid-write). Call it while holding ``FileLock(final_path)``. Returns them."""
    folder, name = os.path.split(os.path.abspath(final_path))
    return remove_stale_temps_in(folder, name)


def remove_stale_temps_in(folder: str, name: str | None = None) -> list[str]:
    """Delete every ``.NAME.tmp-PID-*`` in ``folder`` (only of ``name`` if given) whose writer
    (PID) is dead. Returns the removed paths."""
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        if name is not None:
            prefix = f".{name}.tmp-"
            pid = entry[len(prefix) :].split("-")[0] if entry.startswith(prefix) else ""
        else:
            pid = entry.rsplit(".tmp-", 1)[1].split("-")[0] if entry.startswith(".") and (
                ".tmp-" in entry
            ) else ""
        if pid.isdigit() and not _pid_alive(int(pid)):
            path = os.path.join(folder, entry)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
                removed.append(path)
    return removed


def _disk_full(final_path: str, e: OSError) -> MetroemError:
    what = "exists unchanged" if os.path.exists(final_path) else "was not created"
    return MetroemError(
        f"cannot write {final_path}: {e.strerror} (disk full or file-size limit); free space "
        f"or write elsewhere, then run again ({os.path.basename(final_path)} {what})"
    )


class WriteGuard:
    """A binary file for a C library to write through (h5py's ``fileobj`` driver).

    The first ``OSError`` of a write, truncate or flush is remembered and every later write is
    swallowed (reported as done), so the library finishes and closes normally; the caller then
    calls :meth:`check`, which raises the remembered error. Reads go straight to the file.
    """

    def __init__(self, path: str):
        self._f = open(path, "w+b", buffering=0)  # unbuffered: a seek never flushes
        self.error: OSError | None = None

    def _guard(self, fn, *args):
        if self.error is None:
            try:
                return fn(*args)
            except OSError as e:
                self.error = e
        return None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n, start = len(view), self._f.tell()
        self._guard(self._write_all, view)
        if self.error is not None:  # pretend: move on as if written
            self._f.seek(start + n)
        return n

    def _write_all(self, view: memoryview) -> None:
        while view:
            view = view[self._f.write(view) :]

    def truncate(self, size: int | None = None) -> int:
        self._guard(self._f.truncate, size)
        return self._f.tell() if size is None else size

    def flush(self) -> None:
        self._guard(self._f.flush)

    def read(self, n: int = -1) -> bytes:
        return self._f.read(n)

    def readinto(self, buffer) -> int:
        return self._f.readinto(buffer)

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        return self._f.seek(pos, whence)

    def tell(self) -> int:
        return self._f.tell()

    def check(self) -> None:
        """Raise the remembered write error, if any."""
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Flush and close the file, then raise the remembered write error, if any."""
        if not self._f.closed:
            self.flush()
            self._f.close()
        self.check()

    def __enter__(self) -> WriteGuard:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        elif not self._f.closed:
            self._f.close()


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def lock_path_for(target: str) -> str:
    """The hidden lock file guarding ``target``: ``.name.lock`` in the same folder."""
    folder, name = os.path.split(os.path.abspath(target))
    return os.path.join(folder, f".{name}.lock")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class FileLock:
    """Exclusive lock on ``target`` via the lock file ``.name.lock`` beside it.

    Use as a context manager. Acquiring fails at once with a one-line :class:`MetroemError` when
    a live process holds the lock; a lock whose pid is dead is removed and taken over.
    """

    def __init__(self, target: str):
        self.target = os.path.abspath(target)
        self.path = lock_path_for(self.target)
        self._held = False

    def _holder(self) -> int | None:
        """Pid recorded in the lock file, or None if it cannot be read."""
        try:
            with open(self.path) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def _is_stale(self) -> tuple[bool, int | None]:
        pid = self._holder()
        if pid is not None:
            return (not _pid_alive(pid)), pid
        try:
            age = time.time() - os.path.getmtime(self.path)
        except FileNotFoundError:
            return True, None
        return age > _UNREADABLE_LOCK_GRACE_S, None

    def _create(self) -> None:
        """Create the lock file already holding our pid: written under a temporary name and
        hard-linked into place (atomic, fails if the lock exists), so a process killed at any
        moment never leaves a lock without a pid. Where hard links are not supported, an
        ``O_EXCL`` create followed by the write."""
        tmp = f"{self.path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                f.write(f"{os.getpid()}\n")
            try:
                os.link(tmp, self.path)
                return
            except FileExistsError:
                raise
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV,
                                   errno.EMLINK):
                    raise
        finally:
            _remove_quietly(tmp)
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")

    def acquire(self) -> None:
        for _ in range(3):
            try:
                self._create()
            except FileExistsError:
                stale, pid = self._is_stale()
                if not stale:
                    who = f"pid {pid}" if pid is not None else "pid unknown"
                    raise MetroemError(
                        f"another process ({who}) is writing {self.target}; wait for it or "
                        f"remove the stale lock file {self.path}"
                    ) from None
                _remove_quietly(self.path)
                continue
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                    raise MetroemError(
                        f"cannot create {self.path}: {e.strerror}; pick a writable --dst_folder"
                    ) from e
                raise
            self._held = True
            return
        raise MetroemError(
            f"could not lock {self.target}: the lock file {self.path} keeps changing; "
            "another process is competing for it, try again"
        )

    def release(self) -> None:
        if self._held:
            self._held = False
            _remove_quietly(self.path)

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

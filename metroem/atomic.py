"""Write-to-temp-then-rename helpers and a simple exclusive file lock.

Every output metroem writes goes through :func:`atomic_path`: the data is written to a hidden
temporary file in the destination folder and ``os.replace``d onto the final name only when the
writer finished without an exception, so a final name never holds half-written data (a crash, an
error or Ctrl-C leaves nothing, or at worst a hidden ``.name.tmp-*`` file after ``kill -9``).

:class:`FileLock` keeps two processes from writing the same output at once. It is a plain
``O_CREAT | O_EXCL`` lock file holding the owner's pid; a lock left by a dead process is taken
over. It is advisory and meant for one machine (pids are not comparable across hosts).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import time
from collections.abc import Iterator

from metroem.errors import MetroemError

__all__ = ["atomic_path", "atomic_write_bytes", "temp_name", "FileLock", "lock_path_for"]

# A lock file whose content is not a pid (its writer died between create and write) counts as
# stale once it is this old.
_UNREADABLE_LOCK_GRACE_S = 5.0


def temp_name(final_path: str) -> str:
    """The hidden temporary sibling used while writing ``final_path``."""
    folder, name = os.path.split(os.path.abspath(final_path))
    return os.path.join(folder, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


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

    def acquire(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
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
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
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

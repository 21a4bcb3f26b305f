"""An exclusive lock on a run folder: one fine-tuning run writes there at a time.

The lock is an ``flock`` on ``<run>/.lock``, which also records the holder's PID and host. The
kernel drops the lock when its process dies, however it dies, so a lock file left behind by a
killed run never blocks the next one (it is taken over, and a log line says so); a run that
ends removes it. ``flock``
works between processes of one machine; on network file systems it may not.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from pathlib import Path
from types import TracebackType

from mcn_compress.errors import OutputError, RunFolderError

_logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class RunLock:
    """Hold the lock of run folder ``run_dir`` from `acquire` until `release` (or exit of the
    ``with`` block). A folder locked by a live process raises `RunFolderError` naming it."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None
        self.remove_empty_dir = False  # `release` then removes the folder if nothing is left

    def acquire(self) -> RunLock:
        """Take the lock, or raise `RunFolderError` naming the live holder."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputError(f"cannot lock {self.path.parent}: {exc.strerror or exc}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                os.close(fd)
                raise RunFolderError(
                    f"{self.path.parent} is in use by a running fine-tuning run "
                    f"({holder or 'another process'}); wait for it to finish or choose another "
                    "output.dir"
                ) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder removed the file between our open and flock: again
        previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if previous:
            _logger.info("taking over the lock of %s left by %s", self.path.parent, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (safe to call twice). A process that opened
        the file just before it went sees that after its own ``flock`` and starts over."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        if self.remove_empty_dir:  # a run that wrote nothing leaves no folder
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def lock_holder(run_dir: str | Path) -> str | None:
    """Who holds the lock of ``run_dir`` now (``"pid N on HOST"``), None when nobody does."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)

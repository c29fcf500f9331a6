"""One server per buffer directory: an exclusive flock on `{buffer.path}/.lock`.

A second instance on the same directory would recover the live journal of the first as
if it had crashed and store every record twice. The lock is taken before anything else
(before recovery, before binding ports) by the process that owns the directory: the
server itself, or the supervisor of `server.workers > 1` (its workers' areas are inside
it). The kernel drops the lock when the process dies, so a crash never leaves it stale.
"""

import fcntl
import os
from pathlib import Path

from mwdlogd.errors import StorageError

LOCK_FILE = ".lock"


def lock_buffer(directory: Path) -> int:
    """Hold the lock (the returned descriptor; closing it releases) and record our pid in
    the file. Raises StorageError naming the directory and the pid that holds it."""
    path = directory / LOCK_FILE
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StorageError(str(path), "lock buffer.path", exc.strerror or str(exc)) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise StorageError(str(directory), "lock buffer.path",
                           f"in use by another mwdlogd (pid {holder}, see {path}); two "
                           f"servers on one buffer directory would store records twice"
                           ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd

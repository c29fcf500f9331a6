"""Hourly files: multi-member gzip JSON lines; a flush appends one complete member."""

import os
import zlib

from mwdlogd.errors import StorageError

# zlib level 6 is gzip's default; compression is isolated here so igzip can replace it.
GZIP_LEVEL = 6


def compress_member(data: bytes) -> bytes:
    """One complete gzip member (mtime 0, so equal input gives equal bytes)."""
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()


def destination(root: str, relpath: str) -> str:
    """Absolute file for `relpath`; refuses any path that would leave `root`."""
    full = os.path.normpath(os.path.join(root, relpath))
    if not full.startswith(os.path.normpath(root) + os.sep) or ".." in relpath.split("/"):
        raise StorageError(full, "resolve", "path escapes the storage root")
    return full


def append_member(root: str, relpath: str, data: bytes) -> int:
    """Compress `data` into one gzip member, append it to the file and fsync.

    Blocking: call it from a worker thread. Returns the bytes appended; raises
    StorageError (with the errno text) when the directory or file cannot be written.
    """
    path = destination(root, relpath)
    member = compress_member(data)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(member)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StorageError(path, "append", exc.strerror or str(exc)) from exc
    return len(member)


def check_writable(root: str) -> str | None:
    """None when `root` exists (or can be made) and accepts writes, else why not."""
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as exc:
        return f"cannot create {root}: {exc.strerror}"
    if not os.access(root, os.W_OK | os.X_OK):
        return f"{root} is not writable"
    return None

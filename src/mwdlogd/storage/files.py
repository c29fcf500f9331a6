"""Small durable-file helpers shared by the journal and the side logs."""

import os
from pathlib import Path

from mwdlogd.errors import StorageError
from mwdlogd.storage import framing


def destination(root: str, relpath: str) -> str:
    """Absolute file for `relpath`; refuses any path that would leave `root`."""
    full = os.path.normpath(os.path.join(root, relpath))
    if not full.startswith(os.path.normpath(root) + os.sep) or ".." in relpath.split("/"):
        raise StorageError(full, "resolve", "path escapes the storage root")
    return full


def fsync_dir(directory: Path) -> None:
    """Make a created, renamed or deleted entry in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_and_reopen(path: Path, data: bytes, old_fd: int) -> int:
    """Atomically replace `path` with `data` (temp file, fsync, rename); close `old_fd`
    and return a new append descriptor. Raises OSError."""
    temp = path.with_suffix(".tmp")
    with open(temp, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)
    fsync_dir(path.parent)
    if old_fd >= 0:
        os.close(old_fd)
    return os.open(path, os.O_WRONLY | os.O_APPEND)


def read_records(path: Path, magic: bytes, what: str) -> tuple[list[tuple[int, bytes]], int]:
    """The whole framed records of a side log (none if it does not exist yet), and where
    they end; raises StorageError naming `what`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = path.read_bytes() if path.exists() else b""
    except OSError as exc:
        raise StorageError(str(path), f"read {what}", str(exc)) from exc
    return framing.scan(magic, data)

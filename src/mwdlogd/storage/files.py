"""Small durable-file helpers shared by the journal and the side logs."""

import hashlib
import os
from pathlib import Path

from mwdlogd.errors import StorageError


def storage_id(root: str) -> str:
    """A digest of `root`'s real path: /health shows it instead of the path, so a local
    tool (restore) can tell whether a server uses these very files without the answer
    telling anyone where they are."""
    return hashlib.sha256(os.path.realpath(root).encode("utf-8", "surrogateescape")
                          ).hexdigest()[:16]


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

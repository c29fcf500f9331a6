"""Forward chunk ids already made durable, on disk, so a resend after a restart is still
recognised. Appends are not fsynced on their own: the journal batch that carries the
same id is, and `sync` runs before any journal segment holding such ids is deleted."""

import collections
import os
import time
from pathlib import Path

from mwdlogd.errors import StorageError
from mwdlogd.storage import framing
from mwdlogd.storage.files import read_records, replace_and_reopen

MAGIC = b"MWC1"
COMPACT_BYTES = 4 * 1024 * 1024


class ChunkIdLog:
    def __init__(self, path: Path, *, window_s: float, fsync: bool = True) -> None:
        self.path = path
        self._window_s = window_s
        self._fsync = fsync
        self._entries: collections.deque[tuple[float, str]] = collections.deque()
        self._fd = -1
        self._size = 0
        self._dirty = False

    def open(self, now: float | None = None) -> list[tuple[float, str]]:
        """The ids still inside the window, oldest first; rewrites the file with just them."""
        records, _ = read_records(self.path, MAGIC, "chunk id log")
        self._entries.extend((ms / 1000, key.decode("utf-8", "surrogateescape"))
                             for ms, key in records)
        self._expire(now if now is not None else time.time())
        self._rewrite()
        return list(self._entries)

    def append(self, keys: list[str], now: float) -> None:
        if not keys:
            return
        data = b"".join(framing.frame(MAGIC, int(now * 1000),
                                      key.encode("utf-8", "surrogateescape")) for key in keys)
        try:
            os.write(self._fd, data)
        except OSError as exc:
            raise StorageError(str(self.path), "append chunk ids", str(exc)) from exc
        self._entries.extend((now, key) for key in keys)
        self._size += len(data)
        self._dirty = True
        if self._size > COMPACT_BYTES:
            self._expire(now)
            self._rewrite()

    def sync(self) -> None:
        if self._dirty and self._fsync:
            os.fdatasync(self._fd)
        self._dirty = False

    def _expire(self, now: float) -> None:
        while self._entries and self._entries[0][0] < now - self._window_s:
            self._entries.popleft()

    def _rewrite(self) -> None:
        data = b"".join(framing.frame(MAGIC, int(at * 1000), key.encode("utf-8", "surrogateescape"))
                        for at, key in self._entries)
        try:
            self._fd = replace_and_reopen(self.path, data, self._fd)
        except OSError as exc:
            raise StorageError(str(self.path), "rewrite chunk id log", str(exc)) from exc
        self._size, self._dirty = len(data), False

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

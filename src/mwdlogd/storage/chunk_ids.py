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
# The log's name in each worker's buffer directory.
CHUNK_IDS = "chunk-ids.log"
COMPACT_BYTES = 4 * 1024 * 1024


def _encode(at: float, key: str) -> bytes:
    """One entry: the time in ms as the record id, the key as its payload."""
    return framing.frame(MAGIC, int(at * 1000), key.encode("utf-8", "surrogateescape"))


def _decode(records: list[tuple[int, bytes]]) -> list[tuple[float, str]]:
    return [(ms / 1000, key.decode("utf-8", "surrogateescape")) for ms, key in records]


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
        self._entries.extend(_decode(records))
        self._expire(now if now is not None else time.time())
        self._rewrite()
        return list(self._entries)

    def append(self, keys: list[str], now: float) -> None:
        if not keys:
            return
        data = b"".join(_encode(now, key) for key in keys)
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
        data = b"".join(_encode(at, key) for at, key in self._entries)
        try:
            self._fd = replace_and_reopen(self.path, data, self._fd)
        except OSError as exc:
            raise StorageError(str(self.path), "rewrite chunk id log", str(exc)) from exc
        self._size, self._dirty = len(data), False

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class PeerChunkIds:
    """Other workers' chunk id logs, read as they grow: a resend that reconnects to another
    worker is still recognised. Each worker appends an id to its log right after the
    journal fsync and before the ack, so any resend of an acked chunk finds it here."""

    def __init__(self, paths: list[Path]) -> None:
        self._positions = {path: (0, 0) for path in paths}  # path -> (inode, offset read)

    def read_new(self) -> list[tuple[float, str]]:
        """(time, id) of every whole entry appended since the last call."""
        found = []
        for path, (inode, offset) in self._positions.items():
            try:
                with open(path, "rb") as file:
                    stat = os.fstat(file.fileno())
                    if stat.st_ino != inode or stat.st_size < offset:
                        inode, offset = stat.st_ino, 0  # rewritten: read it again whole
                    file.seek(offset)
                    records, valid = framing.scan(MAGIC, file.read())
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StorageError(str(path), "read a worker's chunk ids", str(exc)) from exc
            found += _decode(records)
            self._positions[path] = (inode, offset + valid)
        return found

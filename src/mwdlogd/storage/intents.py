"""The intent log: what makes appends to hourly files exactly-once across crashes.

Before a member is appended to a file, `begin` records (path, size before, highest batch
id in the member) and fsyncs. After the append is fsynced, `done` records the id without
an fsync of its own: a lost `done` only means recovery truncates a complete member and
the journal writes it again — the same bytes, once. On start-up `recover_files` cuts
every file with an unfinished intent back to its size before, and `committed(path)`
tells which journal batches each file already holds.

Blocking and thread-safe: writers call it from worker threads.
"""

import os
import threading
from pathlib import Path

import msgpack

from mwdlogd.errors import StorageError
from mwdlogd.storage import framing
from mwdlogd.storage.files import read_records, replace_and_reopen

MAGIC = b"MWI1"
BEGIN, DONE = "b", "d"
# Rewrite the log once it is this large; it keeps one entry per file still of interest.
COMPACT_BYTES = 8 * 1024 * 1024
NONE = -1


class IntentLog:
    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self.path = path
        self._fsync = fsync
        self._lock = threading.Lock()
        self._committed: dict[str, int] = {}
        self._pending: dict[str, tuple[int, int]] = {}  # path -> (size before, max id)
        self._fd = -1
        self._size = 0

    def open(self) -> dict[str, tuple[int, int]]:
        """Load the log; returns unfinished intents: path -> (size before, max id).

        The caller cuts those files back (`truncate_to`), then calls `settle`.
        """
        records, valid = read_records(self.path, MAGIC, "intent log")
        for _, payload in records:
            self._apply(msgpack.unpackb(payload))
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.ftruncate(self._fd, valid)  # a torn last entry was never fsynced: drop it
        except OSError as exc:
            raise StorageError(str(self.path), "open intent log", str(exc)) from exc
        self._size = valid
        return dict(self._pending)

    def settle(self) -> None:
        """Unfinished intents are resolved (their files cut back): start a clean log."""
        with self._lock:
            self._pending.clear()
            self._rewrite()

    def _apply(self, entry: list[object]) -> None:
        kind, path, max_id = entry[0], str(entry[1]), int(entry[-1])  # type: ignore[call-overload]
        if kind == BEGIN:
            self._pending[path] = (int(entry[2]), max_id)  # type: ignore[call-overload]
        else:
            self._pending.pop(path, None)
            self._committed[path] = max(max_id, self._committed.get(path, NONE))

    @property
    def max_id(self) -> int:
        return max(self._committed.values(), default=NONE)

    def committed(self, path: str) -> int:
        """Highest batch id wholly in `path` (-1 if none is known)."""
        return self._committed.get(path, NONE)

    def begin(self, path: str, size_before: int, max_id: int) -> None:
        with self._lock:
            self._pending[path] = (size_before, max_id)
            self._write([BEGIN, path, size_before, max_id], sync=True)

    def done(self, path: str, max_id: int, *, sync: bool = False) -> None:
        with self._lock:
            self._pending.pop(path, None)
            self._committed[path] = max(max_id, self._committed.get(path, NONE))
            self._write([DONE, path, max_id], sync=sync)

    def forget_below(self, watermark: int) -> None:
        """Drop files whose batches all precede the journal's oldest: nothing to replay."""
        with self._lock:
            for path in [p for p, i in self._committed.items() if i < watermark]:
                del self._committed[path]
            if self._size > COMPACT_BYTES:
                self._rewrite()

    def _write(self, entry: list[object], *, sync: bool) -> None:
        data = framing.frame(MAGIC, 0, msgpack.packb(entry))
        try:
            os.write(self._fd, data)
            if sync and self._fsync:
                os.fdatasync(self._fd)
        except OSError as exc:
            raise StorageError(str(self.path), "write intent log", exc.strerror or str(exc)) \
                from exc
        self._size += len(data)

    def _rewrite(self) -> None:
        """Replace the log with the current state (temp file, fsync, rename)."""
        entries = [[DONE, p, i] for p, i in self._committed.items()]
        entries += [[BEGIN, p, size, i] for p, (size, i) in self._pending.items()]
        data = b"".join(framing.frame(MAGIC, 0, msgpack.packb(e)) for e in entries)
        try:
            self._fd = replace_and_reopen(self.path, data, self._fd)
        except OSError as exc:
            raise StorageError(str(self.path), "rewrite intent log", str(exc)) from exc
        self._size = len(data)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

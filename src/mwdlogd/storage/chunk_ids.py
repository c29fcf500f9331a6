"""Resend keys already made durable (forward chunk ids, HTTP body digests), on disk, so a
resend after a restart is still recognised.

Keys are 16-byte digests (`dedupe_key`), whatever a client sent, so an entry costs the
same at any id size. The log is a directory of append-only segments, each covering a
slice of the window: a segment is fsynced once when it is sealed and deleted whole once
its newest entry has left the window. Nothing is ever rewritten, so an append costs the
same with a million live keys as with none. Appends to the active segment are not
fsynced on their own: the journal batch that carries the same key is, and `sync` runs
before any journal segment holding such keys is deleted.
"""

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from mwdlogd.errors import StorageError
from mwdlogd.storage import framing
from mwdlogd.storage.files import fsync_dir

MAGIC = b"MWC2"
LEGACY_MAGIC = b"MWC1"  # one whole-file log of text keys (before segments)
# The log's directory in each worker's buffer directory; LEGACY is read once, then removed.
CHUNK_IDS = "chunk-ids"
LEGACY = "chunk-ids.log"
SUFFIX = ".ids"
# A segment spans window/SLICES: at most SLICES + 1 segments are live, and a key is
# remembered for at least the window and at most a slice longer.
SLICES = 8
MIN_SPAN_S = 1.0
KEY_BYTES = 16
MOVE_BATCH = 65536  # legacy keys appended per write while moving them


def dedupe_key(kind: bytes, *parts: bytes) -> bytes:
    """The stored key for a resend identity: a 128-bit digest of `kind` and `parts`."""
    digest = hashlib.blake2b(kind, digest_size=KEY_BYTES)
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.digest()


def forward_key(identity: str, chunk: str) -> bytes:
    """A forward chunk's key: client identity (certificate CN / PING name) + chunk id."""
    return dedupe_key(b"forward", identity.encode("utf-8", "surrogateescape"),
                      chunk.encode("utf-8", "surrogateescape"))


def legacy_key(text: str) -> bytes:
    """The key of an id stored as `identity\\0chunk` text by earlier versions."""
    identity, _, chunk = text.partition("\0")
    return forward_key(identity, chunk)


def span_of(window_s: float) -> float:
    return max(window_s / SLICES, MIN_SPAN_S)


def _encode(at: float, keys: list[bytes]) -> bytes:
    """One entry per append: the time in ms as the record id, the keys as its payload
    (one checksum for a journal step's keys, whatever their number)."""
    return framing.frame(MAGIC, int(at * 1000), b"".join(keys))


def _keys(payload: bytes) -> list[bytes]:
    return [payload[i:i + KEY_BYTES] for i in range(0, len(payload), KEY_BYTES)]


Remember = Callable[[list[bytes], float], None]


class ChunkIdLog:
    """One worker's keys: `{directory}/{first entry ms:015d}.ids` segments, oldest first.
    Blocking: every method runs in the journal's worker thread."""

    def __init__(self, directory: Path, *, window_s: float, fsync: bool = True) -> None:
        self.directory = directory
        self._window_s = window_s
        self._span_s = span_of(window_s)
        self._fsync = fsync
        self._sealed: list[tuple[Path, float]] = []  # (segment, time of its newest entry)
        self._fd = -1
        self._active: Path | None = None
        self._active_first = 0.0
        self._active_last = 0.0
        self._dirty = False
        self._unwritten: list[bytes] = []  # keys of failed appends, written by the next one

    def open(self, now: float, remember: Remember) -> int:
        """Calls `remember(keys, time)` for every entry still inside the window, oldest
        segment first, and returns how many; deletes segments wholly out of it and moves
        a legacy log's live keys into a segment. Streams: a million keys cost only what
        `remember` keeps of them."""
        horizon = now - self._window_s
        count = 0
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            for path in sorted(self.directory.glob("*" + SUFFIX)):
                newest = 0.0
                for ms, payload in framing.iterate(MAGIC, path.read_bytes()):
                    newest = max(newest, ms / 1000)
                    if ms / 1000 >= horizon:
                        keys = _keys(payload)
                        remember(keys, ms / 1000)
                        count += len(keys)
                if newest < horizon:
                    path.unlink()
                else:
                    self._sealed.append((path, newest))
            legacy = self.directory.parent / LEGACY
            if legacy.exists():
                count += self._move_legacy(legacy, horizon, remember)
        except OSError as exc:
            raise StorageError(str(self.directory), "open chunk id log", str(exc)) from exc
        return count

    def _move_legacy(self, legacy: Path, horizon: float, remember: Remember) -> int:
        """Keys of the whole-file log of text ids, appended to segments, then it goes."""
        count = 0
        batch: list[bytes] = []
        batch_at = 0.0
        for ms, text in framing.iterate(LEGACY_MAGIC, legacy.read_bytes()):
            at = ms / 1000
            if at < horizon:
                continue
            if batch and (at != batch_at or len(batch) >= MOVE_BATCH):
                self.append(batch, batch_at)
                remember(batch, batch_at)
                count += len(batch)
                batch = []
            batch.append(legacy_key(text.decode("utf-8", "surrogateescape")))
            batch_at = at
        self.append(batch, batch_at)
        remember(batch, batch_at)
        count += len(batch)
        self.sync()
        legacy.unlink()
        return count

    def append(self, keys: list[bytes], now: float) -> None:
        """Writes `keys` and those of earlier appends that failed; on failure they are
        all kept for the next call (the journal still holds them meanwhile)."""
        keys = self._unwritten + keys
        if not keys:
            return
        self._unwritten = keys
        if self._active is None or now - self._active_first >= self._span_s:
            self._seal()
            self._start(now)
        data = _encode(now, keys)
        try:
            os.write(self._fd, data)
        except OSError as exc:
            raise StorageError(str(self._active), "append chunk ids", str(exc)) from exc
        self._unwritten = []
        self._active_last = max(self._active_last, now)
        self._dirty = True
        self._expire(now)

    def sync(self) -> None:
        """Every key appended so far is on disk, or this raises."""
        if self._unwritten:
            raise StorageError(str(self.directory), "sync chunk ids",
                               f"{len(self._unwritten)} ids not written yet")
        self._sync_fd()

    def _sync_fd(self) -> None:
        if self._dirty and self._fsync:
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                raise StorageError(str(self._active), "sync chunk ids", str(exc)) from exc
        self._dirty = False

    def _start(self, now: float) -> None:
        """A new segment named by its first entry's time (never one that exists: segments
        are only ever appended to by the worker that created them)."""
        ms = int(now * 1000)
        while True:
            path = self.directory / f"{ms:015d}{SUFFIX}"
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL,
                                   0o600)
                break
            except FileExistsError:
                ms += 1
            except OSError as exc:
                raise StorageError(str(path), "start chunk id segment", str(exc)) from exc
        try:
            fsync_dir(self.directory)
        except OSError as exc:
            self.close()
            raise StorageError(str(path), "start chunk id segment", str(exc)) from exc
        self._active, self._active_first, self._active_last = path, now, now

    def _seal(self) -> None:
        """The active segment is complete: made durable once, then never written again."""
        if self._active is None:
            return
        self._sync_fd()
        self.close()
        self._sealed.append((self._active, self._active_last))
        self._active = None

    def _expire(self, now: float) -> None:
        """Delete sealed segments whose newest key has left the window (whole files)."""
        while self._sealed and self._sealed[0][1] < now - self._window_s:
            path, _ = self._sealed.pop(0)
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise StorageError(str(path), "delete expired chunk ids", str(exc)) from exc

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class PeerChunkIds:
    """Other workers' chunk id directories, read as their segments grow: a resend that
    reconnects to another worker is still recognised. Each worker appends a key to its
    log right after the journal fsync and before the ack, so any resend of an acked
    chunk finds it here. Segments are only appended to and deleted, never rewritten."""

    def __init__(self, directories: list[Path]) -> None:
        self._directories = directories
        self._offsets: dict[Path, int] = {}  # segment -> bytes of whole entries read

    def read_new(self) -> list[tuple[float, list[bytes]]]:
        """(time, keys) of every whole entry appended since the last call."""
        found: list[tuple[float, list[bytes]]] = []
        seen: set[Path] = set()
        for directory in self._directories:
            try:
                with os.scandir(directory) as entries:
                    segments = sorted((e.path, e.stat().st_size) for e in entries
                                      if e.name.endswith(SUFFIX))
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StorageError(str(directory), "list a worker's chunk ids", str(exc)) from exc
            for name, size in segments:
                path = Path(name)
                seen.add(path)
                offset = self._offsets.get(path, 0)
                if size > offset:
                    found += self._read(path, offset)
        self._offsets = {path: offset for path, offset in self._offsets.items() if path in seen}
        return found

    def _read(self, path: Path, offset: int) -> list[tuple[float, list[bytes]]]:
        try:
            with open(path, "rb") as file:
                file.seek(offset)
                records, valid = framing.scan(MAGIC, file.read())
        except FileNotFoundError:  # expired since it was listed
            return []
        except OSError as exc:
            raise StorageError(str(path), "read a worker's chunk ids", str(exc)) from exc
        self._offsets[path] = offset + valid
        return [(ms / 1000, _keys(payload)) for ms, payload in records]

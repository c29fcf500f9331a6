"""The write-ahead journal: accepted batches, appended and fsynced before they are acked.

Segments `{dir}/{first_id:020d}.wal` hold framed batches with increasing ids. A segment
is deleted once every batch in it is in its hourly file (`release`). On start-up,
`open` reads every segment, cuts a torn tail, and starts a fresh segment. Blocking:
every method runs in a worker thread, one call at a time.
"""

import contextlib
import logging
import os
from pathlib import Path

import attrs

from mwdlogd import log
from mwdlogd.errors import StorageError
from mwdlogd.storage import framing
from mwdlogd.storage.files import fsync_dir

MAGIC = b"MWJ1"
# Big enough that rotation is rare, small enough that a written-out segment frees disk soon.
SEGMENT_BYTES = 64 * 1024 * 1024
SUFFIX = ".wal"
RELEASE_ACTIVE_BYTES = 1024 * 1024


@attrs.define
class Segment:
    path: Path
    last_id: int  # -1 while empty
    size: int


class Journal:
    def __init__(self, directory: Path, *, fsync: bool = True,
                 segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = directory
        self._fsync = fsync
        self._segment_bytes = segment_bytes
        self._sealed: list[Segment] = []
        self._active: Segment | None = None
        self._fd = -1
        self._floor = 0  # ids never go below a segment name seen on disk
        self.next_id = 0

    @property
    def size_bytes(self) -> int:
        return sum(s.size for s in self._sealed) + (self._active.size if self._active else 0)

    def open(self) -> list[tuple[int, bytes]]:
        """Recover: every whole batch still in the journal, oldest first.

        Empty segments go only once the new active one exists: a segment's name is what
        keeps ids from ever going back (files' ledgers compare them)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            batches = [b for path in sorted(self.directory.glob("*" + SUFFIX))
                       for b in self._recover_segment(path)]
            self.next_id = max([self._floor, *(record_id + 1 for record_id, _ in batches)])
            empty = [p for p in self.directory.glob("*" + SUFFIX) if p.stat().st_size == 0]
            self._start_segment()
            for path in empty:
                if self._active is None or path != self._active.path:
                    path.unlink()
        except OSError as exc:
            raise StorageError(str(self.directory), "open journal", str(exc)) from exc
        return batches

    def _recover_segment(self, path: Path) -> list[tuple[int, bytes]]:
        data = path.read_bytes()
        records, valid = framing.scan(MAGIC, data)
        if valid < len(data):
            log.event(logging.WARNING, "journal_torn_tail", segment=path.name,
                      cut_bytes=len(data) - valid, kept_batches=len(records))
            os.truncate(path, valid)
        first = int(path.name.removesuffix(SUFFIX))
        self._floor = max(self._floor, first)
        if records:
            self._sealed.append(Segment(path, records[-1][0], valid))
        return records

    def _start_segment(self) -> None:
        path = self.directory / f"{self.next_id:020d}{SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._active = Segment(path, -1, 0)
        fsync_dir(self.directory)

    def append(self, payloads: list[bytes]) -> list[int]:
        """Write the batches, then fsync once for all of them (group commit); their ids."""
        assert self._active is not None
        ids = list(range(self.next_id, self.next_id + len(payloads)))
        data = b"".join(framing.frame(MAGIC, i, p) for i, p in zip(ids, payloads, strict=True))
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            if self._fsync:
                os.fdatasync(self._fd)
        except OSError as exc:
            # Nothing of a failed group may stay: a later batch after a torn one would be
            # cut off with it at recovery. If this fails too, recovery cuts the tail.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._active.size)
            raise StorageError(str(self._active.path), "append journal",
                               exc.strerror or str(exc)) from exc
        self.next_id += len(payloads)
        self._active.last_id = ids[-1]
        self._active.size += len(data)
        if self._active.size >= self._segment_bytes:
            self._seal()
        return ids

    def _seal(self) -> None:
        assert self._active is not None
        os.close(self._fd)
        self._sealed.append(self._active)
        self._start_segment()

    def releasable(self, watermark: int, *, final: bool = False) -> bool:
        """Would `release` delete anything?"""
        active = self._active
        return bool(self._sealed and self._sealed[0].last_id < watermark) or bool(
            active and -1 < active.last_id < watermark
            and (final or active.size >= RELEASE_ACTIVE_BYTES))

    def release(self, watermark: int, *, final: bool = False) -> int:
        """Delete segments whose batches all have ids below `watermark`; bytes freed.

        The active segment is sealed first when it is wholly written and past
        RELEASE_ACTIVE_BYTES (or at shutdown, `final`), so old batches do not linger.
        """
        active = self._active
        if active and -1 < active.last_id < watermark and (
                final or active.size >= RELEASE_ACTIVE_BYTES):
            self._seal()
        freed = 0
        while self._sealed and self._sealed[0].last_id < watermark:
            segment = self._sealed.pop(0)
            segment.path.unlink(missing_ok=True)
            freed += segment.size
        return freed

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

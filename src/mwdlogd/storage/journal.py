"""The write-ahead journal: accepted batches, appended and fsynced before they are acked.

Segments `{dir}/{first_id:020d}.wal` hold framed batches with increasing ids. A segment
is deleted once every batch in it is in its hourly file (`release`). On start-up,
`open` reads every segment, cuts a torn tail, and starts a fresh segment. Blocking:
every method runs in a worker thread, one call at a time.

Faults raise StorageError and leave the journal consistent, so a later call retries: a
new segment that cannot be created (EMFILE, ENOSPC, EROFS, EACCES) keeps the current one
active; a batch that was written and fsynced is acked even when the segment switch after
it fails. A segment file removed under the running server (its buffer directory deleted)
is noticed at the next append and every append is refused until each batch the journal
held is in its hourly file; then the directory is made again and journaling resumes.
"""

import contextlib
import errno
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
# Free space the journal leaves on its filesystem for the append ledger and chunk id log
# (a page per hourly file state): a journal that took the last bytes would stop every
# file write, so nothing would ever be released (seen with 54 files on a 1 MiB tmpfs).
DISK_RESERVE_BYTES = 1024 * 1024


@attrs.define
class Segment:
    path: Path
    last_id: int  # -1 while empty
    size: int


class Journal:
    def __init__(self, directory: Path, *, fsync: bool = True,
                 segment_bytes: int = SEGMENT_BYTES,
                 reserve_bytes: int = DISK_RESERVE_BYTES) -> None:
        self.directory = directory
        self._reserve_bytes = reserve_bytes
        self._fsync = fsync
        self._segment_bytes = segment_bytes
        self._sealed: list[Segment] = []
        self._active: Segment | None = None
        self._fd = -1
        self._floor = 0  # ids never go below a segment name seen on disk
        self._lost: str | None = None
        self.release_problem: str | None = None  # the last release's failure, until one works
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
        """Open the next segment and make it active; the current one (if any) is sealed only
        once the new one exists, so a failure leaves it active and open. Raises OSError."""
        path = self.directory / f"{self.next_id:020d}{SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            raise
        if self._active is not None:
            os.close(self._fd)
            self._sealed.append(self._active)
        self._fd, self._active = fd, Segment(path, -1, 0)

    @property
    def lost(self) -> str | None:
        """Why appends are refused after the journal's files were removed, else None."""
        return self._lost

    def check(self) -> None:
        """Raise StorageError when the active segment was removed from the directory."""
        if self._lost is None and self._active is not None:
            try:
                removed = os.fstat(self._fd).st_nlink == 0
            except OSError as exc:
                raise StorageError(str(self._active.path), "check journal", str(exc)) from exc
            if removed:
                os.close(self._fd)
                self._fd, self._active, self._sealed = -1, None, []
                self._lost = (f"journal segment removed from {self.directory} while running "
                              f"(buffer directory deleted?)")
        if self._lost is not None:
            raise StorageError(str(self.directory), "append journal",
                               f"{self._lost}; refusing batches until every batch it held "
                               f"is in its hourly file")

    def append(self, payloads: list[bytes], spans: list[int] | None = None) -> list[int]:
        """Write the batches, then fsync once for all of them (group commit); their ids.

        A batch spanning n ids (a streamed request's pieces, in a spool file) takes the
        next n and is framed with the last of them, which is the id returned for it.
        Raises StorageError without keeping anything of them."""
        self.check()
        if self._active is None:
            self._reopen()
        assert self._active is not None
        ids, next_id = [], self.next_id
        for span in spans or [1] * len(payloads):
            next_id += span
            ids.append(next_id - 1)
        data = b"".join(framing.frame(MAGIC, i, p) for i, p in zip(ids, payloads, strict=True))
        try:
            self._check_room(len(data))
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
        self.next_id = next_id
        self._active.last_id = ids[-1]
        self._active.size += len(data)
        if self._active.size >= self._segment_bytes:
            # The batches are durable whatever happens here; a failed switch is retried at
            # the next append (the segment grows past segment_bytes meanwhile).
            with contextlib.suppress(StorageError):
                self._seal()
        return ids

    def _check_room(self, size: int) -> None:
        """Raise OSError(ENOSPC) when `size` bytes would eat into the disk reserve."""
        if self._reserve_bytes:
            stat = os.fstatvfs(self._fd)
            free = stat.f_bavail * stat.f_frsize
            if free < size + self._reserve_bytes:
                raise OSError(errno.ENOSPC, f"No space left on device: {free} bytes free, "
                                            f"{self._reserve_bytes} kept for the ledger")

    def _seal(self) -> None:
        try:
            self._start_segment()
        except OSError as exc:
            raise StorageError(str(self.directory), "start journal segment",
                               exc.strerror or str(exc)) from exc

    def _reopen(self) -> None:
        """After a removal was noticed and every batch is written: start afresh."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(str(self.directory), "create journal directory",
                               exc.strerror or str(exc)) from exc
        self._seal()

    @property
    def oldest_id(self) -> int:
        """No batch below this id is in the journal's files any more."""
        first = self._sealed[0] if self._sealed else self._active
        return int(first.path.name.removesuffix(SUFFIX)) if first else self.next_id

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
        Raises StorageError once it has deleted what it could.
        """
        if self._lost is not None and watermark >= self.next_id:
            log.event(logging.WARNING, "journal_resumed", directory=str(self.directory),
                      detail="every batch of the removed journal is in its hourly file")
            self._lost = None
        active = self._active
        problem = None
        if active and -1 < active.last_id < watermark and (
                final or active.size >= RELEASE_ACTIVE_BYTES):
            try:
                self._seal()
            except StorageError as exc:
                problem = exc
        freed = 0
        while self._sealed and self._sealed[0].last_id < watermark:
            segment = self._sealed[0]
            try:
                segment.path.unlink(missing_ok=True)
            except OSError as exc:
                error = StorageError(str(segment.path), "delete journal segment",
                                     exc.strerror or str(exc))
                self.release_problem = str(error)
                raise error from exc
            self._sealed.pop(0)
            freed += segment.size
        self.release_problem = str(problem) if problem is not None else None
        if problem is not None:
            raise problem
        return freed

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

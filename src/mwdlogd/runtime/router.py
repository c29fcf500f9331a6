"""Routes each batch to the writer of every hourly file it touches; retires closed hours."""

import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import trio

from mwdlogd import log
from mwdlogd.errors import StorageError
from mwdlogd.model import Destination, Group
from mwdlogd.runtime.batch import FlushAll, Message, Submission
from mwdlogd.runtime.channels import Wake, receive_until
from mwdlogd.runtime.tail import TailHub
from mwdlogd.runtime.tracker import BatchTracker
from mwdlogd.runtime.writer import BatchPart, DestinationWriter, Store, WriterSettings
from mwdlogd.storage.spool import read_pieces, spool_path
from mwdlogd.telemetry import Telemetry

HOUR_S = 3600


@attrs.define
class _Open:
    writer: DestinationWriter
    last_used: float  # wall clock


class Router:
    """Owns the writer tasks. A writer is closed (and so flushed) once its hour is over and
    it has had no records for `timekey_wait`; records that come later for that hour open a
    new writer, which waits for its predecessor so appends to one file never overlap."""

    def __init__(self, *, store: Store, settings: Callable[[], WriterSettings],
                 timekey_wait_s: Callable[[], float],
                 telemetry: Telemetry, tracker: BatchTracker, tail: TailHub | None = None,
                 wall_clock: Callable[[], float] = time.time,
                 spool_dir: Path | None = None) -> None:
        self._spool_dir = spool_dir
        self._spool_reader = trio.CapacityLimiter(1)
        self._tail = tail
        self._store = store
        self._tracker = tracker
        self._settings = settings
        self._timekey_wait_s = timekey_wait_s
        self._telemetry = telemetry
        self._wall_clock = wall_clock
        self._writers: dict[Destination, _Open] = {}
        self._live: set[DestinationWriter] = set()
        # The newest live writer of each file, the predecessor of the next one (a scan of
        # `_live` per new writer made 5,000 sites in one request quadratic: 0.2 s stalls).
        self._newest: dict[Destination, DestinationWriter] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, receive: trio.MemoryReceiveChannel[Message], *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Runs until `receive` is closed, then closes every writer and waits for them."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            async with receive:
                while True:
                    message = await receive_until(receive, self._next_close_at())
                    if message is Wake.CLOSED:
                        break
                    if isinstance(message, Submission):
                        await self._route(message)
                    elif isinstance(message, FlushAll):
                        nursery.start_soon(self._flush_all, message)
                    await self._close_finished_hours()
            for entry in self._writers.values():
                await entry.writer.close()
            self._writers.clear()

    @property
    def open_files(self) -> int:
        return len(self._writers)

    def pending_bytes(self) -> int:
        return sum(w.pending_bytes for w in self._live)

    def pending_files(self) -> int:
        return sum(1 for w in self._live if w.pending_bytes)

    def failing_writes(self) -> list[str]:
        """`path: error` of every file whose last write failed and is being retried."""
        return sorted(f"{w.destination.path}: {w.failing}" for w in self._live
                      if w.failing is not None)

    def timekeys(self) -> list[int]:
        """Hours with an open file (Fluentd's buffer_timekeys)."""
        return sorted({destination.hour for destination in self._writers})

    async def _flush_all(self, marker: FlushAll) -> None:
        """Flush every writer, including those already closing, then signal the marker."""
        async def flush(writer: DestinationWriter) -> None:
            result = await writer.flush()
            marker.records += result.records
            marker.files += 1 if result.records else 0
            marker.failed_files += 1 if result.failed else 0

        async with trio.open_nursery() as nursery:
            for writer in list(self._live):
                nursery.start_soon(flush, writer)
        marker.done.set()

    async def _route(self, submission: Submission) -> None:
        if submission.spool is not None:
            await self._route_spooled(submission)
            return
        for group in submission.groups:
            await self._route_group(submission.tag, submission.batch_id, group)

    async def _route_group(self, tag: str, batch_id: int, group: Group) -> None:
        self._telemetry.batch_routed(group.destination.log_type, group.count)
        if self._tail is not None:
            self._tail.publish(group.destination, group.data)
        await self._writer(group.destination).submit(
            BatchPart(tag, batch_id, group.data, group.count))

    async def _route_spooled(self, submission: Submission) -> None:
        """A streamed request's pieces, read from its spool file one at a time (the
        writers' queues hold the router back, so memory stays bounded)."""
        assert self._spool_dir is not None and submission.spool is not None
        pieces: Iterator[list[Group]] = read_pieces(
            spool_path(self._spool_dir, submission.spool))
        for index, meta in enumerate(submission.pieces):
            batch_id = submission.first_id + index
            try:
                groups = await trio.to_thread.run_sync(next, pieces,
                                                       limiter=self._spool_reader)
            except StorageError as exc:  # removed under the running server
                self._spool_lost(submission, index, str(exc))
                return
            if not meta.groups:
                continue
            for group in groups:
                if batch_id > submission.skip.get(group.destination, -1):
                    await self._route_group(submission.tag, batch_id, group)

    def _spool_lost(self, submission: Submission, index: int, error: str) -> None:
        """Say what was lost, and release its ids so the journal does not wait for them."""
        left = submission.pieces[index:]
        log.event(logging.ERROR, "spool_lost", error=error, batch_id=submission.batch_id,
                  records=sum(p.count for p in left), detail="a committed streamed "
                  "request's spool file is gone or damaged; these records are lost")
        for offset, meta in enumerate(left):
            self._tracker.written([submission.first_id + index + offset] * meta.groups)

    def _writer(self, destination: Destination) -> DestinationWriter:
        entry = self._writers.get(destination)
        if entry is None:
            previous = self._newest.get(destination)
            writer = DestinationWriter(destination, store=self._store, settings=self._settings,
                                       telemetry=self._telemetry, written=self._tracker.written,
                                       predecessor=previous)
            entry = self._writers[destination] = _Open(writer, 0.0)
            self._live.add(writer)
            self._newest[destination] = writer
            assert self._nursery is not None
            self._nursery.start_soon(self._run_writer, writer)
        entry.last_used = self._wall_clock()
        return entry.writer

    async def _run_writer(self, writer: DestinationWriter) -> None:
        try:
            await writer.run()
        finally:
            self._live.discard(writer)
            if self._newest.get(writer.destination) is writer:
                del self._newest[writer.destination]

    def _close_wall_time(self, entry: _Open) -> float:
        return max(entry.writer.destination.hour + HOUR_S, entry.last_used) \
            + self._timekey_wait_s()

    def _next_close_at(self) -> float:
        """Trio-clock deadline of the next writer to close, or inf."""
        if not self._writers:
            return math.inf
        soonest = min(map(self._close_wall_time, self._writers.values()))
        return trio.current_time() + max(0.0, soonest - self._wall_clock())

    async def _close_finished_hours(self) -> None:
        now = self._wall_clock()
        for destination, entry in list(self._writers.items()):
            if self._close_wall_time(entry) <= now:
                del self._writers[destination]
                await entry.writer.close()

"""One task per hourly file: compresses its records as they come, appends one member per
flush, and retries failed writes (the retry supervisor of DESIGN §4)."""

import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import attrs
import trio

from mwdlogd import log
from mwdlogd.errors import StorageError
from mwdlogd.model import Destination
from mwdlogd.runtime.channels import Wake, receive_until
from mwdlogd.storage.hourly import MemberBuilder
from mwdlogd.telemetry import Telemetry

# Chunks queued per writer before the router waits: enough to ride out one slow flush.
WRITER_QUEUE = 16
# Raw bytes gathered before they are compressed in a worker thread (bounds memory per file).
COMPRESS_BLOCK = 1024 * 1024
# Raw bytes per gzip member: a backlog is several members, so when the disk cannot take it
# all at once it is written member by member (a 5.8 MB backlog in one member never fit
# on an emptied 4 MiB filesystem). 4 MiB of Engine logs compress to about 0.5 MiB.
MEMBER_BYTES = 4 * 1024 * 1024
RETRY_BASE_S = 1.0
# Each flush waits up to this share of flush_interval longer, at random: files that filled
# together do not all flush (compress, append, fsync) in the same instant, which showed
# as ack latency spikes (the journal's fsync queued behind hundreds of file fsyncs).
FLUSH_SPREAD = 0.2


class Store(Protocol):
    async def compress(self, builder: MemberBuilder, data: bytes) -> None: ...
    async def finish(self, builder: MemberBuilder, tail: bytes) -> bytes: ...
    async def append(self, destination: Destination, members: bytes, max_id: int) -> int: ...
    async def fail(self, destination: Destination, members: bytes, max_id: int,
                   error: str) -> Path: ...


@attrs.frozen
class BatchPart:
    """Records of one journal batch for one file (not a Fluentd chunk: those are the
    writer's pending members, bounded by buffer.chunk_limit)."""

    tag: str
    batch_id: int
    data: bytes
    count: int


@attrs.define
class FlushRequest:
    """A flush asked from outside; the writer fills in what it wrote."""

    done: trio.Event = attrs.field(factory=trio.Event)
    records: int = 0  # written by this flush (a failed one may have written some)
    failed: bool = False


@attrs.define
class Member:
    """A finished gzip member and what it holds; appended whole or not at all."""

    data: bytes
    batch_ids: list[int]
    by_tag: Counter[str]
    raw_bytes: int


@attrs.frozen(kw_only=True)
class WriterSettings:
    """Keyword-only: four numbers of like types are easy to pass in the wrong order."""

    flush_interval_s: float
    chunk_limit: int
    retry_max_interval_s: float
    retry_timeout_s: float
    compression: str = "zlib"
    flush_spread: float = FLUSH_SPREAD


class DestinationWriter:
    """Flushes on `flush_interval`, at `chunk_limit` bytes, on request and when closed.

    A failed write keeps everything pending and is retried with exponential backoff
    (1 s doubling, up to `retry_max_interval`); past `retry_timeout` the chunk moves to
    the failed/ area. `written(batch_ids)` is told of every group that reached a file.
    A `predecessor` (the closed writer of the same file) finishes before this one writes.
    `settings` is called at each use, so a reload applies from the next chunk or flush.
    """

    def __init__(self, destination: Destination, *, store: Store,
                 settings: Callable[[], WriterSettings], telemetry: Telemetry,
                 written: Callable[[Iterable[int]], None],
                 predecessor: "DestinationWriter | None" = None) -> None:
        self.destination = destination
        self.finished = trio.Event()
        self._store = store
        self._settings = settings
        self._telemetry = telemetry
        self._written = written
        self._predecessor = predecessor
        self._send, self._receive = trio.open_memory_channel[BatchPart | FlushRequest](WRITER_QUEUE)
        self._builder = MemberBuilder(self._settings().compression)
        self._raw: list[bytes] = []
        self._raw_bytes = 0
        self._open = Member(b"", [], Counter(), 0)  # what the builder holds
        self._members: list[Member] = []  # finished, not yet appended
        self._pending_bytes = 0
        self._batch_ids: list[int] = []
        self._by_tag: Counter[str] = Counter()
        self._deadline = math.inf
        self._failures = 0
        self._failing_since: float | None = None
        self.failing: str | None = None  # the last write error while retrying, for /health

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    async def submit(self, part: BatchPart) -> None:
        await self._send.send(part)

    async def flush(self) -> FlushRequest:
        """Returns once what was pending when called has been tried (or the writer ended),
        saying how many records that flush wrote."""
        request = FlushRequest()
        try:
            await self._send.send(request)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            await self.finished.wait()
            return request
        await request.done.wait()
        return request

    async def close(self) -> None:
        """No more chunks: the writer flushes what it has and ends."""
        await self._send.aclose()

    async def run(self) -> None:
        try:
            if self._predecessor is not None:
                await self._predecessor.finished.wait()
                self._predecessor = None
            async with self._receive:
                await self._serve()
            while self._batch_ids:
                if not await self._flush():
                    await trio.sleep_until(self._deadline)
        finally:
            self.finished.set()
            if self._batch_ids:
                log.event(logging.WARNING, "left_in_journal", path=self.destination.path,
                          records=sum(self._by_tag.values()),
                          detail="not written before shutdown; recovered at next start")

    async def _serve(self) -> None:
        while True:
            message = await receive_until(self._receive, self._deadline)
            if message is Wake.CLOSED:
                return
            if isinstance(message, BatchPart):
                await self._add(message)
                if self._pending_bytes < self._settings().chunk_limit:
                    continue
            pending = sum(self._by_tag.values())
            written = await self._flush()
            if isinstance(message, FlushRequest):  # a failed flush may have written a part
                message.records = pending - sum(self._by_tag.values())
                message.failed = not written
                message.done.set()

    async def _add(self, part: BatchPart) -> None:
        self._raw.append(part.data)
        self._raw_bytes += len(part.data)
        self._pending_bytes += len(part.data)
        self._batch_ids.append(part.batch_id)
        self._by_tag[part.tag] += part.count
        self._open.batch_ids.append(part.batch_id)
        self._open.by_tag[part.tag] += part.count
        self._open.raw_bytes += len(part.data)
        if self._deadline == math.inf:
            self._deadline = trio.current_time() + self._settings().flush_interval_s * (
                1 + self._settings().flush_spread * random.random())
        if self._open.raw_bytes >= MEMBER_BYTES:
            await self._finish_member()
        elif self._raw_bytes >= COMPRESS_BLOCK:
            await self._store.compress(self._builder, self._take_raw())

    async def _finish_member(self) -> None:
        self._open.data = await self._store.finish(self._builder, self._take_raw())
        self._members.append(self._open)
        self._open = Member(b"", [], Counter(), 0)
        self._builder = MemberBuilder(self._settings().compression)

    def _take_raw(self) -> bytes:
        data = b"".join(self._raw)
        self._raw, self._raw_bytes = [], 0
        return data

    async def _flush(self) -> bool:
        """Append everything pending; False (and a retry deadline) on failure.

        All members go in one append (one fsync); when that fails, one member at a time,
        so that a backlog larger than the free space still makes progress."""
        if not self._batch_ids:
            return True
        if self._open.batch_ids:
            await self._finish_member()
        take = len(self._members)
        while self._members:
            members = self._members[:take]
            started = trio.current_time()
            try:
                size = await self._store.append(self.destination, b"".join(m.data for m in members),
                                                max(i for m in members for i in m.batch_ids))
            except StorageError as exc:
                if take > 1:
                    take = 1
                    continue
                return await self._failed(exc)
            del self._members[:take]
            self._appended(members, size, trio.current_time() - started)
        self._settled()
        return True

    def _appended(self, members: list[Member], size: int, seconds: float) -> None:
        by_tag: Counter[str] = sum((m.by_tag for m in members), Counter())
        ids = [i for m in members for i in m.batch_ids]
        self._telemetry.records_written(self.destination.path, by_tag, size, seconds)
        self._written(ids)
        self._batch_ids = self._batch_ids[len(ids):]
        self._by_tag -= by_tag
        self._pending_bytes -= sum(m.raw_bytes for m in members)
        self._failures, self._failing_since = 0, None  # progress: the retry clock restarts

    async def _failed(self, exc: StorageError) -> bool:
        now = trio.current_time()
        self._failing_since = self._failing_since if self._failing_since is not None else now
        if now - self._failing_since >= self._settings().retry_timeout_s:
            try:
                moved = await self._store.fail(self.destination,
                                               b"".join(m.data for m in self._members),
                                               max(self._batch_ids), str(exc))
            except StorageError as fail_exc:
                exc = fail_exc
            else:
                self._telemetry.chunk_failed(self.destination.path, str(exc),
                                             sum(self._by_tag.values()), str(moved))
                self._written(self._batch_ids)
                self._members, self._pending_bytes, self._batch_ids = [], 0, []
                self._by_tag = Counter()
                self._settled()
                return True
        self._failures += 1
        delay = min(RETRY_BASE_S * 2 ** (self._failures - 1),
                    self._settings().retry_max_interval_s)
        self._deadline = now + delay
        self.failing = str(exc)
        self._telemetry.write_failed(self.destination.path, str(exc),
                                     sum(self._by_tag.values()), delay)
        return False

    def _settled(self) -> None:
        """Nothing pending any more: no deadline, no failure."""
        self._deadline, self._failures, self._failing_since = math.inf, 0, None
        self.failing = None

"""One task per hourly file: collects its records and appends them as gzip members."""

import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable

import attrs
import trio

from mwdlogd import log
from mwdlogd.errors import StorageError
from mwdlogd.runtime.channels import Wake, receive_until
from mwdlogd.telemetry import Telemetry

# Chunks queued per writer before the router waits: enough to ride out one slow flush.
WRITER_QUEUE = 16
RETRY_BASE_S = 1.0

Store = Callable[[str, bytes], Awaitable[int]]


@attrs.frozen
class Chunk:
    """Records of one batch for one file."""

    tag: str
    lines: list[bytes]
    size: int


@attrs.frozen
class FlushRequest:
    done: trio.Event


@attrs.frozen
class WriterSettings:
    flush_interval_s: float
    chunk_limit: int
    retry_max_interval_s: float


class DestinationWriter:
    """Flushes on `flush_interval`, at `chunk_limit` bytes, on request and when closed.

    A `predecessor` (the closed writer of the same file) finishes before this one writes.

    A failed write keeps the records pending and is retried with exponential backoff
    (1 s doubling, up to `retry_max_interval`); nothing is dropped silently.
    """

    def __init__(self, path: str, *, store: Store, settings: WriterSettings,
                 telemetry: Telemetry, predecessor: "DestinationWriter | None" = None) -> None:
        self.path = path
        self._predecessor = predecessor
        self.finished = trio.Event()
        self._store = store
        self._settings = settings
        self._telemetry = telemetry
        self._send, self._receive = trio.open_memory_channel[Chunk | FlushRequest](WRITER_QUEUE)
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._by_tag: Counter[str] = Counter()
        self._deadline = math.inf
        self._failures = 0

    async def submit(self, chunk: Chunk) -> None:
        await self._send.send(chunk)

    async def flush(self) -> None:
        """Returns once what was pending when called has been tried (or the writer ended)."""
        done = trio.Event()
        try:
            await self._send.send(FlushRequest(done))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            await self.finished.wait()
            return
        await done.wait()

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
            while self._pending:
                if not await self._flush():
                    await trio.sleep_until(self._deadline)
        finally:
            self.finished.set()
            if self._pending:
                log.event(logging.ERROR, "records_not_written", path=self.path,
                          records=len(self._pending), reason="shutdown before a write succeeded")

    async def _serve(self) -> None:
        while True:
            message = await receive_until(self._receive, self._deadline)
            if message is Wake.CLOSED:
                return
            if isinstance(message, Chunk):
                self._add(message)
                if self._pending_bytes < self._settings.chunk_limit:
                    continue
            await self._flush()
            if isinstance(message, FlushRequest):
                message.done.set()

    def _add(self, chunk: Chunk) -> None:
        self._pending.extend(chunk.lines)
        self._pending_bytes += chunk.size
        self._by_tag[chunk.tag] += len(chunk.lines)
        if self._deadline == math.inf:
            self._deadline = trio.current_time() + self._settings.flush_interval_s

    async def _flush(self) -> bool:
        """Append everything pending as one member; False (and a retry deadline) on failure."""
        if not self._pending:
            return True
        started = trio.current_time()
        try:
            size = await self._store(self.path, b"".join(self._pending))
        except StorageError as exc:
            self._failures += 1
            delay = min(RETRY_BASE_S * 2 ** (self._failures - 1),
                        self._settings.retry_max_interval_s)
            self._deadline = trio.current_time() + delay
            self._telemetry.write_failed(self.path, str(exc), len(self._pending), delay)
            return False
        self._telemetry.records_written(self.path, self._by_tag, size,
                                        trio.current_time() - started)
        self._pending, self._pending_bytes, self._by_tag = [], 0, Counter()
        self._deadline, self._failures = math.inf, 0
        return True

"""Live tail: normalised records fanned out to WebSocket viewers, never slowing ingest.

Each viewer has a queue bounded in records and in bytes, filled with send_nowait; when it
is full the record is dropped for that viewer and counted. With no viewer, publishing
costs one check.
"""

import random
from collections.abc import Iterator
from contextlib import contextmanager

import attrs
import trio

from mwdlogd.model import Destination
from mwdlogd.pipeline.paths import safe_customer, safe_fqdn
from mwdlogd.telemetry import Telemetry

# Records a viewer may fall behind by before it starts losing them.
VIEWER_QUEUE = 1000
# ... and bytes: 3 stalled viewers and 100 records of 1 MB held 339 MB.
VIEWER_BYTES = 4 * 1024 * 1024


@attrs.frozen
class TailFilter:
    """Matches a Destination's fields, so names are made safe once, here, as in the tree;
    `log_type` "invalid" or "unmatched" picks a stream.

    `allowed` is the viewer's identity's customers (None = any; config names are
    directory names). A restricted viewer sees its customers' directories only, never
    the `_invalid`/`_unmatched` streams, which hold every customer's mistakes.
    """

    customer: str | None = None
    log_type: str | None = None
    fqdn: str | None = None
    sample: float = 1.0
    allowed: frozenset[str] | None = None

    @classmethod
    def from_query(cls, customer: str | None, log_type: str | None, fqdn: str | None,
                   sample: float, allowed: frozenset[str] | None = None) -> "TailFilter":
        return cls(safe_customer(customer) if customer else None, log_type or None,
                   safe_fqdn(fqdn) if fqdn else None, sample, allowed)

    def matches(self, destination: Destination) -> bool:
        if destination.customer is None:  # a stream
            return self.allowed is None and self.customer is None and self.fqdn is None \
                and self.log_type in (None, destination.log_type)
        return ((self.allowed is None or destination.customer in self.allowed)
                and (self.customer is None or destination.customer == self.customer)
                and (self.log_type is None or destination.log_type == self.log_type)
                and (self.fqdn is None or destination.fqdn == self.fqdn))


@attrs.define(eq=False)
class _Viewer:
    filter: TailFilter
    send: trio.MemorySendChannel[bytes]
    queued_bytes: int = 0


class ViewerQueue:
    """One viewer's records, oldest first (`async for`); taking one frees its bytes."""

    def __init__(self, viewer: _Viewer, receive: trio.MemoryReceiveChannel[bytes]) -> None:
        self._viewer = viewer
        self._receive = receive

    def __aiter__(self) -> "ViewerQueue":
        return self

    async def __anext__(self) -> bytes:
        try:
            line = await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
        self._viewer.queued_bytes -= len(line)
        return line


class TailHub:
    def __init__(self, telemetry: Telemetry, *, queue_size: int = VIEWER_QUEUE,
                 queue_bytes: int = VIEWER_BYTES) -> None:
        self._telemetry = telemetry
        self._queue_size = queue_size
        self._queue_bytes = queue_bytes
        self._viewers: set[_Viewer] = set()
        self._random = random.Random()

    @contextmanager
    def viewer(self, tail_filter: TailFilter) -> Iterator[ViewerQueue]:
        send, receive = trio.open_memory_channel[bytes](self._queue_size)
        viewer = _Viewer(tail_filter, send)
        self._viewers.add(viewer)
        self._telemetry.tail_viewers = len(self._viewers)
        try:
            yield ViewerQueue(viewer, receive)
        finally:
            self._viewers.discard(viewer)
            self._telemetry.tail_viewers = len(self._viewers)

    def publish(self, destination: Destination, data: bytes) -> None:
        """One file's records of a batch (newline-terminated JSON lines)."""
        if not self._viewers:
            return
        for viewer in self._viewers:
            if viewer.filter.matches(destination):
                self._offer(viewer, data)

    def _offer(self, viewer: _Viewer, data: bytes) -> None:
        dropped = 0
        for line in data.splitlines():
            if viewer.filter.sample < 1.0 and self._random.random() >= viewer.filter.sample:
                continue
            if viewer.queued_bytes + len(line) > self._queue_bytes:
                dropped += 1
                continue
            try:
                viewer.send.send_nowait(line)
            except trio.WouldBlock:
                dropped += 1
            else:
                viewer.queued_bytes += len(line)
        if dropped:
            self._telemetry.tail_messages_dropped(dropped)

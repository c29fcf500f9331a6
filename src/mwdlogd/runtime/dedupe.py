"""Resends are not duplicates: keys of batches made durable, per client, for a window.

out_forward resends a chunk with the same id when an ack is lost or late, and HTTP
forwarders resend a byte-identical body when a response is late or the connection
breaks; the second copy is answered without being stored again. A resend that arrives
while the first copy is still being committed waits for its outcome.

Keys are kept in time slices (as the on-disk log's segments are): a lookup checks the
few live slices, and a slice is dropped whole once it has left the window, so memory
per key is a 16-byte digest in a set, and expiry costs nothing per key.
"""

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import attrs
import trio

from mwdlogd.storage.chunk_ids import PeerChunkIds, span_of


@attrs.frozen
class Dedupe:
    """A batch's resend key (`storage.chunk_ids.dedupe_key`) and how long it is honoured."""

    key: bytes
    window_s: float


class ChunkMemory:
    def __init__(self, window_s: float, clock: Callable[[], float] = time.time) -> None:
        """`window_s` is the longest window any caller passes."""
        self._window_s = window_s
        self._span_s = span_of(window_s)
        self._clock = clock
        self._slices: dict[int, set[bytes]] = {}  # slice index -> keys made durable in it
        self._in_flight: dict[bytes, trio.Event] = {}

    def __len__(self) -> int:
        return sum(len(keys) for keys in self._slices.values())

    def remember(self, keys: list[bytes], at: float) -> None:
        self._slices.setdefault(int(at // self._span_s), set()).update(keys)

    def is_durable(self, dedupe: Dedupe) -> bool:
        """Made durable within `dedupe.window_s` (or up to one slice longer)."""
        now = self._clock()
        oldest = int((now - self._window_s) // self._span_s)
        for index in [i for i in self._slices if i < oldest]:
            del self._slices[index]
        first = int((now - dedupe.window_s) // self._span_s)
        return any(dedupe.key in keys for index, keys in self._slices.items() if index >= first)

    def in_flight(self, key: bytes) -> trio.Event | None:
        return self._in_flight.get(key)

    def begin(self, key: bytes) -> None:
        self._in_flight[key] = trio.Event()

    def finish(self, key: bytes, durable: bool) -> None:
        if durable:
            self.remember([key], self._clock())
        self._in_flight.pop(key).set()


@attrs.define
class Claim:
    """What `Resends.claim` hands out: `duplicate` when the key is durable already (do not
    store); else the caller sets `durable` once its batch is (the key is then remembered)."""

    duplicate: bool
    durable: bool = False


class Resends:
    """Claims resend keys for batches being committed: the first copy of a key is
    stored, a copy arriving meanwhile waits for its outcome, and later copies (also
    those the other workers made durable, read from their chunk id logs) are duplicates."""

    def __init__(self, memory: ChunkMemory, peers: PeerChunkIds | None = None) -> None:
        self.memory = memory
        self._peers = peers
        self._peer_limiter = trio.CapacityLimiter(1)  # read_new updates its offsets

    @asynccontextmanager
    async def claim(self, dedupe: Dedupe) -> AsyncIterator[Claim]:
        if self._peers is not None and not self.memory.is_durable(dedupe):
            for at, keys in await trio.to_thread.run_sync(self._peers.read_new,
                                                          limiter=self._peer_limiter):
                self.memory.remember(keys, at)
        while not self.memory.is_durable(dedupe):
            first_copy = self.memory.in_flight(dedupe.key)
            if first_copy is None:
                break
            await first_copy.wait()
        else:
            yield Claim(duplicate=True)
            return
        claim = Claim(duplicate=False)
        self.memory.begin(dedupe.key)
        try:
            yield claim
        finally:
            self.memory.finish(dedupe.key, claim.durable)

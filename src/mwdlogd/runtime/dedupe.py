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
from collections.abc import Callable

import attrs
import trio

from mwdlogd.storage.chunk_ids import span_of


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

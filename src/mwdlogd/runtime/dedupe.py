"""Resends are not duplicates: forward chunk ids made durable, per client, for a window.

out_forward resends a chunk with the same id when an ack is lost or late; the second
copy is acked without being stored again. A resend that arrives while the first copy
is still being committed waits for its outcome.
"""

import collections
import time
from collections.abc import Callable

import trio


class ChunkMemory:
    def __init__(self, window_s: float, clock: Callable[[], float] = time.time) -> None:
        self._window_s = window_s
        self._clock = clock
        self._durable: dict[str, float] = {}
        self._order: collections.deque[tuple[float, str]] = collections.deque()
        self._in_flight: dict[str, trio.Event] = {}

    def __len__(self) -> int:
        return len(self._durable)

    def remember(self, key: str, at: float) -> None:
        self._durable[key] = at
        self._order.append((at, key))

    def is_durable(self, key: str) -> bool:
        self._expire()
        return key in self._durable

    def in_flight(self, key: str) -> trio.Event | None:
        return self._in_flight.get(key)

    def begin(self, key: str) -> None:
        self._in_flight[key] = trio.Event()

    def finish(self, key: str, durable: bool) -> None:
        if durable:
            self.remember(key, self._clock())
        self._in_flight.pop(key).set()

    def _expire(self) -> None:
        horizon = self._clock() - self._window_s
        while self._order and self._order[0][0] < horizon:
            at, key = self._order.popleft()
            if self._durable.get(key) == at:
                del self._durable[key]

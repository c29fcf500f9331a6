"""Room in `buffer.total_limit` (DESIGN §4): bytes journaled but not yet in their files.

A batch is admitted only when it fits; until then it waits (a forward connection is not
read meanwhile: TCP backpressure; an HTTP request leaves its body unread) up to its
deadline, and is refused after that or once shutdown begins. Room comes back when the
router has written a batch out (the tracker tells), and when the limit is reloaded.
"""

from collections.abc import Callable

import trio

from mwdlogd.errors import Overloaded, ShuttingDown
from mwdlogd.runtime.tracker import BatchTracker


class Admission:
    def __init__(self, tracker: BatchTracker, total_limit: Callable[[], int]) -> None:
        self._tracker = tracker
        self._total_limit = total_limit
        self._room = trio.Event()
        self._stopping = False
        self.waiting_for_room = 0  # batches held back (forward connections not being read)
        self._refused_bytes = 0  # the last batch refused for room, until one fits
        tracker.on_release = lambda: self._room.set()

    @property
    def overloaded(self) -> bool:
        return self._tracker.buffered_bytes >= self._total_limit()

    @property
    def refusing(self) -> bool:
        """Batches are being refused for room: the buffer is full, or the last refused
        batch would still not fit (for /health)."""
        return self.overloaded or (
            self._tracker.buffered_bytes + self._refused_bytes > self._total_limit())

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def buffered_bytes(self) -> int:
        return self._tracker.buffered_bytes

    async def wait_for_room(self, size: int, deadline: float) -> bool:
        """Whether `size` more bytes (at most the whole buffer) fit, waiting for room
        until `deadline` (trio time). False when they do not by then, or when shutdown
        begins."""
        while self._tracker.buffered_bytes + min(size, self._total_limit()) \
                > self._total_limit():
            if self._stopping or trio.current_time() >= deadline:
                self._refused_bytes = 0 if self._stopping else min(size, self._total_limit())
                return False
            if self._room.is_set():  # waiters share one event, renewed once it has fired
                self._room = trio.Event()
            self.waiting_for_room += 1
            try:
                with trio.move_on_at(deadline):
                    await self._room.wait()
            finally:
                self.waiting_for_room -= 1
        return True

    async def admit(self, size: int, deadline: float) -> None:
        """Wait until a batch of `size` bytes fits; raises Overloaded when it cannot by
        `deadline` (or ever), ShuttingDown once shutdown begins."""
        if size > self._total_limit():
            raise Overloaded(f"batch of {size} bytes can never fit "
                             f"buffer.total_limit={self._total_limit()}")
        if not await self.wait_for_room(size, deadline):
            if self._stopping:
                raise ShuttingDown("server is shutting down")
            raise Overloaded(f"buffer holds {self._tracker.buffered_bytes} bytes; "
                             f"buffer.total_limit={self._total_limit()}")

    def admitted(self) -> None:
        """A batch got in: /health stops reporting the last refusal."""
        self._refused_bytes = 0

    def limit_changed(self) -> None:
        """buffer.total_limit was reloaded: batches waiting for room look again."""
        self._room.set()

    def stop_waiting(self) -> None:
        """Shutdown begins: batches waiting for room give up (nothing was kept)."""
        self._stopping = True
        self._room.set()

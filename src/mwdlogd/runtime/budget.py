"""One memory allowance per server process (`server.memory_limit`).

Wire limits cap bytes received, not what they decode to: a few KB of gzip can become
millions of records. Every reader therefore charges what it holds -- body bytes while
reading, gunzip output, decoded records (a fixed cost per record plus its bytes, so
empty objects are not free) -- against one budget until the records reach the journal.
What would exceed it waits (the reader stops reading: TCP backpressure) or is refused
with an error that names the key.

`MemoryBudget` is the sans-IO count; `Budget` adds waiting for room with Trio;
`Lease` is what one request or message holds, released at once when it is done.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

import trio

from mwdlogd.errors import BudgetExceeded

# Charged per decoded record on top of its bytes: the dicts, the normalised copy and its
# JSON line cost about this much even for `{}` (1.33 M empty objects took +1.33 GB).
RECORD_COST = 1024
# Decoded Python objects take several times their wire bytes (strings, dict slots).
DECODED_PER_BYTE = 4
# An empty dict and its list slot: what a JSON array of `{}` costs per 3 bytes.
OBJECT_BYTES = 72


def decoded_cost(records: int, wire_bytes: int) -> int:
    """The charge for `records` decoded from `wire_bytes` bytes of JSON or msgpack."""
    return records * RECORD_COST + wire_bytes * DECODED_PER_BYTE


class MemoryBudget:
    """Bytes in use against a limit; no clock, no waiting."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def try_acquire(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def release(self, size: int) -> None:
        assert 0 <= size <= self.used, (size, self.used)
        self.used -= size


class Budget:
    """The process's budget; `acquire` waits for room, `try_acquire` does not. A `share`
    is a part of it with its own cap (charges count against both), so one kind of
    holder cannot take everything from the others."""

    def __init__(self, limit: int, *, parent: Budget | None = None) -> None:
        self.core = MemoryBudget(limit)
        self._parent = parent
        self._freed = trio.Event()

    def share(self, fraction: float) -> Budget:
        return Budget(int(self.core.limit * fraction), parent=self)

    @property
    def limit(self) -> int:
        return self.core.limit

    @property
    def used(self) -> int:
        return self.core.used

    def check(self, size: int, what: str) -> None:
        """Raise BudgetExceeded when `size` could never fit."""
        if size > self.core.limit:
            raise BudgetExceeded(size, self.core.limit, what)

    async def acquire(self, size: int, what: str) -> None:
        self.check(size, what)
        while not self.try_acquire(size, what):
            await self._root()._freed.wait()

    def try_acquire(self, size: int, what: str) -> bool:
        self.check(size, what)
        if not self.core.try_acquire(size):
            return False
        if self._parent is not None and not self._parent.try_acquire(size, what):
            self.core.release(size)
            return False
        return True

    def release(self, size: int) -> None:
        if size:
            self.core.release(size)
            if self._parent is not None:
                self._parent.release(size)
            else:
                self._freed.set()
                self._freed = trio.Event()

    def _root(self) -> Budget:
        return self if self._parent is None else self._parent._root()

    def lease(self) -> Lease:
        return Lease(self)


class Lease:
    """What one request, message or connection holds; a context manager that gives it
    all back on exit."""

    def __init__(self, budget: Budget) -> None:
        self._budget = budget
        self.held = 0

    async def grow(self, size: int, what: str) -> None:
        """Take `size` more, waiting for room (the caller stops reading meanwhile)."""
        self._budget.check(self.held + size, what)
        await self._budget.acquire(size, what)
        self.held += size

    def try_grow(self, size: int, what: str) -> bool:
        """Take `size` more if there is room now."""
        self._budget.check(self.held + size, what)
        if not self._budget.try_acquire(size, what):
            return False
        self.held += size
        return True

    def shrink_to(self, size: int) -> None:
        """Give back all but `size` (an estimate turned out high, or data was consumed)."""
        if size < self.held:
            self._budget.release(self.held - size)
            self.held = size

    def release(self) -> None:
        self.shrink_to(0)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


# Decoding and normalising more than this many bytes (or entries, or any gzip) runs in a
# worker thread, so one large request cannot hold the event loop (the GIL is handed back
# every few ms). Less runs inline: at about 10 µs a record that holds the loop for at
# most ~20 ms, while a worker thread costs every request two GIL hand-offs (measured:
# with 64 KiB / 256 entries, the usual 1000-record batches all went to threads and the
# server used 17-33% more CPU per record; BENCHMARKS.md).
INLINE_BYTES = 512 * 1024
INLINE_ENTRIES = 2048
T = TypeVar("T")


async def decode_off_loop(work: Callable[[], T], *, inline: bool,
                          limiter: trio.CapacityLimiter) -> T:
    """`work()` now when `inline`, else in a worker thread under `limiter`."""
    if inline:
        return work()
    return await trio.to_thread.run_sync(work, limiter=limiter)

"""Spreading connections evenly over workers that accept from one shared socket.

Left alone, whichever worker wakes first accepts every queued connection: four Engines
reconnecting together would all land on one worker while the other idles. Each worker
publishes its live connection count per listener in a small memory segment every worker
maps (a memfd from the supervisor), and accepts only while it holds no more connections
than the least loaded other worker; the others are blocked in accept on the same socket
and take the connection instead. A worker that is stuck or restarting cannot starve
the rest: after PATIENCE_S a waiting worker accepts anyway.
"""

import mmap
import os
import struct
from typing import Any

import trio

SLOT = struct.Struct("<q")
LISTENERS = ("http", "forward")
# What a dead worker's counts are set to, so that nobody defers to it.
ABSENT = 1 << 62
# How often a worker over its share looks again, and how long it defers at most.
TICK_S = 0.002
PATIENCE_S = 0.05


def board_size(workers: int) -> int:
    return SLOT.size * len(LISTENERS) * workers


def _offset(listener: str, index: int, workers: int) -> int:
    """Where worker `index`'s count for `listener` lives on the board."""
    return (LISTENERS.index(listener) * workers + index) * SLOT.size


def set_counts(board_fd: int, index: int, workers: int, value: int) -> None:
    """Set every listener's count of worker `index` (the supervisor, between its runs)."""
    for listener in LISTENERS:
        os.pwrite(board_fd, SLOT.pack(value), _offset(listener, index, workers))


class Balance:
    """One worker's view of one listener's connection counts."""

    def __init__(self, board: mmap.mmap, listener: str, index: int, workers: int) -> None:
        self._board = board
        self._mine = _offset(listener, index, workers)
        self._others = [_offset(listener, i, workers) for i in range(workers) if i != index]

    @property
    def connections(self) -> int:
        return int(SLOT.unpack_from(self._board, self._mine)[0])

    def _fewest_elsewhere(self) -> int:
        return min(int(SLOT.unpack_from(self._board, at)[0]) for at in self._others)

    async def my_turn(self) -> None:
        """Returns when this worker should accept the next connection. The counts live in
        other processes, so there is no event to wait for: look again every tick."""
        for _ in range(round(PATIENCE_S / TICK_S)):
            if self.connections <= self._fewest_elsewhere():
                return
            await trio.sleep(TICK_S)

    def opened(self) -> None:
        SLOT.pack_into(self._board, self._mine, self.connections + 1)

    def closed(self) -> None:
        SLOT.pack_into(self._board, self._mine, self.connections - 1)


class BalancedListener(trio.abc.Listener[Any]):
    """Accepts from `inner` only when it is this worker's turn (see module doc)."""

    def __init__(self, inner: trio.abc.Listener[Any], balance: Balance) -> None:
        self._inner = inner
        self._balance = balance

    async def accept(self) -> Any:
        await self._balance.my_turn()
        stream = await self._inner.accept()
        self._balance.opened()  # the handler calls closed() when the connection ends
        return stream

    async def aclose(self) -> None:
        await self._inner.aclose()


def open_board(fd: int, workers: int) -> mmap.mmap:
    return mmap.mmap(fd, board_size(workers))

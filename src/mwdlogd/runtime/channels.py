"""A receive with a deadline, telling apart a message, a timeout and a closed channel."""

import enum
from typing import TypeVar

import trio

T = TypeVar("T")


class Wake(enum.Enum):
    TIMEOUT = "timeout"
    CLOSED = "closed"


async def receive_until(receive: trio.MemoryReceiveChannel[T], deadline: float) -> T | Wake:
    """The next message, Wake.TIMEOUT at `deadline` (trio clock), or Wake.CLOSED."""
    with trio.move_on_at(deadline):
        try:
            return await receive.receive()
        except trio.EndOfChannel:
            return Wake.CLOSED
    return Wake.TIMEOUT

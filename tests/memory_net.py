"""The whole server over memory streams, for tests of protocol and timing in virtual time.

`MemoryListener` is the listener of trio's own `test_highlevel_serve_listeners.py`: each
`connect()` makes an in-memory stream pair and queues the server's end for `accept`.
`memory_server` runs the real App (servers, commit task, router, writers, files in
tmp_path) on five of them; streams are plain, as with `forward.transport = "tcp"`.

Virtual time: tests take pytest-trio's `mock_clock` and `memory_server` moves it like
`autojump_clock`, whenever every task is blocked, except while a worker thread runs: the
server's file work (journal appends, hourly files) runs in threads, and a task waiting for
one counts as blocked, so trio's autojump would skip virtual time past timeouts (or past
the test's own `fail_after`) while a file is being written.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import attrs
import trio
import trio.testing

from mwdlogd.app import LISTENERS, App

from conftest import make_config
from forward_client import RawForward
from helpers import Connection

# Real seconds everything must have been blocked before virtual time jumps: more than
# the tests' own wait_all_tasks_blocked() (0), so theirs wake first.
JUMP_CUSHION_S = 0.0005


async def jump_when_idle(clock: trio.testing.MockClock) -> None:
    """To the next deadline whenever every task is blocked and no worker thread runs."""
    while True:
        await trio.testing.wait_all_tasks_blocked(JUMP_CUSHION_S)
        if trio.testing.active_thread_count():
            await trio.testing.wait_all_threads_completed()
            continue
        jump = trio.lowlevel.current_statistics().seconds_to_next_deadline
        if 0 < jump < math.inf:
            clock.jump(jump)


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    """`lockstep`: the server's `send_all` returns only once the client has read the
    bytes (trio.testing.lockstep_stream_pair), so a client that stops reading blocks it;
    otherwise sends are buffered without limit (memory_stream_pair)."""

    def __init__(self, name: str, *, lockstep: bool = False) -> None:
        self.name = name
        self._pair = trio.testing.lockstep_stream_pair if lockstep \
            else trio.testing.memory_stream_pair
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](0)

    def __repr__(self) -> str:
        return f"memory:{self.name}"

    async def connect(self) -> trio.abc.Stream:
        """The client's end; trio.BrokenResourceError once the listener is closed."""
        client, server = self._pair()
        await self._send.send(server)
        return client

    async def accept(self) -> trio.abc.Stream:
        return await self._receive.receive()

    async def aclose(self) -> None:
        await self._receive.aclose()


@attrs.frozen
class MemoryServer:
    app: App
    listeners: dict[str, MemoryListener]
    root: Path

    async def http(self) -> Connection:
        return Connection(await self.listeners["http"].connect())  # type: ignore[arg-type]

    async def forward(self) -> RawForward:
        return RawForward(await self.listeners["forward"].connect())

    async def stop(self) -> None:
        """Drain, as SIGTERM does, and wait until `run` has returned."""
        self.app.request_stop()
        await self.app.stopped.wait()


async def memory_server(nursery: trio.Nursery, tmp_path: Path, pki: Path, *,
                        lockstep: frozenset[str] = frozenset(),
                        **sections: dict[str, Any]) -> MemoryServer:
    """The App on memory listeners (`lockstep`: names of those that are lockstep), and
    virtual time moving (the test takes `mock_clock`)."""
    clock = trio.lowlevel.current_clock()
    assert isinstance(clock, trio.testing.MockClock), "take the mock_clock fixture"
    nursery.start_soon(jump_when_idle, clock)
    sections = {**sections, "forward": {"transport": "tcp", **sections.get("forward", {})},
                "buffer": {"fsync": False, **sections.get("buffer", {})}}
    config = make_config(tmp_path, pki, **sections)
    listeners = {name: MemoryListener(name, lockstep=name in lockstep) for name in LISTENERS}
    app = App(config, listeners=listeners)
    await nursery.start(app.run)
    return MemoryServer(app, listeners, Path(config.storage.root))

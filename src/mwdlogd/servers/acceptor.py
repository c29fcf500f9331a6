"""Accepting connections until a drain begins, the way both ingest servers need it.

`serve` runs the listeners with handlers in their own nursery and returns once the last
connection has closed after `stop`. `stop` closes the listeners and cancels every wait
entered through `idle()`, so idle keep-alive connections go at once while requests in
flight finish.

Accepting is our own loop rather than `trio.serve_listeners`: at the descriptor limit
(EMFILE and kin) that logs a traceback every 0.1 s; here the failure is counted, logged
once per interval and retried with a growing pause. Connections over the process-wide or
per-address limit (`ConnectionLimits`) are closed at once and counted.
"""

import errno
import functools
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import trio

from mwdlogd.servers.balance import Balance, BalancedListener
from mwdlogd.servers.listen import listen_address
from mwdlogd.telemetry import Telemetry

# What trio.serve_listeners also survives: the process or kernel is out of something that
# closing connections gives back.
ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# trio's fixed pause, doubled on each failure in a row up to the maximum.
ACCEPT_RETRY_MIN_S = 0.1
ACCEPT_RETRY_MAX_S = 2.0


def peer_address(stream: object) -> str:
    """The peer's IP address ("" when the socket no longer knows it)."""
    transport = getattr(stream, "transport_stream", stream)
    try:
        return str(transport.socket.getpeername()[0])  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return ""


async def accept_forever(listener: trio.abc.Listener[Any], protocol: str, telemetry: Telemetry,
                         start: Callable[[Any], None]) -> None:
    """Accept until cancelled, giving each stream to `start` (which must not block); closes
    the listener. Out of descriptors: count, log (rate-limited), pause, try again."""
    pause = ACCEPT_RETRY_MIN_S
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                telemetry.accept_failed(protocol, exc, pause)
                await trio.sleep(pause)
                pause = min(pause * 2, ACCEPT_RETRY_MAX_S)
                continue
            pause = ACCEPT_RETRY_MIN_S
            start(stream)


async def serve_streams(listeners: Sequence[trio.abc.Listener[Any]],
                        handler: Callable[[Any], Awaitable[None]], *, protocol: str,
                        telemetry: Telemetry) -> None:
    """`trio.serve_listeners` with `accept_forever`'s handling of accept failures; each
    stream is closed after `handler`, which must not raise."""

    async def run(stream: Any) -> None:
        try:
            await handler(stream)
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:

        def start(stream: Any) -> None:
            nursery.start_soon(run, stream)

        for listener in listeners:
            nursery.start_soon(accept_forever, listener, protocol, telemetry, start)


class ConnectionLimits:
    """Open ingest connections of this process, in total and per peer address; shared
    by the HTTPS and forward servers so that one flood cannot starve the other port.
    `limits()` gives (total, per address) at each connection, so a reload applies."""

    def __init__(self, limits: Callable[[], tuple[int, int]]) -> None:
        self._limits = limits
        self._open: Counter[str] = Counter()
        self.open_connections = 0

    def admit(self, address: str) -> str | None:
        """Count the connection in, or say which limit it is over (it is not counted)."""
        total, per_address = self._limits()
        if self.open_connections >= total:
            return "max_connections"
        if self._open[address] >= per_address:
            return "max_connections_per_address"
        self._open[address] += 1
        self.open_connections += 1
        return None

    def closed(self, address: str) -> None:
        self.open_connections -= 1
        self._open[address] -= 1
        if not self._open[address]:
            del self._open[address]


class Acceptor:
    def __init__(self, protocol: str, telemetry: Telemetry, limits: ConnectionLimits,
                 balance: Balance | None = None) -> None:
        self._protocol = protocol
        self._telemetry = telemetry
        self._limits = limits
        self._balance = balance
        self._accept_scope = trio.CancelScope()
        self._idle_scopes: set[trio.CancelScope] = set()
        self.draining = False

    async def serve(self, listeners: Sequence[trio.abc.Listener[Any]],
                    handler: Callable[[Any], Awaitable[None]],
                    task_status: trio.TaskStatus[str]) -> None:
        """`handler` must not raise (it would stop the server); it gets each admitted
        stream and the stream is closed after it returns."""
        address = listen_address(listeners[0])
        if self._balance is not None:
            listeners = [BalancedListener(listener, self._balance) for listener in listeners]
        async with trio.open_nursery() as handlers:
            task_status.started(address)
            with self._accept_scope:
                async with trio.open_nursery() as loops:
                    for listener in listeners:
                        loops.start_soon(accept_forever, listener, self._protocol,
                                         self._telemetry,
                                         functools.partial(self._start, handlers, handler))

    def _start(self, handlers: trio.Nursery, handler: Callable[[Any], Awaitable[None]],
               stream: Any) -> None:
        address = peer_address(stream)
        refused = self._limits.admit(address)
        if refused is None:
            handlers.start_soon(self._run_handler, handler, stream, address)
            return
        self._telemetry.connection_refused(self._protocol, address, refused)
        self._closed()
        handlers.start_soon(trio.aclose_forcefully, stream)

    async def _run_handler(self, handler: Callable[[Any], Awaitable[None]], stream: Any,
                           address: str) -> None:
        try:
            await handler(stream)
        finally:
            self._limits.closed(address)
            self._closed()
            await trio.aclose_forcefully(stream)

    def _closed(self) -> None:
        if self._balance is not None:
            self._balance.closed()

    def stop(self) -> None:
        self.draining = True
        self._accept_scope.cancel()
        for scope in self._idle_scopes:
            scope.cancel()

    @contextmanager
    def idle(self, timeout_s: float) -> Iterator[trio.CancelScope]:
        """A wait for the peer's next bytes: ends at the timeout or when the drain begins."""
        with trio.move_on_after(timeout_s) as scope:
            if self.draining:
                scope.cancel()
            self._idle_scopes.add(scope)
            try:
                yield scope
            finally:
                self._idle_scopes.discard(scope)

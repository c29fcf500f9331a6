"""Accepting connections until a drain begins, the way both ingest servers need it.

`serve` runs the listeners with handlers in their own nursery and returns once the last
connection has closed after `stop`. `stop` closes the listeners and cancels every wait
entered through `idle()`, so idle keep-alive connections go at once while requests in
flight finish.
"""

from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import trio

from mwdlogd.servers.balance import Balance, BalancedListener


def listen_address(listener: trio.abc.Listener[Any]) -> str:
    """`host:port` a listener is bound to (TLS listeners wrap a socket listener)."""
    transport = getattr(listener, "transport_listener", listener)
    assert isinstance(transport, trio.SocketListener)
    return "{}:{}".format(*transport.socket.getsockname()[:2])


class Acceptor:
    def __init__(self, balance: Balance | None = None) -> None:
        self._balance = balance
        self._accept_scope = trio.CancelScope()
        self._idle_scopes: set[trio.CancelScope] = set()
        self.draining = False

    async def serve(self, listeners: Sequence[trio.abc.Listener[Any]],
                    handler: Callable[[Any], Awaitable[None]],
                    task_status: trio.TaskStatus[str]) -> None:
        address = listen_address(listeners[0])
        balance = self._balance
        if balance is not None:
            listeners = [BalancedListener(listener, balance) for listener in listeners]
            inner = handler

            async def handler(stream: Any) -> None:
                try:
                    await inner(stream)
                finally:
                    balance.closed()

        async with trio.open_nursery() as handlers:
            task_status.started(address)
            with self._accept_scope:
                await trio.serve_listeners(handler, list(listeners), handler_nursery=handlers)

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

"""Where listening sockets come from: every one is bound before any server starts (by
the server itself, or once by the supervisor and inherited by every worker, which then
all accept from the same queue), so a port that is taken is one clear error naming its
key instead of a failure inside a running nursery."""

import socket
import ssl
from collections.abc import Callable, Iterable
from typing import Any

import trio

from mwdlogd.config import Config
from mwdlogd.errors import ListenFailed


def bind_shared(bind: str, port: int) -> socket.socket:
    """A listening socket (inheritable, for workers); OSError names nothing, callers do."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.create_server((bind, port), family=family, backlog=socket.SOMAXCONN)
    sock.set_inheritable(True)
    return sock


def bind_listeners(config: Config, names: Iterable[str]) -> dict[str, socket.socket]:
    """Bind the `[name]` sections' addresses; raises ListenFailed naming the key and address
    (having closed what it bound)."""
    sockets: dict[str, socket.socket] = {}
    for name in names:
        section = getattr(config, name)
        try:
            sockets[name] = bind_shared(section.bind, section.port)
        except OSError as exc:
            for sock in sockets.values():
                sock.close()
            raise ListenFailed(f"{name}.port: cannot listen on {section.bind}:{section.port}: "
                               f"{exc.strerror or exc}") from exc
    return sockets


def address_of(sock: socket.socket) -> str:
    return "{}:{}".format(*sock.getsockname()[:2])


def tcp_listener(sock: socket.socket) -> trio.SocketListener:
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


class LiveTlsListener(trio.abc.Listener[trio.SSLStream[trio.SocketStream]]):
    """trio.SSLListener, except that each connection gets the TLS context current when it
    is accepted: a reload's new certificate or CA applies to new handshakes, and
    connections already open keep theirs."""

    def __init__(self, transport_listener: trio.SocketListener,
                 context: Callable[[], ssl.SSLContext]) -> None:
        self.transport_listener = transport_listener
        self._context = context

    async def accept(self) -> trio.SSLStream[trio.SocketStream]:
        stream = await self.transport_listener.accept()
        return trio.SSLStream(stream, self._context(), server_side=True, https_compatible=True)

    async def aclose(self) -> None:
        await self.transport_listener.aclose()


def stream_listeners(sock: socket.socket, context: Callable[[], ssl.SSLContext] | None
                     ) -> list[trio.abc.Listener[Any]]:
    """The socket's listener, TLS-wrapped when a `context` source is given."""
    plain = tcp_listener(sock)
    return [plain if context is None else LiveTlsListener(plain, context)]

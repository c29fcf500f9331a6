"""Where listeners come from, the one place that binds: every socket is bound before any
server starts (by the server itself, or once by the supervisor and inherited by every
worker, which then all accept from the same queue), so a port that is taken is one clear
error naming its key instead of a failure inside a running nursery. Servers take the
trio listeners made here (tests hand them memory listeners instead)."""

import socket
import ssl
from collections.abc import Callable, Iterable, Mapping

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


StreamListener = trio.abc.Listener[trio.abc.Stream]


def address_of(sock: socket.socket) -> str:
    return "{}:{}".format(*sock.getsockname()[:2])


def listen_address(listener: trio.abc.Listener[trio.abc.Stream]) -> str:
    """`host:port` a listener is bound to (TLS listeners wrap a socket listener); a
    listener without a socket (a test's memory listener) is named by its repr."""
    transport = getattr(listener, "transport_listener", listener)
    if isinstance(transport, trio.SocketListener):
        return "{}:{}".format(*transport.socket.getsockname()[:2])
    return repr(listener)


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


def stream_listeners(sockets: Mapping[str, socket.socket], *, forward_tls: bool,
                     context: Callable[[], ssl.SSLContext]) -> dict[str, StreamListener]:
    """A listener per bound socket: HTTPS always TLS-wrapped, forward when
    `forward.transport = "tls"`, the rest plain TCP. `context` gives the TLS context
    current at each accept (a reload's new certificate applies to new connections)."""
    tls = {"http", "forward"} if forward_tls else {"http"}
    return {name: LiveTlsListener(tcp_listener(sock), context) if name in tls
            else tcp_listener(sock) for name, sock in sockets.items()}

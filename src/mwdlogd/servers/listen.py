"""Where listening sockets come from: bound by the server itself, or bound once by the
supervisor and inherited by every worker (`server.workers > 1`), which then all accept
from the same queue."""

import socket
import ssl
from typing import Any

import trio


async def tcp_listeners(bind: str, port: int, inherited: socket.socket | None = None
                        ) -> list[trio.SocketListener]:
    if inherited is None:
        return await trio.open_tcp_listeners(port, host=bind)
    return [trio.SocketListener(trio.socket.from_stdlib_socket(inherited))]


async def stream_listeners(bind: str, port: int, ssl_context: ssl.SSLContext | None,
                           inherited: socket.socket | None = None
                           ) -> list[trio.abc.Listener[Any]]:
    """TCP listeners, TLS-wrapped when `ssl_context` is given."""
    plain = await tcp_listeners(bind, port, inherited)
    if ssl_context is None:
        return list(plain)
    return [trio.SSLListener(listener, ssl_context, https_compatible=True) for listener in plain]


def bind_shared(bind: str, port: int) -> socket.socket:
    """A listening socket for workers to inherit; OSError names nothing, callers do."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.create_server((bind, port), family=family, backlog=socket.SOMAXCONN)
    sock.set_inheritable(True)
    return sock

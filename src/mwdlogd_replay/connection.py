"""What both protocol clients share: the target, one reconnecting stream, and the frames a
batch is encoded into once (so every attempt resends the same bytes)."""

import ssl
from collections.abc import Sequence

import attrs
import trio

from mwdlogd_replay.records import Record


@attrs.define
class Target:
    protocol: str  # http | forward
    host: str
    port: int
    context: ssl.SSLContext | None
    tag: str = "nginx.access"
    token: str = ""
    gzip: bool = False
    mode: str = "PackedForward"
    shared_key: str = ""
    ack: bool = True


@attrs.frozen
class Failure:
    """Why a batch was not acknowledged, as the summary shows it."""

    text: str
    final: bool = False  # retrying cannot help (credentials, certificates, a refused body)


@attrs.frozen
class Frame:
    """One request or message of a batch; `chunk` is the forward ack id it carries."""

    data: bytes
    chunk: str | None = None


class Connection:
    """One connection to the target; reconnects when it breaks. Subclasses speak a protocol:
    `encode` a batch once, `send` its frames on every attempt."""

    def __init__(self, target: Target, name: str) -> None:
        self.target = target
        self.name = name
        self.stream: trio.abc.Stream | None = None
        self.buffer = bytearray()

    async def connect(self) -> trio.abc.Stream:
        if self.stream is None:
            t = self.target
            if t.context is None:
                self.stream = await trio.open_tcp_stream(t.host, t.port)
            else:
                self.stream = await trio.open_ssl_over_tcp_stream(
                    t.host, t.port, ssl_context=t.context, https_compatible=True)
            self.buffer.clear()
            await self.opened(self.stream)
        return self.stream

    async def opened(self, stream: trio.abc.Stream) -> None:
        """Called on each new connection (the forward handshake)."""

    async def close(self) -> None:
        if self.stream is not None:
            await trio.aclose_forcefully(self.stream)
            self.stream = None

    async def more(self) -> bytes:
        assert self.stream is not None
        data = await self.stream.receive_some(65536)
        if not data:
            raise EOFError("server closed the connection")
        return bytes(data)

    def encode(self, records: list[Record]) -> Sequence[Frame]:
        raise NotImplementedError

    async def send(self, frames: Sequence[Frame]) -> Failure | None:
        """Send one batch's frames; None when acknowledged, else why not."""
        raise NotImplementedError

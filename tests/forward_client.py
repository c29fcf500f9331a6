"""A raw forward-protocol test client: frames built by hand with msgpack, so tests can send
what libraries never do (fragments, bad handshakes, wrong shapes)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from mwdlogd_replay.forward import ping_message

KEY = "secret123"
PEERS = Path(__file__).parent / "peers"

needs_node = pytest.mark.skipif(
    not os.environ.get("CI") and not ((PEERS / "node_modules").exists() and shutil.which("node")),
    reason="run `npm ci --prefix tests/peers` (tools/test.sh does; in CI these never skip)")


def node_send(options: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """Send records with npm @fluent-org/logger (tests/peers/forward_send.js)."""
    return subprocess.run(["node", str(PEERS / "forward_send.js"), json.dumps(options)],
                          capture_output=True, text=True, timeout=60)


def event_time(seconds: int, nanos: int = 0) -> msgpack.ExtType:
    return msgpack.ExtType(0, seconds.to_bytes(4, "big") + nanos.to_bytes(4, "big"))


def packed(tag: str, records: list[dict[str, Any]], *, chunk: str | None = None,
           compress: bool = False, at: int = 1732500000) -> bytes:
    """PackedForward as out_forward sends it: entries as str32 holding raw msgpack."""
    blob = b"".join(msgpack.packb([event_time(at, 5), r]) for r in records)
    if compress:
        blob = b"".join(gzip.compress(msgpack.packb([event_time(at, 5), r])) for r in records)
    option: dict[str, Any] = {"size": len(records), "compressed": "gzip" if compress else "text"}
    if chunk is not None:
        option["chunk"] = chunk
    header = msgpack.packb(tag) + b"\xdb" + len(blob).to_bytes(4, "big")
    return b"\x93" + header + blob + msgpack.packb(option)


def ping(helo: list[Any], *, key: str = KEY, hostname: str = "engine-01",
         username: str = "", password: str = "") -> bytes:
    """out_forward's PING, with its constant 32-hex-character salt."""
    return ping_message(helo, hostname=hostname, shared_key=key, username=username,
                        password=password, salt="0123456789abcdef0123456789abcdef")


class RawForward:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.unpacker = msgpack.Unpacker(raw=False)

    @classmethod
    async def connect(cls, address: str, context: Any = None) -> RawForward:
        host, _, port = address.rpartition(":")
        stream: trio.abc.Stream
        if context is None:
            stream = await trio.open_tcp_stream(host, int(port))
        else:
            stream = await trio.open_ssl_over_tcp_stream(host, int(port), ssl_context=context,
                                                         https_compatible=True)
        return cls(stream)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive(self) -> Any:
        """The next msgpack object from the server; EOFError when it closed."""
        while True:
            for obj in self.unpacker:
                return obj
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("server closed the connection")
            self.unpacker.feed(data)

    async def handshake(self, **kwargs: Any) -> list[Any]:
        helo = await self.receive()
        assert helo[0] == "HELO"
        await self.send(ping(helo, **kwargs))
        return list(await self.receive())

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def send_one(address: str, context: Any, message: bytes) -> Any:
    """Send one message on a new connection and return the server's answer."""
    client = await RawForward.connect(address, context)
    try:
        await client.send(message)
        return await client.receive()
    finally:
        await client.aclose()

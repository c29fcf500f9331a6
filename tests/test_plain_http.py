"""The plain-HTTP port (health, metrics): HEAD is answered with headers only, and the
connection stays usable for the next request."""

from __future__ import annotations

import trio

from conftest import Running
from helpers import split_address


async def _read_until(stream: trio.SocketStream, buffer: bytes, marker: bytes) -> bytes:
    while marker not in buffer:
        chunk = await stream.receive_some(65536)
        assert chunk, f"connection closed before {marker!r}; got {buffer!r}"
        buffer += chunk
    return buffer


async def test_head_health_gets_headers_only_then_get_works(server: Running) -> None:
    stream = await trio.open_tcp_stream(*split_address(server.addresses.health))
    try:
        with trio.fail_after(5):
            await stream.send_all(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = await _read_until(stream, b"", b"\r\n\r\n")
            head, _, rest = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            assert b"content-length: " in head.lower() and rest == b""
            await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = await _read_until(stream, rest, b"\r\n\r\n")
            while chunk := await stream.receive_some(65536):
                reply += chunk
    finally:
        await stream.aclose()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b'"status": "ok"' in body

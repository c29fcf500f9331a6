"""h11 over a trio stream: read one event, send one response. Shared by every HTTP server."""

import json
from typing import Any

import attrs
import h11
import trio

# h11's own default bound on a request head; bodies are bounded by the ingest core.
MAX_HEAD_BYTES = 64 * 1024
RECEIVE_BYTES = 64 * 1024
SERVER_HEADER = b"mwdlogd"


@attrs.frozen
class Response:
    status: int
    body: bytes
    content_type: bytes = b"application/json"
    headers: tuple[tuple[bytes, bytes], ...] = ()


def json_response(status: int, payload: dict[str, Any],
                  headers: tuple[tuple[bytes, bytes], ...] = ()) -> Response:
    return Response(status, json.dumps(payload).encode() + b"\n", headers=headers)


def new_connection() -> h11.Connection:
    return h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)


async def read_event(conn: h11.Connection, stream: trio.abc.Stream) -> Any:
    """The next h11 event, reading as needed; answers `Expect: 100-continue`."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        if conn.they_are_waiting_for_100_continue:
            go_on = h11.InformationalResponse(status_code=100, headers=[])
            await stream.send_all(conn.send(go_on) or b"")
        conn.receive_data(bytes(await stream.receive_some(RECEIVE_BYTES)))


async def send_response(conn: h11.Connection, stream: trio.abc.Stream, response: Response,
                        *, close: bool = False, head: bool = False) -> None:
    """Sends `response`; for a HEAD request (`head`) the headers only, as HTTP requires."""
    headers = [(b"server", SERVER_HEADER), (b"content-type", response.content_type),
               (b"content-length", str(len(response.body)).encode()), *response.headers]
    if close:
        headers.append((b"connection", b"close"))
    data = conn.send(h11.Response(status_code=response.status, headers=headers)) or b""
    if not head:
        data += conn.send(h11.Data(data=response.body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


def reusable(conn: h11.Connection) -> bool:
    """Both sides finished cleanly: the connection may carry another request."""
    return conn.our_state is h11.DONE and conn.their_state is h11.DONE

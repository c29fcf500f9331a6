"""The HTTPS client, as Fluentd's out_http sends: ndjson bodies, optional gzip, a bearer
token; 503 is waited out (Retry-After) and retried, refusals are explained."""

import gzip
import json
from collections.abc import Awaitable, Callable, Sequence

import trio

from mwdlogd_replay.connection import Connection, Failure, Frame, Target
from mwdlogd_replay.records import Record

RETRY_503_S = 1.0
HTTP_MEANING = {401: "unknown token", 403: "token not allowed for this customer",
                413: "batch too large (lower --batch)", 503: "server busy (retried)"}
FINAL_STATUSES = {400, 401, 403, 413, 415}  # resending the same request cannot help


def http_request(target: Target, records: list[Record]) -> bytes:
    body = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)
    extra = ""
    if target.gzip:
        body, extra = gzip.compress(body, 1), "Content-Encoding: gzip\r\n"
    return (f"POST /{target.tag} HTTP/1.1\r\nHost: {target.host}\r\nUser-Agent: mwdlogd-replay"
            f"\r\nAuthorization: Bearer {target.token}\r\nContent-Type: application/x-ndjson\r\n"
            f"{extra}Content-Length: {len(body)}\r\n\r\n").encode() + body


async def read_http_message(more: Callable[[], Awaitable[bytes]], buffer: bytearray
                            ) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """One HTTP message (head, then a Content-Length body) from `buffer`, refilled with
    `more()`; returns its start line, headers (names lower-cased) and body. Bytes past
    the message stay in `buffer`."""
    while b"\r\n\r\n" not in buffer:
        buffer += await more()
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    start, *lines = head.split(b"\r\n")
    headers = {name.strip().lower(): value.strip()
               for name, _, value in (line.partition(b":") for line in lines)}
    length = int(headers.get(b"content-length", b"0"))
    buffer[:] = rest
    while len(buffer) < length:
        buffer += await more()
    body = bytes(buffer[:length])
    del buffer[:length]
    return start, headers, body


def http_outcome(status: int, body: bytes) -> Failure:
    """`401 unknown token: bearer token is not known`: the status, what it means for
    the replay, and the server's own detail."""
    try:
        detail = str(json.loads(body).get("detail", ""))
    except (ValueError, AttributeError):
        detail = body.decode(errors="replace")[:200]
    meaning = HTTP_MEANING.get(status, "refused")
    return Failure(f"{status} {meaning}" + (f": {detail}" if detail else ""),
                   final=status in FINAL_STATUSES)


class HttpClient(Connection):
    """POSTs each batch as one request on a keep-alive connection."""

    def encode(self, records: list[Record]) -> Sequence[Frame]:
        return [Frame(http_request(self.target, records))]

    async def send(self, frames: Sequence[Frame]) -> Failure | None:
        stream = await self.connect()
        (frame,) = frames
        await stream.send_all(frame.data)
        start, headers, body = await read_http_message(self.more, self.buffer)
        status = int(start.split(b" ", 2)[1])
        if status == 503:
            await trio.sleep(float(headers.get(b"retry-after", b"0")) or RETRY_503_S)
        return None if status == 200 else http_outcome(status, body)

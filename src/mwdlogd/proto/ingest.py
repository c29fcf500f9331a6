"""One HTTP ingest request, judged from h11 events: route, auth, limits, decode.

The head is judged as soon as it arrives, so 401/411/413/415 are answered without
reading a body. Body bytes are counted as they come (h11 bounds only the head) and
again while gunzipping. Nothing here touches a socket.
"""

import hashlib
import itertools
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any
from urllib.parse import parse_qs, unquote

import attrs
import h11

from mwdlogd.errors import AuthFailed, IngestError
from mwdlogd.proto.auth import Identity
from mwdlogd.proto.bodies import (
    Parsed,
    Records,
    check_encoding,
    gunzip_body,
    media_type,
    parser_for,
    records_at_most,
)
from mwdlogd.proto.streamed import can_stream
from mwdlogd.proto.times import event_time_of

# A gzip ndjson body this many times smaller than body_size_limit on the wire is streamed
# from the start: Engine logs compress at least this well, so it would inflate past the
# limit anyway (inflating one first to find out cost 95 MiB of VmHWM for 8.5 MiB of gzip).
GZIP_STREAM_RATIO = 8
_TAG = re.compile(r"^[A-Za-z0-9_.-]{1,256}$")


@attrs.frozen
class Accepted:
    """A request whose every record may be stored."""

    tag: str
    records: Records
    identity: Identity
    default_time: float | None
    lines: Sequence[bytes | None] | None = None  # each record's JSON text, when the body had it
    digest: bytes = b""  # of the target, Content-Type, Content-Encoding and body as sent
    invalid_utf8: int = 0  # records kept with text that was not UTF-8 (proto.text)
    times: list[float | None] | None = None  # event times the body carried, per record

    def with_text(self) -> Iterable[tuple[dict[str, Any], float | None, bytes | None]]:
        """(record, its event time when the body carried one, else None: from the record;
        its JSON text or None) for normalisation."""
        lines = self.lines or itertools.repeat(None)
        times = self.times or itertools.repeat(None)
        return zip(self.records, times, lines, strict=False)


def _header(request: h11.Request, name: bytes) -> bytes | None:
    for key, value in request.headers:
        if key == name:
            return value
    return None


def _text(request: h11.Request, name: bytes) -> str:
    return (_header(request, name) or b"").decode("latin-1")


def tag_of(target: bytes) -> tuple[str, float | None]:
    """`/nginx.access?time=1732500000` -> ("nginx.access", 1732500000.0)."""
    path, _, query = target.decode("ascii", "replace").partition("?")
    tag = unquote(path).strip("/").replace("/", ".")
    if not _TAG.match(tag):
        raise IngestError(400, "bad_tag",
                          f"tag {tag!r} from path {path!r} must be 1-256 of [A-Za-z0-9_.-]")
    times = parse_qs(query).get("time")
    default_time = None
    if times:
        default_time = event_time_of(times[0])
        if default_time is None:
            raise IngestError(400, "bad_time", f"?time={times[0]} is not epoch seconds")
    return tag, default_time


Authenticate = Callable[[bytes | None], Identity]


class RequestReader:
    """Reads one POST: construct with the Request event, feed Data, then `finish()`.

    `authenticate` turns the Authorization header (None: absent) into the client's
    Identity or raises AuthFailed (see proto/auth.py). Raises IngestError as early as
    the problem is known.
    """

    def __init__(self, request: h11.Request, *, authenticate: Authenticate, body_limit: int,
                 max_records: int = sys.maxsize, stream_limit: int = 0) -> None:
        if request.method != b"POST":
            raise IngestError(405, "method_not_allowed",
                              f"{request.method.decode()} is not allowed; send POST /<tag>")
        try:
            self.identity = authenticate(_header(request, b"authorization"))
        except AuthFailed as exc:
            raise IngestError(exc.status, exc.error, exc.detail,
                              retry_after_s=exc.retry_after_s) from None
        self.tag, self.default_time = tag_of(request.target)
        self._content_type = _text(request, b"content-type")
        self._parse: Callable[[bytes, int], Parsed] = parser_for(self._content_type)
        self.gzip = check_encoding(_text(request, b"content-encoding"))
        self.limit = body_limit
        self._max_records = max_records
        self._body = bytearray()
        self._received = 0
        # A body declared larger than body_limit (up to stream_limit) is streamed when its
        # type can be sliced: the caller slices it as it comes (proto.streamed) instead of
        # `receive_data` keeping it, and decodes each slice with `decode`.
        self.stream_limit = stream_limit if can_stream(self._content_type) else 0
        self.streamed = False
        self._check_length(request)
        # What a byte-identical resend has in common with its first copy (HTTP dedupe).
        self._digest = hashlib.sha256()  # the fastest hashlib has here (SHA extensions)
        for part in (request.target, _header(request, b"content-type") or b"",
                     _header(request, b"content-encoding") or b""):
            self._digest.update(len(part).to_bytes(8, "big") + part)

    def _check_length(self, request: h11.Request) -> None:
        length = _header(request, b"content-length")
        if length is None:
            chunked = (_header(request, b"transfer-encoding") or b"").lower() == b"chunked"
            if not chunked:
                raise IngestError(411, "length_required", "send Content-Length (or chunked)")
        elif int(length) > max(self.limit, self.stream_limit):
            raise IngestError(413, "body_too_large", f"Content-Length {int(length)} > "
                              f"http.body_size_limit={self.limit}" + (
                                  f" and http.stream_body_limit={self.stream_limit}"
                                  if self.stream_limit else ""))
        elif int(length) > (self.limit // GZIP_STREAM_RATIO if self.gzip else self.limit):
            self.streamed = self.stream_limit > 0

    def receive_data(self, data: bytes) -> None:
        self._received += len(data)
        self._digest.update(data)
        if self.streamed:
            if self._received > self.stream_limit:
                raise IngestError(413, "body_too_large",
                                  f"body over http.stream_body_limit={self.stream_limit} bytes")
            return
        self._body += data
        if len(self._body) > self.limit:
            raise IngestError(413, "body_too_large",
                              f"body over http.body_size_limit={self.limit} bytes")

    @property
    def content_type(self) -> str:
        return self._content_type

    @property
    def received(self) -> int:
        """Body bytes read so far (before gunzip)."""
        return self._received

    async def pieces(self) -> AsyncIterator[bytes]:
        """The body read so far, in pieces (to stream a body read whole after all)."""
        view = memoryview(self._body)
        for start in range(0, len(view), 1024 * 1024):
            yield bytes(view[start:start + 1024 * 1024])
        self._body = bytearray()

    @property
    def digest(self) -> bytes:
        """Of the target, Content-Type, Content-Encoding and the body read so far."""
        return self._digest.digest()[:16]

    def finish(self) -> Accepted:
        return self.decode(self.inflate())

    def inflate(self) -> bytes:
        """The body, gunzipped when it came gzip (at most `body_limit` bytes)."""
        body = bytes(self._body)
        return gunzip_body(body, self.limit) if self.gzip else body

    def records_at_most(self, body: bytes) -> int:
        """An upper bound on the records `decode(body)` can make, for charging memory."""
        return min(records_at_most(self._content_type, body), self._max_records)

    def built_at_once(self, body: bytes) -> int:
        """Objects a JSON document may make before the record cap is checked (it is
        decoded whole); other formats check the cap as they go."""
        return body.count(b"{") if media_type(self._content_type) == "application/json" else 0

    def decode(self, body: bytes) -> Accepted:
        """The records of the (inflated) body; 413 past `max_records`."""
        if not body.strip():
            raise IngestError(400, "empty_body", "request body is empty")
        parsed = self._parse(body, self._max_records)
        self._check_customers(parsed.records)
        return Accepted(self.tag, parsed.records, self.identity, self.default_time,
                        parsed.lines, self.digest,
                        invalid_utf8=parsed.invalid_utf8, times=parsed.times)

    def _check_customers(self, records: list[dict[str, Any]]) -> None:
        forbidden = self.identity.first_forbidden(records)
        if forbidden is not None:
            index, customer = forbidden
            raise IngestError(403, "forbidden_customer",
                              self.identity.refusal(f"record {index}", customer))

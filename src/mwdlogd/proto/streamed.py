"""Cut a request body, gzip or not, into slices of whole records as its bytes arrive.

A streamed request is never held whole: each slice is decoded, normalised and spooled
before more is read, so memory is bounded by the slice size (plus one record), not by
the body. Each slice is a body of the request's own Content-Type that its parser reads
as it would have read those records in the whole body: whole lines of ndjson; for a
JSON array (Fluentd's `json_array true`) `[` + whole elements + `]`; for msgpack, whole
top-level values (maps, arrays of maps, Fluent Bit events). Gunzip output is bounded
per call too (a bomb inflates a slice at a time). Nothing here touches a socket.
"""

import re
import zlib
from collections.abc import Iterator

import msgpack

from mwdlogd.errors import IngestError
from mwdlogd.proto.bodies import PARSERS, media_type, parse_json, parse_msgpack, parse_ndjson

SLICE_BYTES = 1024 * 1024


class Slicer:
    """`feed` body bytes, then `end`; each returns the slices of whole records now ready.
    Subclasses say where records end (`_take`, `_rest`); `on_loop` says whether
    cutting runs at memory speed (safe on an event loop) or may take long per call."""

    on_loop = True

    def __init__(self, *, gzip: bool, limit: int, line_limit: int,
                 slice_bytes: int = SLICE_BYTES) -> None:
        self._inflater = zlib.decompressobj(wbits=31) if gzip else None
        self._limit = limit
        self._line_limit = line_limit  # the largest record (line, element, value)
        self._slice_bytes = slice_bytes
        self.inflated = 0
        self._in_member = False  # gzip input taken without its member's end yet
        self._more = False  # the last inflate filled its output: call again
        self._start()

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The slices `data` completes, made as they are taken: gzip input is inflated
        at most `slice_bytes` at a time, so a bomb in one read never inflates further
        than the slice the caller is taking."""
        slices: list[bytes] = []
        if self._inflater is None:
            self._add(data, slices)
            yield from slices
            return
        while data or self._more:
            self._in_member = True
            try:
                out = self._inflater.decompress(data, self._slice_bytes)
            except zlib.error as exc:
                raise IngestError(400, "malformed_body", f"gzip body: {exc}") from None
            self._add(out, slices)
            yield from slices
            slices.clear()
            if self._inflater.eof:  # the next gzip member (Fluentd sends several)
                data = self._inflater.unused_data
                self._inflater = zlib.decompressobj(wbits=31)
                self._in_member = self._more = False
            else:
                data = self._inflater.unconsumed_tail
                self._more = len(out) == self._slice_bytes  # output may be left inside

    def end(self) -> Iterator[bytes]:
        """The last slice; 400 when a gzip member or the body's last record was cut short."""
        if self._in_member:
            raise IngestError(400, "malformed_body", "gzip body: gzip data is truncated")
        yield from self._rest()

    def _add(self, data: bytes, slices: list[bytes]) -> None:
        self.inflated += len(data)
        if self.inflated > self._limit:
            raise IngestError(413, "body_too_large",
                              f"body over http.stream_body_limit={self._limit} bytes "
                              f"(after gunzip)")
        self._take(data, slices)

    def _too_long(self, what: str) -> IngestError:
        return IngestError(413, "line_too_long", f"{what} is longer than "
                           f"http.body_size_limit={self._line_limit} bytes")

    def _start(self) -> None:
        raise NotImplementedError

    def _take(self, data: bytes, slices: list[bytes]) -> None:
        raise NotImplementedError

    def _rest(self) -> list[bytes]:
        raise NotImplementedError


class NdjsonSlicer(Slicer):
    """Slices of whole lines."""

    def _start(self) -> None:
        self._pending = bytearray()

    def _take(self, data: bytes, slices: list[bytes]) -> None:
        self._pending += data
        if len(self._pending) < self._slice_bytes:
            return
        cut = self._pending.rfind(b"\n") + 1
        if cut == 0:
            if len(self._pending) > self._line_limit:
                raise self._too_long("a line")
            return
        slices.append(bytes(self._pending[:cut]))
        del self._pending[:cut]

    def _rest(self) -> list[bytes]:
        rest, self._pending = bytes(self._pending), bytearray()
        return [rest] if rest.strip() else []


# A whole string (escapes skipped; possessive, so long strings cost no backtracking), a
# string the data ends inside (no closing quote yet), or a structural byte.
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)|[\[\]{},]', re.S)


def _nested(depth: int) -> bytes:
    """Regex of the inside of an object or array nesting at most `depth` more levels
    (strings whole, so brackets in them do not count)."""
    inner = rb'(?:[^{}\[\]"]++|"(?:[^"\\]++|\\.)*+")*+'
    for _ in range(depth):
        inner = rb'(?:[^{}\[\]"]++|"(?:[^"\\]++|\\.)*+"|\{' + inner + rb'\}|\[' + inner \
            + rb'\])*+'
    return inner


# A run of whole elements, each followed by its comma, nesting up to 4 levels: matched in
# one call (C speed) where most records are; anything else is followed token by token.
_JSON_RUN = re.compile(rb'(?:\s*+(?:\{' + _nested(3) + rb'\}|\[' + _nested(3)
                       + rb'\]|"(?:[^"\\]++|\\.)*+"|[^{}\[\]",\s]++)\s*+,)*+', re.S)


class JsonArraySlicer(Slicer):
    """Slices `[e1,...,en]` of whole elements of one top-level JSON array. The elements
    are not decoded here (the slice's parser does that); only strings and nesting are
    followed, so commas inside them do not cut. A body that is not an array (one
    object) is passed on whole, up to the record limit. Records nested deeper than the
    one-regex match are followed token by token (about 10 MiB/s): not on the loop."""

    on_loop = False

    def _start(self) -> None:
        self._pending = bytearray()  # after the last cut: elements, separators, a partial one
        self._scan = 0  # where to look for the next token in _pending
        self._element = 0  # where the element being read starts in _pending
        self._depth = 0  # nesting: 1 inside the top-level array
        self._state = "start"  # start, array, whole (not an array), done
        self._elements = 0  # complete elements in _pending
        self._any = False  # an element seen (a comma is only valid after one)

    def _take(self, data: bytes, slices: list[bytes]) -> None:
        if self._state == "start":
            data = data.lstrip()
            if not data:
                return
            if data[:1] != b"[":
                self._state = "whole"
            else:
                self._state, self._depth, data = "array", 1, data[1:]
        if self._state == "whole":
            self._pending += data
            if len(self._pending) > self._line_limit:
                raise self._too_long("a JSON body that is not an array")
            return
        if self._state == "done":
            self._after_array(data)
            return
        self._pending += data
        self._tokens()
        if self._state == "done":
            return  # the last slice is cut by `_rest`
        if len(self._pending) >= self._slice_bytes and self._elements:
            slices.append(b"[" + bytes(self._pending[:self._element - 1]) + b"]")
            del self._pending[:self._element]
            self._scan -= self._element
            self._element = self._elements = 0
        elif len(self._pending) - self._element > self._line_limit:
            raise self._too_long("a JSON array element")

    def _tokens(self) -> None:
        closed = self._follow()
        if closed is not None:  # the top-level array ended: nothing may follow
            start, end = closed
            rest = bytes(self._pending[end:])
            del self._pending[start:]
            self._scan = len(self._pending)
            self._state = "done"
            self._after_array(rest)

    def _follow(self) -> tuple[int, int] | None:
        """Follow the body from `_scan`; the span of the array's closing `]` if seen."""
        while True:
            if self._scan == self._element:  # at an element's start: skip a run of them
                run = _JSON_RUN.match(self._pending, self._scan)
                assert run is not None  # it matches the empty run
                if run.end() > self._scan:
                    self._elements += 1
                    self._any = True
                    self._element = self._scan = run.end()
            at = self._scan
            closed = self._tokens_of_one_element()
            if closed is not None or self._scan == at or self._scan != self._element:
                return closed  # the array ended, or the data did inside an element

    def _tokens_of_one_element(self) -> tuple[int, int] | None:
        """Follow tokens from `_scan` to the next element's start (after a comma at
        depth 1); the span of the array's closing `]` if seen. (The matches hold
        _pending: it is resized only after they are gone.)"""
        for match in _JSON_TOKEN.finditer(self._pending, self._scan):
            token = match.group()
            if token[:1] == b'"':
                if len(token) == 1 or token[-1:] != b'"' or _escaped_quote(token):
                    self._scan = match.start()  # a string the data ends inside: later
                    return None
                continue
            if token in b"[{":
                self._depth += 1
            elif token in b"]}":
                self._depth -= 1
                if self._depth == 0:
                    self._end_element(match.start(), closing=True)
                    return match.start(), match.end()
            elif self._depth == 1:  # a comma between elements
                self._end_element(match.start(), closing=False)
                self._element = self._scan = match.end()
                return None
        self._scan = len(self._pending)
        return None

    def _end_element(self, at: int, *, closing: bool) -> None:
        """An element ends at `at` (a comma, or the array's `]`)."""
        if self._pending[self._element:at].strip():
            self._elements += 1
            self._any = True
        elif self._any or not closing:  # `[,`, `,,` or `,]`; `[]` has no elements
            raise IngestError(400, "malformed_body",
                              "JSON array has an empty element (a stray comma)")

    def _after_array(self, data: bytes) -> None:
        if data.strip():
            raise IngestError(400, "malformed_body", "data after the end of the JSON array")

    def _rest(self) -> list[bytes]:
        if self._state == "whole":
            rest, self._pending = bytes(self._pending), bytearray()
            return [rest]
        if self._state == "array":
            raise IngestError(400, "malformed_body", "JSON body is truncated: the array is "
                              "not closed (or a string in it)")
        rest, self._pending = bytes(self._pending), bytearray()
        return [b"[" + rest + b"]"] if rest.strip() else []


def _escaped_quote(token: bytes) -> bool:
    """Whether a string token's last quote is escaped (an odd run of backslashes)."""
    body = token[1:-1]
    return (len(body) - len(body.rstrip(b"\\"))) % 2 == 1


class MsgpackSlicer(Slicer):
    """Slices of whole top-level msgpack values, found by skipping them (not building
    them); the unpacker holds at most one value's bytes plus one feed."""

    def _start(self) -> None:
        self._unpacker = msgpack.Unpacker(max_buffer_size=self._line_limit + self._slice_bytes)
        self._pending = bytearray()  # from the last cut
        self._base = 0  # offset of _pending[0] in the body
        self._boundary = 0  # offset after the last whole value

    def _take(self, data: bytes, slices: list[bytes]) -> None:
        for start in range(0, len(data), self._slice_bytes):
            self._take_part(data[start:start + self._slice_bytes], slices)

    def _take_part(self, data: bytes, slices: list[bytes]) -> None:
        try:
            self._unpacker.feed(data)
        except msgpack.BufferFull:
            raise self._too_long("a msgpack value") from None
        self._pending += data
        try:
            while True:
                self._unpacker.skip()
                self._boundary = self._unpacker.tell()
        except msgpack.OutOfData:
            pass
        except msgpack.StackError:
            raise IngestError(400, "too_deep", "msgpack body nests too deep") from None
        except (ValueError, msgpack.UnpackException) as exc:
            raise IngestError(400, "malformed_body",
                              f"body is not valid msgpack: {exc}") from None
        cut = self._boundary - self._base
        if cut >= self._slice_bytes:
            slices.append(bytes(self._pending[:cut]))
            del self._pending[:cut]
            self._base = self._boundary

    def _rest(self) -> list[bytes]:
        if self._base + len(self._pending) != self._boundary:
            raise IngestError(400, "malformed_body", f"msgpack body is truncated after "
                              f"{self._boundary} of {self._base + len(self._pending)} bytes")
        rest, self._pending = bytes(self._pending), bytearray()
        return [rest] if rest else []


_SLICERS: dict[object, type[Slicer]] = {
    parse_ndjson: NdjsonSlicer, parse_json: JsonArraySlicer, parse_msgpack: MsgpackSlicer}


def can_stream(content_type: str) -> bool:
    """Whether a body of this Content-Type can be sliced as it arrives."""
    return PARSERS.get(media_type(content_type)) in _SLICERS


def slicer_for(content_type: str, *, gzip: bool, limit: int, line_limit: int) -> Slicer:
    """The slicer for a body of `content_type` (one `can_stream` accepts)."""
    kind = _SLICERS[PARSERS[media_type(content_type)]]
    return kind(gzip=gzip, limit=limit, line_limit=line_limit)

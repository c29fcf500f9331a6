"""Cut an ndjson body, gzip or not, into slices of whole lines as its bytes arrive.

A streamed request is never held whole: each slice is decoded, normalised and spooled
before more is read, so memory is bounded by the slice size (plus one line), not by
the body. Gunzip output is bounded per call too (a bomb inflates a slice at a time).
Nothing here touches a socket.
"""

import zlib

from mwdlogd.errors import IngestError

SLICE_BYTES = 1024 * 1024


class NdjsonSlicer:
    """`feed` body bytes, then `end`; each returns the slices of whole lines now ready."""

    def __init__(self, *, gzip: bool, limit: int, line_limit: int,
                 slice_bytes: int = SLICE_BYTES) -> None:
        self._inflater = zlib.decompressobj(wbits=31) if gzip else None
        self._limit = limit
        self._line_limit = line_limit
        self._slice_bytes = slice_bytes
        self._pending = bytearray()
        self.inflated = 0
        self._in_member = False  # gzip input taken without its member's end yet
        self._more = False  # the last inflate filled its output: call again

    def feed(self, data: bytes) -> list[bytes]:
        slices: list[bytes] = []
        if self._inflater is None:
            self._add(data, slices)
            return slices
        while data or self._more:
            self._in_member = True
            try:
                out = self._inflater.decompress(data, self._slice_bytes)
            except zlib.error as exc:
                raise IngestError(400, "malformed_body", f"gzip body: {exc}") from None
            self._add(out, slices)
            if self._inflater.eof:  # the next gzip member (Fluentd sends several)
                data = self._inflater.unused_data
                self._inflater = zlib.decompressobj(wbits=31)
                self._in_member = self._more = False
            else:
                data = self._inflater.unconsumed_tail
                self._more = len(out) == self._slice_bytes  # output may be left inside
        return slices

    def end(self) -> list[bytes]:
        """The last slice; 400 when a gzip member was cut short."""
        if self._in_member:
            raise IngestError(400, "malformed_body", "gzip body: gzip data is truncated")
        rest, self._pending = bytes(self._pending), bytearray()
        return [rest] if rest.strip() else []

    def _add(self, data: bytes, slices: list[bytes]) -> None:
        self.inflated += len(data)
        if self.inflated > self._limit:
            raise IngestError(413, "body_too_large",
                              f"body over http.stream_body_limit={self._limit} bytes "
                              f"(after gunzip)")
        self._pending += data
        if len(self._pending) < self._slice_bytes:
            return
        cut = self._pending.rfind(b"\n") + 1
        if cut == 0:
            if len(self._pending) > self._line_limit:
                raise IngestError(413, "line_too_long", f"a line is longer than "
                                  f"http.body_size_limit={self._line_limit} bytes")
            return
        slices.append(bytes(self._pending[:cut]))
        del self._pending[:cut]

"""Bounded multi-member gunzip, shared by HTTP bodies and forward CompressedPackedForward."""

import zlib

from mwdlogd.errors import GzipMalformed, GzipTooLarge


def gunzip_bounded(data: bytes, limit: int) -> bytes:
    """Inflate every gzip member in `data` (Fluentd sends several), refusing output past
    `limit` while inflating, so a bomb never takes more than `limit` bytes of memory."""
    out = bytearray()
    while data:
        inflater = zlib.decompressobj(wbits=31)
        try:
            out += inflater.decompress(data, limit + 1 - len(out))
        except zlib.error as exc:
            raise GzipMalformed(f"gzip data does not inflate: {exc}") from None
        if len(out) > limit:
            raise GzipTooLarge(f"inflates past {limit} bytes")
        if not inflater.eof:
            raise GzipMalformed("gzip data is truncated")
        data = inflater.unused_data
    return bytes(out)

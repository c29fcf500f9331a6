"""Request body decoders for every format Fluentd out_http and Fluent Bit send (DESIGN §1).

Each returns the records as a list of dicts or raises IngestError naming the problem;
a body is accepted whole or not at all.
"""

from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_to_bytes

import attrs
import msgpack

from mwdlogd import codec
from mwdlogd.errors import IngestError
from mwdlogd.proto.gzipped import GzipMalformed, GzipTooLarge, gunzip_bounded

Records = list[dict[str, Any]]


@attrs.frozen
class Parsed:
    """A body's records and, for ndjson, each record's own JSON text (so storage can add
    its fields to that text instead of encoding the whole record again)."""

    records: Records
    lines: list[bytes] | None = None


def gunzip_body(data: bytes, limit: int) -> bytes:
    """Inflate a gzip request body; 413 past `limit`, 400 when it is not valid gzip."""
    try:
        return gunzip_bounded(data, limit)
    except GzipTooLarge:
        raise IngestError(413, "body_too_large",
                          f"body inflates past {limit} bytes (gzip bomb or oversized)") from None
    except GzipMalformed as exc:
        raise IngestError(400, "malformed_body", f"gzip body: {exc}") from None


def _not_object(index: int, value: object) -> IngestError:
    return IngestError(400, "not_an_object",
                       f"record {index} is {type(value).__name__}, expected a JSON/msgpack object")


def _checked(values: list[Any]) -> Records:
    if not values:
        raise IngestError(400, "empty_body", "body holds no records")
    for index, value in enumerate(values):
        if not isinstance(value, dict):
            raise _not_object(index, value)
    return values


def _json_error(what: str, exc: ValueError) -> IngestError:
    return IngestError(400, "malformed_body", f"{what} is not valid JSON: {exc}")


def parse_ndjson(body: bytes) -> Parsed:
    """One JSON object per line; blank lines (and the trailing newline) are allowed."""
    records, lines = [], []
    for number, line in enumerate(body.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(codec.loads_keeping_text(line))  # normalize keeps `line`
        except ValueError as exc:
            raise _json_error(f"line {number}", exc) from None
        lines.append(line)
    return Parsed(_checked(records), lines)


def parse_json(body: bytes) -> Parsed:
    """One object, or an array of objects (Fluentd's `json_array`); several concatenated
    objects (a JSON stream) are read as ndjson."""
    try:
        value = codec.loads(body)
    except codec.JSONDecodeError as exc:
        if codec.is_trailing_content(exc):
            return parse_ndjson(body)
        raise _json_error("body", exc) from None
    except ValueError as exc:
        raise _json_error("body", exc) from None
    return Parsed(_checked(value if isinstance(value, list) else [value]))


def parse_msgpack(body: bytes) -> Parsed:
    """A stream of maps, or of arrays of maps; keys must be strings."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=max(len(body), 1))
    unpacker.feed(body)
    values: list[Any] = []
    consumed = 0  # tell() after a partial object is not reliable, so keep the last good one
    try:
        for value in unpacker:
            values.extend(value if isinstance(value, list) else [value])
            consumed = unpacker.tell()
    except (ValueError, msgpack.UnpackException) as exc:
        raise IngestError(400, "malformed_body", f"body is not valid msgpack: {exc}") from None
    if consumed != len(body):
        raise IngestError(400, "malformed_body",
                          f"msgpack body is truncated after {consumed} of {len(body)} bytes")
    records = _checked(values)
    for index, record in enumerate(records):
        if not all(isinstance(key, str) for key in record):
            raise IngestError(400, "malformed_body", f"record {index} has a non-string key")
    return Parsed(records)


def parse_form(body: bytes) -> Parsed:
    """Legacy in_http form: `json=<urlencoded JSON>` or `msgpack=<urlencoded msgpack>`."""
    fields = {}
    for pair in body.split(b"&"):
        name, _, value = pair.partition(b"=")
        fields[unquote_to_bytes(name.replace(b"+", b" "))] = unquote_to_bytes(
            value.replace(b"+", b" "))
    if b"json" in fields:
        return parse_json(fields[b"json"])
    if b"msgpack" in fields:
        return parse_msgpack(fields[b"msgpack"])
    raise IngestError(400, "malformed_body", "form body has neither a json= nor a msgpack= field")


PARSERS: dict[str, Callable[[bytes], Parsed]] = {
    "application/x-ndjson": parse_ndjson,
    "application/ndjson": parse_ndjson,
    "application/jsonl": parse_ndjson,
    "application/json": parse_json,
    "application/msgpack": parse_msgpack,
    "application/x-msgpack": parse_msgpack,
    "application/x-www-form-urlencoded": parse_form,
}
GZIP_ENCODINGS = {"gzip", "x-gzip"}


def media_type(content_type: str) -> str:
    """`application/json; charset=utf-8` -> `application/json`."""
    return content_type.split(";", 1)[0].strip().lower()


def parser_for(content_type: str) -> Callable[[bytes], Parsed]:
    """The decoder for a Content-Type; raises 415 naming the supported types."""
    parser = PARSERS.get(media_type(content_type))
    if parser is None:
        supported = ", ".join(PARSERS)
        shown = content_type or "(none)"
        raise IngestError(415, "unsupported_media_type",
                          f"Content-Type {shown} is not supported; use one of: {supported}")
    return parser


def check_encoding(content_encoding: str) -> bool:
    """True when the body is gzip; raises 415 for an encoding we cannot read."""
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        return False
    if encoding in GZIP_ENCODINGS:
        return True
    raise IngestError(415, "unsupported_encoding",
                      f"Content-Encoding {content_encoding} is not supported; use gzip or none")

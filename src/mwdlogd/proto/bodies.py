"""Request body decoders for every format Fluentd out_http and Fluent Bit send (DESIGN §1).

Each returns the records as a list of dicts or raises IngestError naming the problem;
a body is accepted whole or not at all. Text that is not valid UTF-8 does not refuse a
body: such records are kept by the rule of `proto.text` and counted.
"""

import json
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote_to_bytes

import attrs
import msgpack

from mwdlogd import codec
from mwdlogd.errors import IngestError
from mwdlogd.proto.forward import event_time_hook
from mwdlogd.proto.gzipped import GzipMalformed, GzipTooLarge, gunzip_bounded
from mwdlogd.proto.text import repair, repair_all, strings_as_text

Records = list[dict[str, Any]]


@attrs.frozen
class Parsed:
    """A body's records and, for ndjson, each record's own JSON text (so storage can add
    its fields to that text instead of encoding the whole record again)."""

    records: Records
    lines: Sequence[bytes | None] | None = None  # None: store the decoded record's encoding
    invalid_utf8: int = 0  # records kept with text that was not UTF-8
    times: list[float | None] | None = None  # event times the body carried, per record


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
    if isinstance(exc, codec.TooDeep):
        return _too_deep(what)
    return IngestError(400, "malformed_body", f"{what} is not valid JSON: {exc}")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads_lenient(data: bytes) -> Any:
    """JSON whose text is not all valid UTF-8 (or escapes lone surrogates): bad bytes
    become lone surrogates for `proto.text` to repair. Raises ValueError."""
    try:
        return json.loads(data.decode("utf-8", "surrogateescape"),
                          parse_constant=_refuse_constant)
    except RecursionError:
        raise codec.TooDeep from None


def _too_deep(what: str) -> IngestError:
    return IngestError(400, "too_deep", f"{what} nests arrays/objects deeper than "
                                        f"{codec.MAX_DEPTH} levels")


# A line that names its customer twice (or may, through a \u escape) is checked, and when
# it repeats a key it is stored as its decoded record (the last value wins, as it does
# for routing and the token's customer check) instead of as sent: a token limited to
# acme cannot store a line whose first customer_name is another customer's. Other
# repeated keys are stored as sent; a JSON reader takes their last value, as routing did.
CUSTOMER_KEY = b'"customer_name"'


def _text_to_keep(line: bytes) -> bytes | None:
    if (b"\\u" in line or line.count(CUSTOMER_KEY) > 1) and codec.has_duplicate_keys(line):
        return None
    return line


def _may_repeat_keys(body: bytes, records: int) -> bool:
    """Could a line repeat its customer_name? Whole-body scans in C (a long pattern, and
    memchr for the backslash), no work per line for the usual body."""
    return (b"\\" in body and b"\\u" in body) or body.count(CUSTOMER_KEY) > records


def parse_ndjson(body: bytes) -> Parsed:
    """One JSON object per line; blank lines (and the trailing newline) are allowed."""
    records: Records = []
    lines: list[bytes | None] = []
    invalid = 0
    for number, line in enumerate(body.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(codec.loads_keeping_text(line))  # normalize keeps `line`
            lines.append(line)
            continue
        except codec.TooDeep:
            raise _too_deep(f"line {number}") from None
        except ValueError as exc:
            error = exc
        try:
            value = _loads_lenient(line)
        except ValueError:
            raise _json_error(f"line {number}", error) from None
        fixed = repair(value) if isinstance(value, dict) else None
        invalid += fixed is not None
        records.append(value if fixed is None else fixed)
        lines.append(line if fixed is None else None)
    if _may_repeat_keys(body, len(records)):
        lines = [line if line is None else _text_to_keep(line) for line in lines]
    return Parsed(_checked(records), lines, invalid)


def parse_json(body: bytes) -> Parsed:
    """One object, or an array of objects (Fluentd's `json_array`); several concatenated
    objects (a JSON stream) are read as ndjson."""
    try:
        value = codec.loads(body)
    except codec.JSONDecodeError as exc:
        if codec.is_trailing_content(exc):
            return parse_ndjson(body)
        return _parse_json_lenient(body, exc)
    except ValueError as exc:
        raise _json_error("body", exc) from None
    return Parsed(_checked(value if isinstance(value, list) else [value]))


def _parse_json_lenient(body: bytes, error: ValueError) -> Parsed:
    try:
        value = _loads_lenient(body)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # a stream of documents
            return parse_ndjson(body)
        raise _json_error("body", error) from None
    except ValueError:
        raise _json_error("body", error) from None
    records = _checked(value if isinstance(value, list) else [value])
    return Parsed(records, None, repair_all(records))


def _event(value: Any) -> tuple[float, Any] | None:
    """(event time, record) of Fluent Bit's msgpack event, `[time, map]` or
    `[[time, metadata], map]` (its http output with `Format msgpack`), else None."""
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[1], dict)):
        return None
    at = value[0][0] if isinstance(value[0], list) and len(value[0]) == 2 else value[0]
    if isinstance(at, int | float) and not isinstance(at, bool):
        return float(at), value[1]
    return None


def parse_msgpack(body: bytes) -> Parsed:
    """A stream of maps, of arrays of maps, or of Fluent Bit events (`_event`); keys must
    be strings (str or bin: both are text, as in the forward protocol; other keys are
    refused while unpacking)."""
    unpacker = msgpack.Unpacker(raw=True, strict_map_key=True, ext_hook=event_time_hook,
                                max_buffer_size=max(len(body), 1))
    unpacker.feed(body)
    values: list[Any] = []
    times: list[float | None] = []
    consumed = 0  # tell() after a partial object is not reliable, so keep the last good one
    try:
        for value in unpacker:
            if (event := _event(value)) is not None:
                times.append(event[0])
                values.append(event[1])
            else:
                batch = value if isinstance(value, list) else [value]
                times += [None] * len(batch)
                values += batch
            consumed = unpacker.tell()
    except msgpack.StackError:
        raise _too_deep("msgpack body") from None
    except (ValueError, msgpack.UnpackException) as exc:
        raise IngestError(400, "malformed_body", f"body is not valid msgpack: {exc}") from None
    if consumed != len(body):
        raise IngestError(400, "malformed_body",
                          f"msgpack body is truncated after {consumed} of {len(body)} bytes")
    try:
        values, clean = strings_as_text(values, event_time_hook)
    except (ValueError, TypeError) as exc:
        raise IngestError(400, "malformed_body", f"body is not valid msgpack: {exc}") from None
    records = _checked(values)  # keys are text: strict_map_key refused any other
    return Parsed(records, None, 0 if clean else repair_all(records),
                  times if any(at is not None for at in times) else None)


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

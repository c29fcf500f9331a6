"""Request body decoders for every format Fluentd out_http and Fluent Bit send (DESIGN §1).

Each returns the records as a list of dicts or raises IngestError naming the problem;
a body is accepted whole or not at all. Text that is not valid UTF-8 does not refuse a
body: such records are kept by the rule of `proto.text` and counted.
"""

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import unquote_to_bytes

import attrs
import msgpack

from mwdlogd import codec
from mwdlogd.errors import GzipMalformed, GzipTooLarge, IngestError, TooDeep
from mwdlogd.proto.forward import event_time_hook
from mwdlogd.proto.gzipped import gunzip_bounded
from mwdlogd.proto.text import repair, repair_all, strings_as_text

Records = list[dict[str, Any]]
UNCAPPED = sys.maxsize
# JSON arrays with more objects than this are decoded element by element.
SLICED_OBJECTS = 100_000


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


def _too_many(max_records: int) -> IngestError:
    return IngestError(413, "too_many_records",
                       f"body holds more than http.max_records_per_request={max_records} records")


def _checked(values: list[Any], max_records: int = UNCAPPED) -> Records:
    if not values:
        raise IngestError(400, "empty_body", "body holds no records")
    if len(values) > max_records:
        raise _too_many(max_records)
    for index, value in enumerate(values):
        if not isinstance(value, dict):
            raise _not_object(index, value)
    return values


def _json_error(what: str, exc: ValueError) -> IngestError:
    if isinstance(exc, TooDeep):
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
        raise TooDeep(codec.MAX_DEPTH) from None


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


def parse_ndjson(body: bytes, max_records: int = UNCAPPED) -> Parsed:
    """One JSON object per line; blank lines (and the trailing newline) are allowed."""
    records: Records = []
    lines: list[bytes | None] = []
    invalid = 0
    many = body.count(b"\n") > max_records  # blank lines, or past the cap
    for number, line in enumerate(_split_lines(body) if many else body.split(b"\n"), start=1):
        if not line.strip():
            continue
        if len(records) == max_records:
            raise _too_many(max_records)
        try:
            records.append(codec.loads_keeping_text(line))  # normalize keeps `line`
            lines.append(line)
            continue
        except TooDeep:
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
    return Parsed(_checked(records, max_records), lines, invalid)


def _split_lines(body: bytes) -> Iterator[bytes]:
    """`body.split(b"\n")` a line at a time (a fifth slower): split() makes every line in
    one call that holds the GIL (1.33 M of them from a 4 MB body) before the record cap
    can stop it."""
    start = 0
    while (end := body.find(b"\n", start)) >= 0:
        yield body[start:end]
        start = end + 1
    yield body[start:]


def parse_json(body: bytes, max_records: int = UNCAPPED) -> Parsed:
    """One object, or an array of objects (Fluentd's `json_array`); several concatenated
    objects (a JSON stream) are read as ndjson. An array with very many objects is read
    element by element, so the record cap stops it early and the event loop keeps
    running meanwhile (in one call, 3.3 M `{}` held the GIL for most of a second)."""
    if body.count(b"{") > SLICED_OBJECTS and body.lstrip()[:1] == b"[":
        return _parse_json_array_sliced(body, max_records)
    try:
        value = codec.loads(body)
    except codec.JSONDecodeError as exc:
        if codec.is_trailing_content(exc):
            return parse_ndjson(body, max_records)
        return _parse_json_lenient(body, exc, max_records)
    except ValueError as exc:
        raise _json_error("body", exc) from None
    return Parsed(_checked(value if isinstance(value, list) else [value], max_records))


def _parse_json_lenient(body: bytes, error: ValueError, max_records: int) -> Parsed:
    try:
        value = _loads_lenient(body)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # a stream of documents
            return parse_ndjson(body, max_records)
        raise _json_error("body", error) from None
    except ValueError:
        raise _json_error("body", error) from None
    records = _checked(value if isinstance(value, list) else [value], max_records)
    return Parsed(records, None, repair_all(records))


def _parse_json_array_sliced(body: bytes, max_records: int) -> Parsed:
    """Lenient as `_parse_json_lenient` (bad UTF-8 repaired), a value at a time."""
    values: list[Any] = []
    try:
        for value in codec.iter_array(body.decode("utf-8", "surrogateescape")):
            if len(values) == max_records:
                raise _too_many(max_records)
            values.append(value)
    except ValueError as exc:
        raise _json_error("body", exc) from None
    records = _checked(values, max_records)
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


def _array_length(body: bytes, at: int) -> int | None:
    """The length an array header at `at` declares, without reading it; None if none."""
    head = body[at] if at < len(body) else None
    if head is not None and 0x90 <= head <= 0x9F:
        return head & 0x0F
    width = {0xDC: 2, 0xDD: 4}.get(head) if head is not None else None
    if width is None or at + 1 + width > len(body):
        return None
    return int.from_bytes(body[at + 1:at + 1 + width], "big")


def parse_msgpack(body: bytes, max_records: int = UNCAPPED) -> Parsed:
    """A stream of maps, of arrays of maps, or of Fluent Bit events (`_event`); keys must
    be strings (str or bin: both are text, as in the forward protocol; other keys are
    refused while unpacking). An array longer than an event is read a map at a time,
    and one past the record cap is refused from its header, before it is built."""
    unpacker = msgpack.Unpacker(raw=True, strict_map_key=True, ext_hook=event_time_hook,
                                max_buffer_size=max(len(body), 1))
    unpacker.feed(body)
    values: list[Any] = []
    times: list[float | None] = []
    consumed = 0  # tell() after a partial object is not reliable, so keep the last good one
    try:
        while consumed < len(body):
            length = _array_length(body, consumed)
            if length is not None and length > 2:  # a batch of maps, not an event
                if len(values) + length > max_records:
                    raise _too_many(max_records)
                unpacker.read_array_header()
                values.extend(unpacker.unpack() for _ in range(length))
                times += [None] * length
            elif (event := _event(value := unpacker.unpack())) is not None:
                times.append(event[0])
                values.append(event[1])
            else:
                batch = value if isinstance(value, list) else [value]
                times += [None] * len(batch)
                values += batch
            if len(values) > max_records:
                raise _too_many(max_records)
            consumed = unpacker.tell()
    except msgpack.StackError:
        raise _too_deep("msgpack body") from None
    except msgpack.OutOfData:
        pass  # a truncated last value: reported below
    except (ValueError, msgpack.UnpackException) as exc:
        raise IngestError(400, "malformed_body", f"body is not valid msgpack: {exc}") from None
    if consumed != len(body):
        raise IngestError(400, "malformed_body",
                          f"msgpack body is truncated after {consumed} of {len(body)} bytes")
    try:
        values, clean = strings_as_text(values, event_time_hook)
    except (ValueError, TypeError) as exc:
        raise IngestError(400, "malformed_body", f"body is not valid msgpack: {exc}") from None
    records = _checked(values, max_records)  # keys are text: strict_map_key refused any other
    return Parsed(records, None, 0 if clean else repair_all(records),
                  times if any(at is not None for at in times) else None)


def parse_form(body: bytes, max_records: int = UNCAPPED) -> Parsed:
    """Legacy in_http form: `json=<urlencoded JSON>` or `msgpack=<urlencoded msgpack>`."""
    fields = {}
    for pair in body.split(b"&"):
        name, _, value = pair.partition(b"=")
        fields[unquote_to_bytes(name.replace(b"+", b" "))] = unquote_to_bytes(
            value.replace(b"+", b" "))
    if b"json" in fields:
        return parse_json(fields[b"json"], max_records)
    if b"msgpack" in fields:
        return parse_msgpack(fields[b"msgpack"], max_records)
    raise IngestError(400, "malformed_body", "form body has neither a json= nor a msgpack= field")


PARSERS: dict[str, Callable[[bytes, int], Parsed]] = {
    "application/x-ndjson": parse_ndjson,
    "application/ndjson": parse_ndjson,
    "application/jsonl": parse_ndjson,
    "application/json": parse_json,
    "application/msgpack": parse_msgpack,
    "application/x-msgpack": parse_msgpack,
    "application/x-www-form-urlencoded": parse_form,
}
GZIP_ENCODINGS = {"gzip", "x-gzip"}
_MAP_HEADS = bytes(range(0x80, 0x90)) + b"\xde\xdf"  # fixmap, map 16, map 32


def media_type(content_type: str) -> str:
    """`application/json; charset=utf-8` -> `application/json`."""
    return content_type.split(";", 1)[0].strip().lower()


def parser_for(content_type: str) -> Callable[[bytes, int], Parsed]:
    """The decoder for a Content-Type; raises 415 naming the supported types."""
    parser = PARSERS.get(media_type(content_type))
    if parser is None:
        supported = ", ".join(PARSERS)
        shown = content_type or "(none)"
        raise IngestError(415, "unsupported_media_type",
                          f"Content-Type {shown} is not supported; use one of: {supported}")
    return parser


def records_at_most(content_type: str, body: bytes) -> int:
    """A cheap upper bound on the records a body can hold, to charge before decoding:
    a line each for ndjson, an object each for JSON, a map header byte each for msgpack,
    a byte each otherwise."""
    kind = media_type(content_type)
    if PARSERS.get(kind) is parse_ndjson:
        return body.count(b"\n") + 1
    if kind == "application/json":
        return body.count(b"{")
    if PARSERS.get(kind) is parse_msgpack:  # every map starts with one of these bytes
        return len(body) - len(body.translate(None, _MAP_HEADS))
    return len(body)


def check_encoding(content_encoding: str) -> bool:
    """True when the body is gzip; raises 415 for an encoding we cannot read."""
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        return False
    if encoding in GZIP_ENCODINGS:
        return True
    raise IngestError(415, "unsupported_encoding",
                      f"Content-Encoding {content_encoding} is not supported; use gzip or none")

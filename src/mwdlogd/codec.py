"""JSON encode/decode in one place: orjson (here 2x the stdlib decoding, 10x encoding),
with the stdlib where orjson cannot be exact: integers beyond 64 bits, text that is
not valid UTF-8, map keys orjson does not take."""

import json
import math
import re
from collections.abc import Iterator
from typing import Any

import orjson

from mwdlogd.errors import TooDeep

JSONDecodeError = orjson.JSONDecodeError  # a ValueError, as json's is

# Deepest nesting of arrays and objects in a record that is decoded or encoded whole:
# orjson encodes 254 levels. Deeper is refused with TooDeep, never a recursion traceback.
# (A JSON line stored as sent may nest up to orjson's decoding limit, 1024 levels.)
MAX_DEPTH = 254


# orjson turns integers beyond 64 bits into floats (and refuses those past a double's
# range). A document with a number that large anywhere is read again by the stdlib, so
# such integers keep their exact value at any size (up to Python's 4300 digits).
_INT64 = 2.0**63
_TOO_BIG = "number is infinity"


def loads_keeping_text(data: bytes) -> Any:
    """Decode one JSON document for a caller that stores `data` itself, not the result:
    integers beyond 64 bits may come back as floats. Raises JSONDecodeError, TooDeep past
    orjson's 1024 levels (the text is stored as sent, so it may nest deeper than
    MAX_DEPTH; one that must be encoded again raises TooDeep then)."""
    return _orjson_loads(data)


def loads(data: bytes) -> Any:
    """Decode one JSON document, integers exact at any depth; raises JSONDecodeError (also
    for invalid UTF-8), TooDeep."""
    value = _orjson_loads(data)
    return _stdlib_loads(data) if _walk(value) else value


def _orjson_loads(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except JSONDecodeError as exc:
        if exc.msg.startswith(_TOO_BIG):
            return _stdlib_loads(data)
        if exc.msg.startswith("depth limit"):
            raise TooDeep(MAX_DEPTH) from None
        raise


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (math.inf, -math.inf):
        raise ValueError(f"number {text[:40]} is beyond a double's range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _stdlib_loads(data: bytes) -> Any:
    """What orjson cannot hold exactly; the same documents accepted (no NaN literals)."""
    try:
        return json.loads(data, parse_float=_finite_float, parse_constant=_no_constant)
    except RecursionError:
        raise TooDeep(MAX_DEPTH) from None


def _walk(value: Any) -> bool:
    """Does `value` hold a number beyond 64 bits? Raises TooDeep. No recursion."""
    huge = False
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if type(item) is float:
            huge = huge or not -_INT64 < item < _INT64
            continue
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        if depth > MAX_DEPTH:
            raise TooDeep(MAX_DEPTH)
        stack.extend((v, depth + 1) for v in item)
    return huge


def _nonfinite(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is float and not math.isfinite(item):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _spelled(value: Any) -> Any:
    """NaN and infinities (msgpack has them, JSON has not) as the strings "NaN",
    "Infinity", "-Infinity": kept, where orjson would write null."""
    if type(value) is float and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _spelled(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_spelled(v) for v in value]
    return value


def has_duplicate_keys(data: bytes) -> bool:
    """Does the JSON document repeat a key in any object? (Slow: the stdlib decoder.)"""
    found = False

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal found
        result = dict(items)
        found = found or len(result) != len(items)
        return result

    try:
        json.loads(data, object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        return False
    return found


_SPACE = re.compile(r"[ \t\n\r]*")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_STDLIB = json.JSONDecoder(parse_constant=_refuse_constant)


def iter_array(text: str) -> Iterator[Any]:
    """The elements of a JSON array one at a time (stdlib, integers exact), so a caller can
    stop early and other threads run between elements; orjson decodes a whole document
    in one call that holds the GIL. Raises ValueError for invalid JSON."""
    at = _SPACE.match(text).end()  # type: ignore[union-attr]  # always matches
    if text[at:at + 1] != "[":
        raise ValueError("not a JSON array")
    at = _SPACE.match(text, at + 1).end()  # type: ignore[union-attr]
    if text[at:at + 1] == "]":
        at += 1
    else:
        while True:
            value, at = _STDLIB.raw_decode(text, at)
            yield value
            at = _SPACE.match(text, at).end()  # type: ignore[union-attr]
            separator = text[at:at + 1]
            at = _SPACE.match(text, at + 1).end()  # type: ignore[union-attr]
            if separator == "]":
                break
            if separator != ",":
                raise ValueError(f"expected ',' or ']' at character {at}")
    if at != len(text):
        raise ValueError(f"unexpected content after the array at character {at}")


def is_trailing_content(exc: JSONDecodeError) -> bool:
    """The document parsed but more follows: a stream of documents, not one."""
    return exc.msg == "unexpected content after document"


def dumps_line(value: Any) -> bytes:
    """One compact UTF-8 JSON line, newline-terminated, non-ASCII kept as is.

    Never fails on msgpack input but for TooDeep: map keys JSON cannot take become text,
    text that was not valid UTF-8 on the wire is stored with U+FFFD in place of the bad
    bytes, NaN and infinities as the strings "NaN", "Infinity", "-Infinity".
    """
    try:
        line = orjson.dumps(value, default=_jsonable, option=_ORJSON_OPTIONS)
    except TypeError as exc:  # orjson.JSONEncodeError: what only the stdlib path takes
        if "Recursion limit" in str(exc):
            raise TooDeep(MAX_DEPTH) from None
    else:
        if b"null" not in line or not _nonfinite(value):  # orjson writes NaN as null
            return line
    try:
        if _nonfinite(value):
            value = _spelled(value)
        try:
            text = _encoder.encode(value)
        except TypeError:
            text = _encoder.encode(_text_keys(value))
    except RecursionError:  # deeper than orjson's first error showed
        raise TooDeep(MAX_DEPTH) from None
    return (text + "\n").encode("utf-8", "replace")


def _text_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(_jsonable(k)): _text_keys(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_text_keys(v) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    """msgpack can carry what JSON cannot: bytes become text, other values their repr."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if hasattr(value, "to_unix"):  # msgpack.Timestamp
        return value.to_unix()
    return repr(value)


_ORJSON_OPTIONS = orjson.OPT_APPEND_NEWLINE
_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=_jsonable)

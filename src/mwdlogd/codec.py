"""JSON encode/decode in one place: orjson (here 2x the stdlib decoding, 10x encoding),
with the stdlib where orjson cannot be exact: integers beyond 64 bits, text that is
not valid UTF-8, map keys orjson does not take."""

import json
from typing import Any

import orjson

JSONDecodeError = orjson.JSONDecodeError  # a ValueError, as json's is


# orjson turns integers beyond 64 bits into floats. A document with a number that large
# anywhere is read again by the stdlib, so such integers keep their exact value.
_INT64 = 2.0**63


def loads_keeping_text(data: bytes) -> Any:
    """Decode one JSON document for a caller that stores `data` itself, not the result:
    integers beyond 64 bits may come back as floats. Raises JSONDecodeError."""
    return orjson.loads(data)


def loads(data: bytes) -> Any:
    """Decode one JSON document, integers exact at any depth; raises JSONDecodeError (also
    for invalid UTF-8)."""
    value = orjson.loads(data)
    return json.loads(data) if _holds_huge_number(value) else value


def _holds_huge_number(value: Any) -> bool:
    if type(value) is float:
        return not -_INT64 < value < _INT64
    if isinstance(value, dict):
        value = value.values()
    elif not isinstance(value, list):
        return False
    return any(_holds_huge_number(v) for v in value)


def is_trailing_content(exc: JSONDecodeError) -> bool:
    """The document parsed but more follows: a stream of documents, not one."""
    return exc.msg == "unexpected content after document"


def dumps_line(value: Any) -> bytes:
    """One compact UTF-8 JSON line, newline-terminated, non-ASCII kept as is.

    Never fails on msgpack input: map keys JSON cannot take become text, and text that
    was not valid UTF-8 on the wire is stored with U+FFFD in place of the bad bytes.
    """
    try:
        return orjson.dumps(value, default=_jsonable, option=_ORJSON_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError: what only the stdlib path takes
        pass
    try:
        text = _encoder.encode(value)
    except TypeError:
        text = _encoder.encode(_text_keys(value))
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

"""JSON encode/decode in one place. Decoding uses orjson (5x the stdlib here); encoding
stays with the stdlib encoder, which measured as fast as orjson for these records and
takes every value msgpack can produce."""

import json
from typing import Any

import orjson

JSONDecodeError = orjson.JSONDecodeError  # a ValueError, as json's is


# orjson turns integers beyond 64 bits into floats. A record with a top-level number that
# large is read again by the stdlib, so such integers keep their exact value.
_INT64 = 2.0**63


def loads(data: bytes) -> Any:
    """Decode one JSON document; raises JSONDecodeError (also for invalid UTF-8)."""
    value = orjson.loads(data)
    if isinstance(value, dict) and any(type(v) is float and not -_INT64 < v < _INT64
                                       for v in value.values()):
        return json.loads(data)
    return value


def is_trailing_content(exc: JSONDecodeError) -> bool:
    """The document parsed but more follows: a stream of documents, not one."""
    return exc.msg == "unexpected content after document"


def dumps_line(value: Any) -> bytes:
    """One compact UTF-8 JSON line, newline-terminated, non-ASCII kept as is.

    Never fails on msgpack input: map keys JSON cannot take become text, and text that
    was not valid UTF-8 on the wire is stored with U+FFFD in place of the bad bytes.
    """
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


_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=_jsonable)

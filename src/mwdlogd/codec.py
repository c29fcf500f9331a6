"""JSON encode/decode in one place, so a faster library can replace the stdlib later."""

import json
from typing import Any

JSONDecodeError = json.JSONDecodeError


def loads(data: str | bytes) -> Any:
    """Decode one JSON document; raises JSONDecodeError or UnicodeDecodeError."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    return _decoder.decode(text)


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


_decoder = json.JSONDecoder()
_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=_jsonable)

"""JSON encode/decode in one place, so a faster library can replace the stdlib later."""

import json
from typing import Any

JSONDecodeError = json.JSONDecodeError


def loads(data: str | bytes) -> Any:
    """Decode one JSON document; raises JSONDecodeError or UnicodeDecodeError."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    return _decoder.decode(text)


def dumps_line(value: Any) -> bytes:
    """One compact UTF-8 JSON line, newline-terminated, non-ASCII kept as is."""
    return (_encoder.encode(value) + "\n").encode("utf-8", "surrogateescape")


def _jsonable(value: Any) -> Any:
    """msgpack can carry what JSON cannot: bytes become text, other values their repr."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if hasattr(value, "to_unix"):  # msgpack.Timestamp
        return value.to_unix()
    return repr(value)


_decoder = json.JSONDecoder()
_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=_jsonable)

"""Text that is not valid UTF-8, one rule for every protocol (docs/forwarders.md).

A record whose strings (keys or values, at any depth) hold bytes that are not UTF-8 is
kept, never refused: each such string is stored with U+FFFD in place of every invalid
byte, and the record gets a field `utf8_invalid` mapping the JSON Pointer (RFC 6901) of
each such value to the base64 of its original bytes (`utf8_invalid_keys` likewise for
keys). Routing sees the same replaced values the stored line shows. Decoders hand such
strings here decoded with `surrogateescape` (each bad byte a lone surrogate
U+DC80..U+DCFF); lone surrogates from JSON escapes (`\\ud800`) are treated alike.

msgpack *bin* that is valid UTF-8 is text too: Fluentd packs strings from its Yajl and
regexp parsers as bin, and its own in_forward reads them as strings.
"""

import base64
import codecs
import re
from collections.abc import Callable
from typing import Any

import msgpack

INVALID_FIELD = "utf8_invalid"
INVALID_KEYS_FIELD = "utf8_invalid_keys"
_SURROGATE = re.compile("[\ud800-\udfff]")
_ORIGINAL = "mwdlogd-original-bytes"


def _original_bytes(error: UnicodeError) -> tuple[bytes, int]:
    """surrogateescape's inverse, plus the UTF-8 form of surrogates that came as escapes."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    out = bytearray()
    for char in error.object[error.start:error.end]:
        point = ord(char)
        out += bytes([point - 0xDC00]) if 0xDC80 <= point <= 0xDCFF else \
            char.encode("utf-8", "surrogatepass")
    return bytes(out), error.end


codecs.register_error(_ORIGINAL, _original_bytes)


def original_bytes(text: str) -> bytes:
    """The bytes a decoded string came from (its surrogates turned back into bytes)."""
    return text.encode("utf-8", _ORIGINAL)


def _pointer_part(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


class _Repair:
    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.keys: dict[str, str] = {}

    def value(self, value: Any, pointer: str) -> Any:
        if isinstance(value, str):
            if _SURROGATE.search(value) is None:
                return value
            self.values[pointer] = _b64(value)
            return _SURROGATE.sub("\ufffd", value)
        if isinstance(value, dict):
            return self.mapping(value, pointer)
        if isinstance(value, list):
            return [self.value(item, f"{pointer}/{n}") for n, item in enumerate(value)]
        return value

    def mapping(self, value: dict[Any, Any], pointer: str) -> dict[Any, Any]:
        bad = [key for key in value if isinstance(key, str) and _SURROGATE.search(key)]
        taken = set(value).difference(bad)  # good keys keep their names
        out: dict[Any, Any] = {}
        for key, item in value.items():
            shown = key
            if bad and key in bad:
                shown = _SURROGATE.sub("\ufffd", key)
                while shown in taken:  # two keys that differ only in bad bytes stay apart
                    shown += "\ufffd"
                taken.add(shown)
                self.keys[f"{pointer}/{_pointer_part(shown)}"] = _b64(key)
            out[shown] = self.value(item, f"{pointer}/{_pointer_part(str(shown))}")
        return out


def _b64(text: str) -> str:
    return base64.b64encode(original_bytes(text)).decode("ascii")


def _free_name(record: dict[str, Any], name: str) -> str:
    while name in record:  # a record's own field of that name is kept as it is
        name = "_" + name
    return name


def repair(record: dict[str, Any]) -> dict[str, Any] | None:
    """The record with its invalid text replaced and recorded, or None when it has none."""
    fix = _Repair()
    fixed = fix.mapping(record, "")
    if not fix.values and not fix.keys:
        return None
    if fix.values:
        fixed[_free_name(fixed, INVALID_FIELD)] = fix.values
    if fix.keys:
        fixed[_free_name(fixed, INVALID_KEYS_FIELD)] = fix.keys
    return fixed


def repair_all(records: list[Any]) -> int:
    """Repair every dict of `records` in place; returns how many needed it."""
    count = 0
    for index, record in enumerate(records):
        fixed = repair(record) if isinstance(record, dict) else None
        if fixed is not None:
            records[index] = fixed
            count += 1
    return count


ExtHook = Callable[[int, bytes], object]


def strings_as_text(value: Any, ext_hook: ExtHook | None = None) -> tuple[Any, bool]:
    """A value read with `raw=True` (str and bin both bytes), its strings decoded:
    packed again as str and read back by msgpack itself, in C. The flag says whether all
    of it was valid UTF-8; when not, bad bytes are lone surrogates (see `repair`).
    Raises ValueError/TypeError for what msgpack cannot pack back."""
    data = msgpack.packb(value, use_bin_type=False)
    options: dict[str, Any] = {"raw": False, "strict_map_key": False}
    if ext_hook is not None:
        options["ext_hook"] = ext_hook
    try:
        return msgpack.unpackb(data, **options), True
    except UnicodeDecodeError:
        return msgpack.unpackb(data, unicode_errors="surrogateescape", **options), False


# A msgpack document holds no bin unless one of these bytes occurs in it somewhere.
_BIN_MARKERS = (b"\xc4", b"\xc5", b"\xc6")


def may_hold_bin(data: bytes) -> bool:
    return any(marker in data for marker in _BIN_MARKERS)


# What a map read with raw=False may hold that could be (or hide) bin.
_MAYBE_BIN = (bytes, list)


class BinSeen:
    """object_hook for a read with raw=False: notes whether a map holds bin (bytes) or a
    list, which could hide some. The marker bytes of `may_hold_bin` also occur in other
    data (every EventTime's nanoseconds, say), so a blob that has them is read the fast
    way first and read again the slow way only when this saw bin."""

    def __init__(self) -> None:
        self.seen = False

    def __call__(self, mapping: dict[Any, Any]) -> dict[Any, Any]:
        if not self.seen:
            for key, value in mapping.items():
                if type(key) is not str or type(value) in _MAYBE_BIN:
                    self.seen = True
                    break
        return mapping

"""The rule for text that is not UTF-8 (proto/text.py) loses nothing: for any record,
the original bytes of every string come back from what is stored, and what is stored
is valid UTF-8 JSON."""

from __future__ import annotations

import base64
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from mwdlogd import codec
from mwdlogd.proto.text import INVALID_FIELD, INVALID_KEYS_FIELD, repair


def wire_text() -> st.SearchStrategy[str]:
    """Strings as a decoder hands them over: any bytes, decoded with surrogateescape."""
    return st.binary(max_size=8).map(lambda b: b.decode("utf-8", "surrogateescape"))


def records() -> st.SearchStrategy[dict[str, Any]]:
    keys = wire_text().filter(lambda k: not k.startswith(("utf8_invalid", "_utf8_invalid")))
    leaves = st.one_of(wire_text(), st.integers(), st.none())
    values = st.recursive(leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=3)), max_leaves=12)
    return st.dictionaries(keys, values, max_size=5)


def _walk(value: Any, pointer: str) -> tuple[Any, str]:
    """The container holding `pointer` and the last part, unescaped (RFC 6901)."""
    *parts, last = [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]
    for part in parts:
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value, last


def restore(stored: dict[str, Any]) -> dict[str, Any]:
    """What an operator does to get the original record back from a stored line."""
    record = json.loads(json.dumps(stored))
    values, keys = record.pop(INVALID_FIELD, {}), record.pop(INVALID_KEYS_FIELD, {})
    for pointer, b64 in values.items():
        parent, last = _walk(record, pointer)
        index = int(last) if isinstance(parent, list) else last
        parent[index] = base64.b64decode(b64).decode("utf-8", "surrogateescape")
    for pointer in sorted(keys, key=lambda p: -p.count("/")):  # deepest first
        parent, last = _walk(record, pointer)
        original = base64.b64decode(keys[pointer]).decode("utf-8", "surrogateescape")
        parent[original] = parent.pop(last)
    return record


@given(records())
def test_original_bytes_come_back_from_the_stored_line(record: dict[str, Any]) -> None:
    fixed = repair(record)
    stored = record if fixed is None else fixed
    line = codec.dumps_line(stored)
    line.decode("utf-8")  # valid UTF-8, strictly
    if fixed is None:  # nothing to repair: stored as it came
        assert json.loads(line) == record
    assert restore(json.loads(line)) == record

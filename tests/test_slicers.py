"""The body slicers of streamed HTTP requests (proto/streamed.py), sans IO: whatever
the reads, the slices of a JSON array or a msgpack stream, each parsed by the body's
own parser, give the records of the whole body in order; a malformed body is refused
with an error that names what is wrong."""

from __future__ import annotations

import gzip
import json
import random
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mwdlogd.errors import IngestError
from mwdlogd.proto.bodies import parse_json, parse_msgpack
from mwdlogd.proto.streamed import JsonArraySlicer, MsgpackSlicer, Slicer, can_stream, slicer_for

# Text that trips a naive scanner: separators, brackets and quotes inside strings,
# escapes at every position, backslash runs, non-ASCII.
TRICKY = st.text(alphabet=st.sampled_from(list('ab,[]{}"\\/\n é€😀')), max_size=12)
VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | TRICKY,
                      lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(TRICKY, inner, max_size=3), max_leaves=8)
RECORDS = st.lists(st.dictionaries(TRICKY, VALUES, max_size=4), max_size=30)


def sliced(slicer: Slicer, body: bytes, reads: random.Random) -> list[bytes]:
    out, at = [], 0
    while at < len(body):
        size = reads.randint(1, 40)
        out += slicer.feed(body[at:at + size])
        at += size
    return out + list(slicer.end())


def json_records(slices: list[bytes]) -> list[Any]:
    return [record for piece in slices for record in parse_json(piece).records]


@settings(max_examples=150, deadline=None)
@given(records=RECORDS, indent=st.sampled_from([None, 0, 2]), zipped=st.booleans(),
       seed=st.integers(0, 2**16))
def test_json_array_slices_hold_the_records_in_order(
        records: list[dict[str, Any]], indent: int | None, zipped: bool, seed: int) -> None:
    body = json.dumps(records, indent=indent, ensure_ascii=False).encode()
    slicer = JsonArraySlicer(gzip=zipped, limit=10**9, line_limit=10**6, slice_bytes=64)
    slices = sliced(slicer, gzip.compress(body) if zipped else body, random.Random(seed))
    assert json_records(slices) == records
    assert all(piece.startswith(b"[") and piece.endswith(b"]") for piece in slices)
    if len(body) > 4 * 64 and len(records) > 4:
        assert len(slices) > 1  # really sliced, not held whole


@settings(max_examples=100, deadline=None)
@given(records=RECORDS, events=st.booleans(), zipped=st.booleans(),
       seed=st.integers(0, 2**16))
def test_msgpack_slices_hold_the_values_in_order(
        records: list[dict[str, Any]], events: bool, zipped: bool, seed: int) -> None:
    """A stream of maps (Fluentd's msgpack format) or of Fluent Bit events."""
    values = [[[1732500000 + n, {}], r] for n, r in enumerate(records)] if events else records
    body = b"".join(msgpack.packb(value) for value in values)
    slicer = MsgpackSlicer(gzip=zipped, limit=10**9, line_limit=10**6, slice_bytes=64)
    slices = sliced(slicer, gzip.compress(body) if zipped else body, random.Random(seed))
    assert b"".join(slices) == body
    assert [r for piece in slices for r in parse_msgpack(piece).records] == records


def test_one_json_object_is_passed_on_whole() -> None:
    slicer = JsonArraySlicer(gzip=False, limit=1000, line_limit=100, slice_bytes=8)
    assert sliced(slicer, b' {"a": [1, 2, 3], "b": "x,y"}\n', random.Random(1)) == [
        b'{"a": [1, 2, 3], "b": "x,y"}\n']


def test_an_empty_array_has_no_slices() -> None:
    for body in (b"[]", b" [ \n ] \n", b""):
        slicer = JsonArraySlicer(gzip=False, limit=1000, line_limit=100, slice_bytes=8)
        assert sliced(slicer, body, random.Random(1)) == []


@pytest.mark.parametrize(("kind", "body", "detail"), [
    (JsonArraySlicer, b'[{"a": 1}, {"a": 2}', "JSON body is truncated: the array is not closed"),
    (JsonArraySlicer, b'[{"a": "1}, {"a": 2}]', "JSON body is truncated"),  # string not closed
    (JsonArraySlicer, b'[{"a": 1},, {"a": 2}]', "empty element"),
    (JsonArraySlicer, b'[, {"a": 2}]', "empty element"),
    (JsonArraySlicer, b'[{"a": 1}, ]', "empty element"),
    (JsonArraySlicer, b'[{"a": 1}] {"b": 2}', "data after the end of the JSON array"),
    (MsgpackSlicer, msgpack.packb({"a": 1}) + msgpack.packb({"b": "xyz"})[:-2],
     "msgpack body is truncated after 4 of 9 bytes"),
    (MsgpackSlicer, msgpack.packb({"a": 1}) + b"\xc1",  # 0xc1: never used
     "body is not valid msgpack"),
])
def test_a_malformed_body_is_refused(kind: type[Slicer], body: bytes, detail: str) -> None:
    slicer = kind(gzip=False, limit=1000, line_limit=100, slice_bytes=4)
    with pytest.raises(IngestError) as raised:
        sliced(slicer, body, random.Random(1))
    assert (raised.value.status, raised.value.error) == (400, "malformed_body")
    assert detail in raised.value.detail


def test_an_element_or_value_over_the_record_limit_is_413() -> None:
    big = {"uri": "x" * 300}
    for slicer, body, what in (
            (JsonArraySlicer(gzip=False, limit=10**6, line_limit=200, slice_bytes=64),
             json.dumps([{"a": 1}, big]).encode(), "a JSON array element"),
            (JsonArraySlicer(gzip=False, limit=10**6, line_limit=200, slice_bytes=64),
             json.dumps(big).encode(), "a JSON body that is not an array"),
            (MsgpackSlicer(gzip=False, limit=10**6, line_limit=200, slice_bytes=64),
             msgpack.packb({"a": 1}) + msgpack.packb(big), "a msgpack value")):
        with pytest.raises(IngestError) as raised:
            sliced(slicer, body, random.Random(2))
        assert (raised.value.status, raised.value.error) == (413, "line_too_long")
        assert raised.value.detail.startswith(what)


def test_msgpack_nesting_past_the_stack_is_too_deep() -> None:
    slicer = MsgpackSlicer(gzip=False, limit=10**6, line_limit=10**5)
    with pytest.raises(IngestError) as raised:
        list(slicer.feed(b"\x91" * 5000 + b"\x80"))
    assert (raised.value.status, raised.value.error) == (400, "too_deep")


def test_the_stream_limit_counts_inflated_bytes_for_every_kind() -> None:
    body = gzip.compress(json.dumps([{"a": "x" * 100}] * 50).encode())
    with pytest.raises(IngestError) as raised:
        sliced(slicer_for("application/json", gzip=True, limit=1000, line_limit=500),
               body, random.Random(1))
    assert (raised.value.status, raised.value.error) == (413, "body_too_large")


def test_which_content_types_stream() -> None:
    assert [can_stream(kind) for kind in (
        "application/x-ndjson", "application/json; charset=utf-8", "application/msgpack",
        "application/x-msgpack", "application/x-www-form-urlencoded")] == [
        True, True, True, True, False]


@pytest.mark.parametrize("kind", ["application/x-ndjson", "application/json",
                                  "application/msgpack"])
def test_a_gzip_bomb_in_one_read_inflates_only_as_its_slices_are_taken(kind: str) -> None:
    """16 MiB of records in 24 KiB of gzip, given in one `feed`: each slice taken has
    inflated about one slice more, not the whole body (what the caller has not charged
    to the memory budget yet)."""
    record = {"a": 1}
    body = {"application/x-ndjson": b"".join([json.dumps(record).encode() + b"\n"] * 2**21),
            "application/json": json.dumps([record] * 2**21).encode(),
            "application/msgpack": msgpack.packb(record) * 2**21}[kind]
    slicer = slicer_for(kind, gzip=True, limit=2**30, line_limit=1024)
    slices = slicer.feed(gzip.compress(body))
    taken = 0
    for piece in slices:
        taken += len(piece)
        assert slicer.inflated <= taken + 2 * 1024 * 1024
    assert slicer.inflated == len(body) >= 8 * 1024 * 1024

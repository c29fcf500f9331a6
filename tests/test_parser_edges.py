"""Parser edge cases over real HTTPS and forward connections: deep nesting, huge
integers, NaN/Infinity and repeated keys, each either stored faithfully or refused with
a clear error, and routing never disagreeing with the stored text."""

from __future__ import annotations

import gzip
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from conftest import Running
from forward_client import RawForward
from helpers import all_records, client_context, engine_records, ndjson, post

MAX_DEPTH = 254  # codec.MAX_DEPTH
BASE = {"customer_name": "acme", "fqdn": "www.acme.test", "log_type": "nginx"}


def nested(depth: int) -> Any:
    """`depth` levels of arrays and objects in turn, around one number."""
    value: Any = 1
    for level in range(depth):
        value = [value] if level % 2 else {"n": value}
    return value


def record(n: int, **fields: Any) -> dict[str, Any]:
    return {**BASE, "id": f"e{n}", **fields}


def json_text(value: Any) -> bytes:
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)
    try:
        return json.dumps(value).encode()
    finally:
        sys.setrecursionlimit(limit)


BODIES = {  # depth of the record itself counts: the field adds one level
    "application/x-ndjson": lambda r: json_text(r) + b"\n",
    "application/json": json_text,
    "application/msgpack": lambda r: msgpack.packb(r),
}


MSGPACK_PACKS = 500  # msgpack.packb refuses to nest deeper


def deep_msgpack(fields: dict[str, Any], depth: int) -> bytes:
    """The map `fields` plus "deep": `depth` one-element arrays around 1, packed by hand."""
    head = bytes([0x80 | (len(fields) + 1)])
    return (head + b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in fields.items())
            + msgpack.packb("deep") + b"\x91" * depth + b"\x01")


# (content type, depth): stored as sent, or refused. A JSON line is stored as its own text,
# so it may nest to orjson's decoding limit; whatever is decoded or encoded whole stops
# at codec.MAX_DEPTH.
DEPTHS = [("application/x-ndjson", 400, 200), ("application/x-ndjson", 1100, 400),
          ("application/json", 400, 400), ("application/json", 1100, 400),
          ("application/msgpack", 400, 400), ("application/msgpack", 1100, 400)]


@pytest.mark.parametrize(("content_type", "depth", "status"), DEPTHS)
async def test_deep_records_are_stored_as_sent_or_refused_with_too_deep(
        server: Running, pki: Path, content_type: str, depth: int, status: int,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mwdlogd")
    if content_type == "application/msgpack" and depth > MSGPACK_PACKS:
        body = deep_msgpack(record(0), depth)
    else:
        body = BODIES[content_type](record(0, deep=nested(depth)))
    reply = await post(server.addresses.http, client_context(pki), "/nginx.access", body,
                       content_type=content_type)
    assert reply.status == status
    if status == 400:
        assert reply.json()["error"] == "too_deep"
    fine = BODIES[content_type](record(1, deep=nested(MAX_DEPTH - 1)))
    reply = await post(server.addresses.http, client_context(pki), "/nginx.access", fine,
                       content_type=content_type)
    assert reply.status == 200
    await server.app.flush("test")
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)  # to read the stored 400 levels back
    try:
        stored = {r["id"]: r["deep"] for r in all_records(server.root)}
    finally:
        sys.setrecursionlimit(limit)
    expected = {"e1": nested(MAX_DEPTH - 1)} | ({"e0": nested(depth)} if status == 200 else {})
    assert stored == expected
    assert not [r for r in caplog.records if r.exc_info]


async def test_deep_forward_entries_close_the_connection_with_a_reason(
        server: Running, pki: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mwdlogd")
    client = await RawForward.connect(server.addresses.forward, client_context(pki))
    entries = [[int(time.time()), record(0, deep=nested(1000))]]
    await client.send(msgpack.packb(["nginx.access", entries, {"chunk": "deep-1"}]))
    with pytest.raises(EOFError):
        await client.receive()
    await client.aclose()
    assert server.app.telemetry.rejected.labels("forward", "too_deep")._value.get() == 1
    assert not [r for r in caplog.records if r.exc_info]
    await server.app.flush("test")
    assert all_records(server.root) == []


HUGE = int("9" * 400)


@pytest.mark.parametrize("content_type", ["application/x-ndjson", "application/json"])
async def test_integers_of_any_size_are_kept_exact(
        server: Running, pki: Path, content_type: str) -> None:
    body = b'{"customer_name":"acme","fqdn":"www.acme.test","log_type":"nginx","id":"h",' \
           b'"big":' + str(HUGE).encode() + b',"neg":-' + str(HUGE).encode() + b'}'
    reply = await post(server.addresses.http, client_context(pki), "/nginx.access", body,
                       content_type=content_type)
    assert reply.status == 200
    await server.app.flush("test")
    (stored,) = all_records(server.root)
    assert stored["big"] == HUGE and stored["neg"] == -HUGE


async def test_nan_and_infinities_are_stored_as_their_names(server: Running, pki: Path) -> None:
    body = msgpack.packb([record(0, nan=float("nan"), inf=float("inf"),
                                 ninf=float("-inf"), null=None)])
    reply = await post(server.addresses.http, client_context(pki), "/nginx.access", body,
                       content_type="application/msgpack")
    assert reply.status == 200
    await server.app.flush("test")
    (stored,) = all_records(server.root)
    assert [stored[k] for k in ("nan", "inf", "ninf", "null")] == [
        "NaN", "Infinity", "-Infinity", None]


@pytest.mark.parametrize("key", [b'"customer_name"', b'"customer\\u005fname"'])
async def test_a_repeated_key_routes_and_stores_the_same_value(
        server: Running, pki: Path, key: bytes) -> None:
    """A token limited to acme cannot store a line whose first customer_name is another."""
    line = (b'{' + key + b':"other","fqdn":"www.acme.test","log_type":"nginx","id":"d",'
            b'"customer_name":"acme"}\n')
    reply = await post(server.addresses.http, client_context(pki), "/nginx.access",
                       line + ndjson(engine_records(1)), token="acme-token-0123456789")
    assert reply.status == 200
    await server.app.flush("test")
    texts = [gzip.decompress(p.read_bytes()) for p in server.root.rglob("*.log.gz")]
    assert [p.relative_to(server.root).parts[0] for p in server.root.rglob("*.log.gz")] == [
        "acme"]
    lines = b"".join(texts).splitlines()
    assert len(lines) == 2
    assert all(json.loads(text)["customer_name"] == "acme" for text in lines)
    assert not any(b"other" in text for text in lines)



# In a fresh interpreter: normalise records with 100 distinct 1 MB customer names, sites
# and tags, then report how many bytes of Python objects stay alive (tracemalloc).
LONG_NAMES = """
import gc, time, tracemalloc
from mwdlogd.pipeline.normalize import Context, normalize_batch
normalize_batch([({"customer_name": "warm", "fqdn": "a.test", "log_type": "nginx"},
                  None, None)], Context("warm", time.time(), time.time(), "h"))
tracemalloc.start()
for n in range(100):
    name = f"c{n}" + "x" * 1_000_000
    record = {"customer_name": name, "fqdn": name, "log_type": "nginx"}
    routed = normalize_batch([(record, None, None)], Context(name, time.time(), time.time(), "h"))
del name, record, routed
gc.collect()
print(tracemalloc.get_traced_memory()[0])
"""


def test_long_names_and_tags_are_not_kept_by_caches() -> None:
    """200 customer names of 1 MB once kept 464 MB: caches bounded by count held them."""
    done = subprocess.run([sys.executable, "-c", LONG_NAMES], capture_output=True, text=True,
                          timeout=120, check=True)
    assert int(done.stdout) < 1024 * 1024  # without the bound about 300 MB stay


async def test_forward_tags_of_any_length_are_refused(server: Running, pki: Path) -> None:
    """A tag is kept in every record, journal batch and metric label (memory and disk)."""
    client = await RawForward.connect(server.addresses.forward, client_context(pki))
    await client.send(msgpack.packb(["t" * 2000, [[int(time.time()), record(0)]],
                                     {"chunk": "c1"}]))
    with pytest.raises(EOFError):
        await client.receive()
    await client.aclose()
    assert server.app.telemetry.rejected.labels("forward", "too_long")._value.get() == 1
    ok = await RawForward.connect(server.addresses.forward, client_context(pki))
    await ok.send(msgpack.packb(["nginx.access", [[int(time.time()), record(1)]],
                                 {"chunk": "c2"}]))
    assert await ok.receive() == {"ack": "c2"}
    await ok.aclose()
    await server.app.flush("test")
    assert [r["id"] for r in all_records(server.root)] == ["e1"]

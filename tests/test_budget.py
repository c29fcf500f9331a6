"""The memory budget and the limits that feed it: the budget's counts and waiting, record
caps in every decoder, unfinished forward messages, name caches bounded in bytes,
compressors only while a member is open, the budget gauge."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from mwdlogd.errors import BudgetExceeded, ForwardProtocolError, IngestError
from mwdlogd.pipeline.paths import customer_destination
from mwdlogd.proto.bodies import SLICED_OBJECTS, parse_json, parse_msgpack, parse_ndjson
from mwdlogd.proto.forward import Entries, ForwardConnection
from mwdlogd.runtime.budget import Budget, MemoryBudget
from mwdlogd.storage.hourly import MemberBuilder

from conftest import Running
from helpers import client_context, http_get, ids_by_file, split_address


def test_memory_budget_counts() -> None:
    budget = MemoryBudget(100)
    assert budget.try_acquire(60) and not budget.try_acquire(41) and budget.try_acquire(40)
    budget.release(100)
    assert budget.used == 0


async def test_acquire_waits_for_a_release() -> None:
    budget = Budget(100)
    holder = budget.lease()
    await holder.grow(90, "first")
    got = trio.Event()

    async def second() -> None:
        with budget.lease() as lease:
            await lease.grow(20, "second")
            got.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(second)
        await trio.testing.wait_all_tasks_blocked()
        assert not got.is_set()
        holder.shrink_to(80)
        await got.wait()
    assert budget.used == 80


def test_a_charge_that_can_never_fit_is_refused_at_once() -> None:
    lease = Budget(100).lease()
    assert lease.try_grow(60, "a")
    with pytest.raises(BudgetExceeded, match=r"b needs 101 bytes of memory, over "
                                             r"server.memory_limit=100"):
        lease.try_grow(41, "b")


def test_a_share_caps_its_holders_and_counts_in_the_whole() -> None:
    budget = Budget(100)
    half = budget.share(0.5)
    assert half.try_acquire(50, "unread") and not half.try_acquire(1, "unread")
    assert budget.used == 50 and budget.try_acquire(50, "records")
    half.release(50)
    assert budget.used == 50 and half.used == 0


@pytest.mark.parametrize("parse, body", [
    (parse_ndjson, b"{}\n" * 11),
    (parse_json, b"[" + b",".join([b"{}"] * 11) + b"]"),
    (parse_msgpack, msgpack.packb([{}] * 11)),
    (parse_msgpack, msgpack.packb({}) * 11),
])
def test_every_decoder_caps_records(parse: Any, body: bytes) -> None:
    assert len(parse(body, 11).records) == 11
    with pytest.raises(IngestError) as caught:
        parse(body, 10)
    assert (caught.value.status, caught.value.error) == (413, "too_many_records")
    assert "http.max_records_per_request=10" in caught.value.detail


def test_msgpack_array_past_the_cap_is_refused_from_its_header() -> None:
    """10 M empty maps declared: refused without building one."""
    body = b"\xdd" + (10_000_000).to_bytes(4, "big") + b"\x80" * 1000
    with pytest.raises(IngestError, match=r"more than http\.max_records_per_request=100"):
        parse_msgpack(body, 100)


def test_large_json_array_is_read_element_by_element() -> None:
    """Past SLICED_OBJECTS the array is read a value at a time: same records, the cap
    checked as it goes, integers exact, errors still 400."""
    records = [{"n": n, "big": 2**70} for n in range(SLICED_OBJECTS + 1)]
    body = json.dumps(records).encode()
    assert parse_json(body).records == records
    with pytest.raises(IngestError, match="more than http"):
        parse_json(body, SLICED_OBJECTS)
    for bad in (body[:-1], body + b"x", body.replace(b"},", b"}", 1)):
        with pytest.raises(IngestError) as caught:
            parse_json(bad)
        assert (caught.value.status, caught.value.error) == (400, "malformed_body")


def _forward(max_records: int) -> ForwardConnection:
    return ForwardConnection(max_message_bytes=64 * 1024**2, max_records=max_records)


def test_forward_mode_past_the_cap_is_refused_from_its_header() -> None:
    conn = _forward(3)
    conn.receive_data(msgpack.packb(["t", [[0, {}]] * 3]))
    assert isinstance(event := conn.next_event(), Entries) and len(event.entries) == 3
    conn.receive_data(msgpack.packb(["t", [[0, {}]] * 4]))
    with pytest.raises(ForwardProtocolError, match=r"4 entries, over "
                                                   r"forward\.max_records_per_message=3"):
        conn.next_event()


@pytest.mark.parametrize("compressed", ["text", "gzip"])
def test_packed_entries_past_the_cap_are_refused(compressed: str) -> None:
    blob = b"\x92\x00\x80" * 4
    if compressed == "gzip":
        blob = gzip.compress(blob)
    conn = _forward(3)
    conn.receive_data(msgpack.packb(["t", blob, {"compressed": compressed}], use_bin_type=True))
    with pytest.raises(ForwardProtocolError) as caught:
        conn.next_event()
    assert caught.value.reason == "too_many_records"


def test_unfinished_forward_message_builds_nothing() -> None:
    """8 MB of an endless array of empty maps: what is held is its bytes (twice), not
    ~67x in maps (was +535 MB)."""
    conn = _forward(10)
    head = b"\x92\xa1t\xdd" + (2**32 - 1).to_bytes(4, "big")
    tracemalloc.start()
    try:
        conn.receive_data(head)
        for _ in range(128):
            conn.receive_data(b"\x80" * 65536)
            conn.next_event()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert conn.buffered == len(head) + 8 * 1024**2
    assert peak < 3 * 8 * 1024**2, peak


def test_name_caches_keep_no_long_names() -> None:
    """200 customer names of 1 MB: each path is made, none is kept (were +464 MB)."""
    tracemalloc.start()
    try:
        for n in range(200):
            name = f"{n}-" + "c" * 1024**2
            assert customer_destination(name, "nginx", "www.acme.test", 0).path.startswith(
                f"{n}-ccc")
            del name
        current = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert current < 4 * 1024**2, current


def test_short_names_are_still_cached() -> None:
    customer_destination("acme", "nginx", "www.acme.test", 0)
    assert customer_destination("acme", "nginx", "www.acme.test", 0) is \
        customer_destination("acme", "nginx", "www.acme.test", 0)


def test_a_builder_holds_a_compressor_only_while_a_member_is_open() -> None:
    builder = MemberBuilder()
    assert builder._compressor is None
    builder.add(b'{"a":1}\n')
    assert builder._compressor is not None
    member = builder.finish()
    assert builder._compressor is None
    assert gzip.decompress(member) == b'{"a":1}\n'


async def _budget_gauge(running: Running) -> float:
    _, body = await http_get(running.addresses.metrics, "/metrics")
    line = next(ln for ln in body.decode().splitlines()
                if ln.startswith("mwdlogd_memory_budget_used_bytes"))
    return float(line.split()[-1])


async def test_unfinished_message_is_charged_until_the_connection_ends(
        server: Running, pki: Path) -> None:
    """The gauge shows what an unfinished forward message holds (twice its bytes), and
    nothing once its connection is gone."""
    host, port = split_address(server.addresses.forward)
    stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=client_context(pki))
    await stream.send_all(b"\x92\xa1t\xdd" + (2**32 - 1).to_bytes(4, "big") + b"\x80" * 2**20)
    # Polled with a deadline: the server reads and frames in a worker thread, no event
    # tells this task when it is done.
    with trio.fail_after(10):
        while await _budget_gauge(server) < 2 * 2**20:  # noqa: ASYNC110
            await trio.sleep(0.01)
        await stream.aclose()
        while await _budget_gauge(server) != 0:  # noqa: ASYNC110
            await trio.sleep(0.01)
    assert ids_by_file(server.root) == {}

"""out_http chunks larger than http.body_size_limit (Fluentd's file buffer makes 256m ones):
ndjson bodies are streamed through decode, normalise and a spool file, answered 200 only
once all of it is committed, stored exactly once, and nothing of a refused, abandoned or
crashed request is stored. Real TLS sockets, real journal and files; the crash and the
memory bound are measured on a server subprocess."""

from __future__ import annotations

import gzip
import json
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from mwdlogd.errors import IngestError, StorageError
from mwdlogd.proto.streamed import NdjsonSlicer
from mwdlogd.storage.journal import Journal

from conftest import Running, config_raw, make_config, start_app
from helpers import (
    Connection,
    JournalHold,
    Reply,
    client_context,
    ids_by_file,
    post,
    request_bytes,
)
from server_process import ServerProcess, write_config

HOUR_2024 = 1732500000.5
MIB = 1024 * 1024


def big_body(mib: int, *, random_pad: bool = False, start: int = 0) -> tuple[bytes, set[str]]:
    """ndjson of about `mib` MiB over two hourly files of two sites; random padding makes
    it compress poorly (so gzip of it is still over the limit on the wire)."""
    lines, ids, size, n = [], set(), 0, start
    while size < mib * MIB:
        pad = secrets.token_urlsafe(120) if random_pad else "x" * 80
        site = "www.acme.test" if n % 3 else "shop.acme.test"
        line = (f'{{"id": "r{n}", "customer_name": "acme", "fqdn": "{site}", '
                f'"log_type": "nginx", "time": {HOUR_2024 + (n % 2) * 3600}, '
                f'"pad": "{pad}"}}\n').encode()
        lines.append(line)
        ids.add(f"r{n}")
        size += len(line)
        n += 1
    return b"".join(lines), ids


def stored_ids(root: Path) -> list[str]:
    return sorted(i for ids in ids_by_file(root).values() for i in ids)


def spool_files(buffer: Path) -> list[Path]:
    return sorted((buffer / "spool").glob("*.spool"))


async def flushed(running: Running) -> list[str]:
    await running.app.flush("test")
    return stored_ids(running.root)


@pytest.mark.parametrize("use_gzip", [False, True])
def test_slices_are_whole_lines_whatever_the_reads(use_gzip: bool) -> None:
    body, _ = big_body(2, random_pad=True)
    half = len(body) // 2
    wire = gzip.compress(body[:half]) + gzip.compress(body[half:]) if use_gzip else body
    slicer = NdjsonSlicer(gzip=use_gzip, limit=len(body), line_limit=4096,
                          slice_bytes=64 * 1024)
    slices, offset, step = [], 0, 1
    while offset < len(wire):  # reads of every size from 1 byte up
        slices += slicer.feed(wire[offset:offset + step])
        offset, step = offset + step, step * 3 % 100_003 + 1
    slices += slicer.end()
    assert b"".join(slices) == body
    assert all(piece.endswith(b"\n") and len(piece) < 64 * 1024 + 100_003 + 4096
               for piece in slices)


def test_a_cut_gzip_body_and_one_inflating_too_far_are_refused() -> None:
    body, _ = big_body(1)
    cut = NdjsonSlicer(gzip=True, limit=len(body), line_limit=4096)
    list(cut.feed(gzip.compress(body)[:-20]))
    with pytest.raises(IngestError, match="truncated"):
        list(cut.end())
    bomb = NdjsonSlicer(gzip=True, limit=len(body) - 1, line_limit=4096)
    with pytest.raises(IngestError, match="stream_body_limit"):
        list(bomb.feed(gzip.compress(body)))


def test_a_spooled_batch_takes_one_journal_id_per_piece(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal", fsync=False)
    journal.open()
    assert journal.append([b"a", b"spool of 5 pieces", b"b"], [1, 5, 1]) == [0, 5, 6]
    journal.close()
    again = Journal(tmp_path / "journal", fsync=False)
    assert [i for i, _ in again.open()] == [0, 5, 6]
    assert (again.next_id, again.oldest_id) == (7, 0)


@pytest.mark.parametrize("kind", ["plain", "gzip", "gzip_inflating_past_the_limit"])
async def test_a_body_over_the_limit_is_stored_exactly_once(
        nursery: trio.Nursery, tmp_path: Path, pki: Path, kind: str) -> None:
    running = await start_app(nursery, make_config(tmp_path, pki))
    body, ids = big_body(24 if kind == "gzip" else 12, random_pad=kind == "gzip")
    headers = {}
    if kind != "plain":
        body = gzip.compress(body, 1)
        headers = {"Content-Encoding": "gzip"}
    assert (len(body) > 10 * MIB) == (kind != "gzip_inflating_past_the_limit")
    reply = await post(running.addresses.http, client_context(pki), "/nginx.access", body,
                       headers=headers)
    assert (reply.status, reply.json()) == (200, {"records": len(ids)})
    again = await post(running.addresses.http, client_context(pki), "/nginx.access", body,
                       headers=headers)  # the forwarder's resend: the same bytes
    assert (again.status, again.json()) == (200, {"records": len(ids), "duplicate": True})
    assert await flushed(running) == sorted(ids)
    assert set(ids_by_file(running.root)) == {
        f"acme/nginx/{site}/2024/11/25/{hour}.log.gz"
        for site in ("www.acme.test", "shop.acme.test") for hour in ("02", "03")}


def as_kind(body: bytes, kind: str) -> tuple[bytes, str]:
    """The ndjson `body` as a JSON array (pretty-printed, as some clients send it) or a
    msgpack stream (of maps, or of Fluent Bit events); its Content-Type."""
    records = [json.loads(line) for line in body.splitlines()]
    if kind == "json_array":
        return json.dumps(records, indent=1).encode(), "application/json"
    if kind == "msgpack-events":
        records = [[[int(r["time"]), {}], r] for r in records]
    return b"".join(msgpack.packb(r) for r in records), "application/msgpack"


@pytest.mark.parametrize("kind", ["json_array", "msgpack", "msgpack-events"])
@pytest.mark.parametrize("zipped", [False, True])
async def test_a_json_array_or_msgpack_body_over_the_limit_is_streamed(
        nursery: trio.Nursery, tmp_path: Path, pki: Path, kind: str, zipped: bool) -> None:
    """Fluentd's `json_array true` and msgpack bodies (and Fluent Bit's `Format msgpack`
    events) over http.body_size_limit are sliced as they arrive, like ndjson: stored
    once, in their hourly files, and a resend is recognised."""
    running = await start_app(nursery, make_config(tmp_path, pki))
    ndjson_body, ids = big_body(14 if kind.startswith("msgpack") else 12, random_pad=zipped)
    body, content_type = as_kind(ndjson_body, kind)
    headers = {}
    if zipped:
        body = gzip.compress(body, 1)
        headers["Content-Encoding"] = "gzip"
    assert len(body) > (10 * MIB) // 8 if zipped else len(body) > 10 * MIB
    for duplicate in (False, True):  # the forwarder's resend: the same bytes
        reply = await post(running.addresses.http, client_context(pki), "/nginx.access", body,
                           content_type=content_type, headers=headers)
        assert (reply.status, reply.json()) == (
            200, {"records": len(ids), **({"duplicate": True} if duplicate else {})})
    assert await flushed(running) == sorted(ids)
    assert set(ids_by_file(running.root)) == {
        f"acme/nginx/{site}/2024/11/25/{hour}.log.gz"
        for site in ("www.acme.test", "shop.acme.test") for hour in ("02", "03")}


async def test_a_malformed_streamed_json_array_stores_nothing(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    running = await start_app(nursery, make_config(tmp_path, pki))
    body, _ = as_kind(big_body(12)[0], "json_array")
    reply = await post(running.addresses.http, client_context(pki), "/nginx.access",
                       body.rstrip()[:-1] + b",]", content_type="application/json")
    assert (reply.status, reply.json()["error"]) == (400, "malformed_body")
    assert "empty element" in reply.json()["detail"]
    assert spool_files(tmp_path / "buffer") == []
    assert await flushed(running) == []


async def test_a_client_gone_mid_body_stores_nothing(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    running = await start_app(nursery, make_config(tmp_path, pki))
    body, ids = big_body(12)
    connection = await Connection.open(running.addresses.http, client_context(pki))
    await connection.send_raw(request_bytes("/nginx.access", body)[:9 * MIB])
    buffer = tmp_path / "buffer"
    with trio.fail_after(60):  # polls the server's progress (its files): no hook for it
        while not spool_files(buffer) or \
                spool_files(buffer)[0].stat().st_size < 4 * MIB:  # noqa: ASYNC110
            await trio.sleep(0.01)
        await connection.aclose()
        while spool_files(buffer):  # noqa: ASYNC110
            await trio.sleep(0.01)
    assert await flushed(running) == []
    reply = await post(running.addresses.http, client_context(pki), "/nginx.access", body)
    assert (reply.status, reply.json()) == (200, {"records": len(ids)})
    assert await flushed(running) == sorted(ids)


async def test_a_journal_failure_stores_nothing_and_the_resend_once(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    running = await start_app(nursery, make_config(tmp_path, pki))
    journal = running.app.journal
    real_append = journal.append
    failures = []

    def failing_append(payloads: list[bytes], spans: list[int] | None = None) -> list[int]:
        if spans and max(spans) > 1 and not failures:
            failures.append(spans)
            raise StorageError(str(journal.directory), "append journal", "Input/output error")
        return list(real_append(payloads, spans))

    journal.append = failing_append  # type: ignore[method-assign]
    body, ids = big_body(12)
    reply = await post(running.addresses.http, client_context(pki), "/nginx.access", body)
    assert (reply.status, reply.json()["error"]) == (503, "journal_failed")
    assert failures and spool_files(tmp_path / "buffer") == []
    assert await flushed(running) == []
    again = await post(running.addresses.http, client_context(pki), "/nginx.access", body)
    assert (again.status, again.json()) == (200, {"records": len(ids)})
    assert await flushed(running) == sorted(ids)


async def test_a_spool_file_deleted_under_the_server_is_reported_and_released(
        nursery: trio.Nursery, tmp_path: Path, pki: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    running = await start_app(nursery, make_config(tmp_path, pki))
    hold = JournalHold(running.app.journal)
    body, ids = big_body(12)
    replies: list[Reply] = []

    async def send() -> None:
        replies.append(await post(running.addresses.http, client_context(pki),
                                  "/nginx.access", body))

    async with trio.open_nursery() as clients:
        clients.start_soon(send)
        await hold.wait_entered()  # sealed, its commit record being appended
        (spool,) = spool_files(tmp_path / "buffer")
        spool.unlink()  # an operator deleting the buffer directory's files
        hold.release.set()
    assert [(r.status, r.json()) for r in replies] == [(200, {"records": len(ids)})]
    assert await flushed(running) == []
    assert "spool_lost" in caplog.text and f"records={len(ids)}" in caplog.text
    assert running.app.tracker.buffered_bytes == 0  # its ids were released
    after = await post(running.addresses.http, client_context(pki), "/nginx.access",
                       b'{"id": "after", "customer_name": "acme", "fqdn": "www.acme.test"}')
    assert after.status == 200
    assert await flushed(running) == ["after"]


async def test_a_body_inflating_past_the_stream_limit_is_refused(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    running = await start_app(nursery, make_config(tmp_path, pki,
                                                   http={"stream_body_limit": "16MiB"}))
    body, _ = big_body(20)
    reply = await post(running.addresses.http, client_context(pki), "/nginx.access",
                       gzip.compress(body, 1), headers={"Content-Encoding": "gzip"})
    assert (reply.status, reply.json()["error"]) == (413, "body_too_large")
    assert spool_files(tmp_path / "buffer") == []
    assert await flushed(running) == []


# --- a server subprocess: kill -9 and the memory bound ---------------------------------

def start_server(tmp_path: Path, pki: Path, **http: Any) -> ServerProcess:
    raw = config_raw(tmp_path, pki, http=http, buffer={"flush_interval": "1h"})
    return ServerProcess(write_config(tmp_path / "config.toml", raw))


def port_of(server: ServerProcess) -> int:
    return int(server.addresses["http"].rpartition(":")[2])


def wait_until(condition: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)  # polls another process's progress


def stop(server: ServerProcess) -> None:
    server.signal(signal.SIGTERM)  # drains: every file flushed
    assert server.wait() == 0


def hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


async def test_kill_9_before_the_commit_keeps_nothing_and_the_resend_is_stored_once(
        tmp_path: Path, pki: Path) -> None:
    body, ids = big_body(12)
    buffer = tmp_path / "buffer"
    server = await trio.to_thread.run_sync(start_server, tmp_path, pki)
    try:
        connection = await Connection.open(server.addresses["http"], client_context(pki))
        await connection.send_raw(request_bytes("/nginx.access", body)[:10 * MIB])
        await trio.to_thread.run_sync(wait_until, lambda: spool_files(buffer) and spool_files(
            buffer)[0].stat().st_size > 4 * MIB, "a part of the body spooled")
        server.process.kill()
        assert await trio.to_thread.run_sync(server.wait) == -signal.SIGKILL
        await connection.aclose()
    finally:
        server.stop()
    server = await trio.to_thread.run_sync(start_server, tmp_path, pki)
    try:
        assert "uncommitted_spool_files_removed=1" in server.wait_for("recovered")
        assert spool_files(buffer) == []
        reply = await post(server.addresses["http"], client_context(pki), "/nginx.access",
                           body)
        assert (reply.status, reply.json()) == (200, {"records": len(ids)})
        await trio.to_thread.run_sync(stop, server)
    finally:
        server.stop()
    assert stored_ids(tmp_path / "logs") == sorted(ids)
    assert spool_files(buffer) == []


async def test_kill_9_after_the_answer_replays_the_spool_once(
        tmp_path: Path, pki: Path) -> None:
    body, ids = big_body(12)
    server = await trio.to_thread.run_sync(start_server, tmp_path, pki)
    try:
        reply = await post(server.addresses["http"], client_context(pki), "/nginx.access",
                           body)
        assert (reply.status, reply.json()) == (200, {"records": len(ids)})
        server.process.kill()  # flush_interval 1h: nothing was written to the files yet
        assert await trio.to_thread.run_sync(server.wait) == -signal.SIGKILL
    finally:
        server.stop()
    assert stored_ids(tmp_path / "logs") == []
    server = await trio.to_thread.run_sync(start_server, tmp_path, pki)
    try:
        assert f"records_replayed={len(ids)}" in server.wait_for("recovered")
        again = await post(server.addresses["http"], client_context(pki), "/nginx.access",
                           body)  # the forwarder never saw the 200: it resends
        assert (again.status, again.json()) == (200, {"records": len(ids), "duplicate": True})
        await trio.to_thread.run_sync(stop, server)
    finally:
        server.stop()
    assert stored_ids(tmp_path / "logs") == sorted(ids)
    assert spool_files(tmp_path / "buffer") == []


RSS_GROWTH_BOUND_KIB = 64 * 1024


async def test_memory_stays_bounded_while_a_large_body_is_ingested(
        tmp_path: Path, pki: Path) -> None:
    body, ids = big_body(48)
    server = await trio.to_thread.run_sync(start_server, tmp_path, pki)
    try:
        idle = hwm_kib(server.process.pid)
        reply = await post(server.addresses["http"], client_context(pki), "/nginx.access",
                           body)
        assert (reply.status, reply.json()) == (200, {"records": len(ids)})
        growth = hwm_kib(server.process.pid) - idle
        print(f"VmHWM growth while a {len(body) / MIB:.0f} MiB body was ingested: "
              f"{growth / 1024:.1f} MiB")
        assert growth < RSS_GROWTH_BOUND_KIB, growth
        await trio.to_thread.run_sync(stop, server)
    finally:
        server.stop()
    assert len(stored_ids(tmp_path / "logs")) == len(ids)
    assert os.listdir(tmp_path / "buffer" / "spool") == []

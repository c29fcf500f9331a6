"""Acknowledgement, recovery and backpressure in-process: real TLS, real journal, real files."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from mwdlogd.storage.ledger import Ledger

from conftest import make_config, start_app
from helpers import JournalHold, client_context, engine_records, ids_by_file, ndjson, post

HOUR_2024 = 1732500000.5
NGINX_FILE = "acme/nginx/www.acme.test/2024/11/25/02.log.gz"


async def test_no_ack_before_the_journal_fsync(nursery: trio.Nursery, tmp_path: Path,
                                               pki: Path) -> None:
    running = await start_app(nursery, make_config(tmp_path, pki))
    hold = JournalHold(running.app.journal)
    replies = []

    async def send() -> None:
        replies.append(await post(running.addresses.http, client_context(pki), "/nginx.access",
                                  ndjson(engine_records(3, time=HOUR_2024))))

    async with trio.open_nursery() as clients:
        clients.start_soon(send)
        await hold.wait_entered()
        await trio.testing.wait_all_tasks_blocked()
        assert replies == []  # the request is complete, the fsync is held: no answer yet
        hold.release.set()
    assert replies[0].status == 200


async def crash(app_scope: trio.CancelScope) -> None:
    """Stop an app the hard way: no drain, no flush (what kill -9 leaves, bar the OS)."""
    app_scope.cancel()
    await trio.lowlevel.checkpoint()


async def test_acked_records_survive_a_crash_exactly_once(tmp_path: Path, pki: Path) -> None:
    config = make_config(tmp_path, pki, buffer={"flush_interval": "1h"})
    async with trio.open_nursery() as nursery:
        first = await start_app(nursery, config)
        for batch in range(3):
            reply = await post(first.addresses.http, client_context(pki), "/nginx.access",
                               ndjson(engine_records(5, start=batch * 5, time=HOUR_2024)))
            assert reply.status == 200
        await first.app.flush("test")  # r0..r14 written; the next batch only journaled
        reply = await post(first.addresses.http, client_context(pki), "/nginx.access",
                           ndjson(engine_records(5, start=15, time=HOUR_2024)))
        assert reply.status == 200
        nursery.cancel_scope.cancel()
    assert ids_by_file(first.root) == {NGINX_FILE: [f"r{n}" for n in range(15)]}
    async with trio.open_nursery() as nursery:
        second = await start_app(nursery, config)
        await second.app.flush("test")
        nursery.cancel_scope.cancel()
    assert ids_by_file(second.root) == {NGINX_FILE: [f"r{n}" for n in range(20)]}


async def test_an_append_cut_short_is_repaired_and_written_once(tmp_path: Path,
                                                                pki: Path) -> None:
    config = make_config(tmp_path, pki, buffer={"flush_interval": "1h"})
    async with trio.open_nursery() as nursery:
        first = await start_app(nursery, config)
        reply = await post(first.addresses.http, client_context(pki), "/nginx.access",
                           ndjson(engine_records(4, time=HOUR_2024)))
        assert reply.status == 200
        nursery.cancel_scope.cancel()
    # As if the crash came mid-append: the ledger says pending, half a member is in the file.
    target = first.root / NGINX_FILE
    target.parent.mkdir(parents=True)
    with Ledger(Path(config.buffer.path) / "ledger").hold(str(first.root), NGINX_FILE) as held:
        assert held is not None
        held.begin(0)
        target.write_bytes(b"\x1f\x8b\x08\x00torn member")
    async with trio.open_nursery() as nursery:
        second = await start_app(nursery, config)
        await second.app.flush("test")
        nursery.cancel_scope.cancel()
    assert ids_by_file(second.root) == {NGINX_FILE: ["r0", "r1", "r2", "r3"]}


async def test_full_buffer_answers_503_then_recovers(nursery: trio.Nursery, tmp_path: Path,
                                                     pki: Path) -> None:
    running = await start_app(nursery, make_config(
        tmp_path, pki, buffer={"flush_interval": "1h", "total_limit": "8KiB"},
        http={"full_wait": "0s"}))  # refuse at once instead of holding the request
    context = client_context(pki)
    accepted, statuses = [], []
    for batch in range(10):
        reply = await post(running.addresses.http, context, "/nginx.access",
                           ndjson(engine_records(10, start=batch * 10, time=HOUR_2024)))
        statuses.append(reply.status)
        if reply.status == 200:
            accepted.extend(f"r{n}" for n in range(batch * 10, batch * 10 + 10))
        else:
            assert reply.headers["retry-after"] == "5"
            assert reply.json()["error"] == "buffer_full"
    assert 200 in statuses and 503 in statuses
    await running.app.flush("test")
    assert running.app.tracker.buffered_bytes == 0
    reply = await post(running.addresses.http, context, "/nginx.access",
                       ndjson(engine_records(10, start=100, time=HOUR_2024)))
    assert reply.status == 200
    await running.app.flush("test")
    assert ids_by_file(running.root) == {NGINX_FILE: accepted + [f"r{n}" for n in range(100, 110)]}


@pytest.mark.parametrize("fsync", [True, False])
async def test_journal_is_emptied_once_everything_is_written(
        nursery: trio.Nursery, tmp_path: Path, pki: Path, fsync: bool) -> None:
    running = await start_app(nursery, make_config(tmp_path, pki, buffer={"fsync": fsync}))
    reply = await post(running.addresses.http, client_context(pki), "/nginx.access",
                       ndjson(engine_records(5, time=HOUR_2024)))
    assert reply.status == 200
    metrics = running.app.telemetry.exposition().decode()
    gauge = 'fluentd_output_status_buffer_total_bytes{plugin_id="hourly_files",type="file"} '
    (line,) = (x for x in metrics.splitlines() if x.startswith(gauge))
    assert float(line.removeprefix(gauge)) == running.app.tracker.buffered_bytes > 0
    running.app.request_stop()
    await running.app.stopped.wait()
    assert [p.stat().st_size for p in (tmp_path / "buffer" / "journal").glob("*.wal")] == [0]
    assert ids_by_file(running.root) == {NGINX_FILE: [f"r{n}" for n in range(5)]}

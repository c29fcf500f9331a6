"""HTTP delivery as forwarders need it, in-process with real TLS, journal and files:
resends of a body already stored are answered 200 and stored once (also after a crash
between the fsync and the answer), a request that has arrived is never timed out while
its commit is under way, and a full buffer holds requests for `http.full_wait`."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import trio.testing

from conftest import Running, make_config, start_app
from helpers import (
    TOKEN,
    Connection,
    JournalHold,
    Reply,
    client_context,
    engine_records,
    ids_by_file,
    ndjson,
    post,
    request_bytes,
)

HOUR_2024 = 1732500000.5
NGINX_FILE = "acme/nginx/www.acme.test/2024/11/25/02.log.gz"
BODY = ndjson(engine_records(4, time=HOUR_2024))
FOUR = ["r0", "r1", "r2", "r3"]


async def stored(running: Running) -> dict[str, list[str]]:
    await running.app.flush("test")
    return ids_by_file(running.root)


def metric(running: Running, name: str) -> str:
    return next(line for line in running.app.telemetry.exposition().decode().splitlines()
                if line.startswith(name + " "))


async def test_a_resent_body_is_answered_200_and_stored_once(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    running = await start_app(nursery, make_config(tmp_path, pki))
    first = await post(running.addresses.http, client_context(pki), "/nginx.access", BODY)
    again = await post(running.addresses.http, client_context(pki), "/nginx.access", BODY)
    assert (first.status, first.json()) == (200, {"records": 4})
    assert (again.status, again.json()) == (200, {"records": 4, "duplicate": True})
    assert metric(running, "mwdlogd_http_duplicate_requests_total") == \
        "mwdlogd_http_duplicate_requests_total 1.0"
    # Not resends: another client certificate, another token, another tag, another body.
    others = [
        await post(running.addresses.http, client_context(pki, "engine-02"), "/nginx.access",
                   BODY),
        await post(running.addresses.http, client_context(pki), "/nginx.access", BODY,
                   token="acme-token-0123456789"),
        await post(running.addresses.http, client_context(pki), "/nginx.other", BODY),
        await post(running.addresses.http, client_context(pki), "/nginx.access",
                   ndjson(engine_records(4, start=4, time=HOUR_2024))),
    ]
    assert [(r.status, r.json()) for r in others] == [(200, {"records": 4})] * 4
    assert await stored(running) == {NGINX_FILE: FOUR * 4 + ["r4", "r5", "r6", "r7"]}


async def test_with_window_zero_every_copy_is_stored(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    running = await start_app(nursery, make_config(tmp_path, pki,
                                                   http={"dedupe_window": "0s"}))
    for _ in range(2):
        reply = await post(running.addresses.http, client_context(pki), "/nginx.access", BODY)
        assert (reply.status, reply.json()) == (200, {"records": 4})
    assert await stored(running) == {NGINX_FILE: FOUR * 2}


async def test_a_resend_while_the_first_copy_commits_waits_for_it(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    running = await start_app(nursery, make_config(tmp_path, pki))
    hold = JournalHold(running.app.journal)
    replies: list[Reply] = []

    async def send() -> None:
        replies.append(await post(running.addresses.http, client_context(pki),
                                  "/nginx.access", BODY))

    async with trio.open_nursery() as clients:
        clients.start_soon(send)
        await hold.wait_entered()
        clients.start_soon(send)  # the forwarder's read timeout fired: it sends again
        await trio.testing.wait_all_tasks_blocked()
        assert replies == []
        hold.release.set()
    assert sorted(str(r.json()) for r in replies) == [
        "{'records': 4, 'duplicate': True}", "{'records': 4}"]
    assert await stored(running) == {NGINX_FILE: FOUR}


class DieAfterFsync:
    """The journal append completes (fsync included), then the process 'dies' before the
    answer: the append does not return until the app has been cancelled."""

    def __init__(self, journal: Any) -> None:
        self.appended, self.release = threading.Event(), threading.Event()
        real_append = journal.append

        def append(payloads: list[bytes], spans: list[int] | None = None) -> list[int]:
            ids = list(real_append(payloads, spans))
            self.appended.set()
            self.release.wait(30)
            return ids

        journal.append = append


async def test_a_resend_after_a_crash_between_fsync_and_answer_is_stored_once(
        tmp_path: Path, pki: Path) -> None:
    config = make_config(tmp_path, pki, buffer={"flush_interval": "1h"})
    outcome: list[Reply | str] = []

    async def send(address: str) -> None:
        try:
            outcome.append(await post(address, client_context(pki), "/nginx.access", BODY))
        except (EOFError, trio.BrokenResourceError):
            outcome.append("no answer")

    async with trio.open_nursery() as clients, trio.open_nursery() as server:
        first = await start_app(server, config)
        death = DieAfterFsync(first.app.journal)
        clients.start_soon(send, first.addresses.http)
        await trio.to_thread.run_sync(death.appended.wait, 30)
        server.cancel_scope.cancel()  # kill -9: no answer, no flush
        death.release.set()
    assert outcome == ["no answer"]
    # What kill -9 can lose: the resend key's log entry, appended after the fsync.
    shutil.rmtree(tmp_path / "buffer" / "chunk-ids")
    async with trio.open_nursery() as server:
        second = await start_app(server, config)
        reply = await post(second.addresses.http, client_context(pki), "/nginx.access", BODY)
        assert (reply.status, reply.json()) == (200, {"records": 4, "duplicate": True})
        second.app.request_stop()  # drains: every journal segment is written out and deleted
        await second.app.stopped.wait()
    assert ids_by_file(second.root) == {NGINX_FILE: FOUR}
    async with trio.open_nursery() as server:  # the key outlived the journal segment
        third = await start_app(server, config)
        reply = await post(third.addresses.http, client_context(pki), "/nginx.access", BODY)
        assert (reply.status, reply.json()) == (200, {"records": 4, "duplicate": True})
        assert await stored(third) == {NGINX_FILE: FOUR}
        server.cancel_scope.cancel()


async def test_no_408_while_the_commit_is_under_way(
        mock_clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path,
        pki: Path) -> None:
    running = await start_app(nursery, make_config(tmp_path, pki,
                                                   http={"request_timeout": "100ms"}))
    hold = JournalHold(running.app.journal)
    replies: list[Reply] = []

    async def send() -> None:
        replies.append(await post(running.addresses.http, client_context(pki),
                                  "/nginx.access", BODY))

    async with trio.open_nursery() as clients:
        clients.start_soon(send)
        await hold.wait_entered()
        mock_clock.jump(10)  # a slow disk: the fsync takes 100 times request_timeout
        await trio.testing.wait_all_tasks_blocked()
        assert replies == []
        hold.release.set()
    assert (replies[0].status, replies[0].json()) == (200, {"records": 4})
    assert await stored(running) == {NGINX_FILE: FOUR}


async def held(running: Running) -> None:
    """Returns once a request waits for buffer room (fails after 10 s of real time: the
    test clock stands still)."""
    give_up = time.monotonic() + 10
    while running.app.admission.waiting_for_room == 0:
        assert time.monotonic() < give_up, "no request is waiting for room"
        await trio.testing.wait_all_tasks_blocked()


async def full_app(nursery: trio.Nursery, tmp_path: Path, pki: Path) -> tuple[Running, str]:
    """A server whose buffer holds one 50-record batch but not two; the first is in."""
    running = await start_app(nursery, make_config(
        tmp_path, pki, buffer={"flush_interval": "1h", "total_limit": "20KiB"},
        http={"full_wait": "10s"}))
    reply = await post(running.addresses.http, client_context(pki), "/nginx.access",
                       ndjson(engine_records(50, time=HOUR_2024)))
    assert reply.status == 200
    return running, running.addresses.http


async def send_held(address: str, pki: Path, replies: list[Reply]) -> None:
    replies.append(await post(address, client_context(pki), "/nginx.access",
                              ndjson(engine_records(50, start=50, time=HOUR_2024)),
                              token=TOKEN))


@asynccontextmanager
async def one_request_held(nursery: trio.Nursery, tmp_path: Path, pki: Path
                           ) -> AsyncIterator[tuple[Running, list[Reply]]]:
    """A full_app with a second request waiting for room; its reply is in the list once
    the block has ended (the client is awaited there)."""
    running, address = await full_app(nursery, tmp_path, pki)
    replies: list[Reply] = []
    async with trio.open_nursery() as clients:
        clients.start_soon(send_held, address, pki, replies)
        await held(running)
        yield running, replies


async def test_a_full_buffer_holds_the_request_until_there_is_room(
        mock_clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path,
        pki: Path) -> None:
    async with one_request_held(nursery, tmp_path, pki) as (running, replies):
        mock_clock.jump(9)  # within http.full_wait
        await trio.testing.wait_all_tasks_blocked()
        assert replies == []  # neither refused nor acked: held
        await running.app.flush("test")  # the first batch is written: room
    assert (replies[0].status, replies[0].json()) == (200, {"records": 50})
    assert await stored(running) == {NGINX_FILE: [f"r{n}" for n in range(100)]}


async def test_a_held_request_is_not_read_until_there_is_room(
        mock_clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path,
        pki: Path) -> None:
    running, address = await full_app(nursery, tmp_path, pki)
    body = ndjson(engine_records(50, start=50, time=HOUR_2024))
    head, _, _ = request_bytes("/nginx.access", body).partition(b"\r\n\r\n")
    connection = await Connection.open(address, client_context(pki))
    try:
        await connection.send_raw(head + b"\r\n\r\n")  # the body is still to come
        await held(running)  # on the head alone
        await running.app.flush("test")
        await connection.send_raw(body)
        reply = await connection.reply()
    finally:
        await connection.aclose()
    assert (reply.status, reply.json()) == (200, {"records": 50})
    assert await stored(running) == {NGINX_FILE: [f"r{n}" for n in range(100)]}


async def test_a_full_buffer_answers_503_after_full_wait_and_keeps_nothing(
        mock_clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path,
        pki: Path) -> None:
    async with one_request_held(nursery, tmp_path, pki) as (running, replies):
        mock_clock.jump(11)
    assert (replies[0].status, replies[0].json()["error"]) == (503, "buffer_full")
    assert replies[0].headers["retry-after"] == "5"
    assert await stored(running) == {NGINX_FILE: [f"r{n}" for n in range(50)]}


async def test_a_request_held_for_room_when_shutdown_begins_gets_shutting_down(
        mock_clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path,
        pki: Path) -> None:
    async with one_request_held(nursery, tmp_path, pki) as (running, replies):
        running.app.request_stop()
    assert (replies[0].status, replies[0].json()["error"]) == (503, "shutting_down")
    await running.app.stopped.wait()
    assert ids_by_file(running.root) == {NGINX_FILE: [f"r{n}" for n in range(50)]}

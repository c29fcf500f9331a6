"""Server behaviour that is about protocol and timing, over memory streams in virtual time.

The real App (servers, commit task, router, writers, hourly files in tmp_path) runs on
memory listeners (tests/memory_net.py) with a clock that jumps whenever everything waits
(never while a file is written), so a 30 s timeout takes no real time and is checked to
the virtual millisecond. End to end over real sockets and TLS: test_https_ingest,
test_forward_ingest, test_slow_peers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from mwdlogd.servers.plain_http import IDLE_TIMEOUT_S

from forward_client import KEY, packed, ping
from helpers import Connection, engine_records, ids_by_file, ndjson, request_bytes
from memory_net import MemoryServer, memory_server

HOUR_2024 = 1732500000.5  # 2024-11-25T02:00:00.500Z
NGINX_FILE = "acme/nginx/www.acme.test/2024/11/25/02.log.gz"
# Bounds every wait in virtual time: a broken timeout fails the test instead of hanging it.
PATIENCE_S = 3600
DRIP_S = 0.7  # between two bytes of a dripped head or PING; no multiple of the timeouts


async def drip(stream: trio.abc.Stream, data: bytes) -> None:
    """Send `data` a byte every DRIP_S, until done or the server has closed."""
    try:
        for byte in data:
            await stream.send_all(bytes([byte]))
            await trio.sleep(DRIP_S)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def stored_after_drain(server: MemoryServer) -> dict[str, list[str]]:
    await server.stop()
    return ids_by_file(server.root)


async def test_a_dripped_head_gets_408_at_request_timeout(
        mock_clock: MockClock, nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    """The head's first byte starts http.request_timeout; more bytes do not extend it."""
    server = await memory_server(nursery, tmp_path, pki,
                                 http={"request_timeout": "30s", "idle_timeout": "60s"})
    connection = await server.http()
    request = request_bytes("/nginx.access", ndjson(engine_records(1, time=HOUR_2024)),
                            headers={"X-Padding": "p" * 100})  # 200 s of head at this pace
    with trio.fail_after(PATIENCE_S):
        started = trio.current_time()
        async with trio.open_nursery() as dripping:
            dripping.start_soon(drip, connection.stream, request)
            reply = await connection.reply()
            dripping.cancel_scope.cancel()
        assert (reply.status, reply.json()["error"]) == (408, "request_timeout")
        assert trio.current_time() - started == pytest.approx(30)
        assert await stored_after_drain(server) == {}


async def test_a_keep_alive_connection_closes_at_idle_timeout(
        mock_clock: MockClock, nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    """After an answer the connection waits http.idle_timeout for the next request."""
    server = await memory_server(nursery, tmp_path, pki,
                                 http={"request_timeout": "30s", "idle_timeout": "60s"})
    connection = await server.http()
    with trio.fail_after(PATIENCE_S):
        reply = await connection.post("/nginx.access",
                                      ndjson(engine_records(3, time=HOUR_2024)))
        assert reply.status == 200 and "connection" not in reply.headers
        answered = trio.current_time()
        assert await connection.stream.receive_some(100) == b""
        assert trio.current_time() - answered == pytest.approx(60)
        assert await stored_after_drain(server) == {NGINX_FILE: ["r0", "r1", "r2"]}


async def test_pipelined_requests_are_answered_in_order(
        mock_clock: MockClock, nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    """Three requests in one write; the refused middle one does not desynchronise the
    connection, and the others' records are stored once each."""
    server = await memory_server(nursery, tmp_path, pki)
    connection = await server.http()
    await connection.send_raw(
        request_bytes("/nginx.access", ndjson(engine_records(2, time=HOUR_2024)))
        + request_bytes("/nginx.access", b"")
        + request_bytes("/nginx.access", ndjson(engine_records(2, start=2, time=HOUR_2024))))
    with trio.fail_after(PATIENCE_S):
        replies = [await connection.reply() for _ in range(3)]
        assert [(r.status, r.json().get("error")) for r in replies] == [
            (200, None), (400, "empty_body"), (200, None)]
        assert "connection" not in replies[2].headers
        assert await stored_after_drain(server) == {NGINX_FILE: ["r0", "r1", "r2", "r3"]}


async def test_a_dripped_forward_ping_hits_the_handshake_deadline(
        mock_clock: MockClock, nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    """forward.handshake_timeout runs from the connection's start to the PING's last
    byte; bytes that keep arriving do not extend it."""
    server = await memory_server(nursery, tmp_path, pki,
                                 forward={"shared_key": KEY, "handshake_timeout": "30s"})
    with trio.fail_after(PATIENCE_S):
        started = trio.current_time()
        client = await server.forward()
        helo = await client.receive()
        async with trio.open_nursery() as dripping:
            dripping.start_soon(drip, client.stream, ping(helo))  # over 100 s of PING
            with pytest.raises(EOFError):
                await client.receive()
            dripping.cancel_scope.cancel()
        assert trio.current_time() - started == pytest.approx(30)
    rejected = server.app.telemetry.rejected.labels("forward", "handshake_timeout")
    assert rejected._value.get() == 1


async def test_a_forward_client_that_never_reads_its_ack_is_closed_at_send_timeout(
        mock_clock: MockClock, nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    """The ack waits forward.send_timeout for the client to read it, then the
    connection closes; the message was durable before the ack, so it is stored."""
    server = await memory_server(nursery, tmp_path, pki, lockstep=frozenset({"forward"}),
                                 forward={"send_timeout": "30s", "idle_timeout": "300s"})
    stream = await server.listeners["forward"].connect()
    records = engine_records(2)
    with trio.fail_after(PATIENCE_S):
        await stream.send_all(packed("nginx.access", records, chunk="c0"))  # read by now
        sent = trio.current_time()
        with pytest.raises(trio.BrokenResourceError):  # not read: the server is stuck
            await stream.send_all(packed("nginx.access", records, chunk="c1"))
        assert trio.current_time() - sent == pytest.approx(30)
        assert await stored_after_drain(server) == {
            "acme/nginx/www.acme.test/2024/11/25/02.log.gz": ["r0", "r1"]}
    rejected = server.app.telemetry.rejected.labels("forward", "send_timeout")
    assert rejected._value.get() == 1


async def test_health_keeps_a_probe_connection_alive_until_its_idle_timeout(
        mock_clock: MockClock, nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    """Two probes on one connection (the second a HEAD: headers only), then the
    connection closes after plain_http.IDLE_TIMEOUT_S without a request."""
    server = await memory_server(nursery, tmp_path, pki)
    connection = Connection(await server.listeners["health"].connect())  # type: ignore[arg-type]
    with trio.fail_after(PATIENCE_S):
        await connection.send_raw(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = await connection.reply()
        assert (reply.status, reply.json()["status"]) == (200, "ok")
        await connection.send_raw(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await connection.stream.receive_some(65536)
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
        answered = trio.current_time()
        assert await connection.stream.receive_some(100) == b""
        assert trio.current_time() - answered == pytest.approx(IDLE_TIMEOUT_S)


async def test_drain_stops_accepting_finishes_the_request_in_flight_then_returns(
        mock_clock: MockClock, nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    """request_stop: the listener closes, an idle keep-alive connection closes at once, a
    request half received is read to its end, stored and answered (`Connection: close`);
    then the final flush, then `run` returns. No timer is waited for: virtual time
    stands still from the stop to the end."""
    server = await memory_server(nursery, tmp_path, pki, server={"shutdown_timeout": "60s"},
                                 http={"request_timeout": "30s", "idle_timeout": "300s"})
    idle, busy = await server.http(), await server.http()
    request = request_bytes("/nginx.access", ndjson(engine_records(4, time=HOUR_2024)))
    with trio.fail_after(PATIENCE_S):
        await busy.send_raw(request[:-10])
        await trio.testing.wait_all_tasks_blocked()  # the server waits for the body's end
        stopping = trio.current_time()
        server.app.request_stop()
        assert await idle.stream.receive_some(100) == b""
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BrokenResourceError):
            await server.listeners["http"].connect()
        assert not server.app.stopped.is_set()  # the drain waits for the request
        await busy.send_raw(request[-10:])
        reply = await busy.reply()
        assert (reply.status, reply.headers.get("connection")) == (200, "close")
        await server.app.stopped.wait()
        assert trio.current_time() == stopping
    assert ids_by_file(server.root) == {NGINX_FILE: ["r0", "r1", "r2", "r3"]}


async def test_drain_gives_up_at_shutdown_timeout_and_says_what_is_left(
        mock_clock: MockClock, nursery: trio.Nursery, tmp_path: Path, pki: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """A request that never finishes arriving cannot hold the drain past
    server.shutdown_timeout (though http.request_timeout is longer); what was acked but
    not written stays in the journal and the outcome line says so."""
    caplog.set_level(logging.INFO, logger="mwdlogd")
    server = await memory_server(nursery, tmp_path, pki, server={"shutdown_timeout": "10s"},
                                 http={"request_timeout": "120s", "idle_timeout": "300s"})
    done, stalled = await server.http(), await server.http()
    with trio.fail_after(PATIENCE_S):
        reply = await done.post("/nginx.access", ndjson(engine_records(2, time=HOUR_2024)))
        assert reply.status == 200  # acked, in the journal, not yet in its file
        request = request_bytes("/nginx.access", ndjson(engine_records(1, time=HOUR_2024)))
        await stalled.send_raw(request[:-5])
        await trio.testing.wait_all_tasks_blocked()
        stopping = trio.current_time()
        await server.stop()
        assert trio.current_time() - stopping == pytest.approx(10)
    outcomes = [r.getMessage() for r in caplog.records if "shutdown_" in r.getMessage()]
    assert outcomes[0].startswith("shutdown_started timeout_s=10.0")
    assert outcomes[1].startswith("shutdown_incomplete timeout_s=10.0 batches_left_in_journal=1")
    assert len(outcomes) == 2


async def test_cancelling_run_cannot_cut_the_final_flush_short(
        mock_clock: MockClock, tmp_path: Path, pki: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Once the accept plane is done and the commit task closed, the storage plane runs
    dry under a shielded deadline: cancelling `run` then (an enclosing nursery failing, a
    second signal) waits for the final flush instead of leaving it to recovery."""
    caplog.set_level(logging.INFO, logger="mwdlogd")
    async with trio.open_nursery() as running:
        server = await memory_server(running, tmp_path, pki)
        connection = await server.http()
        with trio.fail_after(PATIENCE_S):
            reply = await connection.post("/nginx.access",
                                          ndjson(engine_records(3, time=HOUR_2024)))
            assert reply.status == 200  # acked, waiting in its writer for flush_interval
            committer_closed = trio.Event()
            close = server.app.committer.close

            def close_and_tell() -> None:
                close()
                committer_closed.set()

            server.app.committer.close = close_and_tell  # type: ignore[method-assign]
            server.app.request_stop()
            await committer_closed.wait()
        running.cancel_scope.cancel()
    assert server.app.stopped.is_set()
    assert ids_by_file(server.root) == {NGINX_FILE: ["r0", "r1", "r2"]}
    assert any(r.getMessage().startswith("shutdown_complete records=3 files=1")
               for r in caplog.records)

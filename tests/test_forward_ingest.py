"""Forward ingest end to end: real TLS sockets, our raw client, the Fluentd captures,
and real peers (npm @fluent-org/logger, PyPI fluent-logger)."""

from __future__ import annotations

import json
import logging
import shutil
import threading
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from mwdlogd.storage.chunk_ids import PeerChunkIds
from mwdlogd.storage.journal import Journal

from conftest import Running, make_config, start_app
from forward_client import KEY, RawForward, needs_node, node_send, packed, send_one
from helpers import (
    CAPTURES,
    JournalHold,
    all_records,
    client_context,
    engine_records,
    ids_by_file,
)

NGINX_FILE = "acme/nginx/www.acme.test/2024/11/25/02.log.gz"


async def forward_app(nursery: trio.Nursery, tmp_path: Path, pki: Path,
                      **forward: Any) -> Running:
    extra = {k: v for k, v in forward.items() if k == "buffer"}
    forward = {k: v for k, v in forward.items() if k != "buffer"}
    return await start_app(nursery, make_config(tmp_path, pki, forward=forward, **extra))


async def flushed_ids(running: Running) -> dict[str, list[str]]:
    await running.app.flush("test")
    return ids_by_file(running.root)


async def test_packed_forward_over_mtls_is_acked_after_storing(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    running = await forward_app(nursery, tmp_path, pki)
    client = await RawForward.connect(running.addresses.forward, client_context(pki))
    try:
        for n in range(3):
            chunk = f"chunk-{n}==\n"
            await client.send(packed("nginx.access", engine_records(5, start=n * 5),
                                     chunk=chunk, compress=n == 2))
            assert await client.receive() == {"ack": chunk}
    finally:
        await client.aclose()
    assert await flushed_ids(running) == {NGINX_FILE: [f"r{n}" for n in range(15)]}
    (record, *_) = all_records(running.root)
    assert record["tag"] == "nginx.access" and record["timestamp"] == "2024-11-25T02:00:00.000Z"


async def test_shared_key_handshake_then_data(nursery: trio.Nursery, tmp_path: Path,
                                              pki: Path) -> None:
    running = await forward_app(nursery, tmp_path, pki, shared_key=KEY)
    client = await RawForward.connect(running.addresses.forward, client_context(pki))
    try:
        pong = await client.handshake()
        assert pong[:4] == ["PONG", True, "", "logserver"]
        await client.send(packed("nginx.access", engine_records(2), chunk="c\n"))
        assert await client.receive() == {"ack": "c\n"}
    finally:
        await client.aclose()
    assert await flushed_ids(running) == {NGINX_FILE: ["r0", "r1"]}


async def test_wrong_shared_key_gets_pong_false_and_close(nursery: trio.Nursery, tmp_path: Path,
                                                          pki: Path) -> None:
    running = await forward_app(nursery, tmp_path, pki, shared_key=KEY)
    client = await RawForward.connect(running.addresses.forward, client_context(pki))
    try:
        pong = await client.handshake(key="not-the-key")
        assert pong == ["PONG", False, "shared_key mismatch", "", ""]
        with pytest.raises((EOFError, trio.BrokenResourceError)):
            await client.send(packed("nginx.access", engine_records(1), chunk="c\n"))
            await client.receive()
    finally:
        await client.aclose()
    metrics = running.app.telemetry.exposition().decode()
    assert 'mwdlogd_forward_handshake_failures_total{reason="shared_key mismatch"} 1.0' in metrics
    assert await flushed_ids(running) == {}


async def test_user_auth(nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    running = await forward_app(nursery, tmp_path, pki, shared_key=KEY,
                                users=[{"username": "engine", "password": "pw"}])
    for password, ok in (("pw", True), ("bad", False)):
        client = await RawForward.connect(running.addresses.forward, client_context(pki))
        try:
            pong = await client.handshake(username="engine", password=password)
            assert pong[1] is ok
        finally:
            await client.aclose()


async def test_a_resend_is_acked_but_stored_once_even_after_restart(tmp_path: Path,
                                                                    pki: Path) -> None:
    config = make_config(tmp_path, pki, forward={"bind": "127.0.0.1", "port": 0})
    message = packed("nginx.access", engine_records(4), chunk="same-chunk==\n")
    for _ in range(2):  # the second server is a restart on the same buffer
        async with trio.open_nursery() as nursery:
            running = await start_app(nursery, config)
            for _ in range(2):
                reply = await send_one(running.addresses.forward, client_context(pki), message)
                assert reply == {"ack": "same-chunk==\n"}
            await running.app.flush("test")
            nursery.cancel_scope.cancel()
    assert ids_by_file(running.root) == {NGINX_FILE: ["r0", "r1", "r2", "r3"]}
    metrics = running.app.telemetry.exposition().decode()
    assert "mwdlogd_forward_duplicate_chunks_total 2.0" in metrics


async def test_with_window_zero_a_resend_is_stored_again(nursery: trio.Nursery,
                                                         tmp_path: Path, pki: Path) -> None:
    running = await forward_app(nursery, tmp_path, pki, dedupe_window="0s")
    message = packed("nginx.access", engine_records(2), chunk="same==\n")
    for _ in range(2):
        assert await send_one(running.addresses.forward, client_context(pki), message) == \
            {"ack": "same==\n"}
    assert await flushed_ids(running) == {NGINX_FILE: ["r0", "r1", "r0", "r1"]}


async def test_concurrent_resends_wait_for_the_first_copy(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    running = await forward_app(nursery, tmp_path, pki)
    message = packed("nginx.access", engine_records(3), chunk="twice\n")

    async def send() -> None:
        reply = await send_one(running.addresses.forward, client_context(pki), message)
        assert reply == {"ack": "twice\n"}

    async with trio.open_nursery() as clients:
        for _ in range(4):
            clients.start_soon(send)
    assert await flushed_ids(running) == {NGINX_FILE: ["r0", "r1", "r2"]}


async def test_no_ack_before_the_journal_fsync(nursery: trio.Nursery, tmp_path: Path,
                                               pki: Path) -> None:
    running = await forward_app(nursery, tmp_path, pki)
    hold = JournalHold(running.app.journal)
    client = await RawForward.connect(running.addresses.forward, client_context(pki))
    try:
        await client.send(packed("nginx.access", engine_records(2), chunk="held\n"))
        await hold.wait_entered()
        with trio.move_on_after(0) as scope:
            await client.stream.receive_some(100)  # nothing may be waiting for us yet
        assert scope.cancelled_caught
        hold.release.set()
        assert await client.receive() == {"ack": "held\n"}
    finally:
        await client.aclose()


async def test_full_buffer_stops_reading_instead_of_refusing(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    running = await forward_app(nursery, tmp_path, pki,
                                buffer={"flush_interval": "1h", "total_limit": "6KiB"})
    client = await RawForward.connect(running.addresses.forward, client_context(pki))
    try:
        await client.send(packed("nginx.access", engine_records(20), chunk="a\n"))
        assert await client.receive() == {"ack": "a\n"}
        await client.send(packed("nginx.access", engine_records(20, start=20), chunk="b\n"))
        while running.app.admission.waiting_for_room == 0:
            await trio.testing.wait_all_tasks_blocked()
        metrics = running.app.telemetry.exposition().decode()
        assert "mwdlogd_batches_waiting_for_room 1.0" in metrics
        with trio.move_on_after(0) as scope:
            await client.stream.receive_some(100)
        assert scope.cancelled_caught  # b is neither refused nor acked: it waits for room
        await running.app.flush("test")  # writes a, frees room
        assert await client.receive() == {"ack": "b\n"}
    finally:
        await client.aclose()
    assert await flushed_ids(running) == {NGINX_FILE: [f"r{n}" for n in range(40)]}


@pytest.mark.parametrize(("garbage", "reason"), [
    (b"\xc1\xc1\xc1", "malformed_msgpack"),
    (msgpack.packb({"not": "an array"}), "wrong_shape"),
    (b"\x93\xa1t\xdb\x40\x00\x00\x00", "too_large"),
    (msgpack.packb(["nginx.access", [[1, {"id": "x"}]], {"size": 9}]), "size_mismatch"),
    (packed("nginx.access", [{"id": "x"}], chunk="c" * 65), "chunk_id_too_long"),
])
async def test_malformed_input_closes_only_that_connection(
        nursery: trio.Nursery, tmp_path: Path, pki: Path, garbage: bytes, reason: str,
        caplog: pytest.LogCaptureFixture) -> None:
    running = await forward_app(nursery, tmp_path, pki)
    good = await RawForward.connect(running.addresses.forward, client_context(pki))
    bad = await RawForward.connect(running.addresses.forward, client_context(pki))
    try:
        await good.send(packed("nginx.access", engine_records(1), chunk="g1\n"))
        assert await good.receive() == {"ack": "g1\n"}
        await bad.send(garbage)
        with pytest.raises((EOFError, trio.BrokenResourceError)):
            await bad.receive()
        await good.send(packed("nginx.access", engine_records(1, start=1), chunk="g2\n"))
        assert await good.receive() == {"ack": "g2\n"}
    finally:
        await good.aclose()
        await bad.aclose()
    assert await flushed_ids(running) == {NGINX_FILE: ["r0", "r1"]}
    metrics = running.app.telemetry.exposition().decode()
    assert f'mwdlogd_rejected_requests_total{{protocol="forward",reason="{reason}"}} 1.0' \
        in metrics
    closed = [r.getMessage() for r in caplog.records if "forward_connection_closed" in
              r.getMessage() and "reason=" in r.getMessage()]
    assert len(closed) == 1


async def test_what_a_client_may_make_the_server_remember_is_bounded(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    """Chunk ids up to 64 bytes and PING names up to 255 bytes are kept for the dedupe
    window; longer ones are refused with the reason."""
    running = await forward_app(nursery, tmp_path, pki, shared_key=KEY)
    client = await RawForward.connect(running.addresses.forward, client_context(pki))
    try:
        assert (await client.handshake(hostname="e" * 255))[1] is True
        await client.send(packed("nginx.access", engine_records(1), chunk="c" * 64))
        assert await client.receive() == {"ack": "c" * 64}
    finally:
        await client.aclose()
    client = await RawForward.connect(running.addresses.forward, client_context(pki))
    try:
        assert await client.handshake(hostname="e" * 256) == [
            "PONG", False, "hostname over 255 bytes", "", ""]
    finally:
        await client.aclose()
    assert await flushed_ids(running) == {NGINX_FILE: ["r0"]}


async def test_a_key_only_in_the_journal_outlives_its_segment(tmp_path: Path,
                                                               pki: Path) -> None:
    """kill -9 after the journal fsync can lose the chunk id log's unsynced tail: recovery
    takes the key from the journal and logs it again, so the resend after the journal
    segment is gone is still recognised."""
    config = make_config(tmp_path, pki, forward={"bind": "127.0.0.1", "port": 0})
    message = packed("nginx.access", engine_records(2), chunk="kept==\n")
    async with trio.open_nursery() as nursery:
        first = await start_app(nursery, config)
        assert await send_one(first.addresses.forward, client_context(pki), message) == \
            {"ack": "kept==\n"}
        nursery.cancel_scope.cancel()
    shutil.rmtree(tmp_path / "buffer" / "chunk-ids")
    for _ in range(2):  # the restart drains (the journal empties), then one more
        async with trio.open_nursery() as nursery:
            running = await start_app(nursery, config)
            assert await send_one(running.addresses.forward, client_context(pki), message) \
                == {"ack": "kept==\n"}
            running.app.request_stop()
            await running.app.stopped.wait()
    assert ids_by_file(running.root) == {NGINX_FILE: ["r0", "r1"]}
    assert not list((tmp_path / "buffer" / "journal").glob("*.wal")) or all(
        p.stat().st_size == 0 for p in (tmp_path / "buffer" / "journal").glob("*.wal"))


async def test_a_failing_chunk_id_log_does_not_refuse_what_the_journal_holds(
        tmp_path: Path, pki: Path) -> None:
    """The chunk id log cannot be written after the journal fsync: the batch is durable,
    so it is acked (a refusal made the sender resend it and recovery store every copy),
    and a crash then a restart stores it once."""
    config = make_config(tmp_path, pki, buffer={"flush_interval": "1h", "timekey_wait": "1h"})
    message = packed("nginx.access", engine_records(2), chunk="same==\n")
    ids_dir = tmp_path / "buffer" / "chunk-ids"
    async with trio.open_nursery() as nursery:
        first = await start_app(nursery, config)
        shutil.rmtree(ids_dir)
        ids_dir.write_bytes(b"")  # no segment can be created in it now
        for _ in range(3):  # a sender resends until acked
            assert await send_one(first.addresses.forward, client_context(pki), message) == \
                {"ack": "same==\n"}
        metrics = first.app.telemetry.exposition().decode()
        nursery.cancel_scope.cancel()  # kill -9: no drain
    assert "mwdlogd_forward_duplicate_chunks_total 2.0" in metrics
    ids_dir.unlink()
    async with trio.open_nursery() as nursery:
        running = await start_app(nursery, config)
        assert await flushed_ids(running) == {NGINX_FILE: ["r0", "r1"]}
        nursery.cancel_scope.cancel()


async def test_recovery_replays_one_copy_of_a_resend_journaled_twice(tmp_path: Path,
                                                                      pki: Path) -> None:
    """Two journal records with the same resend key (a resend journaled again, e.g. by
    a version that refused a batch it had journaled): the restart stores one copy."""
    config = make_config(tmp_path, pki, buffer={"flush_interval": "1h", "timekey_wait": "1h"})
    message = packed("nginx.access", engine_records(2), chunk="twice==\n")
    async with trio.open_nursery() as nursery:
        first = await start_app(nursery, config)
        assert await send_one(first.addresses.forward, client_context(pki), message) == \
            {"ack": "twice==\n"}
        nursery.cancel_scope.cancel()  # kill -9: no drain
    journal = Journal(tmp_path / "buffer" / "journal")
    [(_, payload)] = journal.open()
    journal.append([payload])
    journal.close()
    async with trio.open_nursery() as nursery:
        running = await start_app(nursery, config)
        assert await flushed_ids(running) == {NGINX_FILE: ["r0", "r1"]}
        nursery.cancel_scope.cancel()


class OverlapCounting(PeerChunkIds):
    """Other workers' chunk ids, noting how many threads read them at once."""

    def __init__(self, directories: list[Path]) -> None:
        super().__init__(directories)
        self.inside = self.most = 0
        self._lock = threading.Lock()

    def read_new(self) -> list[tuple[float, list[bytes]]]:
        with self._lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
        threading.Event().wait(0.05)  # widens the window another thread could enter
        try:
            return super().read_new()
        finally:
            with self._lock:
                self.inside -= 1


async def test_other_workers_chunk_ids_are_read_by_one_thread_at_a_time(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    """read_new updates its segment offsets: threads reading at once would skip or repeat
    entries."""
    running = await forward_app(nursery, tmp_path, pki)
    peers = OverlapCounting([tmp_path / "other-worker"])
    running.app.resends._peers = peers

    async def send(n: int) -> None:
        reply = await send_one(running.addresses.forward, client_context(pki), packed(
            "nginx.access", engine_records(1, start=n), chunk=f"c{n}"))
        assert reply == {"ack": f"c{n}"}

    async with trio.open_nursery() as senders:
        for n in range(4):
            senders.start_soon(send, n)
    assert peers.most == 1
    stored = await flushed_ids(running)
    assert {path: sorted(ids) for path, ids in stored.items()} == \
        {NGINX_FILE: [f"r{n}" for n in range(4)]}


async def test_heartbeats_are_cheap_and_quiet(nursery: trio.Nursery, tmp_path: Path, pki: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    running = await forward_app(nursery, tmp_path, pki, shared_key=KEY)
    caplog.set_level(logging.INFO, logger="mwdlogd")
    for _ in range(10):  # a TCP heartbeat of TLS, then one with a full handshake
        client = await RawForward.connect(running.addresses.forward, client_context(pki))
        await client.aclose()
        client = await RawForward.connect(running.addresses.forward, client_context(pki))
        assert (await client.handshake())[1] is True
        await client.aclose()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO] == []
    metrics = running.app.telemetry.exposition().decode()
    assert 'mwdlogd_connections_total{protocol="forward"} 20.0' in metrics


@pytest.mark.parametrize("name", ["fwd-packed-ack", "fwd-gzip-ack", "infwd-plain-ok"])
async def test_captured_fluentd_messages_replayed(nursery: trio.Nursery, tmp_path: Path,
                                                  pki: Path, name: str) -> None:
    running = await forward_app(nursery, tmp_path, pki)
    ack = await send_one(running.addresses.forward, client_context(pki),
                         (CAPTURES / f"{name}.client.bin").read_bytes())
    assert msgpack.packb(ack) == (CAPTURES / f"{name}.server.bin").read_bytes()
    await running.app.flush("test")
    assert len(all_records(running.root)) == (2 if name == "infwd-plain-ok" else 12)


async def test_captured_shared_key_session_replayed(nursery: trio.Nursery, tmp_path: Path,
                                                    pki: Path) -> None:
    """The client bytes of a real out_forward session, PING re-signed for our nonce."""
    running = await forward_app(nursery, tmp_path, pki, shared_key=KEY)
    unpacker = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape")
    unpacker.feed((CAPTURES / "fwd-sharedkey-ack.client.bin").read_bytes())
    _ping, *rest = [msgpack.packb(m, unicode_errors="surrogateescape") for m in unpacker]
    client = await RawForward.connect(running.addresses.forward, client_context(pki))
    try:
        assert (await client.handshake())[1] is True
        for message in rest:
            await client.send(message)
        ack = await client.receive()
    finally:
        await client.aclose()
    assert ack == {"ack": "ZhGNgq8oQOPpu05WL8wwzg==\n"}
    await running.app.flush("test")
    assert [r["seq"] for r in all_records(running.root)] == list(range(8))


@needs_node
@pytest.mark.parametrize("mode", ["Message", "Forward", "PackedForward", "CompressedPackedForward"])
async def test_node_fluent_logger_every_mode_tls_shared_key_ack(
        nursery: trio.Nursery, tmp_path: Path, pki: Path, mode: str) -> None:
    running = await forward_app(nursery, tmp_path, pki, shared_key=KEY)
    host, _, port = running.addresses.forward.rpartition(":")
    result = await trio.to_thread.run_sync(node_send, {
        "host": host, "port": int(port), "ca": str(pki / "ca.crt"),
        "cert": str(pki / "engine-01.crt"), "key": str(pki / "engine-01.key"),
        "sharedKey": KEY, "mode": mode, "tag": "nginx.access", "count": 50, "start": 0,
        "ack": True, "flushInterval": 20})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"sent": 50}
    await running.app.flush("test")
    records = all_records(running.root)
    assert sorted(r["id"] for r in records) == sorted(f"node-{n}" for n in range(50))
    assert {r["timestamp"] for r in records} == {"2024-11-25T02:00:00.500Z"}
    assert {r["msg"] for r in records} == {"ログ ✓"}


@needs_node
async def test_node_client_without_certificate_is_refused(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    running = await forward_app(nursery, tmp_path, pki)
    host, _, port = running.addresses.forward.rpartition(":")
    result = await trio.to_thread.run_sync(node_send, {
        "host": host, "port": int(port), "ca": str(pki / "ca.crt"), "mode": "PackedForward",
        "tag": "nginx.access", "count": 1, "start": 0, "ack": True})
    assert result.returncode != 0
    await running.app.flush("test")
    assert all_records(running.root) == []


async def test_python_fluent_logger_message_mode_over_tcp(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    sender_module = pytest.importorskip("fluent.sender")
    running = await forward_app(nursery, tmp_path, pki, transport="tcp")
    host, _, port = running.addresses.forward.rpartition(":")

    def send() -> None:
        sender = sender_module.FluentSender("nginx", host=host, port=int(port))
        for record in engine_records(30):
            assert sender.emit_with_time("access", 1732500000, record), sender.last_error
        sender.close()

    await trio.to_thread.run_sync(send)
    # fluent-logger has no acks, so no event can tell when the server has the records:
    # watch the input counter, bounded in time.
    registry = running.app.telemetry.registry
    labels = {"tag": "nginx.access", "hostname": "testhost"}

    def received() -> float:
        return registry.get_sample_value("fluentd_input_status_num_records_total", labels) or 0

    with trio.fail_after(10):
        while received() < 30:  # noqa: ASYNC110
            await trio.sleep(0.01)
    assert await flushed_ids(running) == {NGINX_FILE: [f"r{n}" for n in range(30)]}


async def test_bin_strings_route_and_bad_bytes_are_kept(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    """PackedForward with every string as bin (Fluentd's Yajl parser), one value not
    UTF-8: routed like str, stored with U+FFFD and the original bytes, counted."""
    records = engine_records(2, time=1732500000)
    records[1]["path"] = b"/p/\xc0\xaf"
    binary = [{k.encode(): v.encode() if isinstance(v, str) else v for k, v in r.items()}
              for r in records]
    blob = b"".join(msgpack.packb([1732500000, r], use_bin_type=True) for r in binary)
    running = await forward_app(nursery, tmp_path, pki)
    client = await RawForward.connect(running.addresses.forward, client_context(pki))
    try:
        await client.send(msgpack.packb(["nginx.access", blob, {"chunk": "c1"}],
                                        use_bin_type=True))
        assert await client.receive() == {"ack": "c1"}
    finally:
        await client.aclose()
    assert await flushed_ids(running) == {NGINX_FILE: ["r0", "r1"]}
    bad = all_records(running.root)[1]
    assert bad["path"] == "/p/\ufffd\ufffd" and bad["utf8_invalid"] == {"/path": "L3AvwK8="}
    metrics = running.app.telemetry.exposition().decode()
    assert 'mwdlogd_invalid_utf8_records_total{protocol="forward"} 1.0' in metrics

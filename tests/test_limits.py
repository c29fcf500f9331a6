"""Connection limits and the descriptor limit, on real sockets: clients from several
loopback addresses, and `prlimit` lowering a live server's RLIMIT_NOFILE."""

from __future__ import annotations

import json
import os
import re
import resource
import socket
import ssl
import threading
import time
import tracemalloc
import urllib.request
from pathlib import Path

import trio

from mwdlogd.model import Destination
from mwdlogd.runtime.tail import TailFilter, TailHub
from mwdlogd.telemetry import Telemetry

from conftest import config_raw, make_config, start_app
from helpers import (
    Connection,
    all_records,
    client_context,
    engine_records,
    http_get,
    ndjson,
    post_sync,
    split_address,
)
from server_process import ServerProcess, write_config


async def connect_from(source: str, address: str, context: ssl.SSLContext) -> Connection:
    host, port = split_address(address)
    tcp = await trio.open_tcp_stream(host, port, local_address=source)
    stream = trio.SSLStream(tcp, context, server_hostname=host, https_compatible=True)
    return Connection(stream)


async def served(connection: Connection, start: int) -> bool:
    """Does the server answer a post on this connection (200), or close it?"""
    try:
        reply = await connection.post("/nginx.access", ndjson(engine_records(1, start=start)))
    except (trio.BrokenResourceError, EOFError):
        return False
    assert reply.status == 200
    return True


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


async def test_connection_limits_total_and_per_address(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    config = make_config(tmp_path, pki, server={"max_connections": 4,
                                                "max_connections_per_address": 2})
    running = await start_app(nursery, config)
    http = running.addresses.http
    context = client_context(pki)
    kept = [await connect_from(a, http, context) for a in ("127.0.0.1", "127.0.0.1",
                                                           "127.0.0.2")]
    assert [await served(c, n) for n, c in enumerate(kept)] == [True, True, True]
    over_address = await connect_from("127.0.0.1", http, context)
    assert not await served(over_address, 10)
    kept.append(await connect_from("127.0.0.2", http, context))
    assert await served(kept[-1], 3)
    over_total = await connect_from("127.0.0.3", http, context)
    assert not await served(over_total, 11)
    await kept[0].aclose()
    await over_address.aclose()
    await over_total.aclose()
    again = await connect_from("127.0.0.1", http, context)
    with trio.fail_after(10):  # the slot is freed once the server has seen the close
        while not await served(again, 12):
            await again.aclose()
            again = await connect_from("127.0.0.1", http, context)
    for connection in [*kept[1:], again]:
        await connection.aclose()
    _, body = await http_get(running.addresses.metrics, "/metrics")
    text = body.decode()
    assert metric(text, 'mwdlogd_rejected_connections_total{protocol="http",'
                        'reason="max_connections_per_address"}') >= 1
    assert metric(text, 'mwdlogd_rejected_connections_total{protocol="http",'
                        'reason="max_connections"}') >= 1
    await running.app.flush("test")
    ids = {r["id"] for r in all_records(running.root)}
    assert ids == {"r0", "r1", "r2", "r3", "r12"}
    running.app.request_stop()


ACCEPT_LOG_INTERVAL_S = 10.0  # telemetry.ACCEPT_LOG_INTERVAL_S
HOLD_S = 2.0  # how long the test keeps the server at its descriptor limit


def test_at_the_descriptor_limit_accept_backs_off_quietly_then_serves(
        tmp_path: Path, pki: Path) -> None:
    config = write_config(tmp_path / "config.toml", config_raw(tmp_path, pki))
    server = ServerProcess(config)
    pid = server.process.pid
    try:
        used = len(os.listdir(f"/proc/{pid}/fd"))
        hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (used + 2, hard))
        host, port = split_address(server.addresses["forward"])
        waiting = [socket.create_connection((host, port)) for _ in range(8)]
        started = time.monotonic()
        server.wait_for(r"accept_failed protocol=forward errno=EMFILE")
        threading.Event().wait(HOLD_S)  # the fault's duration: failures pile up meanwhile
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))
        for sock in waiting:
            sock.close()
        http_port = split_address(server.addresses["http"])[1]
        status, _ = post_sync(http_port, client_context(pki), ndjson(engine_records(3)))
        assert status == 200
        elapsed = time.monotonic() - started
        with urllib.request.urlopen(f"http://{server.addresses['metrics']}/metrics") as reply:
            failures = metric(reply.read().decode(),
                              'mwdlogd_accept_errors_total{errno="EMFILE",protocol="forward"}')
    finally:
        server.stop()
    lines = [line for line in server.lines if "accept_failed" in line]
    assert failures >= 3
    assert len(lines) <= 1 + elapsed // ACCEPT_LOG_INTERVAL_S
    assert not [line for line in server.lines if "Traceback" in line or "accept returned" in line]


async def test_health_is_degraded_while_acks_are_refused_for_a_full_buffer(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    config = make_config(tmp_path, pki, buffer={"total_limit": "16KiB", "flush_interval": "1h"})
    running = await start_app(nursery, config)
    context = client_context(pki)
    connection = await Connection.open(running.addresses.http, context)
    first = engine_records(60)
    assert (await connection.post("/nginx.access", ndjson(first))).status == 200
    assert (await connection.post("/nginx.access", ndjson(engine_records(60, start=60)))
            ).json()["error"] == "buffer_full"
    status, body = await http_get(running.addresses.health, "/health")
    assert status == 503 and b"buffer full" in body
    await running.app.flush("test")
    assert (await http_get(running.addresses.health, "/health"))[0] == 200
    assert sorted(r["id"] for r in all_records(running.root)) == sorted(r["id"] for r in first)
    await connection.aclose()
    running.app.request_stop()


RECORDS = 40
RECORD_BYTES = 1_000_000


async def test_stalled_tail_viewers_hold_a_bounded_number_of_bytes() -> None:
    """Three viewers that read nothing while 40 records of 1 MB go by: each keeps at most
    VIEWER_BYTES (4 MiB) of them, not 40 MB."""
    telemetry = Telemetry("t")
    hub = TailHub(telemetry)
    destination = Destination("acme", "nginx", "www.acme.test", 1732500000)
    tracemalloc.start()
    try:
        with hub.viewer(TailFilter()) as first, hub.viewer(TailFilter()), \
                hub.viewer(TailFilter()):
            before = tracemalloc.get_traced_memory()[0]
            for n in range(RECORDS):
                hub.publish(destination, b'{"n":%d,"pad":"' % n + b"x" * RECORD_BYTES + b'"}\n')
            held = tracemalloc.get_traced_memory()[0] - before
            kept = [await first.__anext__() for _ in range(4)]
    finally:
        tracemalloc.stop()
    assert held < 3 * 5 * 1024 * 1024  # about 120 MB without the byte bound
    assert [json.loads(line)["n"] for line in kept] == [0, 1, 2, 3]
    assert telemetry.tail_dropped._value.get() == 3 * (RECORDS - 4)

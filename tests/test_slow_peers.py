"""Stuck peers on real sockets: a peer that never reads (TCP backpressure, a full socket
buffer) cannot hold a connection, nor make a drain wait. Dripped heads and PINGs, each
deadline to the virtual millisecond: test_servers_virtual_time."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import msgpack
import trio

from conftest import Running, make_config, start_app
from helpers import ids_by_file


def forward_message(n: int) -> bytes:
    record = {"id": f"f{n}", "customer_name": "acme", "fqdn": "www.acme.test",
              "log_type": "nginx"}
    return bytes(msgpack.packb(["nginx.access", [[int(time.time()), record]],
                                {"chunk": f"chunk-{n}"}]))


async def never_reading_client(address: str) -> trio.SocketStream:
    """A plain TCP client with a tiny receive buffer, so unread acks fill it soon."""
    host, _, port = address.rpartition(":")
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    await sock.connect((host, int(port)))
    return trio.SocketStream(sock)


async def send_until_stuck(stream: trio.SocketStream) -> int:
    """Messages sent before the server stopped reading (it is blocked on an ack) or, with
    a short send_timeout, already closed the connection."""
    sent = 0
    while True:
        with trio.move_on_after(2) as stuck:
            try:
                await stream.send_all(forward_message(sent))
            except trio.BrokenResourceError:
                return sent
        if stuck.cancelled_caught:
            return sent
        sent += 1


async def stuck_server(nursery: trio.Nursery, tmp_path: Path, pki: Path,
                       send_timeout: str) -> tuple[Running, trio.SocketStream, int]:
    running = await start_app(nursery, make_config(
        tmp_path, pki, server={"shutdown_timeout": "30s"}, buffer={"fsync": False},
        forward={"transport": "tcp", "send_timeout": send_timeout}))
    stream = await never_reading_client(running.addresses.forward)
    with trio.fail_after(60):
        sent = await send_until_stuck(stream)
    return running, stream, sent


def check_stored_once(root: Path, sent: int) -> None:
    stored = [i for ids in ids_by_file(root).values() for i in ids]
    assert len(stored) == len(set(stored))
    assert set(stored) <= {f"f{n}" for n in range(sent + 1)}
    assert stored


async def test_a_client_that_never_reads_acks_is_closed_at_send_timeout(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    running, stream, sent = await stuck_server(nursery, tmp_path, pki, "1s")
    with trio.fail_after(10):
        while True:  # the server closes: our sends fail once its reset arrives
            try:
                await stream.send_all(b"\x00" * 65536)
            except trio.BrokenResourceError:
                break
    await stream.aclose()
    rejected = running.app.telemetry.rejected.labels("forward", "send_timeout")
    assert rejected._value.get() == 1
    await running.app.flush("test")
    check_stored_once(running.root, sent)


async def test_drain_does_not_wait_for_a_client_that_never_reads(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    running, stream, sent = await stuck_server(nursery, tmp_path, pki, "60s")
    started = trio.current_time()
    running.app.request_stop()
    with trio.fail_after(10):  # shutdown_timeout is 30 s; send_timeout 60 s
        await running.app.stopped.wait()
    assert trio.current_time() - started < 10
    await stream.aclose()
    check_stored_once(running.root, sent)

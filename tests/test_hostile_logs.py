"""Peers that close mid-way or send huge values cannot flood the log: no tracebacks,
values capped, lines rate-limited."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
import trio

from conftest import Running, make_config, start_app
from forward_client import RawForward
from helpers import Connection, client_context, request_bytes, split_address

CLOSES = 20


async def close_mid_way(address: str, pki: Path, stage: int) -> None:
    host, port = split_address(address)
    if stage == 0:  # half a ClientHello
        with socket.create_connection((host, port)) as sock:
            sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        return
    connection = await Connection.open(address, client_context(pki))
    raw = request_bytes("/nginx.access", b'{"customer_name": "acme"}\n' * 100)
    await connection.send_raw(raw[: 40 if stage == 1 else len(raw) // 2])
    await trio.aclose_forcefully(connection.stream.transport_stream)


async def test_clients_closing_mid_request_log_no_traceback(
        server: Running, pki: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="mwdlogd")
    for n in range(CLOSES):
        for address in (server.addresses.http, server.addresses.forward):
            await close_mid_way(address, pki, n % 3)
    with trio.fail_after(10):  # until the server has seen every close
        while server.app.limits.open_connections:  # noqa: ASYNC110 - the kernel delivers
            await trio.sleep(0.01)
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) <= 2 * 10 + 4


PINGS = 12
HOSTNAME_BYTES = 1024 * 1024


async def test_ping_hostnames_are_capped_and_handshake_failures_rate_limited(
        nursery: trio.Nursery, tmp_path: Path, pki: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    running = await start_app(nursery, make_config(
        tmp_path, pki, forward={"shared_key": "right-key"},
        auth={"failure_limit": 0}))  # every PING answered: no lockout (test_authorization)
    caplog.set_level(logging.INFO, logger="mwdlogd")
    for _ in range(PINGS):
        client = await RawForward.connect(running.addresses.forward, client_context(pki))
        pong = await client.handshake(key="wrong-key", hostname="h" * HOSTNAME_BYTES)
        assert pong[:2] == ["PONG", False]
        await client.aclose()
    failed = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith("forward_handshake_failed")]
    assert 1 <= len(failed) <= 10  # telemetry's RateLimiter burst
    assert all(len(line) < 1000 for line in failed)
    assert sum(len(r.getMessage()) for r in caplog.records) < 20_000

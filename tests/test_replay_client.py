"""The replay client as its own package: it loads without the server, and a batch resent
after a lost ack carries the same chunk id, so the server stores it once."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

import mwdlogd_replay
from mwdlogd_replay import cli
from mwdlogd_replay.connection import Target
from mwdlogd_replay.forward import ForwardClient
from mwdlogd_replay.records import batches, generate
from mwdlogd_replay.run import Stats, run_replay
from mwdlogd_replay.verify import verify

from conftest import make_config, start_app


def test_the_replay_package_imports_nothing_of_the_server() -> None:
    modules = [f"mwdlogd_replay.{m.name}" for m in pkgutil.iter_modules(mwdlogd_replay.__path__)]
    assert {"mwdlogd_replay.cli", "mwdlogd_replay.forward", "mwdlogd_replay.http"} <= set(modules)
    loaded = subprocess.run(
        [sys.executable, "-c", "import importlib, json, sys\n"
         f"for name in {modules!r}: importlib.import_module(name)\n"
         "print(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True).stdout
    server = [m for m in json.loads(loaded) if m == "mwdlogd" or m.startswith("mwdlogd.")]
    assert server == []


def _unpack(data: bytes) -> list[Any]:
    """Every msgpack object in `data`."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    return list(unpacker)


def test_ack_percentiles_are_null_below_two_samples() -> None:
    """One ack has no p50: the summary says null, never 0.0 (which reads as instant acks)."""
    assert Stats().percentile_ms(0.5) is None
    assert Stats(latencies=[0.08]).percentile_ms(0.99) is None
    assert Stats(latencies=[0.01, 0.02, 0.03]).percentile_ms(0.5) == 20.0


def test_chunk_ids_are_fixed_per_batch_and_unique_per_message() -> None:
    target = Target("forward", "127.0.0.1", 1, None, mode="Message")
    client = ForwardClient(target, "replay-1-0")
    (batch,) = batches(generate(1, customers=1, fqdns=1, appsec_share=0), size=3, run="m",
                       count=3)
    frames = client.encode(batch)
    ids = [frame.chunk for frame in frames]
    assert len(set(ids)) == 3
    assert [_unpack(f.data)[0][-1]["chunk"] for f in frames] == ids
    again = ForwardClient(target, "replay-1-0").encode(batch)  # same pid and index, later run
    assert not {f.chunk for f in again} & set(ids)


async def test_a_batch_resent_after_a_lost_ack_is_stored_once(tmp_path: Path,
                                                              pki: Path) -> None:
    """A proxy passes the first batch to the server, which stores it and acks; the proxy
    drops that ack and the connection. Replay resends on a new connection: with the same
    chunk id the server recognises the resend and acks without storing it again."""
    forward = {"bind": "127.0.0.1", "port": 0, "transport": "tcp"}
    cut = trio.Event()
    async with trio.open_nursery() as nursery:
        running = await start_app(nursery, make_config(tmp_path, pki, forward=forward))
        host, _, port = running.addresses.forward.rpartition(":")

        async def relay(client: trio.SocketStream) -> None:
            upstream = await trio.open_tcp_stream(host, int(port))
            async with client, upstream, trio.open_nursery() as pipes:
                async def to_server() -> None:
                    async for data in client:
                        await upstream.send_all(data)
                    pipes.cancel_scope.cancel()

                pipes.start_soon(to_server)
                async for data in upstream:
                    if not cut.is_set():  # the first ack: the batch is durable; lose it
                        cut.set()
                        break
                    await client.send_all(data)
                pipes.cancel_scope.cancel()

        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        nursery.start_soon(trio.serve_listeners, relay, [listener])
        proxy_port = listener.socket.getsockname()[1]
        source = batches(generate(4, customers=2, fqdns=2, appsec_share=0.3), size=100,
                         run="resend", count=300)
        stats = await run_replay(source, Target("forward", "127.0.0.1", proxy_port, None),
                                 connections=1, rate=None, duration=None, progress=False)
        await running.app.flush("test")
        nursery.cancel_scope.cancel()
    assert cut.is_set() and sum(stats.errors.values()) == 1
    assert (stats.sent, len(stats.acked)) == (300, 300)
    verdict = verify(running.root, "resend", stats.acked)
    assert (verdict.stored, verdict.duplicated, verdict.missing) == (300, [], [])


def test_without_a_server_config_the_command_line_must_say_it_all(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--count", "1", "--target", "127.0.0.1:1"]) == 2
    assert capsys.readouterr().err == (
        "mwdlogd replay: no server config to read: give --target, --cacert, --cert, --key, "
        "--token or --shared-key, and --verify ROOT\n")

"""`server.workers = 2`: two real worker processes behind one supervisor share the ports
and the hourly files. Under continuous load, a worker killed with SIGKILL is restarted
and the whole group killed at once recovers: every acked record lands exactly once."""

from __future__ import annotations

import concurrent.futures
import gzip
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import trio

from mwdlogd.storage.ledger import SUFFIX, Ledger

from conftest import config_raw
from forward_client import KEY, RawForward, needs_node, node_send, packed, send_one
from helpers import (
    TOKEN,
    client_context,
    engine_records,
    free_port,
    http_get,
    ids_by_file,
    ndjson,
    post,
    read_tree,
)
from load_client import BATCH, Load
from server_process import ServerProcess, write_config

# 2 KiB chunks flushed every 10 ms: both workers append to the same files all the time.
BUSY_BUFFER = {"flush_interval": "10ms", "chunk_limit": "2KiB"}


def workers_config(tmp_path: Path, pki: Path, workers: int = 2,
                   buffer: dict[str, Any] | None = None, **sections: Any) -> Path:
    raw = config_raw(tmp_path, pki, buffer=buffer or BUSY_BUFFER, **sections)
    raw["server"]["workers"] = workers
    return write_config(tmp_path / f"config-{workers}.toml", raw)


def start(config: Path) -> tuple[ServerProcess, dict[int, int]]:
    server = ServerProcess(config)
    return server, worker_pids(server)


def worker_pids(server: ServerProcess, start: int = 0) -> dict[int, int]:
    """index -> pid of the newest start of each worker, from the supervisor's log."""
    pids = {}
    for line in server.lines[start:]:
        if " worker_started " in line:
            fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
            pids[int(fields["index"])] = int(fields["pid"])
    return pids


def port(server: ServerProcess) -> int:
    return int(server.addresses["http"].rpartition(":")[2])


def stored_ids(root: Path) -> Counter[str]:
    files = sorted(root.rglob("*.log.gz"))
    subprocess.run(["gzip", "-t", *map(str, files)], check=True)  # every member whole
    return Counter(record["id"] for records in read_tree(root).values() for record in records)


def writers_per_file(buffer: Path, root: Path) -> list[set[int]]:
    """Which workers appended to each hourly file, from the append ledger's states."""
    ledger, found = Ledger(buffer / "ledger"), []
    for state in ledger.directory.rglob("*" + SUFFIX):
        relpath = str(state.relative_to(ledger.directory)).removesuffix(SUFFIX)
        with ledger.hold(str(root), relpath, create=False) as held:
            assert held is not None
            found.append(set(held.state.committed))
    return found


def acked_records(server: ServerProcess, pki: Path, more_than: int,
                  requests_per_connection: int) -> set[str]:
    """Run the load client until over `more_than` records are acked; what was acked."""
    load = Load(client_context(pki), requests_per_connection=requests_per_connection)
    try:
        load.serve(port(server))
        load.wait_for_acks(more_than)
        load.serve(None)
    finally:
        load.stop()
    return load.acked


def kill_all(server: ServerProcess, pids: dict[int, int]) -> None:
    """SIGKILL every worker and the supervisor: a crash of the whole group."""
    for pid in [*pids.values(), server.process.pid]:
        os.kill(pid, signal.SIGKILL)
    server.wait()


def run_cli(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mwdlogd", "run", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)


def drain(server: ServerProcess) -> None:
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert sum(" shutdown_complete " in line for line in server.lines) == 2


def assert_exactly_once(root: Path, acked: set[str]) -> None:
    stored = stored_ids(root)
    assert [i for i, n in stored.items() if n > 1] == []
    assert sorted(acked - set(stored)) == []


def test_two_workers_share_ports_and_files(tmp_path: Path, pki: Path) -> None:
    server, pids = start(workers_config(tmp_path, pki))
    assert sorted(pids) == [0, 1] and len(set(pids.values())) == 2
    assert "workers=2" in server.wait_for(r" listening ")
    load = Load(client_context(pki), requests_per_connection=3)
    try:
        load.serve(port(server))
        load.wait_for_acks(60 * BATCH)
    finally:
        load.stop()
    drain(server)
    assert_exactly_once(tmp_path / "logs", load.acked)
    assert {0, 1} in writers_per_file(tmp_path / "buffer", tmp_path / "logs")  # both workers
    assert (tmp_path / "buffer" / "worker-1" / "journal").is_dir()


def test_a_killed_worker_is_restarted_and_loses_nothing(tmp_path: Path, pki: Path) -> None:
    server, pids = start(workers_config(tmp_path, pki))
    chaos = random.Random("one-worker")
    load = Load(client_context(pki), requests_per_connection=3)
    try:
        load.serve(port(server))
        for kill in range(4):
            load.wait_for_acks(len(load.acked) + 5 * BATCH)
            threading.Event().wait(chaos.uniform(0.0, 0.3))  # chaos, not a wait
            victim = kill % 2
            seen = len(server.lines)
            os.kill(pids[victim], signal.SIGKILL)
            server.wait_for(rf" worker_died index={victim} exit_code=-9 ", start=seen)
            server.wait_for(rf" worker_listening .* worker={victim}$", start=seen)
            pids = {**pids, **worker_pids(server, seen)}
        load.wait_for_acks(len(load.acked) + 5 * BATCH)
    finally:
        load.stop()
    drain(server)
    assert_exactly_once(tmp_path / "logs", load.acked)
    assert any("records_replayed=0" not in line
               for line in server.lines if " recovered " in line)


def test_the_whole_group_killed_at_once_recovers_exactly_once(tmp_path: Path,
                                                             pki: Path) -> None:
    config = workers_config(tmp_path, pki)
    chaos = random.Random("group")
    load = Load(client_context(pki), requests_per_connection=3)
    try:
        for _ in range(4):
            server, pids = start(config)
            load.serve(port(server))
            load.wait_for_acks(len(load.acked) + 5 * BATCH)
            threading.Event().wait(chaos.uniform(0.0, 0.3))  # chaos, not a wait
            kill_all(server, pids)
            load.serve(None)
        final, _ = start(config)
        load.serve(port(final))
        load.wait_for_acks(len(load.acked) + 5 * BATCH)
    finally:
        load.stop()
    drain(final)
    assert_exactly_once(tmp_path / "logs", load.acked)


def test_fewer_workers_than_journals_is_refused_until_they_are_written(tmp_path: Path,
                                                                        pki: Path) -> None:
    two = workers_config(tmp_path, pki, buffer={"flush_interval": "1h"})
    server, pids = start(two)
    acked = acked_records(server, pki, 40 * BATCH, requests_per_connection=1)
    kill_all(server, pids)
    refused = run_cli(workers_config(tmp_path, pki, workers=1, buffer={"flush_interval": "1h"}))
    assert refused.returncode == 2
    assert (f"server.workers: {tmp_path}/buffer/worker-1 holds the unwritten journal of a "
            "worker beyond server.workers=1; start once with server.workers=2") in refused.stderr
    again, _ = start(two)
    drain(again)
    assert_exactly_once(tmp_path / "logs", acked)


def test_a_worker_that_cannot_start_stops_the_supervisor(tmp_path: Path, pki: Path) -> None:
    (tmp_path / "logs").write_text("a file where the storage root should be")
    result = run_cli(workers_config(tmp_path, pki))
    assert result.returncode == 1
    assert "worker_failed_to_start" in result.stderr
    # whichever worker fails first says why; the other may be stopped before it does
    assert re.search(rf"worker [01]: open storage.root {tmp_path}/logs: cannot create",
                     result.stderr), result.stderr


def test_a_port_in_use_is_named(tmp_path: Path, pki: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port_in_use = taken.getsockname()[1]
        result = run_cli(workers_config(tmp_path, pki, forward={"port": port_in_use}))
    assert result.returncode == 2
    assert (f"forward.port: cannot listen on 127.0.0.1:{port_in_use}: Address already in use"
            in result.stderr)
    assert "worker_started" not in result.stderr


def test_workers_drain_when_the_supervisor_is_killed(tmp_path: Path, pki: Path) -> None:
    server, pids = start(workers_config(tmp_path, pki, buffer={"flush_interval": "1h"}))
    acked = acked_records(server, pki, 20 * BATCH, requests_per_connection=2)
    server.signal(signal.SIGKILL)
    for index in pids:
        server.wait_for(rf" shutdown_complete .* worker={index}$")
    assert_exactly_once(tmp_path / "logs", acked)
    assert gzip.decompress(next((tmp_path / "logs").rglob("*.log.gz")).read_bytes())


def only(pids: dict[int, int], serving: int | None) -> None:
    """Pause every worker but `serving` (SIGSTOP: it accepts nothing), resume that one;
    None resumes all. Returns once the kernel shows the paused ones stopped."""
    for index, pid in pids.items():
        if index == serving or serving is None:
            os.kill(pid, signal.SIGCONT)
            continue
        os.kill(pid, signal.SIGSTOP)
        while Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "T":
            os.sched_yield()


async def test_an_http_resend_to_the_other_worker_is_not_stored_twice(tmp_path: Path,
                                                                     pki: Path) -> None:
    server, pids = start(workers_config(tmp_path, pki))
    body = ndjson(engine_records(4, time=1732500000.5))
    replies = []
    try:
        for serving in (0, 1):  # the first copy to worker 0, the resend to worker 1
            only(pids, serving)
            replies.append(await post(server.addresses["http"], client_context(pki),
                                      "/nginx.access", body))
        only(pids, None)
    finally:
        drain(server)
    assert [r.json() for r in replies] == [{"records": 4}, {"records": 4, "duplicate": True}]
    assert ids_by_file(tmp_path / "logs") == {
        "acme/nginx/www.acme.test/2024/11/25/02.log.gz": ["r0", "r1", "r2", "r3"]}


async def test_a_forward_resend_to_the_other_worker_is_not_stored_twice(tmp_path: Path,
                                                                       pki: Path) -> None:
    server, pids = start(workers_config(tmp_path, pki))
    message = packed("nginx.access", engine_records(4), chunk="chunk-A==\n")
    try:
        for serving in (0, 1):  # the first copy to worker 0, the resend to worker 1
            only(pids, serving)
            reply = await send_one(server.addresses["forward"], client_context(pki), message)
            assert reply == {"ack": "chunk-A==\n"}
        only(pids, None)
        worker_1_metrics = server.addresses["worker_metrics"].split(",")[1]
        _, body = await http_get(worker_1_metrics, "/metrics")
        assert b"mwdlogd_forward_duplicate_chunks_total 1.0" in body
    finally:
        drain(server)
    assert ids_by_file(tmp_path / "logs") == {
        "acme/nginx/www.acme.test/2024/11/25/02.log.gz": ["r0", "r1", "r2", "r3"]}


async def test_connections_that_arrive_together_are_spread_over_the_workers(
        tmp_path: Path, pki: Path) -> None:
    server, _ = start(workers_config(tmp_path, pki))
    clients = []
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(connect_forward, server.addresses["forward"], pki, clients)
        for metrics in server.addresses["worker_metrics"].split(","):
            _, body = await http_get(metrics, "/metrics")
            assert b'mwdlogd_connections_total{protocol="forward"} 2.0' in body
    finally:
        for client in clients:
            await client.aclose()
        drain(server)


async def connect_forward(address: str, pki: Path, clients: list[RawForward]) -> None:
    client = await RawForward.connect(address, client_context(pki))
    await client.send(packed("nginx.access", engine_records(1)))  # the TLS handshake is done
    clients.append(client)


async def test_tail_follows_every_worker(tmp_path: Path, pki: Path) -> None:
    monitor = free_port(count=2)
    config = workers_config(tmp_path, pki, monitor={"port": monitor})
    server, pids = start(config)
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_tail_cli, config, 4)
                for index in (0, 1):
                    await trio.to_thread.run_sync(
                        server.wait_for, rf" tail_viewer_connected .* worker={index}$")
                for serving, first_id in ((0, 0), (1, 2)):  # r0, r1 to worker 0; r2, r3 to 1
                    only(pids, serving)
                    message = packed("nginx.access", engine_records(2, start=first_id),
                                     chunk=f"c{first_id}")
                    reply = await send_one(server.addresses["forward"], client_context(pki),
                                           message)
                    assert reply == {"ack": f"c{first_id}"}
                only(pids, None)
    finally:
        drain(server)


async def run_tail_cli(config: Path, count: int) -> None:
    result = await trio.run_process(
        [sys.executable, "-m", "mwdlogd", "tail", "--config", str(config), "--count", str(count)],
        capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr
    ids = sorted(json.loads(line)["id"] for line in result.stdout.decode().splitlines())
    assert ids == ["r0", "r1", "r2", "r3"]


@needs_node
def test_real_clients_against_two_workers(tmp_path: Path, pki: Path) -> None:
    """npm @fluent-org/logger (PackedForward, TLS, shared key, acks), two processes at once
    against each worker, and curl over HTTPS against both: every record stored once."""
    server, pids = start(workers_config(tmp_path, pki, forward={"shared_key": KEY}))
    host, _, forward_port = server.addresses["forward"].rpartition(":")
    try:
        options = [{"host": host, "port": int(forward_port), "ca": str(pki / "ca.crt"),
                    "cert": str(pki / "engine-01.crt"), "key": str(pki / "engine-01.key"),
                    "sharedKey": KEY, "mode": "PackedForward", "tag": "nginx.access",
                    "count": 50, "start": 50 * n, "ack": True, "flushInterval": 20}
                   for n in range(4)]
        for serving in (0, 1):
            only(pids, serving)
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                for result in pool.map(node_send, options[2 * serving:2 * serving + 2]):
                    assert result.returncode == 0, result.stderr
        only(pids, None)
        for n in range(4):
            curl_post(server.addresses["http"], pki, engine_records(5, start=100 + 5 * n))
        connections = [metric_value(address, 'mwdlogd_connections_total{protocol="forward"}')
                       for address in server.addresses["worker_metrics"].split(",")]
    finally:
        drain(server)
    ids = [record["id"] for records in read_tree(tmp_path / "logs").values()
           for record in records]
    assert sorted(ids) == sorted([f"node-{n}" for n in range(200)] +
                                 [f"r{n}" for n in range(100, 120)])
    assert connections == [2.0, 2.0]


def curl_post(address: str, pki: Path, records: list[dict[str, Any]]) -> None:
    result = subprocess.run(
        ["curl", "-sS", "--fail-with-body", "--cacert", str(pki / "ca.crt"),
         "--cert", str(pki / "engine-01.crt"), "--key", str(pki / "engine-01.key"),
         "-H", f"Authorization: Bearer {TOKEN}", "-H", "Content-Type: application/x-ndjson",
         "--data-binary", "@-", f"https://localhost:{address.rpartition(':')[2]}/nginx.access"],
        input=ndjson(records), capture_output=True, timeout=30)
    assert result.returncode == 0 and json.loads(result.stdout) == {"records": len(records)}, \
        result.stderr


def metric_value(address: str, name: str) -> float:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    raise AssertionError(f"{name} not exposed at {address}")

"""Scale out: three `mwdlogd run` processes, each with its own config and storage, behind a
real HAProxy running deploy/haproxy/haproxy.cfg (addresses and ports rewritten for this
machine), for HTTPS and forward. Senders, each from its own loopback address like Engines
on different machines, post through HAProxy and retry a batch until it is acked (HTTPS:
the same body on a new connection, as out_http does; forward: the same chunk id, as
out_forward does). One instance is killed with SIGKILL mid-load and started again later
on its own storage.

What holds, and is asserted: every acked record is stored, no instance stores a record
twice, and a record is stored by two instances only if its batch was resent after an
attempt that got no answer. The wire cannot tell those apart: an instance that fsynced
a batch and died before its answer was sent still writes that batch at its restart, and
the instance that gets the resend has never seen it (a request's digest and a forward
chunk id are remembered only by the instance that stored them). Batches acked at their
first attempt are stored exactly once, in one instance's tree. While the instances are
up, resends are recognised too: HAProxy's `balance source` sends an Engine's new
connections to the same instance, the one that remembers the request or chunk.
"""

from __future__ import annotations

import csv
import io
import shutil
import signal
import ssl
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from conftest import config_raw
from forward_client import RawForward, packed
from helpers import Connection, Reply, client_context, free_port, ids_by_file, ndjson
from server_process import ServerProcess, write_config

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "deploy" / "haproxy" / "haproxy.cfg"
BATCH = 20
ATTEMPT_TIMEOUT_S = 15.0
DEADLINE_S = 60.0
# Senders' addresses, as if Engines on twelve machines: `balance source` maps them
# (deterministically, by HAProxy's consistent hash of the address) onto all three instances.
HTTPS_SOURCES = [f"127.0.0.{n}" for n in range(21, 27)]
FORWARD_SOURCES = [f"127.0.0.{n}" for n in range(11, 17)]
# What a sender sees when an instance dies under it (or HAProxy gives up on one).
BROKEN = (OSError, EOFError, trio.BrokenResourceError, trio.TooSlowError)

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None,
                                reason="haproxy is not installed (tools/test.sh installs it)")


class Instance:
    """One mwdlogd on fixed free ports (so HAProxy finds it again after a restart)."""

    def __init__(self, directory: Path, pki: Path, index: int) -> None:
        directory.mkdir()
        self.name = f"node{index}"
        self.https, self.forward, self.health = free_port(), free_port(), free_port()
        self.root = directory / "logs"
        raw = config_raw(directory, pki, server={"hostname": self.name,
                                                 "shutdown_timeout": "20s"},
                         http={"port": self.https}, forward={"port": self.forward},
                         health={"port": self.health})
        self.config = write_config(directory / "config.toml", raw)
        self.process: ServerProcess | None = None

    async def start(self) -> None:
        self.process = await trio.to_thread.run_sync(ServerProcess, self.config)

    async def kill(self) -> None:
        assert self.process is not None
        self.process.signal(signal.SIGKILL)
        await trio.to_thread.run_sync(self.process.wait)

    async def drain(self) -> None:
        """SIGTERM: everything acked goes to its file; exit 0."""
        assert self.process is not None
        self.process.signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(self.process.wait) == 0, self.process.lines

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def haproxy_config(*, https: int, forward: int, socket: Path,
                   instances: list[Instance]) -> str:
    """The shipped configuration for loopback ports, with faster health checks."""
    text = TEMPLATE.read_text()
    replacements = {"bind :8888": f"bind 127.0.0.1:{https}",
                    "bind :24224": f"bind 127.0.0.1:{forward}",
                    "/run/haproxy/admin.sock": str(socket), "inter 2s": "inter 200ms"}
    for n, instance in enumerate(instances, 1):
        replacements[f"10.0.0.1{n}:8888 check port 8889"] = \
            f"127.0.0.1:{instance.https} check port {instance.health}"
        replacements[f"10.0.0.1{n}:24224 check port 8889"] = \
            f"127.0.0.1:{instance.forward} check port {instance.health}"
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


class HAProxy:
    def __init__(self, directory: Path, instances: list[Instance]) -> None:
        self.https, self.forward = free_port(), free_port()
        self.socket = directory / "haproxy.sock"
        self.config = directory / "haproxy.cfg"
        self.config.write_text(haproxy_config(https=self.https, forward=self.forward,
                                              socket=self.socket, instances=instances))
        check = subprocess.run(["haproxy", "-c", "-f", str(self.config)],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.log = directory / "haproxy.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(["haproxy", "-db", "-f", str(self.config)],
                                            stdout=log, stderr=subprocess.STDOUT)

    async def states(self) -> dict[tuple[str, str], str]:
        """(backend, server) -> UP / DOWN / ..., from the stats socket's `show stat`."""
        stream = await trio.open_unix_socket(str(self.socket))
        async with stream:
            await stream.send_all(b"show stat\n")
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        return {(row["pxname"], row["svname"]): row["status"] for row in rows
                if row["svname"] not in ("FRONTEND", "BACKEND")}

    async def wait_state(self, server: str, status: str) -> None:
        """Until both backends see `server` (mwdlogdN) with `status`."""
        with trio.fail_after(DEADLINE_S):
            while True:
                assert self.process.poll() is None, self.log.read_text()
                try:
                    states = await self.states()
                except OSError:  # the socket is not there yet
                    states = {}
                found = {v for (_, s), v in states.items() if s == server}
                if found == {status} and len(states) == 6:
                    return
                await trio.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


async def open_tls(port: int, context: ssl.SSLContext,
                   source: str) -> trio.SSLStream[trio.SocketStream]:
    """A TLS connection through HAProxy from the loopback address `source`, so that senders
    look like Engines on different machines to `balance source`."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
    stream = trio.SSLStream(tcp, context, server_hostname="127.0.0.1", https_compatible=True)
    await stream.do_handshake()
    return stream


async def post_from(port: int, context: ssl.SSLContext, source: str, body: bytes) -> Reply:
    """One request on a new connection, as out_http sends it."""
    connection = Connection(await open_tls(port, context, source))
    try:
        return await connection.post("/nginx.access", body)
    finally:
        await connection.aclose()


async def connect_forward(port: int, context: ssl.SSLContext, source: str) -> RawForward:
    return RawForward(await open_tls(port, context, source))


def engine_batch(name: str, batch: int) -> list[dict[str, Any]]:
    return [{"id": f"{name}-{batch}-{n}", "customer_name": "acme", "fqdn": "www.acme.test",
             "log_type": "nginx", "status": 200} for n in range(BATCH)]


@attrs.define
class Senders:
    """HTTPS and forward senders through HAProxy that retry each batch until acked."""

    context: ssl.SSLContext
    proxy: HAProxy
    acked: set[str] = attrs.field(factory=set)
    resent: set[str] = attrs.field(factory=set)  # ids of batches sent again after no answer
    failures: Counter[str] = attrs.field(factory=Counter)
    batches: int = 0
    stopping: bool = False
    _progress: trio.Event = attrs.field(factory=trio.Event)

    async def wait_batches(self, count: int) -> None:
        """Until `count` more batches are acked."""
        target = self.batches + count
        with trio.fail_after(DEADLINE_S):
            while self.batches < target:
                await self._progress.wait()

    def _acked(self, ids: list[str]) -> None:
        self.acked.update(ids)
        self.batches += 1
        self._progress.set()
        self._progress = trio.Event()

    def _failed(self, ids: list[str], exc: BaseException) -> None:
        self.failures[type(exc).__name__] += 1
        self.resent.update(ids)

    async def https(self, name: str, source: str) -> None:
        """A new connection per request from `source`, as Fluentd's out_http sends."""
        for batch in range(10**9):
            if self.stopping:
                return
            records = engine_batch(name, batch)
            ids = [r["id"] for r in records]
            body = ndjson(records)
            while True:
                try:
                    with trio.fail_after(ATTEMPT_TIMEOUT_S):
                        reply = await post_from(self.proxy.https, self.context, source, body)
                except BROKEN as exc:
                    self._failed(ids, exc)
                    continue
                if reply.status == 200:
                    break
                assert reply.status == 503, reply  # shutting down: nothing kept, retry
            self._acked(ids)

    async def forward(self, name: str, source: str) -> None:
        """One long-lived connection from `source`, PackedForward with chunk ids; a broken
        connection is opened again and the chunk resent with the same id, as out_forward
        does."""
        connection: RawForward | None = None
        try:
            for batch in range(10**9):
                if self.stopping:
                    return
                records = engine_batch(name, batch)
                ids = [r["id"] for r in records]
                chunk = f"{name}-chunk-{batch}"
                message = packed("nginx.access", records, chunk=chunk)
                while True:
                    try:
                        with trio.fail_after(ATTEMPT_TIMEOUT_S):
                            if connection is None:
                                connection = await connect_forward(
                                    self.proxy.forward, self.context, source)
                            await connection.send(message)
                            answer = await connection.receive()
                    except BROKEN as exc:
                        self._failed(ids, exc)
                        if connection is not None:
                            await connection.aclose()
                        connection = None
                        continue
                    assert answer == {"ack": chunk}, answer
                    break
                self._acked(ids)
        finally:
            if connection is not None:
                await connection.aclose()


@pytest.fixture
def instances(tmp_path: Path, pki: Path) -> Iterator[list[Instance]]:
    started = [Instance(tmp_path / f"node{i}", pki, i) for i in range(3)]
    try:
        yield started
    finally:
        for instance in started:
            instance.stop()


@pytest.fixture
async def proxy(tmp_path: Path, instances: list[Instance]) -> AsyncIterator[HAProxy]:
    for instance in instances:
        await instance.start()
    haproxy = HAProxy(tmp_path, instances)
    try:
        for n in range(1, 4):
            await haproxy.wait_state(f"mwdlogd{n}", "UP")
        yield haproxy
    finally:
        haproxy.stop()


def test_template_is_valid_haproxy_config(tmp_path: Path) -> None:
    config = tmp_path / "haproxy.cfg"
    config.write_text(TEMPLATE.read_text().replace("/run/haproxy/admin.sock",
                                                   str(tmp_path / "admin.sock")))
    check = subprocess.run(["haproxy", "-c", "-f", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


async def test_spread_over_three_and_one_killed_mid_load(
        proxy: HAProxy, instances: list[Instance], pki: Path) -> None:
    senders = Senders(client_context(pki), proxy)
    async with trio.open_nursery() as nursery:
        for n, source in enumerate(HTTPS_SOURCES):
            nursery.start_soon(senders.https, f"h{n}", source)
        for n, source in enumerate(FORWARD_SOURCES):
            nursery.start_soon(senders.forward, f"f{n}", source)
        await senders.wait_batches(60)
        await instances[1].kill()  # SIGKILL mid-load: journal kept, nothing drained
        await senders.wait_batches(60)  # the others take the load: senders fail over
        await proxy.wait_state("mwdlogd2", "DOWN")
        await instances[1].start()  # the same storage: its journal is recovered
        await proxy.wait_state("mwdlogd2", "UP")
        await senders.wait_batches(60)
        senders.stopping = True
    for instance in instances:
        await instance.drain()

    stored = {instance.name: Counter(i for ids in ids_by_file(instance.root).values()
                                     for i in ids) for instance in instances}
    assert sum(senders.failures.values()) > 0  # the kill really hit the senders
    for name, counts in stored.items():
        # Traffic spreads: every instance got both protocols.
        assert {i.split("-")[0][0] for i in counts} == {"h", "f"}, name
        assert [i for i, n in counts.items() if n > 1] == [], f"{name} stored ids twice"
    everywhere = Counter(i for counts in stored.values() for i in counts)
    assert set(everywhere) == senders.acked, (
        f"missing {sorted(senders.acked - set(everywhere))[:10]}, "
        f"never acked {sorted(set(everywhere) - senders.acked)[:10]}")
    doubled = {i for i, n in everywhere.items() if n > 1}
    assert doubled <= senders.resent, sorted(doubled - senders.resent)[:10]
    # `balance source` with consistent hashing: only the killed instance's senders moved
    # (redispatched anywhere until HAProxy marked it down, then to one other instance, and
    # back once it was up again); every other sender's records are on one instance.
    for sender in [f"h{n}" for n in range(len(HTTPS_SOURCES))] + \
            [f"f{n}" for n in range(len(FORWARD_SOURCES))]:
        holders = {name for name, counts in stored.items()
                   if any(i.startswith(f"{sender}-") for i in counts)}
        assert len(holders) == 1 or "node1" in holders, (sender, holders)
    print(f"acked {len(senders.acked)} records; failed attempts {dict(senders.failures)}; "
          f"resent {len(senders.resent)}; stored on two instances {len(doubled)}; per "
          f"instance { {name: sum(c.values()) for name, c in stored.items()} }")


async def test_a_resend_on_a_new_connection_is_stored_once(
        proxy: HAProxy, instances: list[Instance], pki: Path) -> None:
    """Engines resend a chunk whose answer was late or lost on a new connection (out_http
    always, out_forward by default). With `balance source` it reaches the same instance,
    which recognises it (the request's digest; the chunk id) and answers without storing it
    again. With `balance roundrobin` or `leastconn` the resends land on other instances,
    which cannot know them: this test then finds records stored three times."""
    context = client_context(pki)
    expected: list[str] = []
    for n, source in enumerate(HTTPS_SOURCES):
        records = engine_batch(f"rh{n}", 0)
        replies = [await post_from(proxy.https, context, source, ndjson(records))
                   for _ in range(3)]
        assert [r.status for r in replies] == [200] * 3, replies
        expected += [r["id"] for r in records]
    for n, source in enumerate(FORWARD_SOURCES):
        records = engine_batch(f"rf{n}", 0)
        chunk = f"resend-{n}"
        message = packed("nginx.access", records, chunk=chunk)
        for _ in range(3):
            connection = await connect_forward(proxy.forward, context, source)
            try:
                await connection.send(message)
                assert await connection.receive() == {"ack": chunk}
            finally:
                await connection.aclose()
        expected += [r["id"] for r in records]
    for instance in instances:
        await instance.drain()
    stored = Counter(i for instance in instances
                     for ids in ids_by_file(instance.root).values() for i in ids)
    assert stored == Counter(expected)

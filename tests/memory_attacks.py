"""Memory attacks on a running server, and a good client posting alongside.

Shared by tests/test_attacks_memory.py and tools/attacks.py. Each attack is bounded in
size and time and talks to loopback only; it returns what the attacker saw. Peak memory
is the server process's VmHWM from /proc; the good client's latencies say whether one
client's input stalled the others.
"""

from __future__ import annotations

import gzip
import json
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import msgpack
import trio

from helpers import Connection, client_context, post, split_address

GOOD_INTERVAL_S = 0.02
GOOD_AFTER = 10  # good requests made after the attack ends, so its aftermath counts too
ATTACK_TIMEOUT_S = 60.0
HOUR_2024 = 1732500000.5
MIB = 1024**2


@attrs.frozen
class Target:
    http: str
    forward: str
    pki: Path
    pid: int

    def context(self) -> ssl.SSLContext:
        return client_context(self.pki)


@attrs.frozen
class Outcome:
    attack: str
    seen: str  # what the attacker saw (status codes, or how the connection ended)
    peak_rss: int
    good_requests: int
    good_failures: int
    good_p99_s: float
    good_max_s: float

    def summary(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "peak_rss_mib": round(self.peak_rss / MIB, 1)}


def vm_hwm(pid: int) -> int:
    """Peak resident memory of a process, bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    assert match, status
    return int(match.group(1)) * 1024


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[int(0.99 * (len(ordered) - 1))] if ordered else 0.0


class GoodClient:
    """Posts 10 small records per request on one keep-alive connection, each request
    after the previous answer and GOOD_INTERVAL_S, and times every answer."""

    def __init__(self, target: Target, prefix: str) -> None:
        self._target = target
        self._prefix = prefix
        self.latencies: list[float] = []
        self.failures = 0
        self.stored_ids: list[str] = []
        self.started = trio.Event()
        self._stop_after: int | None = None
        self.stopped = trio.Event()

    def stop_soon(self) -> None:
        self._stop_after = len(self.latencies) + GOOD_AFTER

    async def run(self) -> None:
        connection = await Connection.open(self._target.http, self._target.context())
        try:
            while self._stop_after is None or len(self.latencies) < self._stop_after:
                n = len(self.latencies)
                ids = [f"{self._prefix}{n}-{i}" for i in range(10)]
                body = b"".join(json.dumps(good_record(i)).encode() + b"\n" for i in ids)
                started = time.monotonic()
                reply = await connection.post("/nginx.access", body)
                self.latencies.append(time.monotonic() - started)
                if reply.status == 200:
                    self.stored_ids += ids
                else:
                    self.failures += 1
                self.started.set()
                await trio.sleep(GOOD_INTERVAL_S)  # pacing of a steady client, not a wait
        finally:
            await connection.aclose()
            self.stopped.set()


def good_record(ident: str) -> dict[str, Any]:
    return {"id": ident, "customer_name": "acme", "fqdn": "www.acme.test",
            "log_type": "nginx", "status": 200, "time": HOUR_2024}


Attack = Callable[[Target], Awaitable[str]]


async def run_attack(name: str, attack: Attack, target: Target) -> tuple[Outcome, list[str]]:
    """The attack with a good client posting before, during and after it; returns the
    outcome and the ids the good client had acknowledged."""
    good = GoodClient(target, prefix=f"good-{name}-")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(good.run)
        await good.started.wait()
        with trio.fail_after(ATTACK_TIMEOUT_S):
            seen = await attack(target)
        good.stop_soon()
        await good.stopped.wait()
    outcome = Outcome(name, seen, vm_hwm(target.pid), len(good.latencies), good.failures,
                      p99(good.latencies), max(good.latencies))
    return outcome, good.stored_ids


# --- HTTPS ----------------------------------------------------------------------------

async def _post_statuses(target: Target, body: bytes, *, times: int, content_type: str,
                         gzip_body: bool = True) -> str:
    headers = {"Content-Encoding": "gzip"} if gzip_body else {}
    statuses = []
    for _ in range(times):
        try:
            reply = await post(target.http, target.context(), "/nginx.access", body,
                               content_type=content_type, headers=headers)
            statuses.append(f"{reply.status} {reply.json().get('error', '')}".strip())
        except (EOFError, trio.BrokenResourceError) as exc:
            statuses.append(f"closed ({type(exc).__name__})")
    return ", ".join(sorted(set(statuses)))


def gzip_of_empty_objects(count: int, *, array: bool = False) -> bytes:
    raw = (b"[" + b"{}," * (count - 1) + b"{}]") if array else b"{}\n" * count
    return gzip.compress(raw, 9)


async def http_gzip_empty_objects(target: Target) -> str:
    """3.9 KB of gzip, 1.33 M empty ndjson objects (was +1.33 GB, loop stalled 6.7 s)."""
    return await _post_statuses(target, gzip_of_empty_objects(1_330_000), times=3,
                                content_type="application/x-ndjson")


async def http_json_array_empty_objects(target: Target) -> str:
    """A JSON array of 3.3 M `{}` (10 MB inflated, decoded whole by the JSON parser)."""
    return await _post_statuses(target, gzip_of_empty_objects(3_300_000, array=True),
                                times=3, content_type="application/json")


async def http_msgpack_empty_maps(target: Target) -> str:
    """A msgpack array of 10 M empty maps (10 MB inflated)."""
    body = gzip.compress(b"\xdd" + (10_000_000).to_bytes(4, "big") + b"\x80" * 10_000_000, 9)
    return await _post_statuses(target, body, times=3, content_type="application/msgpack")


FQDNS = 5000


async def http_many_fqdns(target: Target) -> str:
    """One request, a record for each of 5,000 sites (a compressor each, held until the
    hour ended, was +635 MB)."""
    records = [{"id": f"fqdn-{n}", "customer_name": "acme", "fqdn": f"site-{n}.acme.test",
                "log_type": "nginx", "time": HOUR_2024} for n in range(FQDNS)]
    body = b"".join(json.dumps(r).encode() + b"\n" for r in records)
    return await _post_statuses(target, body, times=1, content_type="application/x-ndjson",
                                gzip_body=False)


# --- forward --------------------------------------------------------------------------

async def _forward_stream(target: Target, tls: bool) -> trio.abc.Stream:
    host, port = split_address(target.forward)
    if tls:
        return await trio.open_ssl_over_tcp_stream(host, port, ssl_context=target.context())
    return await trio.open_tcp_stream(host, port)


async def _until_closed(stream: trio.abc.Stream, timeout_s: float) -> str:
    """How the server ended the connection: 'closed', or 'open' after `timeout_s`."""
    with trio.move_on_after(timeout_s):
        try:
            while data := await stream.receive_some(65536):
                if b"ack" in data:
                    return "acked"
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        return "closed"
    return "open"


def compressed_bomb(entries: int) -> bytes:
    """A CompressedPackedForward message whose gzip holds `entries` of `[0, {}]`."""
    blob = gzip.compress(b"\x92\x00\x80" * entries, 9)
    option = msgpack.packb({"compressed": "gzip", "chunk": "bomb"})
    return (b"\x93" + msgpack.packb("nginx.access") + b"\xc6" + len(blob).to_bytes(4, "big")
            + blob + option)


async def forward_compressed_bomb(target: Target, *, tls: bool = True) -> str:
    """12 KB CompressedPackedForward -> 4 M entries (was 4.64 GB)."""
    stream = await _forward_stream(target, tls)
    try:
        await stream.send_all(compressed_bomb(4_000_000))
        return await _until_closed(stream, 30)
    finally:
        await trio.aclose_forcefully(stream)


def unfinished_message(size: int) -> bytes:
    """`[tag, [{}, {}, ...` that never ends: a Forward-mode array of empty maps."""
    return b"\x92" + msgpack.packb("nginx.access") + b"\xdd" + (2**32 - 1).to_bytes(4, "big") \
        + b"\x80" * size


async def _hold_unfinished(target: Target, size: int, tls: bool, holding: trio.Semaphore,
                           release: trio.Event, results: list[str]) -> None:
    stream = await _forward_stream(target, tls)
    try:
        with trio.move_on_after(10) as scope:
            await stream.send_all(unfinished_message(size))
        results.append("blocked" if scope.cancelled_caught else "sent")
        holding.release()
        await release.wait()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        results.append("closed")
        holding.release()
    finally:
        await trio.aclose_forcefully(stream)


async def forward_unfinished(target: Target, *, connections: int = 1, size: int = 8 * MIB,
                             tls: bool = True, hold_s: float = 2.0) -> str:
    """Connections each holding an unfinished message of empty maps (one: 67x its size,
    8 MB -> +535 MB; 100 of them: +791 MB), kept open `hold_s` after sending."""
    holding, release, results = trio.Semaphore(0, max_value=connections), trio.Event(), []
    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(_hold_unfinished, target, size, tls, holding, release, results)
        for _ in range(connections):
            await holding.acquire()
        await trio.sleep(hold_s)  # the attack is holding memory for a while: that is the attack
        release.set()
    counts = {r: results.count(r) for r in sorted(set(results))}
    return ", ".join(f"{count} {result}" for result, count in counts.items())


ATTACKS: dict[str, Attack] = {
    "http_gzip_empty_objects": http_gzip_empty_objects,
    "http_json_array_empty_objects": http_json_array_empty_objects,
    "http_msgpack_empty_maps": http_msgpack_empty_maps,
    "http_many_fqdns": http_many_fqdns,
    "forward_compressed_bomb": forward_compressed_bomb,
    "forward_unfinished_8mb": forward_unfinished,
}

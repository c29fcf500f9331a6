"""`mwdlogd replay` / tools/replay.py: send generated or archived Engine traffic to a log
server (this one or any other speaking the same protocol), at a chosen rate, and verify
what landed.

Sources: generated nginx access records and open-appsec detections over C customers x F
sites (seeded, reproducible), or existing `.log.gz` trees and JSON-lines files. Targets:
HTTPS as Fluentd's out_http sends it (ndjson, optional gzip, bearer token, mTLS) or the
forward protocol as out_forward sends it (mode, TLS or TCP, shared key, acks). Every
record gets a `replay_id` (`<run>-<n>`), so `--verify ROOT` can report missing and
duplicated records exactly.
"""

import argparse
import gzip
import hashlib
import itertools
import json
import math
import os
import random
import ssl
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import attrs
import msgpack
import trio

Record = dict[str, Any]
PROGRESS_EVERY_S = 1.0
RETRY_503_S = 1.0
MAX_ATTEMPTS = 5

USER_AGENTS = ["Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0", "curl/8.5.0",
               "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) Safari/604.1"]
ATTACKS = [("SQL Injection", "high"), ("Cross Site Scripting", "medium"),
           ("Path Traversal", "high"), ("Remote Code Execution", "critical"),
           ("Bot Protection", "low")]


def generate(seed: int, *, customers: int, fqdns: int, appsec_share: float,
             now: float | None = None) -> Iterator[Record]:
    """Endless, reproducible Engine traffic: nginx access logs and open-appsec detections."""
    rng = random.Random(seed)
    start = time.time() if now is None else now
    for n in itertools.count():
        customer = f"customer-{rng.randrange(customers):03d}"
        fqdn = f"site-{rng.randrange(fqdns)}.{customer}.example"
        common = {"customer_name": customer, "fqdn": fqdn, "time": round(start + n / 1e4, 3),
                  "remote_addr": f"198.51.{rng.randrange(256)}.{rng.randrange(256)}"}
        if rng.random() < appsec_share:
            attack, severity = rng.choice(ATTACKS)
            yield {**common, "log_type": "openappsec", "eventName": attack,
                   "severity": severity, "securityAction": rng.choice(["Prevent", "Detect"]),
                   "httpUriPath": f"/login?user={rng.randrange(10**6)}",
                   "matchedParameter": "user", "assetName": fqdn}
        else:
            yield {**common, "log_type": "nginx", "method": rng.choice(["GET", "GET", "POST"]),
                   "path": f"/api/v1/items/{rng.randrange(10**6)}?page={rng.randrange(20)}",
                   "status": rng.choice([200, 200, 200, 304, 404, 500]),
                   "body_bytes_sent": rng.randrange(10**5),
                   "request_time": round(rng.random(), 3),
                   "http_user_agent": rng.choice(USER_AGENTS)}


def read_archive(paths: Iterable[Path]) -> Iterator[Record]:
    """Records from `.log.gz` files, JSON-lines files, or directories holding them."""
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in
                       (".gz", ".jsonl", ".ndjson", ".log")) if path.is_dir() else [path]
        for file in files:
            opener = gzip.open if file.suffix == ".gz" else open
            with opener(file, "rt", encoding="utf-8") as lines:
                for line in lines:
                    if line.strip():
                        yield dict(json.loads(line))


def batches(records: Iterator[Record], *, size: int, run: str, count: int | None
            ) -> Iterator[list[Record]]:
    """Batches of `size`, each record tagged `replay_id`; stops after `count` records."""
    limited = records if count is None else itertools.islice(records, count)
    numbered = zip(itertools.count(), limited, strict=False)
    while batch := [{**r, "replay_id": f"{run}-{n}"} for n, r in itertools.islice(numbered, size)]:
        yield batch


@attrs.define
class Target:
    protocol: str  # http | forward
    host: str
    port: int
    context: ssl.SSLContext | None
    tag: str = "nginx.access"
    token: str = ""
    gzip: bool = False
    mode: str = "PackedForward"
    shared_key: str = ""
    ack: bool = True


@attrs.define
class Stats:
    sent: int = 0
    acked: set[str] = attrs.field(factory=set)
    errors: Counter[str] = attrs.field(factory=Counter)
    latencies: list[float] = attrs.field(factory=list)

    def percentile_ms(self, q: float) -> float:
        if len(self.latencies) < 2:
            return 0.0
        return statistics.quantiles(self.latencies, n=1000)[int(q * 1000) - 1] * 1000


def http_request(target: Target, records: list[Record]) -> bytes:
    body = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)
    extra = ""
    if target.gzip:
        body, extra = gzip.compress(body, 1), "Content-Encoding: gzip\r\n"
    return (f"POST /{target.tag} HTTP/1.1\r\nHost: {target.host}\r\nUser-Agent: mwdlogd-replay"
            f"\r\nAuthorization: Bearer {target.token}\r\nContent-Type: application/x-ndjson\r\n"
            f"{extra}Content-Length: {len(body)}\r\n\r\n").encode() + body


def forward_message(target: Target, records: list[Record], chunk: str | None) -> bytes:
    """The message as out_forward frames it (entries as str32, EventTime, option map)."""
    def event_time(record: Record) -> msgpack.ExtType:
        at = float(record.get("time", time.time()))
        return msgpack.ExtType(0, int(at).to_bytes(4, "big") +
                               int(at % 1 * 1e9).to_bytes(4, "big"))

    option: dict[str, Any] = {"size": len(records)}
    if chunk is not None:
        option["chunk"] = chunk
    if target.mode == "Message":
        (record,) = records
        return bytes(msgpack.packb([target.tag, event_time(record), record, option]))
    if target.mode == "Forward":
        return bytes(msgpack.packb([target.tag, [[event_time(r), r] for r in records], option]))
    blob = b"".join(msgpack.packb([event_time(r), r]) for r in records)
    option["compressed"] = "text"
    if target.mode == "CompressedPackedForward":
        blob, option["compressed"] = gzip.compress(blob, 1), "gzip"
    head = b"\x93" + bytes(msgpack.packb(target.tag)) + b"\xdb" + len(blob).to_bytes(4, "big")
    return head + blob + bytes(msgpack.packb(option))


def ping_message(helo: list[Any], *, hostname: str, shared_key: str, username: str = "",
                 password: str = "", salt: str | None = None) -> bytes:
    """The client's PING for a server's HELO, as out_forward builds it."""
    salt = salt or os.urandom(16).hex()
    digest = hashlib.sha512(salt.encode() + hostname.encode() + helo[1]["nonce"] +
                            shared_key.encode()).hexdigest()
    user_digest = hashlib.sha512((helo[1]["auth"] or b"") + username.encode() +
                                 password.encode()).hexdigest() if username else ""
    return bytes(msgpack.packb(["PING", hostname, salt, digest, username, user_digest]))


async def read_http_message(more: Callable[[], Awaitable[bytes]], buffer: bytearray
                            ) -> tuple[bytes, dict[bytes, bytes]]:
    """One HTTP message (head, then a Content-Length body) from `buffer`, refilled with
    `more()`; returns its start line and headers (names lower-cased). Bytes past the
    message stay in `buffer`."""
    while b"\r\n\r\n" not in buffer:
        buffer += await more()
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    start, *lines = head.split(b"\r\n")
    headers = {name.strip().lower(): value.strip()
               for name, _, value in (line.partition(b":") for line in lines)}
    length = int(headers.get(b"content-length", b"0"))
    buffer[:] = rest
    while len(buffer) < length:
        buffer += await more()
    del buffer[:length]
    return start, headers


class _Peer:
    """One connection to the target; reconnects when it breaks."""

    def __init__(self, target: Target, name: str) -> None:
        self.target = target
        self.name = name
        self.stream: trio.abc.Stream | None = None
        self.buffer = bytearray()
        self.unpacker = msgpack.Unpacker(raw=False)
        self.sequence = itertools.count()

    async def connect(self) -> trio.abc.Stream:
        if self.stream is None:
            t = self.target
            if t.context is None:
                self.stream = await trio.open_tcp_stream(t.host, t.port)
            else:
                self.stream = await trio.open_ssl_over_tcp_stream(
                    t.host, t.port, ssl_context=t.context, https_compatible=True)
            self.buffer.clear()
            self.unpacker = msgpack.Unpacker(raw=False)
            if t.protocol == "forward" and t.shared_key:
                await self._handshake(self.stream)
        return self.stream

    async def close(self) -> None:
        if self.stream is not None:
            await trio.aclose_forcefully(self.stream)
            self.stream = None

    async def _more(self) -> bytes:
        assert self.stream is not None
        data = await self.stream.receive_some(65536)
        if not data:
            raise EOFError("server closed the connection")
        return bytes(data)

    async def _next_msgpack(self) -> Any:
        while True:
            for obj in self.unpacker:
                return obj
            self.unpacker.feed(await self._more())

    async def _handshake(self, stream: trio.abc.Stream) -> None:
        helo = await self._next_msgpack()
        await stream.send_all(ping_message(helo, hostname=self.name,
                                           shared_key=self.target.shared_key))
        pong = await self._next_msgpack()
        if pong[1] is not True:
            raise ConnectionError(f"handshake refused: {pong[2]}")

    async def http_status(self) -> tuple[int, float]:
        start, headers = await read_http_message(self._more, self.buffer)
        return int(start.split(b" ", 2)[1]), float(headers.get(b"retry-after", b"0"))

    async def send(self, records: list[Record]) -> str:
        """Send one batch; 'ok', or why it was not acknowledged."""
        stream = await self.connect()
        if self.target.protocol == "http":
            await stream.send_all(http_request(self.target, records))
            status, retry_after = await self.http_status()
            if status == 503:
                await trio.sleep(retry_after or RETRY_503_S)
            return "ok" if status == 200 else f"http {status}"
        chunk = f"{self.name}-{next(self.sequence)}\n" if self.target.ack else None
        messages = ([forward_message(self.target, [r], chunk) for r in records]
                    if self.target.mode == "Message" else
                    [forward_message(self.target, records, chunk)])
        for message in messages:
            await stream.send_all(message)
            if chunk is not None and (await self._next_msgpack()) != {"ack": chunk}:
                return "bad ack"
        return "ok"


async def run_replay(source: Iterator[list[Record]], target: Target, *, connections: int,
                     rate: float | None, duration: float | None, progress: bool = True
                     ) -> Stats:
    """Send every batch from `source` (or until `duration`), at `rate` records/s or as
    fast as acks come back, over `connections` connections."""
    stats = Stats()
    started = trio.current_time()
    deadline = started + duration if duration else math.inf
    send, batches_out = trio.open_memory_channel[list[Record]](0)

    async def produce() -> None:
        next_at = started
        async with send:
            for batch in source:
                if trio.current_time() >= deadline:
                    return
                if rate:
                    await trio.sleep_until(next_at)
                    next_at += len(batch) / rate
                await send.send(batch)

    async def consume(index: int, receive: trio.MemoryReceiveChannel[list[Record]]) -> None:
        peer = _Peer(target, f"replay-{os.getpid()}-{index}")
        async with receive:
            async for batch in receive:
                await deliver(peer, batch)
        await peer.close()

    async def deliver(peer: _Peer, batch: list[Record]) -> None:
        for _ in range(MAX_ATTEMPTS):
            began = time.perf_counter()
            try:
                outcome = await peer.send(batch)
            except (OSError, EOFError, trio.BrokenResourceError, ConnectionError) as exc:
                outcome = type(exc).__name__
                await peer.close()
            if outcome == "ok":
                stats.latencies.append(time.perf_counter() - began)
                stats.acked.update(r["replay_id"] for r in batch)
                break
            stats.errors[outcome] += 1
        stats.sent += len(batch)

    async with trio.open_nursery() as nursery:
        if progress:
            nursery.start_soon(report_progress, stats, started)
        async with trio.open_nursery() as workers:
            workers.start_soon(produce)
            async with batches_out:
                for index in range(connections):
                    workers.start_soon(consume, index, batches_out.clone())
        nursery.cancel_scope.cancel()
    return stats


async def report_progress(stats: Stats, started: float) -> None:
    """One line a second on stderr: elapsed, sent, acked and the current ack rate."""
    last_acked, last_at = 0, started
    while True:
        await trio.sleep(PROGRESS_EVERY_S)
        now = trio.current_time()
        acked = len(stats.acked)
        rate = (acked - last_acked) / max(now - last_at, 1e-9)
        errors = sum(stats.errors.values())
        print(f"[{now - started:6.1f}s] sent {stats.sent:,}  acked {acked:,}  "
              f"{rate:,.0f} records/s  errors {errors}", file=sys.stderr, flush=True)
        last_acked, last_at = acked, now


@attrs.frozen
class Verdict:
    stored: int
    missing: list[str]  # acked but not stored
    duplicated: list[str]  # stored more than once
    unacked_stored: int  # stored once without an ack (allowed: the ack may have been lost)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.duplicated


def verify(root: Path, run: str, acked: set[str]) -> Verdict:
    """Read every hourly file under `root` and compare this run's replay_ids with `acked`."""
    prefix = f"{run}-"
    stored: Counter[str] = Counter()
    for record in read_archive([root]):
        replay_id = record.get("replay_id")
        if isinstance(replay_id, str) and replay_id.startswith(prefix):
            stored[replay_id] += 1
    return Verdict(sum(stored.values()), sorted(acked - stored.keys()),
                   sorted(i for i, n in stored.items() if n > 1), len(stored.keys() - acked))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mwdlogd replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("source")
    source.add_argument("--from", dest="archive", type=Path, nargs="*", metavar="PATH",
                        help="replay .log.gz trees or JSON-lines files instead of generating")
    source.add_argument("--seed", type=int, default=1)
    source.add_argument("--customers", type=int, default=20)
    source.add_argument("--fqdns", type=int, default=5, help="sites per customer")
    source.add_argument("--appsec-share", type=float, default=0.3,
                        help="share of open-appsec detections among generated records")
    target = parser.add_argument_group("target")
    target.add_argument("--target", required=True, metavar="HOST:PORT")
    target.add_argument("--protocol", choices=["http", "forward"], default="http")
    target.add_argument("--tag", default="nginx.access")
    target.add_argument("--token", default=os.environ.get("MWDLOGD_TOKEN", ""),
                        help="bearer token (http; default $MWDLOGD_TOKEN)")
    target.add_argument("--gzip", action="store_true", help="gzip HTTP bodies")
    target.add_argument("--mode", default="PackedForward", choices=[
        "Message", "Forward", "PackedForward", "CompressedPackedForward"])
    target.add_argument("--shared-key", default="", help="forward shared_key handshake")
    target.add_argument("--no-ack", action="store_true", help="forward without acks")
    target.add_argument("--plain", action="store_true", help="no TLS (forward transport tcp)")
    target.add_argument("--cacert", type=Path, help="CA of the server certificate")
    target.add_argument("--cert", type=Path, help="client certificate (mTLS)")
    target.add_argument("--key", type=Path, help="client key")
    load = parser.add_argument_group("load")
    load.add_argument("--batch", type=int, default=1000, help="records per request/message")
    load.add_argument("--connections", type=int, default=4)
    load.add_argument("--rate", type=float, help="records/s (default: as fast as acked)")
    load.add_argument("--count", type=int, help="records to send")
    load.add_argument("--duration", type=float, help="seconds to send for")
    load.add_argument("--run", default=f"run{int(time.time())}",
                      help="prefix of the replay_id given to every record")
    load.add_argument("--verify", type=Path, metavar="ROOT",
                      help="afterwards, read the hourly files under ROOT and report missing "
                           "and duplicated records")
    load.add_argument("--settle", type=float, default=0.0, metavar="SECONDS",
                      help="before --verify, wait this long for the server's flush "
                           "(its buffer.flush_interval), unless you run `mwdlogd flush` first")
    return parser


def _context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.plain:
        return None
    context = ssl.create_default_context(cafile=str(args.cacert) if args.cacert else None)
    if args.cert:
        context.load_cert_chain(str(args.cert), str(args.key or args.cert))
    return context


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.count is None and args.duration is None and not args.archive:
        print("mwdlogd replay: give --count or --duration (or --from to replay an archive)",
              file=sys.stderr)
        return 2
    host, _, port = args.target.rpartition(":")
    target = Target(args.protocol, host, int(port), _context(args), args.tag, args.token,
                    args.gzip, args.mode, args.shared_key, not args.no_ack)
    records = read_archive(args.archive) if args.archive else generate(
        args.seed, customers=args.customers, fqdns=args.fqdns, appsec_share=args.appsec_share)
    source = batches(records, size=1 if args.mode == "Message" and args.protocol == "forward"
                     else args.batch, run=args.run, count=args.count)
    started = time.perf_counter()
    stats = trio.run(lambda: run_replay(source, target, connections=args.connections,
                                        rate=args.rate, duration=args.duration))
    elapsed = time.perf_counter() - started
    summary: dict[str, Any] = {
        "run": args.run, "sent": stats.sent, "acked": len(stats.acked),
        "seconds": round(elapsed, 2), "acked_per_s": round(len(stats.acked) / elapsed),
        "errors": dict(stats.errors), "ack_p50_ms": round(stats.percentile_ms(0.5), 2),
        "ack_p99_ms": round(stats.percentile_ms(0.99), 2)}
    code = 0 if not stats.errors and len(stats.acked) == stats.sent else 1
    if args.verify:
        time.sleep(args.settle)
        verdict = verify(args.verify, args.run, stats.acked)
        summary["verify"] = {"stored": verdict.stored, "missing": len(verdict.missing),
                             "duplicated": len(verdict.duplicated),
                             "stored_without_ack": verdict.unacked_stored,
                             "first_missing": verdict.missing[:5],
                             "first_duplicated": verdict.duplicated[:5]}
        code = code if verdict.ok else 3
    print(json.dumps(summary))
    return code

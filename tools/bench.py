#!/usr/bin/env python3
"""Ingest benchmark: acked records/s and ack latency for batches of Engine records, over
HTTPS (ndjson, `out_http` shape) or forward (PackedForward / CompressedPackedForward over
TLS with shared key and ack, as out_forward sends it).

By default it starts mwdlogd as a subprocess on a temporary config (own dev PKI, ports
0; `--config` measures an operator's config instead, with those replaced), drives it over
keep-alive mTLS connections with pre-encoded batches, then stops it with SIGTERM and
counts what landed. Reports server CPU seconds per million records and peak RSS (VmHWM),
summed over its processes, and the bytes written. With --target it drives any server of
the same protocol instead. --reference-null first measures the same load against a null
server (TLS + HTTP framing only, in its own process): the ceiling of this load generator
on this machine, for side-by-side figures.

    python tools/bench.py --connections 4 --batch 1000 --duration 20
    python tools/bench.py --protocol forward --mode CompressedPackedForward
    python tools/bench.py --protocol forward --batch 10 --prefill-chunk-ids 1000000

--prefill-chunk-ids N starts the server with N forward chunk ids already inside the
dedupe window (written in the chunk id log format every version reads), to measure
what a full resend store costs each ack.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import signal
import ssl
import statistics
import struct
import sys
import tempfile
import time
import tomllib
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import tomli_w
import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from mwdlogd.certs import init_certs  # noqa: E402
from mwdlogd_replay.forward import ping_message  # noqa: E402
from mwdlogd_replay.http import read_http_message  # noqa: E402

from server_process import ServerProcess  # noqa: E402

TOKEN = "bench-token-0123456789"
SHARED_KEY = "bench-shared-key"
BODIES_PER_CONNECTION = 8
# The bodies are sent again and again: a sequence number in the URL (ignored by the
# server) makes each request one mwdlogd's HTTP dedupe stores, as real traffic is.
UNIQUE = "n=0000000000"


def engine_record(rng: random.Random, ident: str, now: float) -> dict[str, Any]:
    """An nginx access record of ~320 bytes of JSON, shaped like an Engine's."""
    customer = f"customer-{rng.randrange(5)}"
    return {
        "id": ident, "customer_name": customer,
        "fqdn": f"site-{rng.randrange(4)}.{customer}.example",
        "log_type": "nginx", "time": now, "remote_addr": f"203.0.113.{rng.randrange(256)}",
        "method": rng.choice(["GET", "POST"]), "status": rng.choice([200, 200, 304, 404]),
        "path": f"/api/v1/items/{rng.randrange(10**6)}?page={rng.randrange(20)}",
        "body_bytes_sent": rng.randrange(10**5), "request_time": round(rng.random(), 3),
        "http_user_agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0",
    }


def request_bytes(host: str, records: list[dict[str, Any]], gzipped: bool) -> bytes:
    body = b"".join(json.dumps(r).encode() + b"\n" for r in records)
    extra = ""
    if gzipped:
        body = gzip.compress(body, 1)
        extra = "Content-Encoding: gzip\r\n"
    head = (f"POST /nginx.access?{UNIQUE} HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/x-ndjson\r\n"
            f"{extra}Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


class Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.records = 0
        self.errors: dict[str, int] = {}

    def answered(self, started: float, records: int, error: str | None) -> None:
        """One request answered: acked (error None) after `started`, or refused."""
        if error is None:
            self.latencies.append(time.perf_counter() - started)
            self.records += records
        else:
            self.errors[error] = self.errors.get(error, 0) + 1


def receiver(stream: trio.SSLStream[trio.SocketStream]) -> Callable[[], Awaitable[bytes]]:
    """More bytes from `stream`; EOFError once the peer has closed."""
    async def more() -> bytes:
        data = await stream.receive_some(65536)
        if not data:
            raise EOFError("peer closed the connection")
        return bytes(data)
    return more


class Pace:
    """Sends at a fixed interval (records/s shared across connections), or at once."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.next_at = trio.current_time()

    async def wait(self) -> None:
        if self.interval_s:
            await trio.sleep_until(self.next_at)
            self.next_at += self.interval_s


async def drive(host: str, port: int, context: ssl.SSLContext, bodies: list[bytes],
                batch: int, deadline: float, stats: Stats, pace: Pace) -> None:
    stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=context,
                                                 https_compatible=True)
    buffer, more = bytearray(), receiver(stream)
    n = 0
    try:
        while trio.current_time() < deadline:
            await pace.wait()
            started = time.perf_counter()
            await stream.send_all(bodies[n % len(bodies)].replace(
                UNIQUE.encode(), f"n={n:010d}".encode(), 1))
            start, _, _ = await read_http_message(more, buffer)
            status = int(start.split(b" ", 2)[1])
            n += 1
            stats.answered(started, batch, None if status == 200 else str(status))
    finally:
        await trio.aclose_forcefully(stream)


async def serve_null(stream: trio.SSLStream[trio.SocketStream]) -> None:
    """Answers every request 200 after reading it whole; stores nothing."""
    buffer, more = bytearray(), receiver(stream)
    try:
        while True:
            await read_http_message(more, buffer)
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    except (trio.BrokenResourceError, EOFError):
        return


async def serve_null_forward(stream: trio.SSLStream[trio.SocketStream]) -> None:
    """HELO, any PING gets PONG, every message gets its ack; nothing is checked or kept."""
    unpacker = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape",
                                max_buffer_size=256 * 1024 * 1024)
    try:
        await stream.send_all(msgpack.packb(["HELO", {"nonce": os.urandom(16), "auth": b"",
                                                      "keepalive": True}]))
        await next_msgpack(stream, unpacker)
        await stream.send_all(msgpack.packb(["PONG", True, "", "null", ""]))
        while True:
            message = await next_msgpack(stream, unpacker)
            await stream.send_all(msgpack.packb({"ack": message[2]["chunk"]},
                                                unicode_errors="surrogateescape"))
    except (trio.BrokenResourceError, EOFError):
        return


async def run_null_server(pki: Path, protocol: str) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.crt"))
    context.load_cert_chain(str(pki / "server.crt"), str(pki / "server.key"))
    context.verify_mode = ssl.CERT_REQUIRED
    listeners = await trio.open_ssl_over_tcp_listeners(0, context, host="127.0.0.1",
                                                       https_compatible=True)
    port = listeners[0].transport_listener.socket.getsockname()[1]  # type: ignore[attr-defined]
    print(f"null-server listening {protocol}=127.0.0.1:{port}", file=sys.stderr, flush=True)
    await trio.serve_listeners(serve_null if protocol == "http" else serve_null_forward,
                               listeners)


def forward_blob(records: list[dict[str, Any]], mode: str) -> tuple[bytes, bytes]:
    """The message up to its option map, and the `compressed` value, as out_forward packs."""
    entries = [msgpack.packb([msgpack.ExtType(0, int(r["time"]).to_bytes(4, "big") + bytes(4)),
                              r]) for r in records]
    blob = b"".join(entries)
    compressed = "text"
    if mode == "CompressedPackedForward":
        blob, compressed = gzip.compress(blob, 1), "gzip"
    head = b"\x93" + msgpack.packb("nginx.access") + b"\xdb" + len(blob).to_bytes(4, "big")
    return head + blob, compressed.encode()


async def forward_handshake(stream: trio.SSLStream[trio.SocketStream],
                            unpacker: msgpack.Unpacker) -> None:
    helo = await next_msgpack(stream, unpacker)
    await stream.send_all(ping_message(helo, hostname="bench-engine", shared_key=SHARED_KEY))
    pong = await next_msgpack(stream, unpacker)
    if pong[1] is not True:
        raise RuntimeError(f"handshake refused: {pong}")


async def next_msgpack(stream: trio.SSLStream[trio.SocketStream],
                       unpacker: msgpack.Unpacker) -> Any:
    while True:
        for obj in unpacker:
            return obj
        data = await stream.receive_some(65536)
        if not data:
            raise EOFError("server closed the connection")
        unpacker.feed(data)


async def drive_forward(host: str, port: int, context: ssl.SSLContext,
                        messages: list[tuple[bytes, bytes]], batch: int, deadline: float,
                        stats: Stats, pace: Pace, connection: int) -> None:
    stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=context,
                                                 https_compatible=True)
    unpacker = msgpack.Unpacker(raw=False)
    try:
        await forward_handshake(stream, unpacker)
        n = 0
        while trio.current_time() < deadline:
            body, compressed = messages[n % len(messages)]
            chunk = f"{connection}-{n}-{os.getpid()}\n"
            option = msgpack.packb({"size": batch, "compressed": compressed.decode(),
                                    "chunk": chunk})
            await pace.wait()
            started = time.perf_counter()
            await stream.send_all(body + option)
            ack = await next_msgpack(stream, unpacker)
            n += 1
            stats.answered(started, batch, None if ack == {"ack": chunk} else repr(ack))
    finally:
        await trio.aclose_forcefully(stream)


def server_pids(server: ServerProcess) -> list[int]:
    """The server process and, with workers > 1, every worker it started."""
    workers = [int(line.rpartition("pid=")[2].split()[0]) for line in server.lines
               if " worker_started " in line]
    return [server.process.pid, *workers]


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pids: list[int]) -> float:
    """Sum of each process's peak resident set (VmHWM)."""
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])
    return total / 1024


def machine() -> str:
    model = next((line.split(":", 1)[1].strip()
                  for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{os.cpu_count()} cores, {model}, Python {platform.python_version()}"


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 1000) - 1] if len(values) > 1 else 0.0


def count_stored(root: Path) -> tuple[int, int, int]:
    """Records, their JSON bytes and the gzip bytes written under `root`."""
    records = raw = written = 0
    for path in root.rglob("*.log.gz"):
        written += path.stat().st_size
        with gzip.open(path, "rb") as file:
            for line in file:
                records += 1
                raw += len(line)
    return records, raw, written


def prefill_chunk_ids(buffer: Path, count: int) -> None:
    """`count` chunk ids acked just now by other clients, as `{buffer}/chunk-ids.log`
    (framed entries: time in ms, then `identity NUL chunk id`): the store a busy fleet
    leaves within the window. Newer servers move it into their own format at start."""
    buffer.mkdir(parents=True, exist_ok=True)
    ms = int(time.time() * 1000)
    with open(buffer / "chunk-ids.log", "wb") as file:
        for n in range(count):
            key = f"198.51.100.{n % 250}:{40000 + n % 20000}/engine-{n % 500}\0" \
                  f"{n:022d}==\n".encode()
            crc = zlib.crc32(key, zlib.crc32(ms.to_bytes(8, "big")))
            file.write(struct.pack(">4sIIQ", b"MWC1", len(key), crc, ms) + key)


def bench_config(work: Path, pki: Path, args: argparse.Namespace) -> Path:
    """The server's config: `--config`'s (its [server], [buffer], [storage] and limits are
    what is measured) or the defaults, with the bench's own addresses, PKI, credentials and
    scratch directories; --workers, --compression and --no-fsync override when given."""
    raw: dict[str, Any] = tomllib.loads(args.config.read_text()) if args.config else {}
    loopback = {"bind": "127.0.0.1", "port": 0}
    overrides: dict[str, dict[str, Any]] = {
        "tls": {"cert": str(pki / "server.crt"), "key": str(pki / "server.key"),
                "ca": str(pki / "ca.crt"), "client_auth": True},
        "http": loopback, "health": loopback, "metrics": loopback, "monitor": loopback,
        "forward": {**loopback, "shared_key": SHARED_KEY, "transport": "tls", "users": []},
        "auth": {"tokens": [{"name": "bench", "token": TOKEN}]},
        "storage": {"root": str(work / "logs")},
        "buffer": {"path": str(work / "buffer")},
    }
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    raw.setdefault("server", {}).setdefault("hostname", "bench")
    if args.workers is not None:
        raw["server"]["workers"] = args.workers
    if args.compression is not None:
        raw["storage"]["compression"] = args.compression
    if args.no_fsync:
        raw["buffer"]["fsync"] = False
    path = work / "config.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


async def load(host: str, port: int, context: ssl.SSLContext, args: argparse.Namespace,
               stats: Stats) -> float:
    rng = random.Random(args.seed)
    now = time.time()
    batches = [[[engine_record(rng, f"c{c}-b{b}-{i}", now) for i in range(args.batch)]
                for b in range(BODIES_PER_CONNECTION)] for c in range(args.connections)]
    started = trio.current_time()
    deadline = started + args.duration
    async with trio.open_nursery() as nursery:
        for c in range(args.connections):
            pace = Pace(args.batch * args.connections / args.rate if args.rate else 0.0)
            if args.protocol == "forward":
                messages = [forward_blob(records, args.mode) for records in batches[c]]
                nursery.start_soon(drive_forward, host, port, context, messages, args.batch,
                                   deadline, stats, pace, c)
            else:
                bodies = [request_bytes(host, records, args.gzip) for records in batches[c]]
                nursery.start_soon(drive, host, port, context, bodies, args.batch, deadline,
                                   stats, pace)
    return trio.current_time() - started


def report(result: dict[str, Any]) -> None:
    print(json.dumps(result, indent=2))
    print(f"\n{result['records_per_s']:>10,.0f} acked records/s   "
          f"p50 {result['ack_p50_ms']:.1f} ms   p99 {result['ack_p99_ms']:.1f} ms   "
          f"p999 {result['ack_p999_ms']:.1f} ms", file=sys.stderr)
    if "reference_null_server_records_per_s" in result:
        print(f"{result['reference_null_server_records_per_s']:>10,} records/s against the null "
              "server (load generator ceiling)", file=sys.stderr)
    if "server_cpu_s_per_million" in result:
        print(f"{result['server_cpu_s_per_million']:>10.1f} server CPU s per million records   "
              f"peak RSS {result['server_peak_rss_mb']:.0f} MB   "
              f"stored {result['stored_records']:,} of {result['acked_records']:,} acked   "
              f"{result['bytes_written']:,} bytes written (ratio {result['compression_ratio']})",
              file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=["http", "forward"], default="http")
    parser.add_argument("--mode", choices=["PackedForward", "CompressedPackedForward"],
                        default="PackedForward", help="forward message mode")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--config", type=Path, metavar="PATH",
                        help="measure this mwdlogd config (addresses, TLS, tokens and paths "
                        "are replaced by the bench's own)")
    parser.add_argument("--workers", type=int, help="server.workers (default: the config's, 1)")
    parser.add_argument("--compression", choices=["zlib", "igzip"],
                        help="storage.compression (default: the config's, zlib)")
    parser.add_argument("--batch", type=int, default=1000, help="records per request")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load")
    parser.add_argument("--rate", type=float, help="offered records/s (default: as fast as "
                        "acks come back)")
    parser.add_argument("--gzip", action="store_true", help="gzip request bodies")
    parser.add_argument("--no-fsync", action="store_true",
                        help="run mwdlogd with buffer.fsync = false (shows what durability costs)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--target", metavar="HOST:PORT",
                        help="drive this server instead of starting mwdlogd")
    parser.add_argument("--pki", type=Path, help="with --target: dir with ca.crt and "
                        "engine-01.crt/.key (default: a fresh one)")
    parser.add_argument("--reference-null", action="store_true",
                        help="also measure a null server first, side by side")
    parser.add_argument("--prefill-chunk-ids", type=int, default=0, metavar="N",
                        help="start mwdlogd with N forward chunk ids inside the dedupe window")
    parser.add_argument("--serve-null", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_null:
        trio.run(run_null_server, args.pki, args.protocol)
        return 0

    with tempfile.TemporaryDirectory(prefix="mwdlogd-bench-") as tmp:
        work = Path(tmp)
        pki = args.pki or work / "pki"
        if not args.pki:
            init_certs(pki, hosts=["localhost", "127.0.0.1"], clients=["engine-01"], days=2)
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        context.load_cert_chain(str(pki / "engine-01.crt"), str(pki / "engine-01.key"))
        reference = None
        if args.reference_null:
            null = ServerProcess(None, argv=[sys.executable, __file__, "--serve-null",
                                             "--pki", str(pki), "--protocol", args.protocol])
            host, _, port = null.addresses[args.protocol].rpartition(":")
            stats = Stats()
            elapsed = trio.run(load, host, int(port), context, args, stats)
            null.stop()
            reference = round(stats.records / elapsed)
        server, server_config = None, None
        if args.target:
            host, _, port = args.target.rpartition(":")
        else:
            config_path = bench_config(work, pki, args)
            if args.prefill_chunk_ids:
                prefill_chunk_ids(work / "buffer", args.prefill_chunk_ids)
            server_config = tomllib.loads(config_path.read_text())
            server = ServerProcess(config_path)
            host, _, port = server.addresses[args.protocol].rpartition(":")
        stats = Stats()
        pids = server_pids(server) if server else []
        cpu_before = cpu_seconds(pids)
        elapsed = trio.run(load, host, int(port), context, args, stats)
        result: dict[str, Any] = {
            "machine": machine(), "protocol": args.protocol,
            "mode": args.mode if args.protocol == "forward" else "ndjson",
            "config": str(args.config) if server and args.config else None,
            "workers": server_config["server"].get("workers", 1) if server_config else None,
            "compression": (server_config["storage"].get("compression", "zlib")
                            if server_config else None),
            "connections": args.connections, "batch": args.batch, "rate": args.rate,
            "gzip": args.gzip, "fsync": not args.no_fsync, "duration_s": round(elapsed, 2),
            "acked_records": stats.records,
            "records_per_s": round(stats.records / elapsed),
            "acks_per_s": round(len(stats.latencies) / elapsed), "errors": stats.errors,
            "prefilled_chunk_ids": args.prefill_chunk_ids,
            "ack_p50_ms": round(percentile(stats.latencies, 0.5) * 1000, 2),
            "ack_p99_ms": round(percentile(stats.latencies, 0.99) * 1000, 2),
            "ack_p999_ms": round(percentile(stats.latencies, 0.999) * 1000, 2),
        }
        if reference is not None:
            result["reference_null_server_records_per_s"] = reference
        if server:
            cpu = cpu_seconds(pids) - cpu_before
            result["server_cpu_s"] = round(cpu, 2)
            result["server_cpu_s_per_million"] = round(cpu / max(stats.records, 1) * 1e6, 2)
            result["server_peak_rss_mb"] = round(peak_rss_mb(pids), 1)
            server.signal(signal.SIGTERM)
            result["server_exit"] = server.wait()
            stored, raw, written = count_stored(work / "logs")
            result["stored_records"] = stored
            result["bytes_written"] = written
            result["compression_ratio"] = round(raw / max(written, 1), 1)
        report(result)
        return 0 if not server or result["stored_records"] == stats.records else 1


if __name__ == "__main__":
    raise SystemExit(main())

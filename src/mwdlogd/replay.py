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
import socket
import ssl
import statistics
import sys
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import attrs
import msgpack
import trio

from mwdlogd.certs import Layout
from mwdlogd.config import ListenConfig, config_path, load_config
from mwdlogd.errors import MwdlogdError
from mwdlogd.flush_client import flush_one
from mwdlogd.worker import worker_config

Record = dict[str, Any]
PROGRESS_EVERY_S = 1.0
DEFAULT_SETTLE_S = 30.0
VERIFY_POLL_S = 1.0
HELO_TIMEOUT_S = 5.0
STORAGE_ROOT = Path("<storage.root>")  # `--verify` without ROOT: the config's
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
                            ) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """One HTTP message (head, then a Content-Length body) from `buffer`, refilled with
    `more()`; returns its start line, headers (names lower-cased) and body. Bytes past
    the message stay in `buffer`."""
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
    body = bytes(buffer[:length])
    del buffer[:length]
    return start, headers, body


class HandshakeRefused(ConnectionError):
    """The forward server answered PONG false (its reason: `shared_key mismatch`, ...)."""


HTTP_MEANING = {401: "unknown token", 403: "token not allowed for this customer",
                413: "batch too large (lower --batch)", 503: "server busy (retried)"}
FINAL_STATUSES = {400, 401, 403, 413, 415}  # resending the same request cannot help


@attrs.frozen
class Failure:
    """Why a batch was not acknowledged, as the summary shows it."""

    text: str
    final: bool = False  # retrying cannot help (credentials, certificates, a refused body)


def http_outcome(status: int, body: bytes) -> Failure:
    """`401 unknown token: bearer token is not known`: the status, what it means for
    the replay, and the server's own detail."""
    try:
        detail = str(json.loads(body).get("detail", ""))
    except (ValueError, AttributeError):
        detail = body.decode(errors="replace")[:200]
    meaning = HTTP_MEANING.get(status, "refused")
    return Failure(f"{status} {meaning}" + (f": {detail}" if detail else ""),
                   final=status in FINAL_STATUSES)


TLS_REFUSALS = ("UNKNOWN_CA", "CERTIFICATE_REQUIRED", "BAD_CERTIFICATE")


def explain(exc: BaseException, target: Target) -> Failure:
    """An operator's reading of a failed send: what went wrong and where, not the class."""
    where = f"{target.host}:{target.port}"
    cause: BaseException = exc
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__:  # TLS errors inside
        cause = exc.__cause__
    elif isinstance(exc.__cause__, BaseExceptionGroup):  # trio: every address failed
        cause = exc.__cause__.exceptions[-1]
    if isinstance(cause, HandshakeRefused):
        reason = str(cause)
        if "mismatch" in reason:
            return Failure(f"shared key mismatch (the server at {where} answered: {reason})",
                           final=True)
        return Failure(f"forward handshake with {where} failed: {reason}", final=True)
    if isinstance(cause, ConnectionRefusedError):
        return Failure(f"connection refused by {where} (is the server running? check "
                       "--target)")
    if isinstance(cause, socket.gaierror):
        return Failure(f"cannot resolve {target.host}: {cause.strerror}", final=True)
    if isinstance(cause, ssl.SSLCertVerificationError):
        return Failure(f"the server certificate at {where} is not trusted by --cacert "
                       f"({cause.verify_message})", final=True)
    if isinstance(cause, ssl.SSLError):
        reason = cause.reason or str(cause)
        if any(word in reason.upper() for word in TLS_REFUSALS):
            return Failure(f"the server at {where} refused the client certificate ({reason}): "
                           "give --cert/--key signed by its tls.ca", final=True)
        return Failure(f"TLS error with {where}: {reason}")
    if isinstance(cause, EOFError | trio.BrokenResourceError | ConnectionResetError):
        return Failure(f"{where} closed the connection before answering (right after the TLS "
                       "handshake this is a refused client certificate: check that --cert is "
                       "signed by the server's tls.ca)")
    if isinstance(cause, TimeoutError):
        return Failure(f"{where} timed out")
    return Failure(f"{type(cause).__name__}: {cause}")


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
        helo = None
        with trio.move_on_after(HELO_TIMEOUT_S):
            helo = await self._next_msgpack()
        if helo is None:
            raise HandshakeRefused(f"no HELO within {HELO_TIMEOUT_S:g} s: the server has no "
                                   "shared_key; drop --shared-key")
        await stream.send_all(ping_message(helo, hostname=self.name,
                                           shared_key=self.target.shared_key))
        pong = await self._next_msgpack()
        if pong[1] is not True:
            raise HandshakeRefused(str(pong[2]))

    async def http_reply(self) -> tuple[int, float, bytes]:
        start, headers, body = await read_http_message(self._more, self.buffer)
        return int(start.split(b" ", 2)[1]), float(headers.get(b"retry-after", b"0")), body

    async def send(self, records: list[Record]) -> Failure | None:
        """Send one batch; None when acknowledged, else why not."""
        stream = await self.connect()
        if self.target.protocol == "http":
            await stream.send_all(http_request(self.target, records))
            status, retry_after, body = await self.http_reply()
            if status == 503:
                await trio.sleep(retry_after or RETRY_503_S)
            return None if status == 200 else http_outcome(status, body)
        chunk = f"{self.name}-{next(self.sequence)}\n" if self.target.ack else None
        messages = ([forward_message(self.target, [r], chunk) for r in records]
                    if self.target.mode == "Message" else
                    [forward_message(self.target, records, chunk)])
        for message in messages:
            await stream.send_all(message)
            if chunk is not None and (answer := await self._next_msgpack()) != {"ack": chunk}:
                if isinstance(answer, list) and answer[:1] == ["HELO"]:
                    raise HandshakeRefused("the server asks for a shared key (sent HELO): "
                                           "give --shared-key or --config")
                return Failure(f"unexpected answer instead of the ack: {answer!r:.100}")
        return None


async def run_replay(source: Iterator[list[Record]], target: Target, *, connections: int,
                     rate: float | None, duration: float | None, progress: bool = True
                     ) -> Stats:
    """Send every batch from `source` (or until `duration`), at `rate` records/s or as
    fast as acks come back, over `connections` connections."""
    stats = Stats()
    started = trio.current_time()
    deadline = started + duration if duration else math.inf
    send, batches_out = trio.open_memory_channel[list[Record]](0)
    stop = trio.CancelScope()  # cancelled when the target refuses everything

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
                failure = await peer.send(batch)
            except (OSError, EOFError, trio.BrokenResourceError, ConnectionError) as exc:
                failure = explain(exc, target)
                await peer.close()
            if failure is None:
                stats.latencies.append(time.perf_counter() - began)
                stats.acked.update(r["replay_id"] for r in batch)
                break
            stats.errors[failure.text] += 1
            if failure.final:
                break
        if failure is not None and not stats.acked:  # nothing got through: the setup is wrong
            print(f"mwdlogd replay: stopping: nothing was acknowledged; {failure.text}",
                  file=sys.stderr)
            stop.cancel()
        stats.sent += len(batch)

    async with trio.open_nursery() as nursery:
        if progress:
            nursery.start_soon(report_progress, stats, started)
        with stop:
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
    target = parser.add_argument_group(
        "target", "What is not given here comes from --config (as for every mwdlogd command: "
        "default ./config.toml or $MWDLOGD_CONFIG): the http or forward listener's address, "
        "tls.ca, the first NAME.crt/NAME.key beside tls.cert, the first of auth.tokens, "
        "forward.shared_key and forward.transport.")
    target.add_argument("--config", metavar="PATH", help="mwdlogd config to take defaults from")
    target.add_argument("--target", metavar="HOST:PORT",
                        help="server address (default: the config's http or forward listener)")
    target.add_argument("--protocol", choices=["http", "forward"], default="http")
    target.add_argument("--tag", default="nginx.access")
    target.add_argument("--token", default=os.environ.get("MWDLOGD_TOKEN"),
                        help="bearer token (http; default $MWDLOGD_TOKEN, then the config's)")
    target.add_argument("--gzip", action="store_true", help="gzip HTTP bodies")
    target.add_argument("--mode", default="PackedForward", choices=[
        "Message", "Forward", "PackedForward", "CompressedPackedForward"])
    target.add_argument("--shared-key", help="forward shared_key handshake (default: the "
                        "config's forward.shared_key)")
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
    load.add_argument("--verify", type=Path, metavar="ROOT", nargs="?", const=STORAGE_ROOT,
                      help="afterwards, read the hourly files under ROOT (default: the "
                           "config's storage.root) until every acked record is there (or "
                           "--settle passes) and report missing and duplicated records")
    load.add_argument("--flush", action="store_true",
                      help="before --verify, ask the server to write what it acknowledged "
                           "(as `mwdlogd flush`: POST /api/flush on every worker's monitor "
                           "port from the config), instead of waiting for its flush_interval")
    load.add_argument("--settle", type=float, default=DEFAULT_SETTLE_S, metavar="SECONDS",
                      help="longest wait for acked records to land (the server writes them "
                           f"every buffer.flush_interval, or at `mwdlogd flush`); default "
                           f"{DEFAULT_SETTLE_S:g}")
    return parser


def _context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The client TLS context; a missing file is named (ssl would say only 'No such file')."""
    if args.plain:
        return None
    for option, path in (("--cacert", args.cacert), ("--cert", args.cert), ("--key", args.key)):
        if path is not None and not Path(path).is_file():
            raise ReplaySetupError(f"certificate file not found: {path} ({option})")
    context = ssl.create_default_context(cafile=str(args.cacert) if args.cacert else None)
    if args.cert:
        try:
            context.load_cert_chain(str(args.cert), str(args.key or args.cert))
        except ssl.SSLError as exc:
            raise ReplaySetupError(f"{args.cert} and {args.key} do not load as a certificate "
                                   f"and its key: {exc.reason}") from None
    return context


class ReplaySetupError(Exception):
    """The command line or config cannot make a target; the message says which input."""


def apply_config(args: argparse.Namespace) -> None:
    """Fill what the command line left open from the mwdlogd config (like every command)."""
    wants_tls = not args.plain and (args.cacert is None or args.cert is None)
    needs_token = args.protocol == "http" and args.token is None
    needs_key = args.protocol == "forward" and args.shared_key is None
    needs_root = args.verify == STORAGE_ROOT
    args.monitors = []
    if args.target is not None and not (wants_tls or needs_token or needs_key or needs_root
                                         or args.flush):
        return
    path, required = config_path(args.config)
    try:
        config = load_config(path, required=required)
    except MwdlogdError as exc:
        raise ReplaySetupError(str(exc)) from None
    if args.target is None:
        listen = config.http if args.protocol == "http" else config.forward
        host = "127.0.0.1" if listen.bind in ("0.0.0.0", "::") else listen.bind
        args.target = f"{host}:{listen.port}"
        args.plain = args.plain or (args.protocol == "forward"
                                    and config.forward.transport == "tcp")
    if not args.plain:
        tls = config.tls
        args.cacert = args.cacert or Path(tls.ca)
        pair = next((crt for crt in Layout.from_paths(cert=tls.cert, key=tls.key, ca=tls.ca)
                     .client_certs() if crt.with_suffix(".key").is_file()), None)
        if args.cert is None and pair is not None:
            args.cert, args.key = pair, pair.with_suffix(".key")
    if args.token is None:
        args.token = next((t.token for t in config.auth.tokens), "")
    if args.shared_key is None:
        args.shared_key = config.forward.shared_key
    if needs_root:
        args.verify = Path(config.storage.root)
    args.monitors = [_local(worker_config(config, index).monitor)
                     for index in range(config.server.workers)]


def _local(listen: ListenConfig) -> str:
    """Where this machine reaches a listener (wildcard binds via loopback)."""
    return f"{'127.0.0.1' if listen.bind in ('0.0.0.0', '::') else listen.bind}:{listen.port}"


def ask_flush(monitors: list[str], token: str, timeout_s: float) -> None:
    """Ask every worker to write what it acknowledged now; a failure is reported and the
    verification goes on waiting for the regular flush instead."""
    for server in monitors:
        try:
            answer = flush_one(server, token, timeout_s)
        except OSError as exc:
            print(f"mwdlogd replay: flush at {server} failed: {exc}", file=sys.stderr)
            continue
        print(f"flushed {server}: {answer.get('records', 0):,} records to "
              f"{answer.get('files', 0):,} files", file=sys.stderr)


def await_verdict(root: Path, run: str, acked: set[str], *, settle: float,
                  poll: float = VERIFY_POLL_S) -> tuple[Verdict, float]:
    """Verify until every acked record is stored or `settle` seconds pass: the server
    writes records at its flush, seconds after the ack. Returns the verdict and the wait."""
    started = time.monotonic()
    while True:
        try:
            verdict = verify(root, run, acked)
        except (EOFError, ValueError, OSError, zlib.error) as exc:
            if time.monotonic() - started >= settle:
                raise
            # a gzip member being appended right now reads as truncated: read again
            print(f"verify: a file is being written ({exc}); reading again", file=sys.stderr)
        else:
            waited = time.monotonic() - started
            if not verdict.missing or waited >= settle:
                return verdict, waited
            print(f"verify: {len(acked) - len(verdict.missing):,} of {len(acked):,} acked "
                  f"records stored; waiting for the flush ({waited:.0f} of {settle:g} s)",
                  file=sys.stderr, flush=True)
        time.sleep(min(poll, max(settle - (time.monotonic() - started), 0.0)))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.count is None and args.duration is None and not args.archive:
        print("mwdlogd replay: give --count or --duration (or --from to replay an archive)",
              file=sys.stderr)
        return 2
    try:
        apply_config(args)
        host, _, port = args.target.rpartition(":")
        if not host or not port.isdigit():
            raise ReplaySetupError(f"--target {args.target!r}: expected HOST:PORT")
        target = Target(args.protocol, host, int(port), _context(args), args.tag,
                        args.token or "", args.gzip, args.mode, args.shared_key or "",
                        not args.no_ack)
    except ReplaySetupError as exc:
        print(f"mwdlogd replay: {exc}", file=sys.stderr)
        return 2
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
    for error, count in stats.errors.most_common():
        print(f"mwdlogd replay: {count} failed attempts: {error}", file=sys.stderr)
    if args.verify and args.flush:
        ask_flush(args.monitors, args.token or "", args.settle or DEFAULT_SETTLE_S)
    if args.verify:
        verdict, waited = await_verdict(args.verify, args.run, stats.acked, settle=args.settle)
        summary["verify"] = {"stored": verdict.stored, "missing": len(verdict.missing),
                             "waited_s": round(waited, 1),
                             "duplicated": len(verdict.duplicated),
                             "stored_without_ack": verdict.unacked_stored,
                             "first_missing": verdict.missing[:5],
                             "first_duplicated": verdict.duplicated[:5]}
        code = code if verdict.ok else 3
    print(json.dumps(summary))
    return code

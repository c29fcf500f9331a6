"""Drives a replay: batches from a source over N connections, at a rate or as fast as acks
come back, retrying a failed batch with the same frames; counts acks, errors and latency,
and explains failures in an operator's words."""

import math
import os
import socket
import ssl
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator

import attrs
import trio

from mwdlogd_replay.connection import Connection, Failure, Target
from mwdlogd_replay.forward import ForwardClient, HandshakeRefused
from mwdlogd_replay.http import HttpClient
from mwdlogd_replay.records import Record

PROGRESS_EVERY_S = 1.0
MAX_ATTEMPTS = 5
CLIENTS: dict[str, type[Connection]] = {"http": HttpClient, "forward": ForwardClient}
TLS_REFUSALS = ("UNKNOWN_CA", "CERTIFICATE_REQUIRED", "BAD_CERTIFICATE")


@attrs.define
class Stats:
    sent: int = 0
    acked: set[str] = attrs.field(factory=set)
    errors: Counter[str] = attrs.field(factory=Counter)
    latencies: list[float] = attrs.field(factory=list)

    def percentile_ms(self, q: float) -> float | None:
        """The ack latency at quantile q, in ms rounded to 0.01; None (JSON null) with fewer
        than two samples, where no percentile exists (0.0 would read as instant acks)."""
        if len(self.latencies) < 2:
            return None
        return round(statistics.quantiles(self.latencies, n=1000)[int(q * 1000) - 1] * 1000, 2)


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
        peer = CLIENTS[target.protocol](target, f"replay-{os.getpid()}-{index}")
        async with receive:
            async for batch in receive:
                await deliver(peer, batch)
        await peer.close()

    async def deliver(peer: Connection, batch: list[Record]) -> None:
        frames = peer.encode(batch)  # once: a resend carries the same chunk ids
        for _ in range(MAX_ATTEMPTS):
            began = time.perf_counter()
            try:
                failure = await peer.send(frames)
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



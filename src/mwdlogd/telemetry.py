"""Metrics and log lines for every observable event, in one place (one call per batch).

Metric names follow fluent-plugin-prometheus, so dashboards and alerts written for the
Fluentd log server keep working. Label values come from fixed sets or from the tag.
"""

import errno
import logging
import time
from collections.abc import Callable, Mapping

import attrs
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mwdlogd import log
from mwdlogd.model import Peer

prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FSYNC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)
OUTPUT_PLUGIN = ("hourly_files", "file")
# Fluentd's slow_flush_log_threshold default: a flush slower than this counts as slow.
SLOW_FLUSH_S = 20.0
# A failing accept loop (descriptor limit) logs one line per listener this often.
ACCEPT_LOG_INTERVAL_S = 10.0


@attrs.define
class OutputStats:
    """The output plugin's counters, shared by /metrics and /api/plugins.json."""

    emit_count: int = 0  # chunks handed to file writers
    emit_records: int = 0
    write_count: int = 0  # gzip members appended
    rollback_count: int = 0  # appends that failed and were kept for a retry
    retry_count: int = 0
    num_errors: int = 0
    flush_time_count: float = 0.0  # milliseconds spent in successful flushes
    slow_flush_count: int = 0
    written_records: int = 0  # records appended to hourly files


@attrs.define
class InputStats:
    emit_count: int = 0  # batches accepted
    emit_records: int = 0


def _zero() -> int:
    return 0


def _one() -> int:
    return 1


def _none() -> list[int]:
    return []


@attrs.define
class BufferView:
    """Read at scrape time from the runtime that owns the numbers."""

    total_bytes: Callable[[], int] = _zero
    stage_bytes: Callable[[], int] = _zero
    queue_length: Callable[[], int] = _zero
    timekeys: Callable[[], list[int]] = _none
    journal_bytes: Callable[[], int] = _zero
    waiting_for_room: Callable[[], int] = _zero
    limit_bytes: Callable[[], int] = _one


class Telemetry:
    """Owns one Prometheus registry, so servers started in one process stay apart."""

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname
        self.registry = CollectorRegistry()
        self.output = OutputStats()
        self.inputs = {"http": InputStats(), "forward": InputStats()}
        self.buffer = BufferView()
        self.tail_viewers = 0
        self.memory_budget_used: Callable[[], int] = lambda: 0  # set by the App
        self._rate = log.RateLimiter()
        self._accept_rate = log.RateLimiter(burst=1, window_s=ACCEPT_LOG_INTERVAL_S)
        r = self.registry
        self.input_records = Counter(
            "fluentd_input_status_num_records", "Records accepted from Engines",
            ["tag", "hostname"], registry=r)
        self.output_records = Counter(
            "fluentd_output_status_num_records", "Records written to hourly files",
            ["tag", "hostname"], registry=r)
        self._output_gauges()
        self.failed_chunks = Counter("mwdlogd_failed_chunks", "Chunks moved to buffer/failed "
                                     "after retry_timeout", registry=r)
        self.failed_records = Counter("mwdlogd_failed_records", "Records moved to "
                                      "buffer/failed after retry_timeout", registry=r)
        self.duplicate_chunks = Counter("mwdlogd_forward_duplicate_chunks",
                                        "Forward resends acked without storing again",
                                        registry=r)
        self.duplicate_requests = Counter("mwdlogd_http_duplicate_requests",
                                          "HTTP resends answered 200 without storing again",
                                          registry=r)
        self.handshake_failures = Counter("mwdlogd_forward_handshake_failures",
                                          "Failed shared_key handshakes", ["reason"], registry=r)
        self.requests = Counter("mwdlogd_http_requests", "HTTPS ingest requests by status",
                                ["status"], registry=r)
        self.rejected = Counter("mwdlogd_rejected_requests", "Refused requests by reason",
                                ["protocol", "reason"], registry=r)
        self.connections = Counter("mwdlogd_connections", "Accepted TCP connections",
                                   ["protocol"], registry=r)
        self.ack_latency = Histogram("mwdlogd_ack_latency_seconds",
                                     "From request complete to acknowledgement", ["protocol"],
                                     buckets=ACK_BUCKETS, registry=r)
        self.journal_sync = Histogram("mwdlogd_journal_fsync_seconds",
                                      "Journal append + fsync of one group commit",
                                      buckets=FSYNC_BUCKETS, registry=r)
        self.records_by_type = Counter("mwdlogd_records", "Records routed, by log type",
                                       ["log_type"], registry=r)
        self.invalid_utf8 = Counter("mwdlogd_invalid_utf8_records",
                                    "Records kept with text that was not UTF-8 (U+FFFD shown, "
                                    "original bytes in utf8_invalid)", ["protocol"], registry=r)
        self.tail_dropped = Counter("mwdlogd_tail_dropped_messages",
                                    "Live-tail records dropped for slow viewers", registry=r)
        self.rejected_connections = Counter(
            "mwdlogd_rejected_connections", "Connections closed at once, over a limit",
            ["protocol", "reason"], registry=r)
        self.accept_errors = Counter(
            "mwdlogd_accept_errors", "accept() failures (EMFILE: descriptor limit)",
            ["protocol", "errno"], registry=r)
        Gauge("mwdlogd_tail_viewers", "Connected live-tail viewers", registry=r).set_function(
            lambda: float(self.tail_viewers))
        Gauge("mwdlogd_journal_bytes", "Journal segment bytes on disk", registry=r).set_function(
            lambda: float(self.buffer.journal_bytes()))
        Gauge("mwdlogd_memory_budget_used_bytes", "Bytes of server.memory_limit held by "
              "requests and unfinished forward messages", registry=r
              ).set_function(lambda: float(self.memory_budget_used()))
        Gauge("mwdlogd_batches_waiting_for_room", "Forward batches held back (their "
              "connections not read) while the buffer is full", registry=r).set_function(
            lambda: float(self.buffer.waiting_for_room()))
        self.auth_failures = Counter("mwdlogd_auth_failures", "Failed authentications "
                                     "(tokens, shared key, forward users)",
                                     ["protocol", "reason"], registry=r)
        self.auth_throttled = Counter("mwdlogd_auth_throttled", "Attempts refused "
                                      "unchecked from addresses locked out after failures",
                                      ["protocol"], registry=r)

    def _output_gauges(self) -> None:
        """fluent-plugin-prometheus' output gauges, read from OutputStats and BufferView."""
        out = self.output

        def buf() -> BufferView:
            return self.buffer

        values: dict[str, tuple[str, Callable[[], float]]] = {
            "buffer_total_bytes": ("Journaled bytes not yet in files",
                                   lambda: float(buf().total_bytes())),
            "buffer_stage_byte_size": ("Bytes waiting in file writers for their flush",
                                       lambda: float(buf().stage_bytes())),
            "buffer_queue_length": ("Hourly files with records waiting for a flush",
                                    lambda: float(buf().queue_length())),
            "buffer_available_space_ratio": (
                "Percent of buffer.total_limit free",
                lambda: max(0.0, 100.0 * (1 - buf().total_bytes() / buf().limit_bytes()))),
            "retry_count": ("Retries of failed writes", lambda: float(out.retry_count)),
            "num_errors": ("Failed writes to hourly files", lambda: float(out.num_errors)),
            "emit_count": ("Chunks handed to file writers", lambda: float(out.emit_count)),
            "write_count": ("gzip members appended", lambda: float(out.write_count)),
            "rollback_count": ("Failed appends kept for retry",
                               lambda: float(out.rollback_count)),
            "flush_time_count": ("Milliseconds spent flushing", lambda: out.flush_time_count),
            "slow_flush_count": (f"Flushes slower than {SLOW_FLUSH_S:g} s",
                                 lambda: float(out.slow_flush_count)),
        }
        for name, (help_text, read) in values.items():
            Gauge(f"fluentd_output_status_{name}", help_text, ["plugin_id", "type"],
                  registry=self.registry).labels(*OUTPUT_PLUGIN).set_function(read)

    def journal_synced(self, seconds: float) -> None:
        """One group commit's journal append + fsync."""
        self.journal_sync.observe(seconds)

    def tail_messages_dropped(self, count: int) -> None:
        """Live-tail records a slow viewer did not get."""
        self.tail_dropped.inc(count)

    def batch_routed(self, log_type: str, records: int) -> None:
        self.output.emit_count += 1
        self.output.emit_records += records
        self.records_by_type.labels(log_type).inc(records)

    def http_accepted(self, tag: str, records: int, latency_s: float,
                      duplicate: bool = False) -> None:
        if duplicate:
            self.duplicate_requests.inc()
            log.event(logging.INFO, "http_resend_acked", tag=tag, records=records,
                      detail="same body from the same client already durable; not stored again")
        else:
            self._input("http", tag, records)
        self.requests.labels("200").inc()
        self.ack_latency.labels("http").observe(latency_s)

    def http_rejected(self, peer: Peer, status: int, reason: str, detail: str) -> None:
        self.requests.labels(str(status)).inc()
        self.rejected.labels("http", reason).inc()
        self._peer_mistake(f"http:{reason}", "request_rejected", peer=peer, status=status,
                           reason=reason, detail=detail)

    def forward_accepted(self, tag: str, records: int, duplicate: bool, latency_s: float) -> None:
        if duplicate:
            self.duplicate_chunks.inc()
            self._peer_mistake("forward:resend", "forward_resend_acked", level=logging.INFO,
                               tag=tag,
                               detail="chunk id already durable; acked without storing again")
        else:
            self._input("forward", tag, records)
        self.ack_latency.labels("forward").observe(latency_s)

    def _input(self, protocol: str, tag: str, records: int) -> None:
        self.input_records.labels(tag, self.hostname).inc(records)
        stats = self.inputs[protocol]
        stats.emit_count += 1
        stats.emit_records += records

    def forward_rejected(self, peer: Peer, reason: str, detail: str) -> None:
        self.rejected.labels("forward", reason).inc()
        self._peer_mistake(f"forward:{reason}", "forward_connection_closed", peer=peer,
                           reason=reason, detail=detail)

    def forward_handshake_failed(self, peer: Peer, reason: str, hostname: str) -> None:
        self.rejected.labels("forward", "handshake").inc()
        self.handshake_failures.labels(reason).inc()
        self._peer_mistake("forward:handshake", "forward_handshake_failed", peer=peer,
                           reason=reason, client_hostname=hostname)

    def auth_event(self, protocol: str, source: str, reason: str, detail: str) -> None:
        """A failed authentication (`reason` from a fixed set), an attempt refused while
        locked out (`throttled`), or the failure that locks an address out (`locked_out`)."""
        if reason == "throttled":
            self.auth_throttled.labels(protocol).inc()
            name = "auth_throttled"
        elif reason == "locked_out":
            name = "auth_locked_out"
        else:
            self.auth_failures.labels(protocol, reason).inc()
            name = "auth_failed"
        self._peer_mistake(f"{protocol}:{name}", name, protocol=protocol, source=source,
                           reason=reason, detail=detail)

    def tls_handshake_failed(self, protocol: str, peer: Peer, error: str) -> None:
        self.rejected.labels(protocol, "tls_handshake").inc()
        self._peer_mistake(f"{protocol}:tls", "tls_handshake_failed", protocol=protocol,
                           peer=peer, error=error)

    def connection_opened(self, protocol: str) -> None:
        self.connections.labels(protocol).inc()

    def connection_refused(self, protocol: str, address: str, reason: str) -> None:
        self.rejected_connections.labels(protocol, reason).inc()
        self._peer_mistake(f"{protocol}:{reason}", "connection_refused", protocol=protocol,
                           peer=address, reason=reason)

    def accept_failed(self, protocol: str, exc: OSError, retry_in_s: float) -> None:
        code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        self.accept_errors.labels(protocol, code).inc()
        allowed, suppressed = self._accept_rate.allow(protocol, time.monotonic())
        if allowed:
            log.event(logging.ERROR, "accept_failed", protocol=protocol, errno=code,
                      error=exc.strerror, retry_in_s=f"{retry_in_s:.1f}",
                      failures_not_logged=suppressed,
                      detail=f"new connections wait; logged at most every "
                             f"{ACCEPT_LOG_INTERVAL_S:g}s, counted in "
                             f"mwdlogd_accept_errors_total")

    def handler_failed(self, protocol: str, peer: Peer) -> None:
        """A connection handler raised (our bug, but a peer may trigger it at will): the
        traceback is logged, rate-limited, from inside the `except` block."""
        self.rejected.labels(protocol, "internal_error").inc()
        allowed, suppressed = self._rate.allow(f"{protocol}:internal_error", time.monotonic())
        if suppressed:
            log.event(logging.WARNING, "log_suppressed", kind=f"{protocol}:internal_error",
                      lines=suppressed)
        if allowed:
            log.logger.exception("%s", log.logfmt("handler_failed", {
                "protocol": protocol, "peer": log.capped(peer)}))

    def records_written(self, path: str, by_tag: Mapping[str, int], size: int,
                        seconds: float) -> None:
        for tag, count in by_tag.items():
            self.output_records.labels(tag, self.hostname).inc(count)
        self.output.write_count += 1
        self.output.written_records += sum(by_tag.values())
        self.output.flush_time_count += seconds * 1000
        if seconds >= SLOW_FLUSH_S:
            self.output.slow_flush_count += 1
            log.event(logging.WARNING, "slow_flush", path=path, seconds=f"{seconds:.1f}")
        log.event(logging.DEBUG, "flushed", path=path, records=sum(by_tag.values()),
                  bytes=size, seconds=f"{seconds:.4f}")

    def write_failed(self, path: str, error: str, records: int, retry_in_s: float) -> None:
        self.output.num_errors += 1
        self.output.retry_count += 1
        self.output.rollback_count += 1
        log.event(logging.ERROR, "write_failed", path=path, error=error, records=records,
                  retry_in_s=f"{retry_in_s:.1f}")

    def chunk_failed(self, path: str, error: str, records: int, moved_to: str) -> None:
        self.failed_chunks.inc()
        self.failed_records.inc(records)
        log.event(logging.ERROR, "chunk_moved_to_failed", path=path, error=error,
                  records=records, moved_to=moved_to)

    def invalid_utf8_kept(self, protocol: str, peer: Peer, tag: str, records: int) -> None:
        """Once per request or message that had such records: they were stored."""
        self.invalid_utf8.labels(protocol).inc(records)
        self._peer_mistake(f"{protocol}:invalid_utf8", "invalid_utf8_kept", protocol=protocol,
                           peer=peer, tag=tag, records=records,
                           detail="stored with U+FFFD; original bytes in utf8_invalid")

    def _peer_mistake(self, key: str, name: str, level: int = logging.WARNING,
                      **fields: object) -> None:
        """A line a peer can cause at will: rate-limited per `key`, every value capped."""
        allowed, suppressed = self._rate.allow(key, time.monotonic())
        if suppressed:
            log.event(logging.WARNING, "log_suppressed", kind=key, lines=suppressed)
        if allowed:
            log.event(level, name, **{k: log.capped(v) for k, v in fields.items()})

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)

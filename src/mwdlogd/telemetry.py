"""Metrics and log lines for every observable event, in one place (one call per batch).

Metric names follow fluent-plugin-prometheus, so dashboards and alerts written for the
Fluentd log server keep working. Label values come from fixed sets or from the tag.
"""

import logging
import time
from collections.abc import Callable, Mapping

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mwdlogd import log

prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
OUTPUT_PLUGIN = ("hourly_files", "file")


class Telemetry:
    """Owns one Prometheus registry, so servers started in one process stay apart."""

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname
        self.registry = CollectorRegistry()
        self._rate = log.RateLimiter()
        r = self.registry
        self.input_records = Counter(
            "fluentd_input_status_num_records", "Records accepted from Engines",
            ["tag", "hostname"], registry=r)
        self.output_records = Counter(
            "fluentd_output_status_num_records", "Records written to hourly files",
            ["tag", "hostname"], registry=r)
        plugin = ["plugin_id", "type"]
        self.write_count = Gauge("fluentd_output_status_write_count",
                                 "gzip members appended to hourly files", plugin, registry=r)
        self.num_errors = Gauge("fluentd_output_status_num_errors",
                                "Failed writes to hourly files", plugin, registry=r)
        self.retry_count = Gauge("fluentd_output_status_retry_count",
                                 "Retries of failed writes", plugin, registry=r)
        self.failed_chunks = Counter("mwdlogd_failed_chunks", "Chunks moved to buffer/failed "
                                     "after retry_timeout", registry=r)
        self.failed_records = Counter("mwdlogd_failed_records", "Records moved to "
                                      "buffer/failed after retry_timeout", registry=r)
        self.duplicate_chunks = Counter("mwdlogd_forward_duplicate_chunks",
                                        "Forward resends acked without storing again",
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
        for gauge in (self.write_count, self.num_errors, self.retry_count):
            gauge.labels(*OUTPUT_PLUGIN).set(0)

    def watch_buffer(self, buffered_bytes: Callable[[], int], open_batches: Callable[[], int]
                     ) -> None:
        """Gauges read at scrape time: journal bytes not yet written, batches open."""
        plugin = ["plugin_id", "type"]
        Gauge("fluentd_output_status_buffer_total_bytes", "Journaled bytes not yet in files",
              plugin, registry=self.registry).labels(*OUTPUT_PLUGIN).set_function(
            lambda: float(buffered_bytes()))
        Gauge("fluentd_output_status_buffer_queue_length", "Journaled batches not yet in files",
              plugin, registry=self.registry).labels(*OUTPUT_PLUGIN).set_function(
            lambda: float(open_batches()))

    def http_accepted(self, tag: str, records: int, latency_s: float) -> None:
        self.input_records.labels(tag, self.hostname).inc(records)
        self.requests.labels("200").inc()
        self.ack_latency.labels("http").observe(latency_s)

    def http_rejected(self, peer: str, status: int, reason: str, detail: str) -> None:
        self.requests.labels(str(status)).inc()
        self.rejected.labels("http", reason).inc()
        self._peer_mistake(f"http:{reason}", "request_rejected", peer=peer, status=status,
                           reason=reason, detail=detail)

    def forward_accepted(self, tag: str, records: int, duplicate: bool, latency_s: float) -> None:
        if duplicate:
            self.duplicate_chunks.inc()
            log.event(logging.INFO, "forward_resend_acked", tag=tag,
                      detail="chunk id already durable; acked without storing again")
        else:
            self.input_records.labels(tag, self.hostname).inc(records)
        self.ack_latency.labels("forward").observe(latency_s)

    def forward_rejected(self, peer: str, reason: str, detail: str) -> None:
        self.rejected.labels("forward", reason).inc()
        self._peer_mistake(f"forward:{reason}", "forward_connection_closed", peer=peer,
                           reason=reason, detail=detail)

    def forward_handshake_failed(self, peer: str, reason: str, hostname: str) -> None:
        self.rejected.labels("forward", "handshake").inc()
        self.handshake_failures.labels(reason).inc()
        self._peer_mistake("forward:handshake", "forward_handshake_failed", peer=peer,
                           reason=reason, client_hostname=hostname)

    def tls_handshake_failed(self, protocol: str, peer: str, error: str) -> None:
        self.rejected.labels(protocol, "tls_handshake").inc()
        self._peer_mistake(f"{protocol}:tls", "tls_handshake_failed", protocol=protocol,
                           peer=peer, error=error)

    def connection_opened(self, protocol: str) -> None:
        self.connections.labels(protocol).inc()

    def records_written(self, path: str, by_tag: Mapping[str, int], size: int,
                        seconds: float) -> None:
        for tag, count in by_tag.items():
            self.output_records.labels(tag, self.hostname).inc(count)
        self.write_count.labels(*OUTPUT_PLUGIN).inc()
        log.event(logging.DEBUG, "flushed", path=path, records=sum(by_tag.values()),
                  bytes=size, seconds=f"{seconds:.4f}")

    def write_failed(self, path: str, error: str, records: int, retry_in_s: float) -> None:
        self.num_errors.labels(*OUTPUT_PLUGIN).inc()
        self.retry_count.labels(*OUTPUT_PLUGIN).inc()
        log.event(logging.ERROR, "write_failed", path=path, error=error, records=records,
                  retry_in_s=f"{retry_in_s:.1f}")

    def chunk_failed(self, path: str, error: str, records: int, moved_to: str) -> None:
        self.failed_chunks.inc()
        self.failed_records.inc(records)
        log.event(logging.ERROR, "chunk_moved_to_failed", path=path, error=error,
                  records=records, moved_to=moved_to)

    def _peer_mistake(self, key: str, name: str, **fields: object) -> None:
        allowed, suppressed = self._rate.allow(key, time.monotonic())
        if suppressed:
            log.event(logging.WARNING, "log_suppressed", kind=key, lines=suppressed)
        if allowed:
            log.event(logging.WARNING, name, **fields)

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)

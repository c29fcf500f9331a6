"""What goes wrong on the way, with the Engines' real forwarders (Fluentd 1.18, Fluent
Bit 4.2.8) and a real mwdlogd subprocess, each case on both protocols:

- a server stall (SIGSTOP) longer than the client's read/ack timeout: the forwarder gives
  up on its request and sends it again; the copy the stalled server commits after SIGCONT
  and the resend are stored once;
- a `kill -9` between the fsync and the answer: a relay swallows mwdlogd's answers
  (the server has fsynced and answered, the forwarder never hears), then mwdlogd is
  killed and restarted; the restarted server recognises the resends;
- a full buffer: a small `buffer.total_limit`, so HTTP answers 503 and forward stops
  reading until the flush makes room.

Each checks the exact set of records that landed (missing 0, duplicated 0) and that the
fault really happened (the forwarder's timeout line, the server's resend counters, the
503s), so it can fail.
"""

from __future__ import annotations

import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from peers.gate import Gate
from peers.real import Peer
from test_forwarders import (
    DELIVERY_TIMEOUT_S,
    KILL_CASES,
    Site,
    Writer,
    check_landed,
    json_lines,
    open_site,
    start_engine,
    wait_more_stored,
    wait_stored,
)

CASES = sorted(KILL_CASES)
RECORDS = 6000


def metric(site: Site, prefix: str, contains: str = "") -> float:
    """The sum of the server's samples named `prefix...` whose line holds `contains`."""
    assert site.server is not None
    address = site.server.addresses["metrics"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(prefix) and contains in line)


def resends_acked(site: Site) -> float:
    """Requests and chunks the server recognised as already durable."""
    return (metric(site, "mwdlogd_http_duplicate_requests_total")
            + metric(site, "mwdlogd_forward_duplicate_chunks_total"))


def acked_records(site: Site) -> float:
    return metric(site, "fluentd_input_status_num_records_total")


def poll(condition: object, what: str, timeout: float = DELIVERY_TIMEOUT_S) -> None:
    """Until `condition()` (state in another process), failing after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)  # polling another process, with a deadline


# Connections kept open between requests (Fluent Bit does by default), so that requests
# go on an open connection: when the server stops, or while the relay holds answers.
KEEPALIVE = {
    "fluentd-forward": (("  require_ack_response true\n",
                         "  require_ack_response true\n  keepalive true\n"),),
    "fluentd-http": (("  content_type application/x-ndjson\n",
                      "  content_type application/x-ndjson\n  reuse_connections true\n"),),
    "fluent-bit-forward": (),
    "fluent-bit-http": (),
}
# ... and a client timeout of 2 s on each forwarder.
TIMEOUTS = {
    "fluentd-forward": (*KEEPALIVE["fluentd-forward"],
                        ("  keepalive true\n",
                         "  keepalive true\n  ack_response_timeout 2\n  connect_timeout 2\n")),
    "fluentd-http": (*KEEPALIVE["fluentd-http"],
                     ("  reuse_connections true\n",
                      "  reuse_connections true\n  open_timeout 2\n  read_timeout 2\n")),
    "fluent-bit-forward": (("    net.io_timeout       60s\n", "    net.io_timeout 2s\n"),),
    "fluent-bit-http": (("    net.io_timeout    60s\n", "    net.io_timeout 2s\n"),),
}
TIMEOUT_LINES = {
    "fluentd-forward": r"\[warn\].*(no response from node|timeout to commit|failed to flush)",
    "fluentd-http": r"\[warn\].*(Timeout|timeout)",
    "fluent-bit-forward": r"\[ *(warn|error)\].*(timeout|timed out)",
    "fluent-bit-http": r"\[ *(warn|error)\].*(timeout|timed out)",
}


@pytest.fixture
def engine_site(tmp_path: Path, pki: Path) -> Iterator[Site]:
    with open_site(tmp_path, pki) as site:
        yield site


def deliver(site: Site, peer: Peer, writer: Writer, expected: set[str]) -> None:
    try:
        writer.join()
        wait_stored(site.root, expected, peer=peer)
    finally:
        writer.stop()
        peer.stop()


@pytest.mark.parametrize("case", CASES)
def test_a_stall_longer_than_the_client_timeout(engine_site: Site, peers_cache: Path,
                                                tmp_path: Path, case: str) -> None:
    """mwdlogd stops (SIGSTOP) while the forwarder sends, until the forwarder's 2 s
    timeout fires (its log says so), then continues: the forwarder resends, the server
    recognises the resend (its counter), every record lands once."""
    site = engine_site
    data, expected = json_lines(case.replace("-", ""), RECORDS)
    peer = start_engine(case, site, peers_cache, tmp_path, edits=TIMEOUTS[case])
    writer = Writer(tmp_path / "engine.log", data, steps=80)
    assert site.server is not None
    try:
        wait_more_stored(site.root, 0)
        timeouts = len(peer.matching(TIMEOUT_LINES[case]))
        site.server.signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            peer.wait_for_more(TIMEOUT_LINES[case], timeouts, timeout=30)
        finally:
            site.server.signal(signal.SIGCONT)
        print(f"stalled {time.monotonic() - stopped:.1f} s: "
              f"{peer.matching(TIMEOUT_LINES[case])[timeouts]}")
    finally:
        deliver(site, peer, writer, set(expected))
    resends = resends_acked(site)
    site.stop()
    check_landed(site.root, expected)
    assert resends > 0, "the stall caused no resend: the test proves nothing"


@pytest.mark.parametrize("case", CASES)
def test_kill_9_between_fsync_and_answer(engine_site: Site, peers_cache: Path, tmp_path: Path,
                                         case: str) -> None:
    """The forwarder sends through a relay; the relay starts swallowing mwdlogd's answers,
    the server goes on acking (its counter: records fsynced whose answer the forwarder
    never got), then it is `kill -9`ed and restarted. The forwarder resends those
    requests/chunks; the restarted server recognises them (its resend counter) and
    every record lands once."""
    site = engine_site
    forward = "forward" in case
    gate = Gate(site.forward_port if forward else site.http_port)
    data, expected = json_lines(case.replace("-", ""), RECORDS)
    peer = start_engine(case, site, peers_cache, tmp_path, edits=KEEPALIVE[case],
                        port=gate.port)
    writer = Writer(tmp_path / "engine.log", data, steps=80)
    try:
        wait_more_stored(site.root, 0)
        gate.hold()
        held_from = acked_records(site)
        poll(lambda: gate.swallowed > 0 and acked_records(site) > held_from,
             "an answer swallowed after the fsync")
        unanswered = acked_records(site) - held_from
        assert writer.writing, "the kill must come while the Engine still logs"
        site.kill()
        gate.release()
        site.start()
        print(f"killed with {unanswered:.0f} records fsynced and unanswered")
    finally:
        try:
            deliver(site, peer, writer, set(expected))
        finally:
            gate.close()
    resends = resends_acked(site)
    site.stop()
    check_landed(site.root, expected)
    assert resends > 0, "no resend was recognised after the restart"


class GaugeWatch:
    """Samples a server gauge in a thread; `peak` is the largest value seen."""

    def __init__(self, site: Site, name: str) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(site, name))
        self._thread.start()

    def _run(self, site: Site, name: str) -> None:
        while not self._stop.wait(0.05):  # sampling another process's gauge
            try:
                self.peak = max(self.peak, metric(site, name))
            except OSError:
                continue

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.parametrize("case", CASES)
def test_a_full_buffer(tmp_path: Path, pki: Path, peers_cache: Path, case: str) -> None:
    """`buffer.total_limit` far below what the Engine sends between two flushes (4 s):
    HTTP answers 503 at once (`http.full_wait 0s`: the forwarder's retry path), forward
    stops reading (batches wait for room); after each flush there is room again and
    every record lands once."""
    site = open_site(tmp_path, pki, buffer={"total_limit": "1MiB", "flush_interval": "4s"},
                     http={"full_wait": "0s"})
    try:
        data, expected = json_lines(case.replace("-", ""), RECORDS)
        edits = (("chunk_limit_size 8m", "chunk_limit_size 64k"),) \
            if case.startswith("fluentd") else ()
        peer = start_engine(case, site, peers_cache, tmp_path, edits=edits)
        writer = Writer(tmp_path / "engine.log", data, steps=30)
        waiting = GaugeWatch(site, "mwdlogd_batches_waiting_for_room")
        try:
            deliver(site, peer, writer, set(expected))
        finally:
            waiting.stop()
        refused = metric(site, "mwdlogd_http_requests_total", 'status="503"')
        print(f"503 answers: {refused:.0f}, forward batches waiting at most: {waiting.peak:.0f}")
        if "forward" in case:
            assert waiting.peak > 0, "forward was never held back: the buffer was not full"
        else:
            assert refused > 0, "no 503: the buffer was never full"
    finally:
        site.stop()
    check_landed(site.root, expected)

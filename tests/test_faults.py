"""Disk full, permission denied and overload against the real server process.

Needs root (CI and the dev machines run as root): a small tmpfs is mounted as the storage
root to make ENOSPC real, and the server runs without CAP_DAC_OVERRIDE so that a mode-000
directory refuses it. Every acked record must land exactly once once the fault clears.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import config_raw
from helpers import client_context, read_tree, tmpfs
from load_client import Load
from server_process import ServerProcess, write_config

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root (mount, setpriv)")
NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
          "--inh-caps=-dac_override,-dac_read_search"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "small", "256k") as mountpoint:
        yield mountpoint


def grow(mountpoint: Path) -> None:
    subprocess.run(["mount", "-o", "remount,size=512m", str(mountpoint)], check=True)


def scrape(server: ServerProcess) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{server.addresses['metrics']}/metrics") as reply:
        text = reply.read().decode()
    return {m[0]: float(m[1]) for m in re.findall(r"^(\S+) (\S+)$", text, re.M)}


RETRIES = 'fluentd_output_status_retry_count{plugin_id="hourly_files",type="file"}'
ERRORS = 'fluentd_output_status_num_errors{plugin_id="hourly_files",type="file"}'


def finish_and_check(server: ServerProcess, load: Load, root: Path) -> None:
    """Stop the load, flush, drain, then every acked id is stored exactly once."""
    load.stop()
    mark = len(server.lines)
    server.signal(signal.SIGUSR1)
    server.wait_for("flush_done", start=mark)
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    server.wait_for("shutdown_complete")
    stored = Counter(r["id"] for records in read_tree(root).values() for r in records)
    assert [i for i, n in stored.items() if n > 1] == []
    assert sorted(load.acked - set(stored)) == []
    assert load.acked


# A full buffer answers 503 at once: with the default http.full_wait each request first
# waits 20 s for room, which only adds 20 s to every wait_for_status(503).
ANSWER_503_AT_ONCE = {"full_wait": "0s"}


def fault_config(tmp_path: Path, pki: Path, root: Path, *, http: dict[str, str] | None = None,
                 **buffer: str) -> Path:
    raw = config_raw(tmp_path, pki, storage={"root": str(root)}, http=http or {},
                     buffer={"flush_interval": "100ms", "retry_max_interval": "200ms",
                             **buffer})
    return write_config(tmp_path / "config.toml", raw)


def test_disk_full_retries_answers_503_then_everything_lands(
        tmp_path: Path, pki: Path, small_disk: Path) -> None:
    server = ServerProcess(fault_config(tmp_path, pki, small_disk, total_limit="1MiB",
                                        http=ANSWER_503_AT_ONCE))
    load = Load(client_context(pki), pad=2000)
    try:
        load.serve(int(server.addresses["http"].rpartition(":")[2]))
        server.wait_for(r"write_failed .*No space left on device")
        load.wait_for_status(503)
        metrics = scrape(server)
        assert metrics[RETRIES] > 0 and metrics[ERRORS] > 0
        assert metrics['mwdlogd_rejected_requests_total{protocol="http",reason="buffer_full"}'] > 0
        grow(small_disk)
        finish_and_check(server, load, small_disk)
    finally:
        load.stop()
        server.stop()


def test_permission_denied_retries_then_lands_when_fixed(tmp_path: Path, pki: Path) -> None:
    root = tmp_path / "logs"
    (root / "c0").mkdir(parents=True)
    (root / "c0").chmod(0)
    config = fault_config(tmp_path, pki, root)
    server = ServerProcess(None, argv=[*NO_DAC, sys.executable, "-m", "mwdlogd", "run",
                                       "--config", str(config)])
    load = Load(client_context(pki), customers=("c0", "c1"))
    try:
        load.serve(int(server.addresses["http"].rpartition(":")[2]))
        server.wait_for(r"write_failed path=c0/.*Permission denied")
        load.wait_for_acks(200)
        assert scrape(server)[RETRIES] > 0
        mark = len(server.lines)
        server.signal(signal.SIGUSR1)
        server.wait_for("flush_done", start=mark)
        assert list((root / "c1").rglob("*.log.gz"))  # other customers are unaffected
        (root / "c0").chmod(0o755)
        assert not list((root / "c0").rglob("*.log.gz"))
        (root / "c0").chmod(0o755)
        finish_and_check(server, load, root)
        assert list((root / "c0").rglob("*.log.gz"))
    finally:
        (root / "c0").chmod(0o755)
        load.stop()
        server.stop()


OVERLOAD_S = 30.0
MIB = 1024**2
TOTAL_LIMIT = 16 * MIB  # buffer.total_limit: records acked but not yet written
# The load writes 54 hourly files (3 customers x 2 log types x 3 fqdns x 3 hours), each
# with a gzip member open and its compressor (about 256 KiB, storage/hourly.py).
OPEN_FILES = 54
COMPRESSOR_BYTES = 256 * 1024
# What no limit names: allocator high-water, TLS and thread buffers, the requests in flight
# (3 clients x 40 records of at most 2 KB), the first requests' lazy imports and caches.
# Measured on top of the two named terms: 66-77 MiB (growth 96-106 MiB in 11 runs,
# 2026-11-30, most of it while the disk refuses writes); not yet attributed further.
UNNAMED_MARGIN = 96 * MIB
GROWTH_LIMIT = TOTAL_LIMIT + OPEN_FILES * COMPRESSOR_BYTES + UNNAMED_MARGIN


def test_overload_keeps_memory_bounded_and_loses_nothing(
        tmp_path: Path, pki: Path, small_disk: Path) -> None:
    """30 s of load at full speed; for the first 20 s the disk takes nothing at all. The
    server's peak resident set (VmHWM) grows above its idle size (VmRSS once ready) by
    less than GROWTH_LIMIT."""
    server = ServerProcess(fault_config(tmp_path, pki, small_disk,
                                        total_limit=f"{TOTAL_LIMIT // MIB}MiB",
                                        flush_interval="500ms", http=ANSWER_503_AT_ONCE))
    idle = proc_status_bytes(server.process.pid, "VmRSS")
    load = Load(client_context(pki), pad=2000)
    try:
        load.serve(int(server.addresses["http"].rpartition(":")[2]))
        load.wait_for_status(503)
        threading.Event().wait(OVERLOAD_S * 2 / 3)  # the offered load's duration
        grow(small_disk)
        threading.Event().wait(OVERLOAD_S / 3)
        peak = proc_status_bytes(server.process.pid, "VmHWM")
        finish_and_check(server, load, small_disk)
    finally:
        load.stop()
        server.stop()
    assert load.statuses[503] > 0
    print(f"overload: idle RSS {idle / MIB:.1f} MiB, peak {peak / MIB:.1f} MiB, growth "
          f"{(peak - idle) / MIB:.1f} MiB (limit {GROWTH_LIMIT / MIB:.0f} MiB), "
          f"statuses {dict(load.statuses)}, acked {len(load.acked)}")
    assert peak - idle < GROWTH_LIMIT


def proc_status_bytes(pid: int, field: str) -> int:
    """A `/proc/PID/status` size field (VmRSS, VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_shutdown_timeout_leaves_the_rest_in_the_journal(tmp_path: Path, pki: Path) -> None:
    root = tmp_path / "logs"
    (root / "c0").mkdir(parents=True)
    (root / "c0").chmod(0)
    raw = config_raw(tmp_path, pki, storage={"root": str(root)},
                     server={"shutdown_timeout": "1s"},
                     buffer={"flush_interval": "100ms", "retry_max_interval": "200ms"})
    config = write_config(tmp_path / "config.toml", raw)
    argv = [*NO_DAC, sys.executable, "-m", "mwdlogd", "run", "--config", str(config)]
    server = ServerProcess(None, argv=argv)
    load = Load(client_context(pki), customers=("c0",))
    try:
        load.serve(int(server.addresses["http"].rpartition(":")[2]))
        load.wait_for_acks(100)
        load.stop()
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
        left = server.wait_for(r"shutdown_incomplete .*batches_left_in_journal=[1-9]")
        assert "bytes_left_in_journal=" in left
        (root / "c0").chmod(0o755)
        again = ServerProcess(None, argv=argv)
        replayed = again.wait_for(r" recovered ")
        assert "records_replayed=0" not in replayed
        finish_and_check(again, load, root)
    finally:
        (root / "c0").chmod(0o755)
        load.stop()
        server.stop()

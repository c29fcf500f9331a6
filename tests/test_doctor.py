"""`mwdlogd doctor`: each finding provoked for real (a port taken by a listening socket, an
expired certificate, a key that is not the certificate's, a CA the running server does
not match, a client certificate it refuses, a full tmpfs) against the real command."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mwdlogd.certs import init_certs
from mwdlogd.doctor import (
    listening_inodes,
    log_findings,
    metric_findings,
    parse_metrics,
    parse_status,
    writable_by,
)

from conftest import config_raw
from helpers import (
    TOKEN,
    client_context,
    engine_records,
    free_port,
    ids_by_file,
    ndjson,
    reissue,
    tmpfs,
)
from server_process import ServerProcess, write_config

NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount)")
HOUR_2024 = 1732500000.5
NGINX_FILE = "acme/nginx/www.acme.test/2024/11/25/02.log.gz"


def doctor(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mwdlogd", "doctor", "--config", str(config),
                           *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ})


def lines(result: subprocess.CompletedProcess[str], status: str) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith(status)]


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    """A PKI of this test's own (tests change it), valid long enough not to warn."""
    directory = tmp_path / "certs"
    init_certs(directory, hosts=["localhost", "127.0.0.1"], clients=["engine-01"], days=400)
    return directory


def fixed_ports(tmp_path: Path, certs: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A config whose listeners have real port numbers (doctor must know where to look)."""
    ports = {s: {"bind": "127.0.0.1", "port": free_port()}
             for s in ("http", "forward", "health", "monitor", "metrics")}
    return config_raw(tmp_path, certs, **{**ports, **sections})


def test_all_good_exits_0(tmp_path: Path, certs: Path) -> None:
    config = write_config(tmp_path / "c.toml", fixed_ports(tmp_path, certs))
    server = ServerProcess(config)
    try:
        result = doctor(config)
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout
    assert lines(result, "warn") == lines(result, "FAIL") == []
    out = result.stdout
    assert f"ok    port http {server.addresses['http']}: served by mwdlogd (pid " in out
    assert "ok    tls key matches cert: yes" in out
    assert "ok    server: running, /health answers" in out
    assert (f"ok    tls handshake http {server.addresses['http']}: handshake completed with "
            f"tls.ca and client certificate {certs / 'engine-01.crt'}") in out
    assert f"ok    tls handshake forward {server.addresses['forward']}:" in out
    assert "ok    metrics 127.0.0.1:" in out and "0 write retries, 0 errors" in out


def test_a_port_taken_by_another_process_is_named_with_its_pid(tmp_path: Path,
                                                               certs: Path) -> None:
    raw = fixed_ports(tmp_path, certs)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        raw["http"]["port"] = port
        result = doctor(write_config(tmp_path / "c.toml", raw))
    assert result.returncode == 2
    (fail,) = lines(result, "FAIL")
    assert fail.startswith(f"FAIL  port http 127.0.0.1:{port}: in use by pid {os.getpid()} ("
                           f"{sys.executable}")
    assert fail.endswith("— stop that process or set http.port to a free port; `mwdlogd run` "
                         "cannot bind it")
    assert "warn  server: not running" in result.stdout


def test_an_expired_certificate_and_a_wrong_key_are_problems(tmp_path: Path,
                                                            certs: Path) -> None:
    config = write_config(tmp_path / "c.toml", fixed_ports(tmp_path, certs))
    reissue(certs, "server", days=-2, hosts=["localhost"])
    result = doctor(config)
    assert result.returncode == 2
    (expired,) = [line for line in lines(result, "FAIL") if "expiry" in line]
    assert expired.startswith("FAIL  tls.cert expiry: expired on ")
    assert expired.endswith("— `mwdlogd certs renew`, then reload the server (SIGHUP)")
    other = ec.generate_private_key(ec.SECP256R1())
    (certs / "server.key").write_bytes(other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    mismatch = doctor(config)
    assert (f"FAIL  tls key matches cert: {certs / 'server.key'} is not the key of "
            f"{certs / 'server.crt'}") in mismatch.stdout


def test_missing_certificates_say_how_to_create_them(tmp_path: Path, certs: Path) -> None:
    config = write_config(tmp_path / "c.toml", fixed_ports(tmp_path, certs))
    (certs / "server.key").unlink()
    result = doctor(config)
    assert result.returncode == 2
    assert (f"FAIL  tls key: {certs / 'server.key'} not found — create it (`mwdlogd certs "
            "init` for a development PKI) or point tls.key at your file") in result.stdout


def test_a_ca_the_running_server_does_not_match_fails_the_handshake(
        tmp_path: Path, certs: Path, rogue_pki: Path) -> None:
    config = write_config(tmp_path / "c.toml", fixed_ports(tmp_path, certs))
    server = ServerProcess(config)
    try:
        refused = doctor(config, "--client-cert", str(rogue_pki / "engine-01.crt"),
                         "--client-key", str(rogue_pki / "engine-01.key"))
        init_certs(certs, hosts=["localhost"], clients=["engine-01"], days=400, force=True)
        replaced = doctor(config)  # new CA on disk, the server still serves the old one
    finally:
        server.stop()
    assert refused.returncode == 2
    assert (f"FAIL  tls handshake http {server.addresses['http']}: the server refused client "
            f"certificate {rogue_pki / 'engine-01.crt'}") in refused.stdout
    assert replaced.returncode == 2
    for protocol in ("http", "forward"):
        assert (f"FAIL  tls handshake {protocol} {server.addresses[protocol]}: the running "
                "server's certificate is not trusted by tls.ca") in replaced.stdout
    assert "reload (SIGHUP) the server if its certificate was re-issued" in replaced.stdout


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "small", "256k") as mountpoint:
        yield mountpoint


def post(address: str, certs: Path, records: list[dict[str, Any]]) -> int:
    request = urllib.request.Request(
        f"https://{address}/nginx.access", data=ndjson(records), method="POST",
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-ndjson"})
    try:
        with urllib.request.urlopen(request, context=client_context(certs), timeout=30) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as refused:
        return refused.code


@NEEDS_ROOT
def test_a_full_disk_names_the_cause_in_storage_metrics_and_log(
        tmp_path: Path, certs: Path, full_disk: Path) -> None:
    raw = fixed_ports(tmp_path, certs, storage={"root": str(full_disk)},
                      buffer={"flush_interval": "100ms", "retry_max_interval": "200ms",
                              "total_limit": "100KiB"})
    raw["http"]["full_wait"] = "100ms"  # answer 503 at once when the journal is full
    config = write_config(tmp_path / "c.toml", raw)
    with (full_disk / "filler").open("wb", buffering=0) as filler, \
            pytest.raises(OSError, match="No space left"):
        while True:
            filler.write(b"\0" * 4096)
    server = ServerProcess(config)
    try:
        acked: list[str] = []
        for n in range(0, 200, 20):  # until the journal holds more than total_limit
            records = engine_records(20, start=n, time=HOUR_2024)
            for record in records:
                record["pad"] = secrets.token_hex(1000)  # 2 kB the journal cannot shrink
            if post(server.addresses["http"], certs, records) == 503:
                break
            acked += [r["id"] for r in records]
        server.wait_for(r"write_failed .*No space left on device")
        log = tmp_path / "server.log"
        log.write_text("\n".join(server.lines) + "\n")
        result = doctor(config, "--log", str(log))
        (full_disk / "filler").unlink()
        mark = len(server.lines)
        server.signal(signal.SIGUSR1)
        server.wait_for("flush_done", start=mark)
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
    finally:
        server.stop()
    assert 0 < len(acked) < 200
    assert ids_by_file(full_disk) == {NGINX_FILE: acked}
    assert result.returncode == 2, result.stdout
    out = result.stdout
    assert (f"FAIL  storage.root {full_disk}: cannot write in {full_disk}: [Errno 28] No space "
            "left on device") in out
    assert "— free space on that filesystem or grow it" in out
    assert "requests refused with 503 buffer_full since start" in out
    assert "journal size: " in out
    assert "write retries" in out and "failed writes since start" in out
    (cause,) = [line for line in out.splitlines() if line.startswith(f"warn  log {log}:")]
    assert cause.startswith(f"warn  log {log}: write_failed ")
    assert "No space left on device" in cause
    assert cause.endswith("— free space on that filesystem or grow it")


def test_parsers_read_proc_metrics_and_log_lines() -> None:
    table = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   "
             "uid  timeout inode\n"
             "   0: 0100007F:22B8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     "
             "0        0 12345 1 0000000000000000 100 0 0 10 0\n"
             "   1: 0100007F:A1B2 0100007F:22B8 01 00000000:00000000 00:00000000 00000000     "
             "0        0 12346 1 0000000000000000 100 0 0 10 0\n")
    assert listening_inodes(table) == {8888: 12345}
    samples = parse_metrics(
        "# HELP x\n"
        'fluentd_output_status_retry_count{plugin_id="hourly_files",type="file"} 3.0\n'
        'fluentd_output_status_num_errors{plugin_id="hourly_files",type="file"} 3.0\n'
        "mwdlogd_failed_records_total 7.0\n"
        'mwdlogd_rejected_requests_total{protocol="http",reason="unauthorized"} 2.0\n'
        'mwdlogd_rejected_requests_total{protocol="http",reason="forbidden_customer"} 4.0\n')
    found = {f.status: f for f in metric_findings(samples, "m:1")}
    assert found["FAIL"].finding.startswith("7 records moved to")
    assert [f.finding for f in metric_findings(samples, "m:1") if f.status == "warn"] == [
        "3 write retries, 3 failed writes since start",
        "requests refused for their credentials: http unauthorized 2",
        "4 requests refused with 403 forbidden_customer since start"]
    assert [f.fix for f in metric_findings(samples, "m:1")][-1].startswith(
        "a token restricted by `customers = [...]` was used for another customer")
    log = [
        '2026-01-01T00:00:00.000Z ERROR   write_failed path=a/b.log.gz error="[Errno 13] '
        'Permission denied: \'x\'" records=3 retry_in_s=1.0',
        "Jan 01 00:00:01 logs1 mwdlogd[812]: 2026-01-01T00:00:01.000Z WARNING "
        "tls_handshake_failed protocol=http peer=10.0.0.5:41000 error=TLSV1_ALERT_UNKNOWN_CA",
        "2026-01-01T00:00:02.000Z WARNING tls_handshake_failed protocol=http "
        "peer=10.0.0.5:41001 error=TLSV1_ALERT_UNKNOWN_CA",
        json.dumps({"not": "a log line"})]
    assert [f.line() for f in log_findings(log, "L")] == [
        "warn  log L: write_failed 1 time: [Errno 13] Permission denied: 'x' (latest "
        "2026-01-01T00:00:00.000Z, a/b.log.gz) — give the server's user write access "
        "(chown/chmod)",
        "warn  log L: tls_handshake_failed 2 times from 10.0.0.5: TLSV1_ALERT_UNKNOWN_CA — "
        "that Engine does not trust the server's certificate: give it tls.ca"]


NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
          "--inh-caps=-dac_override,-dac_read_search"]


@NEEDS_ROOT
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_a_storage_root_the_server_cannot_write_is_named_with_its_mode(
        tmp_path: Path, certs: Path) -> None:
    """doctor runs as root and could write there itself; the server, without
    CAP_DAC_OVERRIDE, cannot: the finding is about the server's identity."""
    config = write_config(tmp_path / "c.toml", fixed_ports(tmp_path, certs))
    server = ServerProcess(None, argv=[*NO_DAC, sys.executable, "-m", "mwdlogd", "run",
                                       "--config", str(config)])
    root = tmp_path / "logs"
    try:
        assert doctor(config).returncode == 0
        root.chmod(0o555)
        result = doctor(config)
    finally:
        root.chmod(0o755)
        server.stop()
    assert result.returncode == 2
    storage, health = lines(result, "FAIL")
    assert storage == (f"FAIL  storage.root {root}: the running server (pid "
                       f"{server.process.pid}, uid 0) cannot write in {root}: mode 0555, owner "
                       f"uid 0 gid 0 — chmod u+wx {root}")
    assert health.startswith("FAIL  server: unhealthy, /health answers 503")


def test_server_identity_and_permission_bits() -> None:
    status = ("Name:\tmwdlogd\nUid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\n"
              "Groups:\t4 27 1000\nCapEff:\t0000000000000000\n")
    who = parse_status(42, status)
    assert (who.pid, who.uid, who.gids, who.dac_override) == (42, 1000, {4, 27, 1000}, False)
    assert writable_by(0o755, 1000, 0, who) and not writable_by(0o555, 1000, 0, who)
    assert writable_by(0o775, 0, 27, who) and not writable_by(0o755, 0, 27, who)
    assert writable_by(0o777, 0, 0, who) and not writable_by(0o775, 0, 0, who)
    root = parse_status(1, status.replace("1000", "0").replace("0000000000000000",
                                                                "000001ffffffffff"))
    assert root.dac_override and writable_by(0o000, 5, 5, root)


def test_the_log_can_come_from_stdin(tmp_path: Path, certs: Path) -> None:
    config = write_config(tmp_path / "c.toml", fixed_ports(tmp_path, certs))
    journal = ("2026-01-01T00:00:00.000Z ERROR   write_failed path=a.log.gz "
               'error="[Errno 30] Read-only file system" records=1 retry_in_s=1.0\n')
    result = subprocess.run([sys.executable, "-m", "mwdlogd", "doctor", "--config", str(config),
                             "--log", "-"], input=journal, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1, result.stdout
    assert ("warn  log stdin: write_failed 1 time: [Errno 30] Read-only file system (latest "
            "2026-01-01T00:00:00.000Z, a.log.gz) — remount the filesystem read-write"
            ) in result.stdout

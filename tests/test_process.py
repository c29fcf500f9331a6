"""The real command as operators run it: subprocess, signals, curl as the client."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import config_raw
from helpers import TOKEN, engine_records, ids_by_file, ndjson
from server_process import ServerProcess, write_config

REPO = Path(__file__).resolve().parents[1]
NGINX_FILE = "acme/nginx/www.acme.test/2024/11/25/02.log.gz"
HOUR_2024 = 1732500000.5
pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")


@pytest.fixture
def server(tmp_path: Path, pki: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(write_config(tmp_path / "config.toml", config_raw(tmp_path, pki)))
    yield process
    process.stop()


def curl(url: str, pki: Path, body: bytes, *extra: str, token: str = TOKEN,
         cert: str | None = "engine-01") -> subprocess.CompletedProcess[str]:
    args = ["curl", "-sS", "--max-time", "20", "--cacert", str(pki / "ca.crt"),
            "-H", f"Authorization: Bearer {token}", "-H", "Content-Type: application/x-ndjson",
            "--data-binary", "@-", "-w", "\n%{http_code}", *extra]
    if cert:
        args += ["--cert", str(pki / f"{cert}.crt"), "--key", str(pki / f"{cert}.key")]
    return subprocess.run([*args, url], input=body.decode(), capture_output=True, text=True,
                          timeout=30)


def https_url(server: ServerProcess, path: str = "/nginx.access") -> str:
    port = server.addresses["http"].rpartition(":")[2]
    return f"https://localhost:{port}{path}"


def test_curl_post_then_sigusr1_flush_while_running(server: ServerProcess, pki: Path,
                                                    tmp_path: Path) -> None:
    result = curl(https_url(server), pki, ndjson(engine_records(20, time=HOUR_2024)))
    assert result.stdout.splitlines()[-1] == "200", result
    assert json.loads(result.stdout.splitlines()[0]) == {"records": 20}
    mark = len(server.lines)
    server.signal(signal.SIGUSR1)
    server.wait_for(r"flush_done reason=SIGUSR1", start=mark)
    assert server.process.poll() is None
    assert ids_by_file(tmp_path / "logs") == {NGINX_FILE: [f"r{n}" for n in range(20)]}
    zcat = subprocess.run(["zcat", str(tmp_path / "logs" / NGINX_FILE)], capture_output=True,
                          text=True, check=True)
    assert len(zcat.stdout.splitlines()) == 20


def test_sigterm_drains_pending_records_and_exits_0(server: ServerProcess, pki: Path,
                                                    tmp_path: Path) -> None:
    for batch in range(3):
        result = curl(https_url(server), pki,
                      ndjson(engine_records(10, start=batch * 10, time=HOUR_2024)))
        assert result.stdout.splitlines()[-1] == "200"
    assert ids_by_file(tmp_path / "logs") == {}  # pending: flush_interval is 10 s
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    server.wait_for("shutdown_complete")
    assert ids_by_file(tmp_path / "logs") == {NGINX_FILE: [f"r{n}" for n in range(30)]}
    subprocess.run(["gzip", "-t", str(tmp_path / "logs" / NGINX_FILE)], check=True)


def test_sigint_drains_too(server: ServerProcess, pki: Path, tmp_path: Path) -> None:
    assert curl(https_url(server), pki, ndjson(engine_records(3, time=HOUR_2024))
                ).stdout.endswith("200")
    server.signal(signal.SIGINT)
    assert server.wait() == 0
    assert ids_by_file(tmp_path / "logs") == {NGINX_FILE: ["r0", "r1", "r2"]}


def test_curl_refusals(server: ServerProcess, pki: Path, tmp_path: Path) -> None:
    body = ndjson(engine_records(1, time=HOUR_2024))
    no_cert = curl(https_url(server), pki, body, cert=None)
    assert no_cert.returncode != 0 and no_cert.stdout.endswith("000")
    tls11 = curl(https_url(server), pki, body, "--tlsv1.1", "--tls-max", "1.1")
    assert tls11.returncode != 0
    bad_token = curl(https_url(server), pki, body, token="nope")
    assert bad_token.stdout.splitlines()[-1] == "401"
    assert json.loads(bad_token.stdout.splitlines()[0])["error"] == "unauthorized"
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert ids_by_file(tmp_path / "logs") == {}
    log = "\n".join(server.lines)
    assert "tls_handshake_failed" in log and "reason=unauthorized" in log


def test_fresh_checkout_flow_creates_dev_certs(tmp_path: Path) -> None:
    """README's first command on a fresh machine: the repo's config.toml, no certs yet."""
    shutil.copy(REPO / "config.toml", tmp_path / "config.toml")
    ports = {f"MWDLOGD_{s}_PORT": "0" for s in ("HTTP", "FORWARD", "HEALTH", "METRICS", "MONITOR")}
    server = ServerProcess(tmp_path / "config.toml", cwd=tmp_path, env=ports)
    try:
        assert "dev_certs_created" in "\n".join(server.lines)
        assert "DEV_TOKEN_IN_USE" in "\n".join(server.lines)
        certs = tmp_path / "certs"
        assert stat.S_IMODE((certs / "server.key").stat().st_mode) == 0o600
        body = ndjson(engine_records(2, time=HOUR_2024))
        result = curl(https_url(server), certs, body, token="dev-token-CHANGE-ME")
        assert result.stdout.splitlines()[-1] == "200", result
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
        assert ids_by_file(tmp_path / "var" / "logs") == {NGINX_FILE: ["r0", "r1"]}
    finally:
        server.stop()


def mwdlogd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mwdlogd", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=60, env={**os.environ})


def test_check_config_names_the_bad_key(tmp_path: Path, pki: Path) -> None:
    raw = config_raw(tmp_path, pki, http={"port": "eighty"})
    result = mwdlogd("check-config", "--config", str(write_config(tmp_path / "c.toml", raw)))
    assert result.returncode == 2
    assert "http.port: expected an integer, got 'eighty'" in result.stderr
    raw = config_raw(tmp_path, pki, metrics={"port": 9100})
    raw["server"]["workers"] = 2
    ok = mwdlogd("check-config", "--config", str(write_config(tmp_path / "ok.toml", raw)))
    assert ok.returncode == 0 and "config OK" in ok.stdout
    assert "metrics.port=127.0.0.1:9100 " in ok.stdout and "workers=2" in ok.stdout


def test_run_refuses_a_missing_key_file(tmp_path: Path, pki: Path) -> None:
    raw = config_raw(tmp_path, pki, tls={"key": str(tmp_path / "nope.key")})
    result = mwdlogd("run", "--config", str(write_config(tmp_path / "c.toml", raw)))
    assert result.returncode == 2
    assert f"tls.key: file not found: {tmp_path / 'nope.key'}" in result.stderr


def test_certs_init_and_show(tmp_path: Path) -> None:
    made = mwdlogd("certs", "init", "--dir", str(tmp_path / "c"), "--hosts",
                   "logs.example.com,10.1.2.3", "--client", "engine-07", "--days", "90")
    assert made.returncode == 0, made.stderr
    assert made.stdout.count("created") == 3
    again = mwdlogd("certs", "init", "--dir", str(tmp_path / "c"), "--client", "engine-08")
    assert "kept    " + str(tmp_path / "c" / "ca.crt") in again.stdout
    assert "created " + str(tmp_path / "c" / "engine-08.crt") in again.stdout
    shown = mwdlogd("certs", "show", "--dir", str(tmp_path / "c"))
    assert shown.returncode == 0
    lines = {line.split(":")[0]: line for line in shown.stdout.splitlines()}
    assert "CN=logs.example.com" in lines["server.crt"]
    assert "SAN logs.example.com,10.1.2.3" in lines["server.crt"]
    assert "(89 days)" in lines["engine-07.crt"]
    assert "CN=engine-08" in lines["engine-08.crt"]


def test_init_config_writes_and_refuses_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "new.toml"
    assert mwdlogd("init-config", "-o", str(target)).returncode == 0
    check = mwdlogd("check-config", "--config", str(target))
    assert check.returncode == 0, check.stderr  # valid TOML; certs are missing, run makes them
    assert "certificates: none yet in" in check.stdout
    refused = mwdlogd("init-config", "-o", str(target))
    assert refused.returncode == 1 and "--force" in refused.stderr


def test_help_explains_every_command() -> None:
    result = mwdlogd("--help")
    assert result.returncode == 0
    for command in ("run", "check-config", "init-config", "certs"):
        assert command in result.stdout


def test_gzip_member_per_flush(server: ServerProcess, pki: Path, tmp_path: Path) -> None:
    for batch in range(2):
        curl(https_url(server), pki, ndjson(engine_records(2, start=batch * 2, time=HOUR_2024)))
        mark = len(server.lines)
        server.signal(signal.SIGUSR1)
        server.wait_for("flush_done", start=mark)
    data = (tmp_path / "logs" / NGINX_FILE).read_bytes()
    assert data.count(b"\x1f\x8b\x08") == 2
    assert [json.loads(x)["id"] for x in gzip.decompress(data).splitlines()] == [
        "r0", "r1", "r2", "r3"]


def test_health_command_for_cron(server: ServerProcess, tmp_path: Path) -> None:
    healthy = mwdlogd("health", "--server", server.addresses["health"])
    assert healthy.returncode == 0 and json.loads(healthy.stdout)["status"] == "ok"
    (tmp_path / "logs").rmdir()
    (tmp_path / "logs").write_text("not a directory")
    sick = mwdlogd("health", "--server", server.addresses["health"])
    assert sick.returncode == 1 and json.loads(sick.stdout)["status"] == "unavailable"
    server.process.kill()
    server.wait()
    gone = mwdlogd("health", "--server", server.addresses["health"])
    assert gone.returncode == 1 and "cannot reach" in gone.stderr

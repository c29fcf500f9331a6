"""What `mwdlogd run` and `check-config` say: the start-up summary, a warning for each
risky setting, a taken port named by its key (no traceback), two keys on one port."""

from __future__ import annotations

import datetime
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mwdlogd.certs import init_certs
from mwdlogd.config import DEV_TOKEN, Config
from mwdlogd.startup import certificate_warnings, setting_warnings

from conftest import config_raw, make_config
from helpers import TOKEN, free_port
from server_process import ServerProcess, write_config


def mwdlogd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mwdlogd", *args], capture_output=True,
                          text=True, timeout=60)


def risky(tmp_path: Path, pki: Path) -> dict[str, Any]:
    raw = config_raw(tmp_path, pki, tls={"client_auth": False},
                     forward={"transport": "tcp"}, buffer={"fsync": False})
    raw["auth"]["tokens"].append({"name": "dev", "token": DEV_TOKEN})
    return raw


def test_startup_says_what_it_runs_and_warns(tmp_path: Path, pki: Path) -> None:
    config = write_config(tmp_path / "config.toml", risky(tmp_path, pki))
    server = ServerProcess(config)
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    log = "\n".join(server.lines)
    assert f" starting version=0.1.0 config={config} workers=1 log_level=info" in log
    assert " listener key=http address=127.0.0.1:0 protocol=https tls=1.2+ client_auth=off " \
        in log
    assert ' listener key=forward address=127.0.0.1:0 protocol=fluentd-forward tls="off ' \
        '(plain TCP)" shared_key="not set" users=0' in log
    for key in ("health", "metrics", "monitor"):
        assert f" listener key={key} address=127.0.0.1:0 protocol=http " in log
    assert " auth tokens=engine-01,acme-only,fluentd-capture,dev" in log
    assert f" storage root={tmp_path / 'logs'} buffer={tmp_path / 'buffer'} " in log
    assert TOKEN not in log and DEV_TOKEN not in log  # names only, never the secrets
    warned = {line.split("key=")[1].split()[0] for line in server.lines if " WARNING " in line}
    assert warned == {"auth.tokens", "tls.client_auth", "forward.transport", "buffer.fsync",
                      "tls.cert"}  # tls.cert: the test PKI expires in 30 days
    assert " DEV_TOKEN_IN_USE key=auth.tokens problem=\"token 'dev' is the development" in log
    assert "expires in 29 days" in log


def test_check_config_warns_too(tmp_path: Path, pki: Path) -> None:
    raw = risky(tmp_path, pki)
    raw["auth"]["tokens"] = []
    result = mwdlogd("check-config", "--config", str(write_config(tmp_path / "c.toml", raw)))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: ")]
    assert [w.split(":")[1].strip() for w in warnings] == [
        "auth.tokens", "tls.client_auth", "forward.transport", "buffer.fsync", "tls.cert"]
    assert "no tokens: every HTTPS request is refused" in result.stdout


def config_with(tmp_path: Path, pki: Path, **sections: dict[str, Any]) -> Config:
    return make_config(tmp_path, pki, **sections)


def test_certificate_warnings_by_date(tmp_path: Path, pki: Path,
                                      tmp_path_factory: pytest.TempPathFactory) -> None:
    config = config_with(tmp_path, pki)
    now = datetime.datetime.now(datetime.UTC)
    assert [w.key for w in certificate_warnings(config, now)] == ["tls.cert", "tls.ca"]
    assert certificate_warnings(config, now - datetime.timedelta(days=2)) == []
    expired = certificate_warnings(config, now + datetime.timedelta(days=31))
    assert [w.key for w in expired] == ["tls.cert", "tls.ca"]
    assert all(" expired on " in w.problem for w in expired)
    long_lived = tmp_path_factory.mktemp("long")
    init_certs(long_lived, hosts=["localhost"], clients=[], days=825)
    config = config_with(tmp_path, long_lived)
    assert certificate_warnings(config, now) == []
    assert setting_warnings(config) == []  # the test config is otherwise as it should be


def test_a_taken_port_is_named_by_its_key(tmp_path: Path, pki: Path) -> None:
    for key in ("http", "monitor"):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            raw = config_raw(tmp_path, pki, **{key: {"port": port}})
            result = mwdlogd("run", "--config", str(write_config(tmp_path / "c.toml", raw)))
        assert result.returncode == 2
        assert f"mwdlogd: {key}.port: cannot listen on 127.0.0.1:{port}: Address already in " \
            "use" in result.stderr
        assert "Traceback" not in result.stderr and "ExceptionGroup" not in result.stderr


@pytest.mark.parametrize(("sections", "problem"), [
    ({"metrics": {"port": 9100}, "health": {"port": 9100}},
     "metrics.port: port 9100 is also health.port (127.0.0.1:9100)"),
    ({"http": {"port": 9100, "bind": "0.0.0.0"}, "forward": {"port": 9100}},
     "forward.port: port 9100 is also http.port (0.0.0.0:9100)"),
    ({"server": {"workers": 3}, "monitor": {"port": 9100}, "health": {"port": 9102}},
     "monitor.port+2: port 9102 is also health.port (127.0.0.1:9102)"),
    ({"server": {"workers": 4}, "monitor": {"port": 65534}},
     "monitor.port+2: 65536 is beyond 65535 (server.workers=4)"),
])
def test_check_config_finds_two_keys_on_one_port(tmp_path: Path, pki: Path,
                                                  sections: dict[str, Any], problem: str) -> None:
    raw = config_raw(tmp_path, pki, **sections)
    result = mwdlogd("check-config", "--config", str(write_config(tmp_path / "c.toml", raw)))
    assert result.returncode == 2
    assert result.stderr.strip() == f"mwdlogd: {problem}"


def test_different_addresses_may_share_a_port(tmp_path: Path, pki: Path) -> None:
    port = free_port()
    raw = config_raw(tmp_path, pki, health={"port": port, "bind": "127.0.0.1"},
                     metrics={"port": port, "bind": "127.0.0.2"})
    result = mwdlogd("check-config", "--config", str(write_config(tmp_path / "c.toml", raw)))
    assert result.returncode == 0, result.stderr

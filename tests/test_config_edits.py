"""What an operator meets after editing the config: every wrong shape named with the
expected shape, a fresh clone's check-config, init-config into a new directory."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mwdlogd.config import load_config
from mwdlogd.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TOKEN = '{ name = "e", token = "t" }'


def mwdlogd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mwdlogd", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=60, env={**os.environ})


@pytest.mark.parametrize(("text", "message"), [
    ('[auth]\ntokens = [{ name = "a", token = "b", customers = "acme" }]',
     'auth.tokens[0].customers: expected an array like ["..."], got a string'),
    ('[auth]\ntokens = ["abc"]',
     "auth.tokens[0]: expected a table like { name = ..., token = ... }, got a string"),
    ('[auth]\ntokens = "abc"',
     "auth.tokens: expected an array like [{ name = ..., token = ... }], got a string"),
    ('[auth]\ntokens = { name = "a", token = "b" }',
     "auth.tokens: expected an array like [{ name = ..., token = ... }], got a table"),
    ("[auth]\ntokens = [[1]]",
     "auth.tokens[0]: expected a table like { name = ..., token = ... }, got an array"),
    (f"[auth]\ntokens = [{TOKEN}, 7]",
     "auth.tokens[1]: expected a table like { name = ..., token = ... }, got an integer"),
    ('[auth]\ntokens = [{ name = "a", token = 5 }]',
     "auth.tokens[0].token: expected a string, got 5"),
    ('[auth]\ntokens = [{ name = "a", token = "b", customers = [1] }]',
     "auth.tokens[0].customers[0]: expected a string, got 1"),
    ('[auth]\ntokens = [{ name = "a", token = "b", customers = { x = 1 } }]',
     'auth.tokens[0].customers: expected an array like ["..."], got a table'),
    ('auth = "x"',
     "auth: expected a table like { tokens = ..., clients = ..., ... }, got a string"),
    ("http = 5", "http: expected a table like { bind = ..., port = ..., ... }, got an integer"),
    ("health = [1]", "health: expected a table like { bind = ..., port = ..., ... }, "
     "got an array"),
    ("tls = true", "tls: expected a table like { cert = ..., key = ..., ... }, got a boolean"),
    ('[forward]\nshared_key = "k"\nusers = "bob"',
     "forward.users: expected an array like [{ username = ..., password = ... }], "
     "got a string"),
    ('[forward]\nshared_key = "k"\nusers = ["bob"]',
     "forward.users[0]: expected a table like { username = ..., password = ... }, "
     "got a string"),
    ('[forward]\nshared_key = "k"\nusers = [{ username = "bob" }]',
     "forward.users[0].password: required key is missing"),
    ("[buffer]\ntotal_limit = [1]", "buffer.total_limit: expected a size like"),
    ("[buffer]\nflush_interval = {}", "buffer.flush_interval: expected a duration like"),
    ("[buffer]\nfsync = 2024-01-01", "buffer.fsync: expected true or false"),
    ('[server]\nworkers = "2"', "server.workers: expected an integer, got '2'"),
    ("[server]\nworkers = 1.5", "server.workers: expected an integer, got 1.5"),
    ('[tls]\ncert = ["a.crt"]', "tls.cert: expected a string, got ['a.crt']"),
    ("[storage]\nroot = true", "storage.root: expected a string, got True"),
    ("[tls]\nclient_auth = 'yes'", "tls.client_auth: expected true or false, got 'yes'"),
])
def test_every_wrong_shape_names_the_key_and_the_expected_shape(
        tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, required=True, environ={})
    assert message in str(caught.value)


def test_a_token_value_is_never_echoed_in_a_shape_error(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[auth]\ntokens = ["s3cret-token-value"]')
    with pytest.raises(ConfigError) as caught:
        load_config(path, required=True, environ={})
    assert "s3cret" not in str(caught.value)


def test_check_config_refuses_a_string_for_customers(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[auth]\ntokens = [{ name = "a", token = "b", customers = "acme" }]\n')
    result = mwdlogd("check-config", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.strip() == ("mwdlogd: auth.tokens[0].customers: expected an array "
                                     'like ["..."], got a string')


def test_fresh_clone_check_config_says_run_creates_the_certificates(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_bytes((REPO / "config.toml").read_bytes())
    result = mwdlogd("check-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout
    assert (f"certificates: none yet in {tmp_path / 'certs'} (tls.cert, tls.key, tls.ca "
            "missing); `mwdlogd run` creates") in result.stdout
    assert not (tmp_path / "certs").exists()  # check-config only looks


def test_a_partly_missing_pki_is_an_error_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    assert mwdlogd("init-config", "-o", str(path)).returncode == 0
    assert mwdlogd("--config", str(path), "certs", "init").returncode == 0
    (tmp_path / "certs" / "server.key").unlink()
    result = mwdlogd("check-config", "--config", str(path))
    assert result.returncode == 2
    assert (f"tls.key: file not found: {tmp_path / 'certs' / 'server.key'} (point tls.key at "
            "your file, or create a development PKI with `mwdlogd certs init`)"
            ) in result.stderr


def test_init_config_into_a_missing_directory_writes_mode_0600(tmp_path: Path) -> None:
    target = tmp_path / "etc" / "mwdlogd" / "x.toml"
    result = mwdlogd("init-config", "-o", str(target))
    assert result.returncode == 0, result.stderr
    assert f"created directory {target.parent}" in result.stdout
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    target.chmod(0o644)
    assert mwdlogd("init-config", "-o", str(target), "--force").returncode == 0
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_init_config_then_certs_init_with_that_config_passes_check_config(
        tmp_path: Path) -> None:
    config = tmp_path / "etc" / "x.toml"
    assert mwdlogd("init-config", "-o", str(config)).returncode == 0
    made = mwdlogd("--config", str(config), "certs", "init", "--hosts", "logs.example.com")
    assert made.returncode == 0, made.stderr
    assert f"created {tmp_path / 'etc' / 'certs' / 'server.crt'}" in made.stdout
    check = mwdlogd("check-config", "--config", str(config))
    assert check.returncode == 0, check.stderr
    assert "certificates:" not in check.stdout

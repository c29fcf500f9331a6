"""Configuration: units, errors that name the key, env overrides, init-config round trip."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from mwdlogd.config import Config, check_tls_files, load_config
from mwdlogd.errors import ConfigError
from mwdlogd.init_config import render_default_config
from mwdlogd.units import parse_duration, parse_size


@pytest.mark.parametrize(("text", "value"), [
    ("10MiB", 10 * 1024**2), ("2GiB", 2 * 1024**3), ("512k", 512000), ("100", 100), (7, 7),
    ("1.5KiB", 1536)])
def test_sizes(text: object, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize(("text", "value"), [
    ("10s", 10.0), ("500ms", 0.5), ("1h", 3600.0), ("2m", 120.0), (3, 3.0), ("1d", 86400.0)])
def test_durations(text: object, value: float) -> None:
    assert parse_duration(text) == value


@pytest.mark.parametrize("bad", ["10 parsecs", "", "-1s", True, None, "s"])
def test_bad_duration(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "message"), [
    ('[http]\nport = "x"', "http.port: expected an integer, got 'x'"),
    ("[http]\nport = 70000", "http.port: must be 0..65535, got 70000"),
    ('[http]\nbody_size_limit = "10XB"', "http.body_size_limit: expected a size like"),
    ("[http]\nprot = 1", "http: unknown key(s): prot"),
    ("[htp]\nport = 1", "config: unknown key(s): htp"),
    ('[buffer]\nflush_interval = "soon"', "buffer.flush_interval: expected a duration"),
    ('[tls]\nmin_version = "1.1"', "tls.min_version: must be '1.2' or '1.3', got '1.1'"),
    ("[tls]\nclient_auth = 1", "tls.client_auth: expected true or false, got 1"),
    ('[auth]\ntokens = [{ name = "a" }]', "auth.tokens[0].token: required key is missing"),
    ('[auth]\ntokens = [{ name = "a", token = "x" }, { name = "a", token = "y" }]',
     "auth.tokens[1].name: duplicate token name 'a'"),
    ("[server]\nworkers = 0", "server.workers: must be 1..64, got 0"),
    ('[storage]\ncompression = "lz4"', "storage.compression: must be 'zlib' or 'igzip'"),
    ("[http\n", "not valid TOML"),
])
def test_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), required=True, environ={})
    assert message in str(caught.value)


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml", required=True, environ={})


def test_missing_default_file_means_defaults(tmp_path: Path) -> None:
    config = load_config(tmp_path / "config.toml", required=False, environ={})
    assert config.http.port == 8888
    assert config.storage.root == "/var/log/mrwebdefence"


def test_env_overrides_keys_with_toml_values(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[http]\nport = 1\n"), required=True, environ={
        "MWDLOGD_HTTP_PORT": "18888", "MWDLOGD_STORAGE_ROOT": "/data/logs",
        "MWDLOGD_TLS_CLIENT_AUTH": "false", "MWDLOGD_BUFFER_FLUSH_INTERVAL": "2s",
        "MWDLOGD_CONFIG": "ignored", "OTHER": "x"})
    assert config.http.port == 18888
    assert config.storage.root == "/data/logs"
    assert config.tls.client_auth is False
    assert config.buffer.flush_interval == 2.0


def test_unknown_env_override_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="MWDLOGD_HTTP_PROT: environment variable names"):
        load_config(write(tmp_path, ""), required=True, environ={"MWDLOGD_HTTP_PROT": "1"})


def test_relative_paths_follow_the_config_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[storage]\nroot = "var/logs"'), required=True,
                         environ={})
    assert config.storage.root == str(tmp_path / "var/logs")
    assert config.tls.cert == str(tmp_path / "certs/server.crt")


def test_tls_file_errors_name_the_key(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""), required=True, environ={})
    with pytest.raises(ConfigError, match=r"^tls.cert: file not found: .*certs/server.crt"):
        check_tls_files(config)


def test_init_config_renders_the_defaults(tmp_path: Path) -> None:
    text = render_default_config()
    raw = tomllib.loads(text)
    assert raw["http"]["body_size_limit"] == "10MiB"
    assert raw["buffer"]["retry_timeout"] == "1h"
    config = load_config(write(tmp_path, text), required=True, environ={})
    (token,) = config.auth.tokens
    assert token.name == "engine-01" and len(token.token) >= 32
    defaults = Config()
    assert config.http == defaults.http and config.buffer == defaults.buffer
    assert config.server == defaults.server and config.metrics == defaults.metrics
    assert "# largest request body" in text

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from hypothesis import settings

from mwdlogd import log
from mwdlogd.app import Addresses, App
from mwdlogd.certs import init_certs
from mwdlogd.config import Config, resolve_paths, structure_config, validate

from helpers import TOKEN

# CI machines are shared and slow at times: judge properties by their inputs, not timing.
settings.register_profile("mwdlogd", deadline=None)
settings.load_profile("mwdlogd")


@pytest.fixture(autouse=True)
def _restore_log_level() -> Iterator[None]:
    """An in-process reload sets the process-wide `server.log_level`; no test may leave it
    changed for the next."""
    level = log.logger.level
    yield
    log.logger.setLevel(level)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    init_certs(directory, hosts=["localhost", "127.0.0.1"], clients=["engine-01", "engine-02"],
               days=30)
    return directory


@pytest.fixture(scope="session")
def rogue_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA the server does not trust, with a client certificate named like a real Engine."""
    directory = tmp_path_factory.mktemp("rogue")
    init_certs(directory, hosts=["localhost"], clients=["engine-01"], days=30)
    return directory


def config_raw(tmp_path: Path, pki: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "server": {"hostname": "testhost", "shutdown_timeout": "10s"},
        "tls": {"cert": str(pki / "server.crt"), "key": str(pki / "server.key"),
                "ca": str(pki / "ca.crt")},
        "http": {"bind": "127.0.0.1", "port": 0},
        "forward": {"bind": "127.0.0.1", "port": 0},
        "auth": {"tokens": [{"name": "engine-01", "token": TOKEN},
                            {"name": "acme-only", "token": "acme-token-0123456789",
                             "customers": ["acme"]},
                            {"name": "fluentd-capture", "token": "abc"}]},
        "storage": {"root": str(tmp_path / "logs")},
        "buffer": {"path": str(tmp_path / "buffer")},
        "health": {"bind": "127.0.0.1", "port": 0},
        "monitor": {"bind": "127.0.0.1", "port": 0},
        "metrics": {"bind": "127.0.0.1", "port": 0},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def make_config(tmp_path: Path, pki: Path, **sections: dict[str, Any]) -> Config:
    config = structure_config(config_raw(tmp_path, pki, **sections))
    validate(config)
    return resolve_paths(config, tmp_path)


@attrs.frozen
class Running:
    app: App
    addresses: Addresses
    config: Config

    @property
    def root(self) -> Path:
        return Path(self.config.storage.root)


async def start_app(nursery: trio.Nursery, config: Config) -> Running:
    app = App(config)
    addresses = await nursery.start(app.run)
    return Running(app, addresses, config)


@pytest.fixture
async def server(nursery: trio.Nursery, tmp_path: Path, pki: Path) -> AsyncIterator[Running]:
    yield await start_app(nursery, make_config(tmp_path, pki))


@pytest.fixture(scope="session")
def peers_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the forwarders are unpacked: pytest's cache (kept between runs), or a
    session directory when the cache plugin is off (`-p no:cacheprovider`)."""
    if getattr(request.config, "cache", None) is None:
        return tmp_path_factory.mktemp("real-peers")
    return Path(request.config.cache.mkdir("real-peers"))

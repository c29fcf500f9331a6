"""SIGHUP reloads config.toml in a running server (a real subprocess): tokens, limits and
certificates change while clients keep sending over keep-alive HTTPS, with no failed
request and every acked record stored once; an invalid file is refused and the running
config kept; restart-only keys are named; with workers every worker reloads."""

from __future__ import annotations

import copy
import functools
import logging
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from mwdlogd.app import App
from mwdlogd.certs import Layout, init_certs, renew_server, served_certificate
from mwdlogd.config import load_config

from conftest import config_raw
from forward_client import KEY, RawForward, packed
from helpers import Connection, client_context, engine_records, http_get, ndjson, post
from load_client import Load
from server_process import ServerProcess, write_config
from test_workers import drain, stored_ids, workers_config

NEW_TOKEN = "new-token-0123456789abcdef"


def reload(server: ServerProcess, config: Path, raw: dict[str, Any], outcome: str) -> str:
    """Write `raw`, send SIGHUP, return the first line matching `outcome` after it."""
    write_config(config, raw)
    mark = len(server.lines)
    server.signal(signal.SIGHUP)
    return server.wait_for(outcome, start=mark)


async def status_with(server: ServerProcess, pki: Path, token: str, first: int) -> int:
    reply = await post(server.addresses["http"], client_context(pki), "/nginx.access",
                       ndjson(engine_records(1, start=first)), token=token)
    return reply.status


def http_connections(metrics: bytes) -> float:
    for line in metrics.decode().splitlines():
        if line.startswith('mwdlogd_connections_total{protocol="http"} '):
            return float(line.split()[-1])
    raise AssertionError("no http connection count")


async def test_reload_under_keepalive_load(tmp_path: Path, pki: Path) -> None:
    raw = config_raw(tmp_path, pki, buffer={"flush_interval": "100ms"})
    config = write_config(tmp_path / "config.toml", raw)
    server = ServerProcess(config)
    load = Load(client_context(pki))  # three keep-alive connections, posting all the time
    load.serve(int(server.addresses["http"].rpartition(":")[2]))
    extra_connections = 0
    try:
        load.wait_for_acks(200)
        assert await status_with(server, pki, NEW_TOKEN, 9000) == 401
        changed = copy.deepcopy(raw)
        changed["auth"]["tokens"] = [t for t in raw["auth"]["tokens"] if t["name"] != "acme-only"]
        changed["auth"]["tokens"].append({"name": "new", "token": NEW_TOKEN})
        changed["http"].update(port=1, body_size_limit="2MiB")
        changed["server"]["log_level"] = "debug"
        line = reload(server, config, changed, r" reloaded ")
        assert "changed=auth.tokens,http.body_size_limit,server.log_level" in line
        assert "tokens=engine-01,fluentd-capture,new" in line and NEW_TOKEN not in line
        ignored = server.wait_for(r" reload_ignored ", start=server.lines.index(line))
        assert "keys=http.port" in ignored and "restart to apply" in ignored
        server.wait_for(r" DEBUG +flushed ", start=server.lines.index(line))  # log_level
        assert await status_with(server, pki, NEW_TOKEN, 9001) == 200
        assert await status_with(server, pki, "acme-token-0123456789", 9002) == 401
        too_large = await post(server.addresses["http"], client_context(pki), "/nginx.access",
                               b"x" * (2 * 1024 * 1024 + 1))
        assert too_large.status == 413 and b"body_size_limit=2097152" in too_large.body
        extra_connections += 4
        load.wait_for_acks(len(load.acked) + 200)

        broken = copy.deepcopy(changed)
        broken["http"]["body_size_limit"] = "lots"
        line = reload(server, config, broken, r" reload_failed ")
        assert "http.body_size_limit" in line and "the running config is kept" in line
        assert await status_with(server, pki, NEW_TOKEN, 9003) == 200
        (tmp_path / "config.toml").write_text("[http\n")
        mark = len(server.lines)
        server.signal(signal.SIGHUP)
        assert "not valid TOML" in server.wait_for(r" reload_failed ", start=mark)
        extra_connections += 1
        for _ in range(3):  # back and forth while the load keeps going
            reload(server, config, raw, r" reloaded ")
            reload(server, config, changed, r" reloaded ")
        load.wait_for_acks(len(load.acked) + 200)
        _, metrics = await http_get(server.addresses["metrics"], "/metrics")
    finally:
        load.stop()
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
    assert dict(load.statuses) == {200: load.statuses[200]}  # not one failed request
    assert http_connections(metrics) == 3 + extra_connections  # none was dropped
    stored = stored_ids(tmp_path / "logs")
    assert max(stored.values()) == 1
    assert set(stored) == load.acked | {"r9001", "r9003"}


async def test_a_certificate_renewed_in_place_is_named_in_the_reload_line(
        tmp_path: Path, pki: Path) -> None:
    """`certs renew` changes no config key: the reload line still names the certificate now
    served (`tls=reloaded tls_cert_sha256=... tls_cert_expires=...`), and it is served."""
    own = tmp_path / "pki"
    shutil.copytree(pki, own)
    raw = config_raw(tmp_path, own)
    config = write_config(tmp_path / "config.toml", raw)
    server = ServerProcess(config)
    try:
        before = served_certificate(own / "server.crt")
        renew_server(Layout.in_dir(own), days=20)
        after = served_certificate(own / "server.crt")
        assert after != before
        line = reload(server, config, raw, r" reloaded ")
        assert "changed=nothing" in line and " tls=reloaded " in line
        assert (f"tls_cert_sha256={after['tls_cert_sha256']} "
                f"tls_cert_expires={after['tls_cert_expires']}") in line
        reply = await post(server.addresses["http"], client_context(own), "/nginx.access",
                           ndjson(engine_records(1)))
        assert reply.status == 200
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
    finally:
        server.stop()
    assert stored_ids(tmp_path / "logs") == {"r0": 1}


async def test_a_new_certificate_is_used_by_new_handshakes_only(
        tmp_path: Path, pki: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    other = tmp_path_factory.mktemp("other-pki")
    init_certs(other, hosts=["localhost", "127.0.0.1"], clients=["engine-01"], days=30)
    raw = config_raw(tmp_path, pki)
    config = write_config(tmp_path / "config.toml", raw)
    server = ServerProcess(config)
    address = server.addresses["http"]
    try:
        old = await Connection.open(address, client_context(pki))
        assert (await old.post("/nginx.access", ndjson(engine_records(1)))).status == 200
        swapped = copy.deepcopy(raw)
        swapped["tls"] = {"cert": str(other / "server.crt"), "key": str(other / "server.key"),
                          "ca": str(other / "ca.crt")}
        line = reload(server, config, swapped, r" reloaded ")
        assert "tls.ca,tls.cert,tls.key" in line
        with pytest.raises(trio.BrokenResourceError) as refused:
            await post(address, client_context(pki), "/nginx.access", b"")
        assert isinstance(refused.value.__cause__, ssl.SSLCertVerificationError)
        reply = await post(address, client_context(other), "/nginx.access",
                           ndjson(engine_records(1, start=1)))
        assert reply.status == 200
        # the connection from before the reload goes on with its certificate
        assert (await old.post("/nginx.access", ndjson(engine_records(1, start=2)))).status \
            == 200
        await old.aclose()
        missing = copy.deepcopy(swapped)
        missing["tls"]["cert"] = str(tmp_path / "nowhere.crt")
        line = reload(server, config, missing, r" reload_failed ")
        assert "tls.cert: file not found" in line
        reply = await post(address, client_context(other), "/nginx.access",
                           ndjson(engine_records(1, start=3)))
        assert reply.status == 200
    finally:
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
    assert stored_ids(tmp_path / "logs") == {f"r{n}": 1 for n in range(4)}


def test_every_worker_reloads(tmp_path: Path, pki: Path) -> None:
    config = workers_config(tmp_path, pki)
    server = ServerProcess(config)
    try:
        raw = config_raw(tmp_path, pki, buffer={"flush_interval": "10ms", "chunk_limit": "2KiB"})
        raw["server"]["workers"] = 3
        raw["auth"]["tokens"].append({"name": "new", "token": NEW_TOKEN})
        write_config(config, raw)
        mark = len(server.lines)
        server.signal(signal.SIGHUP)
        for index in (0, 1):
            line = server.wait_for(rf" reloaded .* worker={index}$", start=mark)
            assert "changed=auth.tokens" in line and ",new " in line
            line = server.wait_for(rf" reload_ignored .* worker={index}$", start=mark)
            assert "keys=server.workers" in line
        assert " signal name=SIGHUP detail=\"passed on to every worker\"" in \
            "\n".join(server.lines[mark:])
        for first in range(0, 20, 2):  # whichever worker takes it knows the new token
            reply = trio.run(functools.partial(
                post, server.addresses["http"], client_context(pki), "/nginx.access",
                ndjson(engine_records(2, start=first)), token=NEW_TOKEN))
            assert reply.status == 200
    finally:
        drain(server)
    assert stored_ids(tmp_path / "logs") == {f"r{n}": 1 for n in range(20)}



async def test_a_higher_buffer_limit_admits_a_held_forward_batch_at_once(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    raw = config_raw(tmp_path, pki, buffer={"flush_interval": "1h", "timekey_wait": "1h"})
    path = write_config(tmp_path / "config.toml", raw)
    app = App(load_config(path, required=True), loader=lambda: load_config(path, required=True))
    addresses = await nursery.start(app.run)
    client = await RawForward.connect(addresses.forward, client_context(pki))
    await client.send(packed("nginx.access", engine_records(1), chunk="a"))
    assert await client.receive() == {"ack": "a"}
    for limit in (f"{app.admission.buffered_bytes + 10}B", "1MiB"):
        changed = copy.deepcopy(raw)
        changed["buffer"]["total_limit"] = limit
        write_config(path, changed)
        assert await app.reload()
        if limit != "1MiB":
            await client.send(packed("nginx.access", engine_records(1, start=1), chunk="b"))
            while app.admission.waiting_for_room == 0:  # held: its connection not read
                await trio.testing.wait_all_tasks_blocked()
    with trio.fail_after(5):  # it waits for room as long as it takes, so not by a timeout
        assert await client.receive() == {"ack": "b"}
    await client.aclose()
    app.request_stop()
    await app.stopped.wait()
    assert stored_ids(tmp_path / "logs") == {"r0": 1, "r1": 1}


async def test_forward_settings_and_buffer_limit_change_in_process(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    """App.reload without a signal: a shared key applies to new forward connections while
    an open one goes on; a lower buffer.total_limit refuses at once, a higher one admits."""
    raw = config_raw(tmp_path, pki, buffer={"flush_interval": "1h", "timekey_wait": "1h"},
                     http={"full_wait": "0s"})  # refused at once, not after 20 s held
    path = write_config(tmp_path / "config.toml", raw)
    app = App(load_config(path, required=True), loader=lambda: load_config(path, required=True))
    addresses = await nursery.start(app.run)
    context = client_context(pki)
    before = await RawForward.connect(addresses.forward, context)
    await before.send(packed("nginx.access", engine_records(1), chunk="a"))
    assert await before.receive() == {"ack": "a"}
    keyed = copy.deepcopy(raw)
    keyed["forward"]["shared_key"] = KEY
    write_config(path, keyed)
    assert await app.reload()
    after = await RawForward.connect(addresses.forward, context)
    assert (await after.handshake())[1] is True  # HELO, then PONG true
    await before.send(packed("nginx.access", engine_records(1, start=1), chunk="b"))
    assert await before.receive() == {"ack": "b"}  # no handshake asked of it
    for limit in ("100B", "1MiB"):
        keyed["buffer"]["total_limit"] = limit
        write_config(path, keyed)
        assert await app.reload()
        if limit == "100B":
            full = await post(addresses.http, context, "/nginx.access",
                              ndjson(engine_records(1, start=2)))
            assert full.status == 503 and full.json()["error"] == "buffer_full"
    await after.send(packed("nginx.access", engine_records(1, start=3), chunk="c"))
    assert await after.receive() == {"ack": "c"}
    for client in (before, after):
        await client.aclose()
    assert (await http_get(addresses.monitor, "/api/flush"))[0] == 401  # no token
    app.request_stop()
    await app.stopped.wait()
    assert stored_ids(tmp_path / "logs") == {"r0": 1, "r1": 1, "r3": 1}


def only_sighup_held(pid: int) -> bool:
    """SIGHUP blocked but not SIGTERM (between fork and exec every signal is blocked)."""
    status = Path(f"/proc/{pid}/status").read_text()
    blocked = re.search(r"^SigBlk:\s+([0-9a-f]+)$", status, re.M)
    assert blocked is not None
    mask = int(blocked[1], 16)
    return bool(mask & 1 << (signal.SIGHUP - 1)) and not mask & 1 << (signal.SIGTERM - 1)


def test_a_sighup_during_start_up_reloads_once_the_server_runs(tmp_path: Path,
                                                               pki: Path) -> None:
    """A SIGHUP that arrives while the server starts is held, not dropped: an operator
    who edits the config as the server (re)starts gets it applied."""
    config = write_config(tmp_path / "config.toml", config_raw(tmp_path, pki))

    def hup_while_starting(process: subprocess.Popen[str]) -> None:
        give_up = time.monotonic() + 30
        while not only_sighup_held(process.pid):  # start-up holds it from its first lines
            assert time.monotonic() < give_up, "SIGHUP is never held during start-up"
            threading.Event().wait(0.001)  # polling another process: no event to await
        process.send_signal(signal.SIGHUP)

    server = ServerProcess(config, starting=hup_while_starting)
    try:
        server.wait_for(r" signal name=SIGHUP ")
        server.wait_for(r" reloaded ")
    finally:
        server.signal(signal.SIGTERM)
        assert server.wait() == 0


PROBE = """\
import atexit, signal, sys
def held(): return signal.SIGHUP in signal.pthread_sigmask(signal.SIG_BLOCK, [])
class Probe:
    def find_spec(self, name, path=None, target=None):
        if name in ("trio", "cryptography") and name not in sys.modules:
            print(f"probe {name} {held()}", file=sys.stderr)
sys.meta_path.insert(0, Probe())
atexit.register(lambda: print(f"probe exit {held()}", file=sys.stderr))
"""


@pytest.mark.parametrize(("command", "config_name", "at_import", "at_exit"), [
    ("run", "config.toml", "True", "True"), ("check-config", "config.toml", "False", "False"),
    ("check-config", "run", "True", "False")])  # "run" in argv: held, released by main
def test_sighup_is_held_before_the_heavy_imports_of_run_only(
        tmp_path: Path, command: str, config_name: str, at_import: str, at_exit: str) -> None:
    """The hold starts at the package's first import (importing trio, cryptography and the
    rest takes ~0.7 s, a window in which SIGHUP would kill the server), for `run` only;
    a sitecustomize records the mask when trio and cryptography are first imported and at
    exit."""
    (tmp_path / "sitecustomize.py").write_text(PROBE)
    config = tmp_path / config_name
    config.write_text("[server]\nworkers = 0\n")  # refused at once, after the imports
    done = subprocess.run([sys.executable, "-m", "mwdlogd", command, "--config", config_name],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 2, done.stderr
    assert sorted(re.findall(r"^probe (\w+) (\w+)$", done.stderr, re.M)) == [
        ("cryptography", at_import), ("exit", at_exit), ("trio", at_import)]


async def test_a_reload_warns_of_a_certificate_that_expires_soon(
        nursery: trio.Nursery, tmp_path: Path, pki: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Read in the reload's worker thread with the other TLS files (the test PKI expires
    in 30 days)."""
    path = write_config(tmp_path / "config.toml", config_raw(tmp_path, pki))
    app = App(load_config(path, required=True), loader=lambda: load_config(path, required=True))
    await nursery.start(app.run)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mwdlogd"):
        assert await app.reload()
    assert any("key=tls.cert" in r.getMessage() and "expires in 29 days" in r.getMessage()
               for r in caplog.records)
    app.request_stop()
    await app.stopped.wait()

"""Authorization, one model for every door (issue [7]): the probes that got through, now
refused, each with a good client working alongside; real TLS sockets, the npm forward
peer, WebSocket viewers. Attackers connect from 127.0.0.2 so the per-address lockout
is seen to spare the good client on 127.0.0.1."""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket

from mwdlogd.app import App
from mwdlogd.config import structure_config
from mwdlogd.errors import ConfigError
from mwdlogd.proto.auth import (
    AuthFailed,
    Authorizer,
    Credential,
    FailureThrottle,
    Identity,
    ThrottleSettings,
)
from mwdlogd.tail_client import tail_url

from conftest import Running, config_raw, make_config, start_app
from forward_client import KEY, RawForward, needs_node, node_send, packed
from helpers import (
    TOKEN,
    Connection,
    Reply,
    client_context,
    engine_records,
    http_get,
    ids_by_file,
    ndjson,
    post,
    split_address,
)

ACME_TOKEN = "acme-token-0123456789"  # conftest: token "acme-only", customers = ["acme"]
BOUND_TOKEN = "bound-token-0123456789"
HOUR = 1732500000.5
ATTACKER = "127.0.0.2"
# The default limit (5 failures) within a window no slow machine can outlast.
LONG_WINDOW = {"failure_window": "10m"}
ACME_FILE = "acme/nginx/www.acme.test/2024/11/25/02.log.gz"
OTHER_FILE = "other/nginx/www.acme.test/2024/11/25/02.log.gz"


def bound_config(tmp_path: Path, pki: Path, **sections: dict[str, Any]) -> Any:
    """conftest's tokens and one bound to engine-01's certificate."""
    tokens = config_raw(tmp_path, pki)["auth"]["tokens"] + [
        {"name": "bound", "token": BOUND_TOKEN, "subjects": ["engine-01"]}]
    return make_config(tmp_path, pki, auth={"tokens": tokens}, **sections)


async def flushed(running: Running) -> dict[str, list[str]]:
    await running.app.flush("test")
    return ids_by_file(running.root)


def metric(running: Running, name: str, **labels: str) -> float:
    return running.app.telemetry.registry.get_sample_value(name, labels) or 0.0


async def post_from(address: str, context: ssl.SSLContext, body: bytes, *, token: str,
                    local: str = ATTACKER) -> Reply:
    """One HTTPS request from another loopback address."""
    host, port = split_address(address)
    tcp = await trio.open_tcp_stream(host, port, local_address=local)
    connection = Connection(trio.SSLStream(tcp, context, server_hostname=host,
                                           https_compatible=True))
    try:
        return await connection.post("/nginx.access", body, token=token)
    finally:
        await connection.aclose()


async def get_from(address: str, target: str, *, local: str = ATTACKER,
                   headers: str = "") -> tuple[int, dict[str, str], bytes]:
    """A plain GET from another loopback address: (status, headers, body)."""
    host, port = split_address(address)
    stream = await trio.open_tcp_stream(host, port, local_address=local)
    await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: x\r\n{headers}"
                          f"Connection: close\r\n\r\n".encode())
    reply = b""
    while chunk := await stream.receive_some(65536):
        reply += chunk
    await stream.aclose()
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    return int(lines[0].split()[1]), fields, body


def ws_url(running: Running, token: str, **query: str) -> str:
    return tail_url(running.addresses.monitor, token=token, customer=query.get("customer"),
                    log_type=None, fqdn=None, sample=1.0)


# --- live tail --------------------------------------------------------------------------

async def test_tail_shows_a_restricted_token_only_its_customers(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    """Probe: a token limited to acme received every customer's records."""
    running = await start_app(nursery, make_config(tmp_path, pki))
    seen: dict[str, list[str]] = {"acme": [], "all": []}

    async def watch(name: str, token: str) -> None:
        async with trio_websocket.open_websocket_url(ws_url(running, token)) as websocket:
            while not seen[name] or seen[name][-1] != "last":
                seen[name].append(json.loads(await websocket.get_message())["id"])

    context = client_context(pki)
    with trio.fail_after(20):
        async with trio.open_nursery() as viewers:
            viewers.start_soon(watch, "acme", ACME_TOKEN)
            viewers.start_soon(watch, "all", TOKEN)
            while running.app.telemetry.tail_viewers < 2:
                await trio.testing.wait_all_tasks_blocked()
            for records in (engine_records(2, time=HOUR),
                            engine_records(3, start=2, customer="other", time=HOUR),
                            [{"id": "inv", "customer_name": "other", "time": HOUR}],
                            [{"id": "unm", "customer_name": "other", "fqdn": "f", "time": HOUR}],
                            [{**engine_records(1, time=HOUR)[0], "id": "last"}]):
                reply = await post(running.addresses.http, context, "/access", ndjson(records))
                assert reply.status == 200
    assert seen == {"acme": ["r0", "r1", "last"],
                    "all": ["r0", "r1", "r2", "r3", "r4", "inv", "unm", "last"]}


async def test_tail_refuses_what_the_token_may_not_read(server: Running) -> None:
    for token, query, status in ((ACME_TOKEN, {"customer": "other"}, 403),
                                 (BOUND_TOKEN, {}, 401),  # not a token of this server
                                 ("wrong", {}, 401)):
        with pytest.raises(trio_websocket.ConnectionRejected) as refused:
            async with trio_websocket.open_websocket_url(ws_url(server, token, **query)):
                pass
        assert refused.value.status_code == status
    async with trio_websocket.open_websocket_url(ws_url(server, ACME_TOKEN, customer="acme")):
        pass
    status, body = await http_get(server.addresses.monitor, "/api/tail")
    assert (status, json.loads(body)) == (401, {
        "error": "unauthorized", "detail": "send Authorization: Bearer <token> or ?token=<token>"})


async def test_a_subject_bound_token_cannot_tail(nursery: trio.Nursery, tmp_path: Path,
                                                 pki: Path) -> None:
    """The monitor port has no client certificate, so a token bound to one is refused."""
    running = await start_app(nursery, bound_config(tmp_path, pki))
    with pytest.raises(trio_websocket.ConnectionRejected) as refused:
        async with trio_websocket.open_websocket_url(ws_url(running, BOUND_TOKEN)):
            pass
    assert refused.value.status_code == 403
    assert json.loads(refused.value.body) == {
        "error": "subject_mismatch",
        "detail": "token 'bound' is not valid with no client certificate"}


# --- tokens bound to certificate subjects ----------------------------------------------

async def test_a_token_bound_to_a_subject_is_refused_with_another_certificate(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    """Probe: engine-02's certificate with engine-01's token was accepted."""
    running = await start_app(nursery, bound_config(tmp_path, pki))
    stolen = await post(running.addresses.http, client_context(pki, "engine-02"),
                        "/nginx.access", ndjson(engine_records(2, customer="other", time=HOUR)),
                        token=BOUND_TOKEN)
    assert (stolen.status, stolen.json()) == (403, {
        "error": "subject_mismatch",
        "detail": "token 'bound' is not valid with certificate subject 'engine-02'"})
    good = await post(running.addresses.http, client_context(pki, "engine-01"),
                      "/nginx.access", ndjson(engine_records(2, start=2, time=HOUR)),
                      token=BOUND_TOKEN)
    assert good.status == 200
    assert await flushed(running) == {ACME_FILE: ["r2", "r3"]}
    assert metric(running, "mwdlogd_auth_failures_total", protocol="http",
                  reason="subject_mismatch") == 1


async def test_certificate_subject_restricts_https_customers(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    """[[auth.clients]] applies on HTTPS too, and narrows an unrestricted token."""
    running = await start_app(nursery, make_config(tmp_path, pki, auth={
        "clients": [{"subject": "engine-02", "customers": ["acme"]}]}))
    mixed = ndjson(engine_records(1, time=HOUR) + engine_records(1, start=1, customer="other",
                                                                  time=HOUR))
    refused = await post(running.addresses.http, client_context(pki, "engine-02"),
                         "/nginx.access", mixed)
    assert (refused.status, refused.json()["error"]) == (403, "forbidden_customer")
    assert refused.json()["detail"] == ("record 1: token 'engine-01' with certificate "
                                        "'engine-02' may not write customer_name 'other'")
    accepted = await post(running.addresses.http, client_context(pki, "engine-01"),
                          "/nginx.access", mixed)
    assert accepted.status == 200
    assert await flushed(running) == {ACME_FILE: ["r0"], OTHER_FILE: ["r1"]}


# --- forward ---------------------------------------------------------------------------

async def test_forward_refuses_customers_a_certificate_may_not_write(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    """Probe: an Engine restricted on HTTPS could write any customer through forward."""
    running = await start_app(nursery, make_config(
        tmp_path, pki, auth={"clients": [{"subject": "engine-02", "customers": ["acme"]}]},
        forward={"bind": "127.0.0.1", "port": 0}))
    restricted = await RawForward.connect(running.addresses.forward,
                                          client_context(pki, "engine-02"))
    good = await RawForward.connect(running.addresses.forward, client_context(pki, "engine-01"))
    try:
        await restricted.send(packed("nginx.access", engine_records(2), chunk="ok\n"))
        assert await restricted.receive() == {"ack": "ok\n"}
        mixed = engine_records(1, start=2) + engine_records(1, start=3, customer="other") + [
            {"id": "r4", "customer_name": "other"}]  # would go to _invalid
        await restricted.send(packed("nginx.access", mixed, chunk="mixed\n"))
        with pytest.raises(EOFError):
            await restricted.receive()  # closed, no ack: nothing of that message is kept
        await good.send(packed("nginx.access", engine_records(2, start=5, customer="other"),
                               chunk="g\n"))
        assert await good.receive() == {"ack": "g\n"}
    finally:
        await restricted.aclose()
        await good.aclose()
    assert await flushed(running) == {ACME_FILE: ["r0", "r1"], OTHER_FILE: ["r5", "r6"]}
    assert metric(running, "mwdlogd_rejected_requests_total", protocol="forward",
                  reason="forbidden_customer") == 1


@needs_node
async def test_forward_user_customers_with_a_real_peer(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    """forward.users[].customers, with npm @fluent-org/logger as the Engine."""
    running = await start_app(nursery, make_config(tmp_path, pki, forward={
        "bind": "127.0.0.1", "port": 0, "shared_key": KEY,
        "users": [{"username": "beta-engine", "password": "pw1", "customers": ["beta"]},
                  {"username": "acme-engine", "password": "pw2", "customers": ["acme"]}]}))
    host, port = split_address(running.addresses.forward)
    base = {"host": host, "port": port, "ca": str(pki / "ca.crt"),
            "cert": str(pki / "engine-01.crt"), "key": str(pki / "engine-01.key"),
            "sharedKey": KEY, "mode": "PackedForward", "tag": "nginx.access", "ack": True,
            "flushInterval": 20}
    refused = await trio.to_thread.run_sync(node_send, {
        **base, "username": "beta-engine", "password": "pw1", "count": 3, "start": 0,
        "ackTimeout": 3000})  # the server closes without an ack; the peer notices late
    assert refused.returncode != 0 and "ack response timeout" in refused.stderr
    accepted = await trio.to_thread.run_sync(node_send, {
        **base, "username": "acme-engine", "password": "pw2", "count": 3, "start": 10})
    assert accepted.returncode == 0, accepted.stderr
    assert await flushed(running) == {ACME_FILE: ["node-10", "node-11", "node-12"]}
    assert metric(running, "mwdlogd_rejected_requests_total", protocol="forward",
                  reason="forbidden_customer") >= 1


async def test_forward_user_and_certificate_restrictions_combine(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    running = await start_app(nursery, make_config(
        tmp_path, pki, auth={"clients": [{"subject": "engine-01", "customers": ["acme", "beta"]}]},
        forward={"bind": "127.0.0.1", "port": 0, "shared_key": KEY,
                 "users": [{"username": "u", "password": "pw", "customers": ["beta", "other"]}]}))
    outcomes = {}
    for customer in ("acme", "beta", "other"):
        client = await RawForward.connect(running.addresses.forward, client_context(pki))
        try:
            assert (await client.handshake(username="u", password="pw"))[1] is True
            await client.send(packed("nginx.access", engine_records(1, customer=customer),
                                     chunk=f"{customer}\n"))
            outcomes[customer] = await client.receive()
        except EOFError:
            outcomes[customer] = "closed"
        finally:
            await client.aclose()
    assert outcomes == {"acme": "closed", "beta": {"ack": "beta\n"}, "other": "closed"}
    assert await flushed(running) == {"beta/nginx/www.acme.test/2024/11/25/02.log.gz": ["r0"]}


# --- failed-authentication lockout -----------------------------------------------------

async def test_token_guessing_locks_the_address_out_not_the_good_client(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    """Probe: 1,000 wrong keys in 2.9 s were all checked."""
    running = await start_app(nursery, make_config(tmp_path, pki, auth=LONG_WINDOW))
    address, context = running.addresses.http, client_context(pki)
    body = ndjson(engine_records(1, customer="other", time=HOUR))
    for n in range(5):
        reply = await post_from(address, context, body, token=f"guess-{n}")
        assert reply.status == 401
        good = await post(address, context, "/nginx.access",
                          ndjson(engine_records(1, start=n, time=HOUR)))
        assert good.status == 200
    locked = await post_from(address, context, body, token=TOKEN)  # right, but too late
    assert (locked.status, locked.json()["error"]) == (429, "too_many_auth_failures")
    assert 0 < int(locked.headers["retry-after"]) <= 60
    assert (await post(address, context, "/nginx.access",
                       ndjson(engine_records(1, start=5, time=HOUR)))).status == 200
    assert await flushed(running) == {ACME_FILE: [f"r{n}" for n in range(6)]}
    assert metric(running, "mwdlogd_auth_failures_total", protocol="http",
                  reason="unknown_token") == 5
    assert metric(running, "mwdlogd_auth_throttled_total", protocol="http") == 1


async def test_shared_key_guessing_locks_the_address_out(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    running = await start_app(nursery, make_config(tmp_path, pki, auth=LONG_WINDOW, forward={
        "bind": "127.0.0.1", "port": 0, "shared_key": KEY}))
    host, port = split_address(running.addresses.forward)
    context = client_context(pki)

    async def attempt(key: str, local: str) -> list[Any] | None:
        """The PONG, or None when the server closed without one."""
        tcp = await trio.open_tcp_stream(host, port, local_address=local)
        client = RawForward(trio.SSLStream(tcp, context, server_hostname=host,
                                           https_compatible=True))
        try:
            pong = await client.handshake(key=key)
            if pong[1]:
                await client.send(packed("nginx.access", engine_records(1), chunk="c\n"))
                assert await client.receive() == {"ack": "c\n"}
            return pong
        except EOFError:
            return None
        finally:
            await client.aclose()

    for n in range(5):
        assert (await attempt(f"guess-{n}", ATTACKER)) == [
            "PONG", False, "shared_key mismatch", "", ""]
    assert await attempt(KEY, ATTACKER) is None  # locked out: closed before HELO
    pong = await attempt(KEY, "127.0.0.1")
    assert pong is not None and pong[1] is True
    assert await flushed(running) == {ACME_FILE: ["r0"]}
    assert metric(running, "mwdlogd_auth_failures_total", protocol="forward",
                  reason="shared_key") == 5
    assert metric(running, "mwdlogd_auth_throttled_total", protocol="forward") == 1


async def test_tail_token_guessing_locks_the_address_out(nursery: trio.Nursery, tmp_path: Path,
                                                         pki: Path) -> None:
    server = await start_app(nursery, make_config(tmp_path, pki, auth=LONG_WINDOW))
    monitor = server.addresses.monitor
    for n in range(5):
        status, _, _ = await get_from(monitor, f"/api/tail?token=guess-{n}")
        assert status == 401
    status, headers, body = await get_from(monitor, f"/api/tail?token={TOKEN}")
    assert (status, json.loads(body)["error"]) == (429, "too_many_auth_failures")
    assert "retry-after" in headers
    async with trio_websocket.open_websocket_url(ws_url(server, TOKEN)):  # 127.0.0.1: fine
        pass
    assert metric(server, "mwdlogd_auth_failures_total", protocol="monitor",
                  reason="unknown_token") == 5


async def test_reload_applies_restrictions_and_keeps_lockouts(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    configs = [make_config(tmp_path, pki, auth=LONG_WINDOW)]
    app = App(configs[0], loader=lambda: configs[-1])
    running = Running(app, await nursery.start(app.run), configs[0])
    address, context = running.addresses.http, client_context(pki)
    body = ndjson(engine_records(1, customer="other", time=HOUR))
    for n in range(5):
        assert (await post_from(address, context, body, token=f"guess-{n}")).status == 401
    configs.append(make_config(tmp_path, pki, auth={
        **LONG_WINDOW, "clients": [{"subject": "engine-01", "customers": ["acme"]}]}))
    assert await app.reload()  # conftest gives the process-wide log level back
    assert (await post_from(address, context, body, token=TOKEN)).status == 429
    refused = await post(address, context, "/nginx.access", body)
    assert (refused.status, refused.json()["error"]) == (403, "forbidden_customer")
    accepted = await post(address, context, "/nginx.access", ndjson(engine_records(2, time=HOUR)))
    assert accepted.status == 200
    assert await flushed(running) == {ACME_FILE: ["r0", "r1"]}


def test_lockout_window_and_expiry() -> None:
    throttle, settings = FailureThrottle(), ThrottleSettings(failures=3, window_s=10,
                                                             lockout_s=60)
    assert [throttle.failed("a", t, settings) for t in (0, 5, 11)] == [False] * 3  # 0 left
    assert throttle.locked_for("a", 11) == 0
    assert throttle.failed("a", 12, settings) is True  # 5, 11, 12 within 10 s
    assert throttle.locked_for("a", 12) == 60 and throttle.locked_for("b", 12) == 0
    assert throttle.locked_for("a", 71.5) == 0.5 and throttle.locked_for("a", 72) == 0


def test_lockout_remembers_a_bounded_number_of_addresses() -> None:
    throttle, settings = FailureThrottle(max_sources=3), ThrottleSettings(failures=2)
    for source in ("a", "b", "c", "d"):
        throttle.failed(source, 0, settings)
    assert throttle.failed("a", 1, settings) is False  # forgotten: oldest of four
    assert throttle.failed("d", 1, settings) is True


def test_restrictions_combine_and_a_lockout_hides_the_verdict() -> None:
    reports: list[tuple[str, str]] = []
    authorizer = Authorizer(
        [Credential("t", b"secret", frozenset({"acme", "beta"}))],
        clients={"engine-01": frozenset({"beta", "gamma"})},
        throttle=ThrottleSettings(failures=2, window_s=10, lockout_s=5),
        report=lambda protocol, source, reason, detail: reports.append((protocol, reason)))
    identity = authorizer.token(b"Bearer secret", protocol="http", source="x", now=0,
                                subject="engine-01")
    assert identity == Identity("token 't' with certificate 'engine-01'", frozenset({"beta"}))
    assert identity.first_forbidden([{"customer_name": "beta"}, {"customer_name": "acme"}]) \
        == (1, "acme")
    assert identity.first_forbidden([{"fqdn": "x"}]) == (0, None)
    refusal = identity.refusal("record 0", "x" * 10**6)  # a peer's name is quoted, bounded
    assert refusal.startswith("record 0: token 't' with certificate 'engine-01' may not "
                              "write customer_name 'xxx") and len(refusal) < 200
    for _ in range(2):
        with pytest.raises(AuthFailed, match="not known"):
            authorizer.token(b"Bearer nope", protocol="http", source="x", now=1, subject=None)
    with pytest.raises(AuthFailed) as locked:
        authorizer.token(b"Bearer secret", protocol="http", source="x", now=2, subject=None)
    assert (locked.value.status, locked.value.retry_after_s) == (429, 5)
    assert authorizer.token(b"Bearer secret", protocol="http", source="x", now=6,
                            subject=None).customers == frozenset({"acme", "beta"})
    assert reports == [("http", "unknown_token"), ("http", "unknown_token"),
                       ("http", "locked_out"), ("http", "throttled")]


# --- observability endpoints -----------------------------------------------------------

async def test_health_shows_no_paths(server: Running) -> None:
    status, body = await http_get(server.addresses.health, "/health")
    assert status == 200
    assert set(json.loads(body)) == {"status", "storage_id", "open_files", "buffered_bytes"}
    assert str(server.root.parent).encode() not in body


async def test_plugins_config_needs_an_unrestricted_token(server: Running) -> None:
    internals = str(server.root.parent).encode()  # storage and buffer paths live under it
    monitor = server.addresses.monitor
    for headers in ("", f"Authorization: Bearer {ACME_TOKEN}\r\n"):
        for target in ("/api/plugins.json", "/api/plugins"):
            status, _, body = await get_from(monitor, target, local="127.0.0.1", headers=headers)
            assert status == 200 and internals not in body and b"body_size_limit" not in body
    _, _, body = await get_from(monitor, "/api/plugins.json", local="127.0.0.1")
    assert [p["config"] for p in json.loads(body)["plugins"]] == [
        {"@type": "http", "@id": "in_http"}, {"@type": "forward", "@id": "in_forward"},
        {"@type": "file", "@id": "hourly_files"}]
    status, _, body = await get_from(monitor, "/api/plugins.json", local="127.0.0.1",
                                     headers=f"Authorization: Bearer {TOKEN}\r\n")
    output = {p["plugin_id"]: p for p in json.loads(body)["plugins"]}["hourly_files"]
    assert status == 200 and output["config"]["path"] == str(server.root)
    status, _, _ = await get_from(monitor, "/api/plugins.json?token=wrong", local="127.0.0.1")
    assert status == 401


def test_a_listener_section_keeps_its_own_defaults() -> None:
    """Probe: `[monitor] port = N` alone bound the monitor on 0.0.0.0."""
    config = structure_config({"monitor": {"port": 24299}, "health": {"bind": "127.0.0.1"},
                               "metrics": {"port": 9100}})
    assert (config.monitor.bind, config.monitor.port) == ("127.0.0.1", 24299)
    assert (config.health.bind, config.health.port) == ("127.0.0.1", 8889)
    assert (config.metrics.bind, config.metrics.port) == ("0.0.0.0", 9100)


@pytest.mark.parametrize(("auth", "forward", "key"), [
    ({"tokens": [{"name": "t", "token": "x", "customers": ["ac.me"]}]}, {},
     "auth.tokens[0].customers[0]"),
    ({"clients": [{"subject": "e", "customers": ["_invalid"]}]}, {},
     "auth.clients[0].customers[0]"),
    ({"clients": [{"subject": "e"}, {"subject": "e"}]}, {}, "auth.clients[1].subject"),
    ({}, {"shared_key": "k", "users": [{"username": "u", "password": "p", "customers": [""]}]},
     "forward.users[0].customers[0]"),
    ({"failure_limit": -1}, {}, "auth.failure_limit"),
    ({"lockout": "0s"}, {}, "auth.lockout"),
])
def test_auth_config_errors_name_the_key(tmp_path: Path, pki: Path, auth: dict[str, Any],
                                         forward: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make_config(tmp_path, pki, auth=auth, forward=forward)
    assert caught.value.key == key

"""HTTPS ingest end to end, in-process: real sockets, real mTLS, real files."""

from __future__ import annotations

import gzip
import json
import ssl
from pathlib import Path
from urllib.parse import quote_from_bytes

import msgpack
import pytest
import trio

from conftest import Running
from helpers import (
    CAPTURES,
    Connection,
    all_records,
    client_context,
    engine_records,
    exchange,
    http_get,
    ids_by_file,
    ndjson,
    post,
    read_tree,
)

HOUR_2024 = 1732500000.5  # 2024-11-25T02:00:00.500Z
NGINX_FILE = "acme/nginx/www.acme.test/2024/11/25/02.log.gz"


async def stored(server: Running) -> dict[str, list[str]]:
    await server.app.flush("test")
    return ids_by_file(server.root)


@pytest.mark.parametrize(("content_type", "encode"), [
    ("application/x-ndjson", ndjson),
    ("application/json", lambda rs: json.dumps(rs).encode()),
    ("application/json", lambda rs: b"[" + b"\n,".join(json.dumps(r).encode() for r in rs)
     + b"\n]"),  # Fluentd out_http json_array shape
    ("application/msgpack", lambda rs: msgpack.packb(rs)),
    ("application/x-msgpack", lambda rs: b"".join(msgpack.packb(r) for r in rs)),
    ("application/x-www-form-urlencoded",
     lambda rs: b"json=" + quote_from_bytes(json.dumps(rs).encode()).encode()),
    ("application/x-www-form-urlencoded",
     lambda rs: b"msgpack=" + quote_from_bytes(msgpack.packb(rs)).encode()),
])
async def test_every_body_format_lands_exactly(server: Running, pki: Path, content_type: str,
                                               encode: object) -> None:
    records = engine_records(25, time=HOUR_2024)
    reply = await post(server.addresses.http, client_context(pki), "/nginx.access",
                       encode(records), content_type=content_type)  # type: ignore[operator]
    assert (reply.status, reply.json()) == (200, {"records": 25})
    assert await stored(server) == {NGINX_FILE: [f"r{n}" for n in range(25)]}


async def test_gzip_body_and_added_fields(server: Running, pki: Path) -> None:
    records = engine_records(3, time=HOUR_2024, log_type="openappsec")
    records[2]["severity"] = "high"
    reply = await post(server.addresses.http, client_context(pki), "/waf.events",
                       gzip.compress(ndjson(records)), headers={"Content-Encoding": "gzip"})
    assert reply.status == 200
    await server.app.flush("test")
    tree = read_tree(server.root)
    (path, landed), = tree.items()
    assert path == "acme/openappsec/www.acme.test/2024/11/25/02.log.gz"
    assert [r["id"] for r in landed] == ["r0", "r1", "r2"]
    assert [r["severity"] for r in landed] == ["info", "info", "high"]
    for record in landed:
        assert record["tag"] == "waf.events"
        assert record["logserver_hostname"] == "testhost"
        assert record["timestamp"] == "2024-11-25T02:00:00.500Z"
        assert record["received_at"].endswith("Z") and record["received_at"] > "2026"
        assert record["time"] == HOUR_2024


async def test_query_time_and_streams(server: Running, pki: Path) -> None:
    records = [
        {"id": "a", "customer_name": "acme", "fqdn": "a.test"},  # type from tag
        {"id": "b", "customer_name": "acme", "fqdn": "a.test", "log_type": "other"},
        {"id": "c", "fqdn": "a.test"},  # no customer -> invalid
        {"id": "d", "customer_name": "../../etc", "fqdn": "..", "time": "bogus"},
    ]
    reply = await post(server.addresses.http, client_context(pki),
                       "/nginx.access?time=1732500000", ndjson(records))
    assert reply.status == 200
    unmatched = await post(server.addresses.http, client_context(pki), "/other.tag",
                           ndjson([{"id": "e", "customer_name": "acme", "fqdn": "a.test"}]))
    assert unmatched.status == 200
    files = await stored(server)
    assert files.pop("acme/nginx/a.test/2024/11/25/02.log.gz") == ["a", "b"]
    invalid = {k: v for k, v in files.items() if k.startswith("_invalid/")}
    assert sorted(id_ for ids in invalid.values() for id_ in ids) == ["c", "d"]
    (unmatched_path, unmatched_ids), = ((k, v) for k, v in files.items()
                                        if k.startswith("_unmatched/"))
    assert unmatched_ids == ["e"]
    assert set(files) == set(invalid) | {unmatched_path}


async def test_keep_alive_carries_many_requests(server: Running, pki: Path) -> None:
    connection = await Connection.open(server.addresses.http, client_context(pki))
    try:
        for batch in range(5):
            reply = await connection.post("/nginx.access", ndjson(
                engine_records(10, start=batch * 10, time=HOUR_2024)))
            assert reply.status == 200
            assert "connection" not in reply.headers
    finally:
        await connection.aclose()
    assert await stored(server) == {NGINX_FILE: [f"r{n}" for n in range(50)]}


async def test_pipelined_requests_are_answered_in_order(server: Running, pki: Path) -> None:
    from helpers import request_bytes
    connection = await Connection.open(server.addresses.http, client_context(pki))
    try:
        await connection.send_raw(b"".join(
            request_bytes("/nginx.access", ndjson(engine_records(2, start=n * 2, time=HOUR_2024)))
            for n in range(3)))
        assert [(await connection.reply()).status for _ in range(3)] == [200, 200, 200]
    finally:
        await connection.aclose()
    assert await stored(server) == {NGINX_FILE: [f"r{n}" for n in range(6)]}


BIG = 10 * 1024 * 1024


@pytest.mark.parametrize(("body", "kwargs", "status", "error"), [
    (b'{"id": "ok", "customer_name": "acme", "fqdn": "f"}\n{"id": 1', {}, 400,
     "malformed_body"),
    (b"", {}, 400, "empty_body"),
    (b"  \n", {}, 400, "empty_body"),
    (b'[{"id": "x"}, 5]', {"content_type": "application/json"}, 400, "not_an_object"),
    (b'{"id": "x"}\n"str"\n', {}, 400, "not_an_object"),
    (b'{"id": "x"}', {"token": None}, 401, "unauthorized"),
    (b'{"id": "x"}', {"token": "wrong-token-0123456789"}, 401, "unauthorized"),
    (b'{"id": "x"}', {"content_type": "text/plain"}, 415, "unsupported_media_type"),
    (b'{"id": "x"}', {"headers": {"Content-Encoding": "br"}}, 415, "unsupported_encoding"),
    (b"\x1f\x8b\x08\x00garbage", {"headers": {"Content-Encoding": "gzip"}}, 400,
     "malformed_body"),
    (b"\xc1", {"content_type": "application/msgpack"}, 400, "malformed_body"),
    # JSON and ndjson past the limit are streamed: one value or line past it is refused
    (b"x" * (BIG + 1), {"content_type": "application/json"}, 413, "line_too_long"),
    (b"x" * (BIG + 1), {}, 413, "line_too_long"),
    (gzip.compress(b"{}" + b" " * (BIG + 10)), {"headers": {"Content-Encoding": "gzip"},
                                                "content_type": "application/json"}, 413,
     "line_too_long"),
    (gzip.compress(b"{}" + b" " * (BIG + 10)), {"headers": {"Content-Encoding": "gzip"}}, 413,
     "line_too_long"),
    (b'{"customer_name": "other", "fqdn": "x"}', {"token": "acme-token-0123456789"}, 403,
     "forbidden_customer"),
])
async def test_bad_requests_are_refused_and_harm_nothing(
        server: Running, pki: Path, body: bytes, kwargs: dict[str, object], status: int,
        error: str) -> None:
    context = client_context(pki)
    good = await post(server.addresses.http, context, "/nginx.access",
                      ndjson(engine_records(2, time=HOUR_2024)))
    reply = await post(server.addresses.http, context, "/nginx.access", body,
                       **kwargs)  # type: ignore[arg-type]
    assert reply.status == status, reply.body
    payload = reply.json()
    assert payload["error"] == error and payload["detail"]
    after = await post(server.addresses.http, context, "/nginx.access",
                       ndjson(engine_records(2, start=2, time=HOUR_2024)))
    assert (good.status, after.status) == (200, 200)
    assert await stored(server) == {NGINX_FILE: ["r0", "r1", "r2", "r3"]}


async def test_gzip_bomb_is_refused_by_inflated_size(server: Running, pki: Path) -> None:
    bomb = gzip.compress(b"\n" * (64 * 1024 * 1024))
    assert len(bomb) < 200_000
    reply = await post(server.addresses.http, client_context(pki), "/nginx.access", bomb,
                       headers={"Content-Encoding": "gzip"}, content_type="application/json")
    # Streamed (JSON is sliced as it inflates, a slice at a time): 64 MiB of nothing.
    assert (reply.status, reply.json()["error"]) == (400, "empty_body")
    assert await stored(server) == {}


async def test_restricted_token_may_write_its_customer(server: Running, pki: Path) -> None:
    reply = await post(server.addresses.http, client_context(pki), "/nginx.access",
                       ndjson(engine_records(2, time=HOUR_2024)), token="acme-token-0123456789")
    assert reply.status == 200
    assert await stored(server) == {NGINX_FILE: ["r0", "r1"]}


async def test_missing_length_and_wrong_method(server: Running, pki: Path) -> None:
    no_length = await exchange(server.addresses.http, client_context(pki), (
        b"POST /nginx.access HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer test-token-0123456789\r\n"
        b"Content-Type: application/x-ndjson\r\n\r\n"))
    assert no_length.status == 411
    get = await exchange(server.addresses.http, client_context(pki),
                         b"GET /nginx.access HTTP/1.1\r\nHost: x\r\n\r\n")
    assert get.status == 405


async def test_garbage_http_gets_400(server: Running, pki: Path) -> None:
    reply = await exchange(server.addresses.http, client_context(pki),
                           b"NOT HTTP AT ALL\r\n\r\n")
    assert reply.status == 400


async def test_client_without_certificate_is_refused(server: Running, pki: Path) -> None:
    with pytest.raises((trio.BrokenResourceError, EOFError)):
        await post(server.addresses.http, client_context(pki, None), "/nginx.access",
                   ndjson(engine_records(1)))
    assert await stored(server) == {}


async def test_client_certificate_from_another_ca_is_refused(
        server: Running, pki: Path, rogue_pki: Path) -> None:
    context = client_context(pki, None)
    context.load_cert_chain(str(rogue_pki / "engine-01.crt"), str(rogue_pki / "engine-01.key"))
    with pytest.raises((trio.BrokenResourceError, EOFError)):
        await post(server.addresses.http, context, "/nginx.access", ndjson(engine_records(1)))


async def test_tls_1_2_is_served(server: Running, pki: Path) -> None:
    context = client_context(pki, maximum=ssl.TLSVersion.TLSv1_2)
    reply = await post(server.addresses.http, context, "/nginx.access",
                       ndjson(engine_records(1, time=HOUR_2024)))
    assert reply.status == 200


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
async def test_tls_1_1_is_refused(server: Running, pki: Path) -> None:
    context = client_context(pki, maximum=ssl.TLSVersion.TLSv1_1)
    with pytest.raises((trio.BrokenResourceError, ssl.SSLError)):
        await post(server.addresses.http, context, "/nginx.access", ndjson(engine_records(1)))
    metrics = server.app.telemetry.exposition().decode()
    assert 'mwdlogd_rejected_requests_total{protocol="http",reason="tls_handshake"} 1.0' in metrics


async def test_idle_connection_is_closed(nursery: trio.Nursery, tmp_path: Path,
                                         pki: Path) -> None:
    from conftest import make_config, start_app
    running = await start_app(nursery, make_config(tmp_path, pki, http={"idle_timeout": "50ms"}))
    connection = await Connection.open(running.addresses.http, client_context(pki))
    try:
        with trio.fail_after(5):
            assert await connection.stream.receive_some(100) == b""
    finally:
        await connection.aclose()


async def test_slow_request_times_out_with_408(nursery: trio.Nursery, tmp_path: Path,
                                               pki: Path) -> None:
    from conftest import make_config, start_app
    running = await start_app(nursery, make_config(tmp_path, pki,
                                                   http={"request_timeout": "100ms"}))
    connection = await Connection.open(running.addresses.http, client_context(pki))
    try:
        await connection.send_raw(b"POST /nginx.access HTTP/1.1\r\nHost: x\r\n"
                                  b"Authorization: Bearer test-token-0123456789\r\n"
                                  b"Content-Type: application/x-ndjson\r\nContent-Length: 50\r\n"
                                  b"\r\n{\"id\":")
        with trio.fail_after(5):
            reply = await connection.reply()
        assert (reply.status, reply.json()["error"]) == (408, "request_timeout")
    finally:
        await connection.aclose()
    await running.app.flush("test")
    assert all_records(running.root) == []


async def test_metrics_and_health(server: Running, pki: Path) -> None:
    context = client_context(pki)
    await post(server.addresses.http, context, "/nginx.access",
               ndjson(engine_records(7, time=HOUR_2024)))
    await post(server.addresses.http, context, "/nginx.access", b"{", token=None)
    await server.app.flush("test")
    _, text = await http_get(server.addresses.metrics, "/metrics")
    body = text.decode()
    assert ('fluentd_input_status_num_records_total{hostname="testhost",tag="nginx.access"} 7.0'
            in body)
    assert ('fluentd_output_status_num_records_total{hostname="testhost",tag="nginx.access"} 7.0'
            in body)
    assert 'mwdlogd_rejected_requests_total{protocol="http",reason="unauthorized"} 1.0' in body
    status, health = await http_get(server.addresses.health, "/health")
    assert status == 200 and json.loads(health)["status"] == "ok"


async def test_drain_finishes_in_flight_and_flushes(server: Running, pki: Path) -> None:
    await post(server.addresses.http, client_context(pki), "/nginx.access",
               ndjson(engine_records(5, time=HOUR_2024)))
    assert read_tree(server.root) == {}  # still pending: flush_interval is 10 s
    server.app.request_stop()
    with trio.fail_after(10):
        await server.app.stopped.wait()
    assert ids_by_file(server.root) == {NGINX_FILE: [f"r{n}" for n in range(5)]}
    with pytest.raises(OSError):
        await post(server.addresses.http, client_context(pki), "/nginx.access",
                   ndjson(engine_records(1)))


@pytest.mark.parametrize("name", sorted(p.name for p in CAPTURES.glob("http-*.req-*.bin")))
async def test_fluentd_captures_replayed_over_tls(server: Running, pki: Path, name: str) -> None:
    """The exact bytes Fluentd 1.18 out_http sent (a bearer header added where missing)."""
    raw = (CAPTURES / name).read_bytes()
    if b"\r\nAuthorization:" not in raw:
        line, rest = raw.split(b"\r\n", 1)
        raw = line + b"\r\nAuthorization: Bearer abc\r\n" + rest
    head, body = raw.split(b"\r\n\r\n", 1)
    if b"Content-Encoding: gzip" in head:
        body = gzip.decompress(body)
    if body.startswith(b"["):
        expected = [r["seq"] for r in json.loads(body)]
    else:
        expected = [json.loads(line)["seq"] for line in body.splitlines()]
    reply = await exchange(server.addresses.http, client_context(pki), raw)
    assert (reply.status, reply.json()) == (200, {"records": len(expected)})
    await server.app.flush("test")
    landed = all_records(server.root)
    assert [r["seq"] for r in landed] == expected
    # Fluentd's sample records carry `customer`, not customer_name: the invalid stream.
    assert all(r["invalid_reason"] == "customer_name is missing" for r in landed)


async def test_health_is_503_when_storage_is_not_writable(server: Running) -> None:
    server.root.rmdir()
    server.root.write_text("a file where the storage root should be")
    code, body = await http_get(server.addresses.health, "/health")
    assert code == 503
    status = json.loads(body)
    assert status["status"] == "unavailable" and "cannot create" in status["problem"]
    assert status["problem"] == "cannot create {storage.root}: File exists"  # not the path


async def test_a_line_that_is_not_utf8_costs_nothing(server: Running, pki: Path) -> None:
    """One raw attack byte among valid lines: 200, every line stored, the bad one with
    U+FFFD and its original bytes, counted in the metric."""
    records = engine_records(3, time=HOUR_2024)
    lines = ndjson(records).splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"/p/1"', b'"/p/\xff1"')
    reply = await post(server.addresses.http, client_context(pki), "/nginx.access",
                       b"".join(lines))
    assert (reply.status, reply.json()) == (200, {"records": 3})
    assert await stored(server) == {NGINX_FILE: ["r0", "r1", "r2"]}
    bad = all_records(server.root)[1]
    assert bad["path"] == "/p/\ufffd1" and bad["utf8_invalid"] == {"/path": "L3Av/zE="}
    metrics = server.app.telemetry.exposition().decode()
    assert 'mwdlogd_invalid_utf8_records_total{protocol="http"} 1.0' in metrics

"""The sans-IO ingest core: body decoders and RequestReader over h11 events, no sockets.

Real Fluentd 1.18 out_http requests (recorded in shared/reference/captures, kept in
tests/captures) are fed whole, byte by byte, and with trailing bytes; every split must
give the same records.
"""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import Iterator

import h11
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mwdlogd.errors import AuthFailed, IngestError
from mwdlogd.pipeline.normalize import Context, normalize_batch
from mwdlogd.proto.auth import Authorizer, Credential, Identity, ThrottleSettings
from mwdlogd.proto.bodies import gunzip_body, parse_json, parse_msgpack, parse_ndjson
from mwdlogd.proto.ingest import Accepted, RequestReader, tag_of

from helpers import CAPTURES

AUTHORIZER = Authorizer([Credential("engine", b"abc"), Credential("other", b"0123456789abcdef"),
                         Credential("acme-only", b"acme-secret", frozenset({"acme"}))],
                        throttle=ThrottleSettings(failures=0))


def authenticate(authorization: bytes | None) -> Identity:
    return AUTHORIZER.token(authorization, protocol="http", source="test", now=0.0,
                            subject=None)
CAPTURED = sorted(p.name for p in CAPTURES.glob("http-*.req-*.bin"))


def events(data: bytes, step: int | None) -> Iterator[object]:
    conn = h11.Connection(h11.SERVER)
    chunks = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
    for chunk in [*chunks, b""]:
        conn.receive_data(chunk)
        while (event := conn.next_event()) not in (h11.NEED_DATA, h11.PAUSED):
            yield event
            if isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return


def read(data: bytes, step: int | None = None, limit: int = 10 * 1024 * 1024) -> Accepted:
    reader = None
    for event in events(data, step):
        if isinstance(event, h11.Request):
            reader = RequestReader(event, authenticate=authenticate, body_limit=limit)
        elif isinstance(event, h11.Data):
            assert reader is not None
            reader.receive_data(event.data)
        elif isinstance(event, h11.EndOfMessage):
            assert reader is not None
            return reader.finish()
    raise AssertionError("request did not complete")


def with_token(raw: bytes, token: bytes = b"abc") -> bytes:
    if b"\r\nAuthorization:" in raw:
        return raw
    line, rest = raw.split(b"\r\n", 1)
    return line + b"\r\nAuthorization: Bearer " + token + b"\r\n" + rest


def expected_seqs(raw: bytes) -> list[int]:
    """The seq values, read independently of the server code (json + gzip only)."""
    head, body = raw.split(b"\r\n\r\n", 1)
    if b"Content-Encoding: gzip" in head:
        body = gzip.decompress(body)
    if body.lstrip().startswith(b"["):
        return [r["seq"] for r in json.loads(body)]
    return [json.loads(line)["seq"] for line in body.splitlines() if line.strip()]


def test_captures_are_present() -> None:
    assert len(CAPTURED) >= 10


@pytest.mark.parametrize("name", CAPTURED)
@pytest.mark.parametrize("step", [None, 1, 7])
def test_fluentd_out_http_captures(name: str, step: int | None) -> None:
    raw = with_token((CAPTURES / name).read_bytes())
    accepted = read(raw, step)
    assert accepted.tag == "nginx.access"
    assert accepted.identity == Identity("token 'engine'")
    assert [r["seq"] for r in accepted.records] == expected_seqs(raw)
    assert accepted.records[0]["customer"] in {"Müller GmbH", "Société Générale", "Пример ООО"}  # noqa: RUF001


def test_captured_body_with_trailing_request_is_unaffected() -> None:
    raw = with_token((CAPTURES / "http-ndjson.req-2.bin").read_bytes())
    assert read(raw + raw[:40]).records == read(raw).records


def request(body: bytes, *, token: bytes | None = b"abc", content_type: bytes | None =
            b"application/x-ndjson", target: bytes = b"/nginx.access",
            extra: bytes = b"", method: bytes = b"POST") -> bytes:
    head = method + b" " + target + b" HTTP/1.1\r\nHost: x\r\n"
    if token is not None:
        head += b"Authorization: Bearer " + token + b"\r\n"
    if content_type is not None:
        head += b"Content-Type: " + content_type + b"\r\n"
    return head + extra + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body


@pytest.mark.parametrize(("raw", "status", "error"), [
    (request(b"{}", token=None), 401, "unauthorized"),
    (request(b"{}", token=b"ab"), 401, "unauthorized"),
    (request(b"{}", token=b"abcd"), 401, "unauthorized"),
    (request(b"{}", method=b"PUT"), 405, "method_not_allowed"),
    (request(b"{}", target=b"/"), 400, "bad_tag"),
    (request(b"{}", target=b"/a%20b"), 400, "bad_tag"),
    (request(b"{}", target=b"/nginx?time=yesterday"), 400, "bad_time"),
    (request(b"{}", content_type=None), 415, "unsupported_media_type"),
    (request(b"{}", content_type=b"text/csv"), 415, "unsupported_media_type"),
    (request(b"x" * 101), 413, "body_too_large"),
    (request(b"", extra=b""), 400, "empty_body"),
    (request(b'{"customer_name": "evil"}', token=b"acme-secret"), 403, "forbidden_customer"),
    (request(b'{"fqdn": "x"}', token=b"acme-secret"), 403, "forbidden_customer"),
])
def test_refusals(raw: bytes, status: int, error: str) -> None:
    with pytest.raises(IngestError) as caught:
        read(raw, limit=100)
    assert (caught.value.status, caught.value.error) == (status, error)
    assert caught.value.detail


def test_head_is_refused_before_the_body_arrives() -> None:
    head = request(b"x" * 1000).split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    with pytest.raises(IngestError, match=r"Content-Length 1000 > http\.body_size_limit=100"):
        RequestReader(event, authenticate=authenticate, body_limit=100)


def test_bearer_scheme_is_case_insensitive_and_others_refused() -> None:
    assert authenticate(b"bearer abc").name == "token 'engine'"
    for refused in (b"Basic YWJjOmFiYw==", b"", b"abc"):
        with pytest.raises(AuthFailed, match="bearer token is not known"):
            authenticate(refused)


def test_tag_and_time_from_target() -> None:
    assert tag_of(b"/nginx/access?time=1732500000.5") == ("nginx.access", 1732500000.5)
    assert tag_of(b"/waf.events") == ("waf.events", None)


def test_json_stream_of_objects_reads_as_ndjson() -> None:
    assert parse_json(b'{"a": 1}\n{"a": 2}\n').records == [{"a": 1}, {"a": 2}]


def test_ndjson_error_names_the_line() -> None:
    with pytest.raises(IngestError, match="line 2 is not valid JSON"):
        parse_ndjson(b'{"a": 1}\n{"a": \n')


def test_invalid_utf8_keeps_every_line_and_its_bytes() -> None:
    body = b'{"a": "ok"}\n{"id": 2, "uri": "/x\xff\xfey", "h": {"k\xc3": ["\xe2\x82"]}}\n'
    parsed = parse_ndjson(body)
    assert parsed.invalid_utf8 == 1
    assert parsed.lines == [b'{"a": "ok"}', None]
    assert parsed.records[1] == {
        "id": 2, "uri": "/x\ufffd\ufffdy", "h": {"k\ufffd": ["\ufffd\ufffd"]},
        "utf8_invalid": {"/uri": base64.b64encode(b"/x\xff\xfey").decode(),
                         "/h/k\ufffd/0": base64.b64encode(b"\xe2\x82").decode()},
        "utf8_invalid_keys": {"/h/k\ufffd": base64.b64encode(b"k\xc3").decode()}}
    for name in (parse_json, parse_ndjson):  # an array body, a one-object body
        assert name(b'[{"a": "\xff"}]' if name is parse_json else b'{"a": "\xff"}').records == [
            {"a": "\ufffd", "utf8_invalid": {"/a": "/w=="}}]


def test_invalid_text_rule_keeps_colliding_keys_and_own_fields_apart() -> None:
    record = parse_ndjson(b'{"k\xff": 1, "k\xfe": 2, "k\xef\xbf\xbd": 3, '
                          b'"utf8_invalid": "mine", "s": "\\udc80\\ud800"}').records[0]
    assert record["k\ufffd"] == 3 and record["utf8_invalid"] == "mine"
    assert list(record) == ["k\ufffd\ufffd", "k\ufffd\ufffd\ufffd", "k\ufffd", "utf8_invalid", "s",
                            "_utf8_invalid", "utf8_invalid_keys"]  # the order as sent
    assert (record["k\ufffd\ufffd"], record["k\ufffd\ufffd\ufffd"]) == (1, 2)
    assert record["s"] == "\ufffd\ufffd"
    originals = {base64.b64decode(v) for v in record["utf8_invalid_keys"].values()}
    assert originals == {b"k\xff", b"k\xfe"}
    # escaped lone surrogates: 0x80 as surrogateescape does, U+D800 as its UTF-8 form
    assert base64.b64decode(record["_utf8_invalid"]["/s"]) == b"\x80\xed\xa0\x80"


def test_json_refuses_what_is_not_json_even_when_not_utf8() -> None:
    for body in (b'{"a": "\xff",}', b'{"a": NaN, "b": "\xff"}'):
        with pytest.raises(IngestError, match="not valid JSON"):
            parse_ndjson(body)
        with pytest.raises(IngestError, match="not valid JSON"):
            parse_json(body)


def test_msgpack_bin_is_text_and_bad_bytes_are_kept() -> None:
    body = msgpack.packb({b"customer_name": b"acme", "n": 1, "raw": b"\xff"}, use_bin_type=True)
    parsed = parse_msgpack(body)
    assert parsed.records == [{"customer_name": "acme", "n": 1, "raw": "\ufffd",
                               "utf8_invalid": {"/raw": "/w=="}}]
    assert parsed.invalid_utf8 == 1


def test_msgpack_stream_arrays_and_checks() -> None:
    body = msgpack.packb({"a": 1}) + msgpack.packb([{"b": 2}, {"c": 3}])
    assert parse_msgpack(body).records == [{"a": 1}, {"b": 2}, {"c": 3}]
    with pytest.raises(IngestError, match="truncated"):
        parse_msgpack(body[:-1])
    with pytest.raises(IngestError, match="not allowed for map key"):
        parse_msgpack(msgpack.packb({1: 1}))
    with pytest.raises(IngestError, match="record 0 is int"):
        parse_msgpack(msgpack.packb(5))


def test_gunzip_reads_every_member_and_bounds_output() -> None:
    data = gzip.compress(b"abc") + gzip.compress(b"def")
    assert gunzip_body(data, 6) == b"abcdef"
    with pytest.raises(IngestError) as caught:
        gunzip_body(data, 5)
    assert caught.value.status == 413
    with pytest.raises(IngestError, match="truncated"):
        gunzip_body(gzip.compress(b"abcdef" * 100)[:-12], 10_000)


@settings(max_examples=300)
@given(st.binary(max_size=300), st.sampled_from(["application/x-ndjson", "application/json",
                                                 "application/msgpack",
                                                 "application/x-www-form-urlencoded"]),
       st.booleans())
def test_any_body_gives_records_or_an_ingest_error(body: bytes, content_type: str,
                                                   gzipped: bool) -> None:
    extra = b"Content-Encoding: gzip\r\n" if gzipped else b""
    try:
        accepted = read(request(body, content_type=content_type.encode(), extra=extra))
    except IngestError as exc:
        assert 400 <= exc.status < 500
    else:
        assert accepted.records and all(isinstance(r, dict) for r in accepted.records)


@pytest.mark.parametrize("body", [
    b'{"id": 123456789012345678901234567890, "n": 7}\n{"id": 1}\n',
    # a record holding an added field is encoded again, from an exact re-read of its text
    b'{"id": 123456789012345678901234567890, "n": 7, "tag": "mine"}\n{"id": 1}\n',
    b'[{"id": 123456789012345678901234567890, "n": 7}, {"id": 1}]',
])
def test_big_integers_keep_their_exact_value_when_stored(body: bytes) -> None:
    parsed = parse_ndjson(body) if body.startswith(b"{") else parse_json(body)
    records = zip(parsed.records, [None] * 2, parsed.lines or [None] * 2, strict=True)
    lines = [r.line for r in normalize_batch(records, Context("nginx.access", 1.0, 1.0, "h"))]
    assert [json.loads(line)["id"] for line in lines] == [123456789012345678901234567890, 1]


def test_fluent_bit_msgpack_events_carry_their_time() -> None:
    """Fluent Bit's http output with `Format msgpack` sends `[[EventTime, metadata],
    record]` (or `[time, record]`); the record is the map, the time its event time."""
    event_time = msgpack.ExtType(0, (1732500000).to_bytes(4, "big")
                                 + (5 * 10**8).to_bytes(4, "big"))
    body = (msgpack.packb([[event_time, {}], {"a": b"\xff"}], use_bin_type=True)
            + msgpack.packb([1732500001, {"b": 1}]) + msgpack.packb({"c": 2}))
    parsed = parse_msgpack(body)
    assert parsed.records == [{"a": "\ufffd", "utf8_invalid": {"/a": "/w=="}}, {"b": 1},
                              {"c": 2}]
    assert parsed.times == [1732500000.5, 1732500001.0, None]
    assert parse_msgpack(msgpack.packb([{"a": 1}, {"b": 2}])).times is None

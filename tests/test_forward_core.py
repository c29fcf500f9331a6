"""The sans-IO forward core: every mode, real Fluentd captures, handshakes, limits, fuzz."""

from __future__ import annotations

import gzip
import subprocess
import sys
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mwdlogd.errors import ForwardProtocolError
from mwdlogd.proto.forward import NEED_DATA, Entries, ForwardConnection, Pong

from forward_client import KEY, event_time, packed, ping
from helpers import CAPTURES

LIMIT = 1 << 20
RECORD = {"id": "a", "msg": "ログ ✓"}


def events(data: bytes, step: int | None = None, **kwargs: Any) -> list[Any]:
    conn = ForwardConnection(max_message_bytes=kwargs.pop("limit", LIMIT), **kwargs)
    out = []
    chunks = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
    for chunk in chunks:
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not NEED_DATA:
            out.append(event)
    return out


MODES = {
    "message-int-time": (msgpack.packb(["t", 1732500000, RECORD]), [(1732500000.0, RECORD)]),
    "message-event-time": (msgpack.packb(["t", event_time(1732500000, 500_000_000), RECORD,
                                          {"chunk": "c1\n"}]), [(1732500000.5, RECORD)]),
    "message-float-time": (msgpack.packb(["t", 1732500000.25, RECORD]), [(1732500000.25, RECORD)]),
    "forward": (msgpack.packb(["t", [[1, RECORD], [2, {"id": "b"}]], {"size": 2}]),
                [(1.0, RECORD), (2.0, {"id": "b"})]),
    "packed-bin": (msgpack.packb(["t", msgpack.packb([3, RECORD])], use_bin_type=True),
                   [(3.0, RECORD)]),
    "packed-str32": (packed("t", [RECORD, RECORD]), [(1732500000.000000005, RECORD)] * 2),
    "compressed-many-members": (packed("t", [RECORD, RECORD, RECORD], compress=True),
                                [(1732500000.000000005, RECORD)] * 3),
}


@pytest.mark.parametrize("name", sorted(MODES))
@pytest.mark.parametrize("step", [None, 1, 5])
def test_every_mode_any_split(name: str, step: int | None) -> None:
    data, expected = MODES[name]
    got = events(data + data, step)  # two messages back to back
    assert [e.tag for e in got] == ["t", "t"]
    assert [e.entries for e in got] == [expected, expected]


def test_option_chunk_comes_back_byte_exact() -> None:
    (entries,) = events(packed("t", [RECORD], chunk="ZhGNcmjIJvYmNsgKaQnMWA==\n"))
    conn = ForwardConnection(max_message_bytes=LIMIT)
    assert conn.ack(entries.chunk) == b"\x81\xa3ack\xb9ZhGNcmjIJvYmNsgKaQnMWA==\n"


FWD_CAPTURES = ["fwd-packed-ack", "fwd-gzip-ack"]


@pytest.mark.parametrize("name", FWD_CAPTURES)
@pytest.mark.parametrize("step", [None, 1, 64])
def test_fluentd_out_forward_captures(name: str, step: int | None) -> None:
    (entries,) = events((CAPTURES / f"{name}.client.bin").read_bytes(), step)
    assert entries.tag == "nginx.access"
    assert [r["seq"] for _, r in entries.entries] == list(range(12))
    conn = ForwardConnection(max_message_bytes=LIMIT)
    assert conn.ack(entries.chunk) == (CAPTURES / f"{name}.server.bin").read_bytes()


def server_messages(name: str) -> list[Any]:
    unpacker = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape")
    unpacker.feed((CAPTURES / f"{name}.server.bin").read_bytes())
    return list(unpacker)


HANDSHAKE_CAPTURES = ["fwd-sharedkey-ack", "fwd-sharedkey-authsalt-ack", "fwd-sharedkey-heartbeat",
                      "infwd-sec-ok"]


@pytest.mark.parametrize("name", HANDSHAKE_CAPTURES)
def test_shared_key_captures_give_fluentds_own_pong(name: str) -> None:
    helo, pong, *acks = server_messages(name)
    got = events((CAPTURES / f"{name}.client.bin").read_bytes(), shared_key=KEY.encode(),
                 self_hostname="logserver", nonce=helo[1]["nonce"],
                 auth_salt=helo[1]["auth"] or None)
    assert isinstance(got[0], Pong) and got[0].ok and got[0].client_hostname == "engine-01"
    assert got[0].data == msgpack.packb(pong, use_bin_type=True)
    entries = [e for e in got[1:] if isinstance(e, Entries)]
    conn = ForwardConnection(max_message_bytes=LIMIT)
    assert [conn.ack(e.chunk) for e in entries] == [msgpack.packb(a) for a in acks]


def test_wrong_key_capture_gets_pong_false() -> None:
    helo, pong = server_messages("infwd-sec-badkey")
    (got,) = events((CAPTURES / "infwd-sec-badkey.client.bin").read_bytes(),
                    shared_key=KEY.encode(), nonce=helo[1]["nonce"], auth_salt=helo[1]["auth"])
    assert (got.ok, got.reason) == (False, "shared_key mismatch")
    assert got.data == msgpack.packb(pong) == (CAPTURES / "infwd-sec-badkey.pong.bin").read_bytes()


def test_data_before_ping_is_refused_like_in_forward() -> None:
    (got,) = events((CAPTURES / "infwd-sec-nohandshake.client.bin").read_bytes(),
                    shared_key=KEY.encode())
    assert (got.ok, got.reason) == (False, "invalid ping message")


def test_plain_capture_and_its_ack() -> None:
    (entries,) = events((CAPTURES / "infwd-plain-ok.client.bin").read_bytes())
    conn = ForwardConnection(max_message_bytes=LIMIT)
    assert conn.ack(entries.chunk) == (CAPTURES / "infwd-plain-ok.server.bin").read_bytes()


@pytest.mark.parametrize(("name", "reason"), [
    ("infwd-plain-garbage-c1", "malformed_msgpack"),
    ("infwd-plain-garbage-json", "wrong_shape"),
    ("infwd-plain-garbage-http", "wrong_shape"),
    ("infwd-plain-garbage-tls-hello", "wrong_shape"),
    ("infwd-plain-garbage-wrongshape", "wrong_shape"),
])
def test_garbage_captures_are_protocol_errors(name: str, reason: str) -> None:
    with pytest.raises(ForwardProtocolError) as caught:
        events((CAPTURES / f"{name}.client.bin").read_bytes())
    assert caught.value.reason == reason


def helo_of(conn: ForwardConnection) -> list[Any]:
    return list(msgpack.unpackb(conn.helo(), raw=False))


@pytest.mark.parametrize(("kwargs", "ok", "reason"), [
    ({}, True, ""),
    ({"key": "wrong"}, False, "shared_key mismatch"),
    ({"hostname": "logserver"}, False,
     "same hostname between input and output: invalid configuration"),
])
def test_handshake(kwargs: dict[str, str], ok: bool, reason: str) -> None:
    conn = ForwardConnection(max_message_bytes=LIMIT, shared_key=KEY.encode())
    conn.receive_data(ping(helo_of(conn), **kwargs))
    pong = conn.next_event()
    assert isinstance(pong, Pong) and (pong.ok, pong.reason) == (ok, reason)
    assert conn.established is ok


@pytest.mark.parametrize(("username", "password", "ok"), [
    ("engine", "pw", True), ("engine", "nope", False), ("nobody", "pw", False), ("", "", False)])
def test_user_auth(username: str, password: str, ok: bool) -> None:
    conn = ForwardConnection(max_message_bytes=LIMIT, shared_key=KEY.encode(),
                             users={"engine": b"pw"})
    conn.receive_data(ping(helo_of(conn), username=username, password=password))
    pong = conn.next_event()
    assert isinstance(pong, Pong) and pong.ok is ok


def test_a_declared_gigabyte_string_is_refused_at_once() -> None:
    with pytest.raises(ForwardProtocolError) as caught:
        events(b"\x93\xa1t\xdb\x40\x00\x00\x00" + b"x" * 100)
    assert caught.value.reason == "too_large"


def test_message_over_the_limit_is_refused_while_buffering() -> None:
    conn = ForwardConnection(max_message_bytes=1000)
    with pytest.raises(ForwardProtocolError, match="message_size_limit=1000"):
        conn.receive_data(packed("t", [{"pad": "x" * 2000}]))


def test_gzip_bomb_is_refused_by_inflated_size() -> None:
    bomb = gzip.compress(b"\x00" * 10_000_000)
    message = msgpack.packb(["t", bomb, {"compressed": "gzip"}], use_bin_type=True)
    with pytest.raises(ForwardProtocolError) as caught:
        events(message, limit=100_000)
    assert caught.value.reason == "too_large"


@pytest.mark.parametrize(("message", "reason"), [
    (msgpack.packb(["t", msgpack.packb([1, RECORD]), {"size": 5}], use_bin_type=True),
     "size_mismatch"),
    (msgpack.packb(["t", b"\x1f\x8b\x08garbage", {"compressed": "gzip"}]), "bad_gzip"),
    (msgpack.packb(["t", [[1, "not a map"]]]), "wrong_shape"),
    (msgpack.packb(["t", "time", RECORD]), "wrong_shape"),
    (msgpack.packb([1, 2, 3]), "wrong_shape"),
    (msgpack.packb(["only-tag"]), "wrong_shape"),
    (msgpack.packb(["t", msgpack.packb([1, RECORD])[:-1]], use_bin_type=True),
     "malformed_msgpack"),
    (msgpack.packb(["t", 1, RECORD, "option?"]), "wrong_shape"),
    (msgpack.packb(["t", 1, RECORD, {"chunk": 5}]), "wrong_shape"),
])
def test_wrong_shapes(message: bytes, reason: str) -> None:
    with pytest.raises(ForwardProtocolError) as caught:
        events(message)
    assert caught.value.reason == reason


def valid_frames() -> st.SearchStrategy[bytes]:
    return st.sampled_from([data for data, _ in MODES.values()])


@settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(
    st.binary(max_size=200),
    st.tuples(valid_frames(), st.integers(0, 400), st.binary(min_size=1, max_size=4)).map(
        lambda t: t[0][:t[1]] + t[2] + t[0][t[1] + len(t[2]):]),
    st.tuples(valid_frames(), st.integers(0, 400)).map(lambda t: t[0][:t[1]]),
), st.booleans())
def test_fuzz_only_protocol_errors_escape(data: bytes, handshake: bool) -> None:
    conn = ForwardConnection(max_message_bytes=4096, shared_key=KEY.encode() if handshake
                             else None)
    try:
        conn.receive_data(data)
        while conn.next_event() is not NEED_DATA:
            pass
    except ForwardProtocolError:
        pass


HOSTILE_STREAMS = {  # name: (start, unit repeated after it)
    # [tag, str32 declaring 1 GiB]: refused from the header
    "huge declared string": (b"\x93\xa5nginx\xdb\x40\x00\x00\x00", b"x"),
    # [tag, [65535 strings of 64 KiB each, ...]]: every part within limits, never complete
    "endless entries": (b"\x92\xa5nginx\xdc\xff\xff", b"\xda\xff\xff" + b"x" * 65535),
    # arrays nested without end
    "endless nesting": (b"", b"\x91"),
}

# Run in a fresh interpreter: feed 16 MiB of the stream 64 KiB at a time to
# ForwardConnection(limit 1 MiB) or, as the control, to an unbounded msgpack Unpacker;
# print the growth of the peak resident set (VmHWM) in KiB and what stopped it.
HOSTILE_FEEDER = """
import sys, msgpack
from mwdlogd.errors import ForwardProtocolError
from mwdlogd.proto.forward import NEED_DATA, ForwardConnection
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
head, unit = (bytes.fromhex(line) for line in sys.stdin.read().split("\\n"))
control = sys.argv[1] == "control"
pieces = [head] + [unit * max(1, 65536 // len(unit))] * 256
conn = ForwardConnection(max_message_bytes=1 << 20)
unbounded = msgpack.Unpacker(max_buffer_size=0)
before, outcome = hwm(), "fed"
try:
    for piece in pieces:
        if control:
            unbounded.feed(piece)
            continue
        conn.receive_data(piece)
        while conn.next_event() is not NEED_DATA:
            pass
except ForwardProtocolError as exc:
    outcome = exc.reason
print(hwm() - before, outcome)
"""


def feed_hostile(name: str, control: bool = False) -> tuple[int, str]:
    head, unit = HOSTILE_STREAMS[name]
    result = subprocess.run([sys.executable, "-c", HOSTILE_FEEDER,
                             "control" if control else "core"], input=f"{head.hex()}\n{unit.hex()}",
                            capture_output=True, text=True, timeout=60, check=True)
    growth, outcome = result.stdout.split()
    return int(growth), outcome


@pytest.mark.parametrize("name", sorted(HOSTILE_STREAMS))
def test_hostile_streams_are_refused_with_bounded_memory(name: str) -> None:
    """16 MiB of a never-ending message against a 1 MiB limit: refused, and the process's
    peak memory grows by less than 3 MiB, where an unbounded unpacker grows by >= 16 MiB."""
    growth, outcome = feed_hostile(name)
    assert outcome in ("too_large", "malformed_msgpack", "too_deep") and growth < 3 * 1024, (
        growth, outcome)
    control_growth, _ = feed_hostile(name, control=True)
    assert control_growth >= 16 * 1024


BIN_RECORD = {b"customer_name": b"acme", b"fqdn": b"www.acme.test", b"n": 1,
              b"nested": {b"k": [b"v"]}}
TEXT_RECORD = {"customer_name": "acme", "fqdn": "www.acme.test", "n": 1, "nested": {"k": ["v"]}}


def bin_modes(record: dict[Any, Any]) -> dict[str, bytes]:
    """The same record in all four modes, every string packed as msgpack bin (Fluentd's
    Yajl and regexp parsers)."""
    entry = msgpack.packb([1732500000, record], use_bin_type=True)
    return {
        "message": msgpack.packb(["t", 1732500000, record], use_bin_type=True),
        "forward": msgpack.packb(["t", [[1732500000, record]]], use_bin_type=True),
        "packed": msgpack.packb(["t", entry], use_bin_type=True),
        "compressed": msgpack.packb(["t", gzip.compress(entry), {"compressed": "gzip"}],
                                    use_bin_type=True),
    }


@pytest.mark.parametrize("mode", ["message", "forward", "packed", "compressed"])
def test_bin_strings_are_text_in_every_mode(mode: str) -> None:
    (got,) = events(bin_modes(BIN_RECORD)[mode])
    assert got.entries == [(1732500000.0, TEXT_RECORD)] and got.invalid_utf8 == 0


@pytest.mark.parametrize("mode", ["message", "forward", "packed", "compressed"])
def test_invalid_utf8_is_kept_with_its_bytes_in_every_mode(mode: str) -> None:
    (got,) = events(bin_modes({**BIN_RECORD, b"uri": b"/\xc0\xaf"})[mode])
    assert got.entries == [(1732500000.0, {**TEXT_RECORD, "uri": "/\ufffd\ufffd",
                                           "utf8_invalid": {"/uri": "L8Cv"}})]
    assert got.invalid_utf8 == 1


@pytest.mark.parametrize("bin_value", [False, True])
def test_packed_event_times_whose_bytes_look_like_bin_headers(bin_value: bool) -> None:
    """EventTime nanoseconds may hold the bytes of a bin header (0xc4-0xc6): text only and
    text with one bin value both come out as text."""
    at = msgpack.ExtType(0, bytes.fromhex("6746e9a0") + bytes.fromhex("00c4c5c6"))
    record: dict[Any, Any] = {"customer_name": "acme", "fqdn": "www.acme.test", "n": 1}
    if bin_value:
        record["uri"] = b"/x"
    entries = b"".join(msgpack.packb([at, record], use_bin_type=True) for _ in range(3))
    (got,) = events(msgpack.packb(["t", entries], use_bin_type=True))
    expected = {"customer_name": "acme", "fqdn": "www.acme.test", "n": 1}
    if bin_value:
        expected["uri"] = "/x"
    assert [record for _, record in got.entries] == [expected] * 3

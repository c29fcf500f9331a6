"""DESIGN §2 as one pure function: classify a record, add fields, pick its hourly file.

Never raises for any record content: what cannot be classified goes to the `_unmatched`
stream, what lacks customer_name/fqdn or has an unusable time goes to `_invalid`, with
an `invalid_reason` field saying why. Nothing is dropped.
"""

import time
from collections.abc import Iterable
from functools import lru_cache
from typing import Any, NamedTuple

import attrs

from mwdlogd import codec
from mwdlogd.model import LOG_TYPES, Destination
from mwdlogd.pipeline.paths import CACHED_CHARS, customer_destination, stream_destination
from mwdlogd.proto.times import MAX_EVENT_TIME, event_time_of

# A tag's first word names the log type too, `waf` being openappsec's.
TAG_LOG_TYPES = {**{name: name for name in LOG_TYPES}, "waf": "openappsec"}


class Routed(NamedTuple):
    """One normalised record: its hourly file and its JSON line.
    (A tuple: one is made per record, and tuples are the cheapest to make.)"""

    destination: Destination
    line: bytes


@attrs.frozen
class Context:
    """What every record of one batch shares."""

    tag: str
    received_at: float
    default_time: float
    hostname: str


@lru_cache(maxsize=8192)
def _second_prefix(second: int) -> bytes:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)).encode()


_MILLIS = [f".{n:03d}Z".encode() for n in range(1000)]


def timestamp_bytes(epoch: float) -> bytes:
    """UTC `%Y-%m-%dT%H:%M:%S.mmmZ`, truncated to the millisecond (ASCII)."""
    second = int(epoch)  # times here are never negative: int() is floor
    return _second_prefix(second) + _MILLIS[min(int((epoch - second) * 1000), 999)]


def format_timestamp(epoch: float) -> str:
    return timestamp_bytes(epoch).decode()


Extra = tuple[str, str] | None  # ("invalid_reason", why) or ("severity", "info")
# Fields every record gets, in this order, then the Extra one if any.
ADDED_KEYS = frozenset({"received_at", "logserver_hostname", "timestamp", "tag"})


class _Annotator:
    """The added fields of one batch: all but `timestamp` (and the Extra) are the same for
    every record, so their JSON is made once."""

    def __init__(self, ctx: Context) -> None:
        self._received_at = format_timestamp(ctx.received_at)
        self._ctx = ctx
        # Our timestamps are ASCII digits and punctuation: nothing in them needs escaping.
        self._head = (b'"received_at":"' + self._received_at.encode() + b'",'
                      + _json_member("logserver_hostname", ctx.hostname) + b',"timestamp":"')
        self._tail = b'",' + _json_member("tag", ctx.tag)

    def line(self, record: dict[str, Any], timestamp: bytes, extra: Extra,
             text: bytes | None) -> bytes:
        """The record's JSON line with the added fields appended to its own JSON object:
        `text` when it came as JSON (so it is not encoded again), else its encoding."""
        if ADDED_KEYS.isdisjoint(record) and (extra is None or extra[0] not in record):
            body = (text if text is not None else codec.dumps_line(record)).rstrip()
            if body.endswith(b"}"):
                fields = self._head + timestamp + self._tail
                if extra is not None:
                    fields += b"," + _json_member(*extra)
                return body[:-1] + (b"," if record else b"") + fields + b"}\n"
        whole = codec.loads(text) if text is not None else record  # exact big integers
        added = {"received_at": self._received_at, "logserver_hostname": self._ctx.hostname,
                 "timestamp": timestamp.decode(), "tag": self._ctx.tag}
        if extra is not None:
            added[extra[0]] = extra[1]
        return codec.dumps_line({**whole, **added})


def normalize(record: dict[str, Any], event_time: float | None, ctx: Context,
              annotator: _Annotator, text: bytes | None = None) -> Routed:
    """Route and annotate one record. `event_time` None means: from `time`, else default."""
    reason = None
    if event_time is None:
        event_time = ctx.default_time
        if "time" in record:
            event_time = event_time_of(record["time"])
    elif not 0 <= event_time < MAX_EVENT_TIME:
        event_time = None
    if event_time is None:
        reason, event_time = "time is not epoch seconds in range", ctx.received_at
    hour = int(event_time // 3600) * 3600
    destination, extra = _destination(record, ctx.tag, hour, reason)
    return Routed(destination,
                  annotator.line(record, timestamp_bytes(event_time), extra, text))


def _destination(record: dict[str, Any], tag: str, hour: int, reason: str | None
                 ) -> tuple[Destination, Extra]:
    """The record's file, and the `invalid_reason` or default `severity` it gets."""
    log_type = _log_type(record, tag)
    if reason is None and log_type is None:
        return stream_destination("unmatched", hour), None
    customer, fqdn = record.get("customer_name"), record.get("fqdn")
    if reason is None:
        reason = _missing(customer, "customer_name") or _missing(fqdn, "fqdn")
    if reason is not None:
        return stream_destination("invalid", hour), ("invalid_reason", reason)
    assert log_type is not None and isinstance(customer, str) and isinstance(fqdn, str)
    destination = customer_destination(customer, log_type, fqdn, hour)
    if log_type == "openappsec" and "severity" not in record:
        return destination, ("severity", "info")
    return destination, None


def _json_member(key: str, value: str) -> bytes:
    """`"key":"value"` as JSON; the added values (hostname, tag, reasons) repeat, so their
    encoding is cached, unless a peer sent a long one (a tag of any length)."""
    if len(value) > CACHED_CHARS:
        return _encode_member(key, value)
    return _cached_member(key, value)


def _encode_member(key: str, value: str) -> bytes:
    return codec.dumps_line({key: value})[1:-2]


_cached_member = lru_cache(maxsize=4096)(_encode_member)


def _log_type(record: dict[str, Any], tag: str) -> str | None:
    declared = record.get("log_type")
    if isinstance(declared, str) and declared in LOG_TYPES:
        return declared
    return TAG_LOG_TYPES.get(tag.split(".", 1)[0])


def _missing(value: object, name: str) -> str | None:
    if not isinstance(value, str):
        return f"{name} is missing" if value is None else f"{name} is not a string"
    return None if value else f"{name} is empty"


def normalize_batch(records: Iterable[tuple[dict[str, Any], float | None, bytes | None]],
                    ctx: Context) -> list[Routed]:
    """Normalise a whole batch of (record, event time, JSON text); shared per-batch values
    are computed once."""
    annotator = _Annotator(ctx)
    return [normalize(record, event_time, ctx, annotator, text)
            for record, event_time, text in records]

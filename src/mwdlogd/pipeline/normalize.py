"""DESIGN §2 as one pure function: classify a record, add fields, pick its hourly file.

Never raises for any record content: what cannot be classified goes to the `_unmatched`
stream, what lacks customer_name/fqdn or has an unusable time goes to `_invalid`, with
an `invalid_reason` field saying why. Nothing is dropped.
"""

import math
import time
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import attrs

from mwdlogd import codec
from mwdlogd.pipeline.paths import INVALID_DIR, UNMATCHED_DIR, customer_file, stream_file

LOG_TYPES = {"nginx": "nginx", "openappsec": "openappsec"}
TAG_LOG_TYPES = {**LOG_TYPES, "waf": "openappsec"}
# Year 10000 starts here; later times cannot be written as %Y and are refused.
MAX_EVENT_TIME = 253402300800.0


@attrs.frozen
class Routed:
    """One normalised record: its file relative to the storage root and its JSON line."""

    path: str
    hour: int  # epoch second the record's UTC hour starts at
    line: bytes


@attrs.frozen
class Context:
    """What every record of one batch shares."""

    tag: str
    received_at: float
    default_time: float
    hostname: str


@lru_cache(maxsize=8192)
def _second_prefix(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def format_timestamp(epoch: float) -> str:
    """UTC `%Y-%m-%dT%H:%M:%S.mmmZ`, truncated to the millisecond."""
    second = math.floor(epoch)
    millis = min(int((epoch - second) * 1000), 999)
    return f"{_second_prefix(second)}.{millis:03d}Z"


def event_time_of(value: object) -> float | None:
    """A record's `time` as epoch seconds, or None when it is not a usable time."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, int | float) and 0 <= value < MAX_EVENT_TIME:
        return float(value)
    return None


def normalize(record: dict[str, Any], event_time: float | None, ctx: Context,
              received_at: str, text: bytes | None = None) -> Routed:
    """Route and annotate one record. `event_time` None means: from `time`, else default.
    `text`, the record's own JSON object, lets the added fields be appended to it instead
    of encoding the whole record again (the output is the same JSON object)."""
    added = {"received_at": received_at, "logserver_hostname": ctx.hostname}
    reason = None
    if event_time is None:
        event_time = ctx.default_time
        if "time" in record:
            event_time = event_time_of(record["time"])
    elif not 0 <= event_time < MAX_EVENT_TIME:
        event_time = None
    if event_time is None:
        reason, event_time = "time is not epoch seconds in range", ctx.received_at
    added["timestamp"] = format_timestamp(event_time)
    added["tag"] = ctx.tag
    hour = int(event_time // 3600) * 3600
    path = _destination(record, ctx.tag, hour, reason, added)
    return Routed(path, hour, _line(record, added, text))


def _destination(record: dict[str, Any], tag: str, hour: int, reason: str | None,
                 added: dict[str, str]) -> str:
    """The record's file; fills in `invalid_reason` or a default `severity` in `added`."""
    log_type = _log_type(record, tag)
    if reason is None and log_type is None:
        return stream_file(UNMATCHED_DIR, hour)
    customer, fqdn = record.get("customer_name"), record.get("fqdn")
    if reason is None:
        reason = _missing(customer, "customer_name") or _missing(fqdn, "fqdn")
    if reason is not None:
        added["invalid_reason"] = reason
        return stream_file(INVALID_DIR, hour)
    if log_type == "openappsec" and "severity" not in record:
        added["severity"] = "info"
    assert log_type is not None and isinstance(customer, str) and isinstance(fqdn, str)
    return customer_file(customer, log_type, fqdn, hour)


def _line(record: dict[str, Any], added: dict[str, str], text: bytes | None) -> bytes:
    if text is not None and not any(key in record for key in added):
        body = text.rstrip()
        if body.endswith(b"}"):
            fields = b",".join([_member(key, value) for key, value in added.items()])
            return body[:-1] + (b"," if record else b"") + fields + b"}\n"
    return codec.dumps_line({**record, **added})


# Our own timestamps are ASCII digits and punctuation: nothing in them needs escaping.
_PLAIN_ASCII = frozenset({"received_at", "timestamp"})


def _member(key: str, value: str) -> bytes:
    """`"key":"value"` as JSON; most added values repeat, so their encoding is cached."""
    if key in _PLAIN_ASCII:
        return b'"' + key.encode() + b'":"' + value.encode() + b'"'
    return _json_member(key, value)


@lru_cache(maxsize=4096)
def _json_member(key: str, value: str) -> bytes:
    return codec.dumps_line({key: value})[1:-2]


def _log_type(record: dict[str, Any], tag: str) -> str | None:
    declared = record.get("log_type")
    if isinstance(declared, str) and declared in LOG_TYPES:
        return LOG_TYPES[declared]
    return TAG_LOG_TYPES.get(tag.split(".", 1)[0])


def _missing(value: object, name: str) -> str | None:
    if not isinstance(value, str):
        return f"{name} is missing" if value is None else f"{name} is not a string"
    return None if value else f"{name} is empty"


def normalize_batch(records: Iterable[tuple[dict[str, Any], float | None, bytes | None]],
                    ctx: Context) -> list[Routed]:
    """Normalise a whole batch of (record, event time, JSON text); shared per-batch values
    are computed once."""
    received_at = format_timestamp(ctx.received_at)
    return [normalize(record, event_time, ctx, received_at, text)
            for record, event_time, text in records]

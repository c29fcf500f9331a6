"""DESIGN §2 normalisation, one rule per case, plus path-safety properties."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mwdlogd.pipeline.normalize import Context, format_timestamp, normalize_batch
from mwdlogd.pipeline.paths import safe_customer, safe_fqdn
from mwdlogd.storage.files import destination

RECEIVED = 1764072000.25  # 2025-11-25T12:00:00.250Z
CTX = Context(tag="nginx.access", received_at=RECEIVED, default_time=RECEIVED, hostname="ls1")
BASE = {"customer_name": "acme", "fqdn": "www.acme.test"}
HOUR = "2025/11/25/12.log.gz"


def run(record: dict[str, Any], ctx: Context = CTX) -> tuple[str, dict[str, Any]]:
    """Normalise from the dict, and from the record's JSON text: both must agree."""
    (routed,) = normalize_batch([(record, None, None)], ctx)
    (from_text,) = normalize_batch([(record, None, json.dumps(record).encode())], ctx)
    assert (from_text.destination, json.loads(from_text.line)) == \
        (routed.destination, json.loads(routed.line))
    return routed.destination.path, json.loads(routed.line)


@pytest.mark.parametrize(("record", "tag", "path"), [
    ({**BASE, "log_type": "nginx"}, "anything", f"acme/nginx/www.acme.test/{HOUR}"),
    ({**BASE, "log_type": "openappsec"}, "nginx.x", f"acme/openappsec/www.acme.test/{HOUR}"),
    (BASE, "nginx.access", f"acme/nginx/www.acme.test/{HOUR}"),
    (BASE, "openappsec", f"acme/openappsec/www.acme.test/{HOUR}"),
    (BASE, "waf.events", f"acme/openappsec/www.acme.test/{HOUR}"),
    ({**BASE, "log_type": "waf"}, "other", f"_unmatched/{HOUR}"),
    ({**BASE, "log_type": "apache"}, "nginx", f"acme/nginx/www.acme.test/{HOUR}"),
    (BASE, "apache.access", f"_unmatched/{HOUR}"),
    ({"fqdn": "x"}, "nginx", f"_invalid/{HOUR}"),
    ({"customer_name": "", "fqdn": "x"}, "nginx", f"_invalid/{HOUR}"),
    ({"customer_name": "a", "fqdn": None}, "nginx", f"_invalid/{HOUR}"),
    ({"customer_name": 7, "fqdn": "x"}, "nginx", f"_invalid/{HOUR}"),
    ({"customer_name": "Müller GmbH", "fqdn": "städte.de"}, "nginx",
     f"M_ller_GmbH/nginx/st_dte.de/{HOUR}"),
    ({"customer_name": "../..", "fqdn": "../../etc"}, "nginx",
     f"_____/nginx/_._.._etc/{HOUR}"),
    ({"customer_name": "_invalid", "fqdn": "."}, "nginx", f"__invalid/nginx/_/{HOUR}"),
])
def test_routing(record: dict[str, Any], tag: str, path: str) -> None:
    ctx = Context(tag=tag, received_at=RECEIVED, default_time=RECEIVED, hostname="ls1")
    got_path, out = run(record, ctx)
    assert got_path == path
    assert {k: out[k] for k in record} == record  # original values kept


def test_added_fields() -> None:
    _, out = run({**BASE, "log_type": "openappsec", "time": 1732500000.123456})
    assert out["received_at"] == "2025-11-25T12:00:00.250Z"
    assert out["timestamp"] == "2024-11-25T02:00:00.123Z"
    assert out["logserver_hostname"] == "ls1"
    assert out["tag"] == "nginx.access"
    assert out["severity"] == "info"
    _, kept = run({**BASE, "log_type": "openappsec", "severity": "critical"})
    assert kept["severity"] == "critical"
    _, nginx = run({**BASE, "log_type": "nginx"})
    assert "severity" not in nginx


@pytest.mark.parametrize(("time", "hour"), [
    (1732500000, "2024/11/25/02.log.gz"),
    ("1732503599.999", "2024/11/25/02.log.gz"),
    (1732503600, "2024/11/25/03.log.gz"),
])
def test_event_time_picks_the_hour(time: object, hour: str) -> None:
    path, _ = run({**BASE, "time": time})
    assert path == f"acme/nginx/www.acme.test/{hour}"


@pytest.mark.parametrize("time", ["soon", True, -1, 1e20, None, [1]])
def test_unusable_time_goes_to_invalid_with_reason(time: object) -> None:
    path, out = run({**BASE, "time": time})
    assert path == f"_invalid/{HOUR}"
    assert out["invalid_reason"] == "time is not epoch seconds in range"


def test_default_time_comes_from_context() -> None:
    ctx = Context(tag="nginx", received_at=RECEIVED, default_time=1732500000.0, hostname="h")
    path, out = run(dict(BASE), ctx)
    assert path == "acme/nginx/www.acme.test/2024/11/25/02.log.gz"
    assert out["timestamp"] == "2024-11-25T02:00:00.000Z"


def test_invalid_reason_names_the_field() -> None:
    assert run({"fqdn": "x"})[1]["invalid_reason"] == "customer_name is missing"
    assert run({"customer_name": "a", "fqdn": ""})[1]["invalid_reason"] == "fqdn is empty"


def test_non_ascii_is_kept_verbatim() -> None:
    _, out = run({**BASE, "msg": "ログ 日本語 ✓ 🚫"})
    assert out["msg"] == "ログ 日本語 ✓ 🚫"


def test_format_timestamp_truncates_to_milliseconds() -> None:
    assert format_timestamp(0.9999) == "1970-01-01T00:00:00.999Z"
    assert format_timestamp(1732500000) == "2024-11-25T02:00:00.000Z"


def test_long_names_stay_distinct_and_bounded() -> None:
    a, b = "x" * 300 + "a", "x" * 300 + "b"
    assert safe_fqdn(a) != safe_fqdn(b)
    assert len(safe_fqdn(a)) == len(safe_customer(a)) == 200


@given(customer=st.text(), fqdn=st.text())
def test_no_name_leaves_the_root(customer: str, fqdn: str) -> None:
    path, _ = run({"customer_name": customer, "fqdn": fqdn, "log_type": "nginx"})
    root = "/srv/logs"
    full = destination(root, path)
    assert os.path.commonpath([root, full]) == root
    assert len(path.split("/")) in (5, 7)  # stream or customer tree
    for part in path.split("/"):
        assert part not in ("", ".", "..") and not part.startswith(".")
        assert len(part.encode()) <= 200


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(), lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)


@given(record=st.dictionaries(st.sampled_from(
    ["customer_name", "fqdn", "log_type", "time", "tag", "severity", "msg", "x", "received_at"])
    | st.text(max_size=8), JSON_VALUES, max_size=8),
    spacing=st.sampled_from([(",", ":"), (", ", ": "), (" ,", " : ")]))
def test_appending_to_the_text_gives_the_same_record(record: dict[str, Any],
                                                     spacing: tuple[str, str]) -> None:
    text = json.dumps(record, separators=spacing, ensure_ascii=bool(len(record) % 2)).encode()
    (plain,) = normalize_batch([(record, None, None)], CTX)
    (spliced,) = normalize_batch([(record, None, text + b" \r")], CTX)
    assert spliced.destination == plain.destination
    stored = json.loads(spliced.line)
    assert stored == json.loads(plain.line)
    assert spliced.line.endswith(b"}\n") and spliced.line.count(b"\n") == 1
    # Independently of how it was made: the record's own fields, plus only added ones.
    added = {"received_at", "logserver_hostname", "timestamp", "tag"}
    assert {k: v for k, v in stored.items() if k in record and k not in added} == {
        k: v for k, v in record.items() if k not in added}
    assert added <= set(stored) <= set(record) | added | {"severity", "invalid_reason"}
    assert (stored["logserver_hostname"], stored["tag"]) == ("ls1", CTX.tag)

"""The spine's values: a Destination's path is derived once and parses back only to itself;
a Peer prints as the logs always showed it."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mwdlogd.errors import StorageError
from mwdlogd.model import Destination, Group, Peer
from mwdlogd.pipeline.paths import customer_destination, stream_destination
from mwdlogd.runtime.batch import Submission
from mwdlogd.runtime.tail import TailFilter
from mwdlogd.storage.spool import pack_groups, unpack_groups

HOUR = 1732500000  # 2024-11-25T02:00Z


def test_paths_of_customer_files_and_streams() -> None:
    assert customer_destination("ac me", "nginx", "www.acme.test", HOUR).path == \
        "ac_me/nginx/www.acme.test/2024/11/25/02.log.gz"
    assert stream_destination("invalid", HOUR).path == "_invalid/2024/11/25/02.log.gz"
    assert stream_destination("unmatched", HOUR + 3600).path == \
        "_unmatched/2024/11/25/03.log.gz"


@given(st.text(), st.sampled_from(["nginx", "openappsec"]), st.text(),
       st.integers(0, 10**10).map(lambda t: t // 3600 * 3600))
def test_every_destination_parses_back_from_its_path(customer: str, log_type: str,
                                                     fqdn: str, hour: int) -> None:
    made = customer_destination(customer, log_type, fqdn, hour)
    assert Destination.from_path(made.path, hour) == made
    stream = stream_destination("invalid", hour)
    assert Destination.from_path(stream.path, hour) == stream


@pytest.mark.parametrize("path", [
    "../nginx/www/2024/11/25/02.log.gz",
    "acme/nginx/../2024/11/25/02.log.gz",
    "acme/nginx/.hidden/2024/11/25/02.log.gz",
    "acme/apache/www/2024/11/25/02.log.gz",
    "acme/nginx/www/2024/11/25/03.log.gz",  # another hour than the record's
    "acme/nginx/www/2024/11/25/02.log",
    "_invalid/nginx/www/2024/11/25/02.log.gz",
    "_other/2024/11/25/02.log.gz",
    "acme/nginx/www/x/2024/11/25/02.log.gz",
    "",
])
def test_a_path_that_is_not_a_destination_is_refused(path: str) -> None:
    with pytest.raises(StorageError, match="read destination"):
        Destination.from_path(path, HOUR)


def test_destinations_are_equal_by_their_fields_and_shared_from_the_cache() -> None:
    made = customer_destination("acme", "nginx", "www.acme.test", HOUR)
    assert made is customer_destination("acme", "nginx", "www.acme.test", HOUR)
    assert made == Destination("acme", "nginx", "www.acme.test", HOUR)
    assert made != Destination("acme", "nginx", "www.acme.test", HOUR + 3600)
    assert len({made, Destination("acme", "nginx", "www.acme.test", HOUR)}) == 1


def test_journal_and_spool_records_keep_paths_as_text() -> None:
    """The on-disk layout of earlier versions, `[path, hour, count, data]` per group, byte
    for byte; reading it back gives the same Destinations."""
    groups = [Group(customer_destination("acme", "nginx", "www.acme.test", HOUR),
                    b'{"a":1}\n{"a":2}\n', 2),
              Group(stream_destination("invalid", HOUR), b'{"b":1}\n', 1)]
    fields = [["acme/nginx/www.acme.test/2024/11/25/02.log.gz", HOUR, 2,
               b'{"a":1}\n{"a":2}\n'], ["_invalid/2024/11/25/02.log.gz", HOUR, 1, b'{"b":1}\n']]
    payload = Submission("nginx.access", groups, dedupe_key=b"k").payload()
    assert payload == msgpack.packb(["nginx.access", fields, b"k"])
    assert Submission.from_payload(7, payload).groups == groups
    assert pack_groups(groups) == msgpack.packb(fields)
    assert unpack_groups(pack_groups(groups)) == groups


@pytest.mark.parametrize(("peer", "text", "identity"), [
    (Peer("10.0.0.5", 50122), "10.0.0.5:50122", "10.0.0.5"),
    (Peer("10.0.0.5", 50122, "engine-1", "commonName=engine-1,organizationName=acme"),
     "10.0.0.5:50122/engine-1", "engine-1"),
    (Peer("::1", 24224, "a/b"), "::1:24224/a/b", "a/b"),
    (Peer("unknown"), "unknown", "unknown"),
])
def test_a_peer_prints_as_the_logs_show_it(peer: Peer, text: str, identity: str) -> None:
    assert (str(peer), peer.identity) == (text, identity)


@pytest.mark.parametrize(("query", "matched"), [
    ((None, None, None), {"acme-nginx", "other-waf", "invalid", "unmatched"}),
    (("acme", None, None), {"acme-nginx"}),
    ((None, "openappsec", None), {"other-waf"}),
    ((None, "invalid", None), {"invalid"}),
    ((None, None, "www.acme.test"), {"acme-nginx"}),
    (("ac me", None, None), set()),  # made safe once, at parse: `ac_me`
])
def test_tail_filters_compare_destination_fields(
        query: tuple[str | None, str | None, str | None], matched: set[str]) -> None:
    files = {"acme-nginx": customer_destination("acme", "nginx", "www.acme.test", HOUR),
             "other-waf": customer_destination("other", "openappsec", "o.test", HOUR),
             "invalid": stream_destination("invalid", HOUR),
             "unmatched": stream_destination("unmatched", HOUR)}
    tail_filter = TailFilter.from_query(*query, sample=1.0)
    assert {name for name, d in files.items() if tail_filter.matches(d)} == matched
    restricted = TailFilter.from_query(*query, sample=1.0, allowed=frozenset({"acme"}))
    assert {name for name, d in files.items() if restricted.matches(d)} == \
        matched & {"acme-nginx"}

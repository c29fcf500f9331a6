"""The journal on real files: torn tails, release, ids that never go back."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from mwdlogd.storage import framing
from mwdlogd.storage.journal import MAGIC, Journal


def test_append_then_reopen_returns_every_batch(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    assert journal.open() == []
    assert journal.append([b"a", b"bb"]) == [0, 1]
    assert journal.append([b"c"]) == [2]
    journal.close()
    again = Journal(tmp_path)
    assert again.open() == [(0, b"a"), (1, b"bb"), (2, b"c")]
    assert again.append([b"d"]) == [3]


@settings(max_examples=60, deadline=None)
@given(payloads=st.lists(st.binary(max_size=40), min_size=1, max_size=12), cut=st.integers(0, 800))
def test_a_torn_tail_loses_only_the_torn_batch(tmp_path_factory: object, payloads: list[bytes],
                                               cut: int) -> None:
    directory = tmp_path_factory.mktemp("j")  # type: ignore[attr-defined]
    journal = Journal(directory)
    journal.open()
    journal.append(payloads)
    journal.close()
    (segment,) = directory.glob("*.wal")
    size = segment.stat().st_size
    os.truncate(segment, max(0, size - cut))
    ends = [0]
    for payload in payloads:
        ends.append(ends[-1] + framing.HEADER.size + len(payload))
    whole = sum(1 for end in ends[1:] if end <= size - cut)
    recovered = Journal(directory)
    assert recovered.open() == list(enumerate(payloads))[:whole]
    assert recovered.append([b"next"]) == [whole]  # appends continue after the cut
    recovered.close()
    assert Journal(directory).open()[-1] == (whole, b"next")


def test_corrupt_byte_stops_the_scan_there(tmp_path: Path) -> None:
    data = framing.frame(MAGIC, 0, b"one") + framing.frame(MAGIC, 1, b"two")
    broken = bytearray(data)
    broken[-1] ^= 0xFF
    assert framing.scan(MAGIC, bytes(broken)) == ([(0, b"one")], len(data) // 2)


def test_release_deletes_written_segments_only(tmp_path: Path) -> None:
    journal = Journal(tmp_path, segment_bytes=60)  # one 61-byte batch per segment
    journal.open()
    for n in range(6):
        journal.append([bytes(40) + bytes([n])])
    before = sorted(p.name for p in tmp_path.glob("*.wal"))
    assert len(before) == 7  # six sealed segments and an empty active one
    journal.release(3)
    assert sorted(p.name for p in tmp_path.glob("*.wal")) == before[3:]
    journal.close()
    assert [i for i, _ in Journal(tmp_path).open()] == [3, 4, 5]


def test_ids_never_go_back_after_everything_is_released(tmp_path: Path) -> None:
    journal = Journal(tmp_path, segment_bytes=10)
    journal.open()
    journal.append([b"x" * 20])
    journal.release(1)
    journal.close()
    again = Journal(tmp_path)
    assert again.open() == []
    assert again.append([b"y"]) == [1]

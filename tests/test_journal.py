"""Journal and intent log on real files: torn tails, release, recovery rules."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from mwdlogd.storage import framing
from mwdlogd.storage.hourly import MemberBuilder, append_members, truncate_to
from mwdlogd.storage.intents import IntentLog
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


def test_unfinished_intent_is_cut_back_and_not_committed(tmp_path: Path) -> None:
    root = tmp_path / "logs"
    intents = IntentLog(tmp_path / "intents.log")
    intents.open()
    intents.settle()
    append_members(str(root), "a.log.gz", MemberBuilder().finish(b"1\n"), 4, intents)
    size = (root / "a.log.gz").stat().st_size
    intents.begin("a.log.gz", size, 9)  # crash: the member is half written, no `done`
    with open(root / "a.log.gz", "ab") as file:
        file.write(MemberBuilder().finish(b"2\n")[:7])
    intents.close()
    reopened = IntentLog(tmp_path / "intents.log")
    assert reopened.open() == {"a.log.gz": (size, 9)}
    assert truncate_to(str(root), "a.log.gz", size) == 7
    reopened.settle()
    assert reopened.committed("a.log.gz") == 4
    assert reopened.open() == {}


def test_lost_done_counts_as_unfinished(tmp_path: Path) -> None:
    intents = IntentLog(tmp_path / "intents.log")
    intents.open()
    intents.begin("a", 0, 1)
    intents.close()
    assert IntentLog(tmp_path / "intents.log").open() == {"a": (0, 1)}


def test_forget_below_keeps_what_the_journal_may_replay(tmp_path: Path) -> None:
    intents = IntentLog(tmp_path / "intents.log")
    intents.open()
    intents.done("old", 3)
    intents.done("new", 12)
    intents.forget_below(10)
    assert (intents.committed("old"), intents.committed("new")) == (-1, 12)

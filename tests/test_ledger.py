"""The append ledger on real files: unfinished appends cut back once, by whichever worker
comes next; torn state writes; two processes appending to one file; the sweep."""

from __future__ import annotations

import gzip
import logging
import multiprocessing
import os
from pathlib import Path

import pytest

from mwdlogd.storage.files import destination
from mwdlogd.storage.hourly import MemberBuilder, append_members
from mwdlogd.storage.ledger import SLOT, SUFFIX, Ledger

REL = "c/nginx/site/2024/11/25/02.log.gz"


def member(text: str) -> bytes:
    return MemberBuilder().finish(text.encode())


def crash_mid_append(ledger: Ledger, root: Path, text: str) -> int:
    """Begin an append, write half a member, then 'die' (no done). Returns size before."""
    with ledger.hold(str(root), REL) as held:
        assert held is not None
        size = (root / REL).stat().st_size if (root / REL).exists() else 0
        held.begin(size)
        (root / REL).parent.mkdir(parents=True, exist_ok=True)
        with open(root / REL, "ab") as file:
            file.write(member(text)[:9])
    return size


def committed(ledger: Ledger, root: Path) -> int:
    with ledger.hold(str(root), REL, create=False) as held:
        return -2 if held is None else held.committed


def test_unfinished_append_is_cut_back_and_not_committed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root, ledger = tmp_path / "logs", Ledger(tmp_path / "ledger")
    append_members(str(root), REL, member("1\n"), 4, ledger)
    crash_mid_append(ledger, root, "2\n")
    with caplog.at_level(logging.WARNING, logger="mwdlogd"):
        assert committed(Ledger(tmp_path / "ledger"), root) == 4
        assert committed(Ledger(tmp_path / "ledger"), root) == 4  # cut once, logged once
    assert gzip.decompress((root / REL).read_bytes()) == b"1\n"
    assert [r.getMessage() for r in caplog.records] == [
        f"unfinished_append_cut path={REL} bytes_cut=9 detail=\"an append was interrupted; "
        f"the journal that owns it writes it again\""]


def test_a_dead_workers_torn_member_is_cut_by_the_next_writer_and_only_once(
        tmp_path: Path) -> None:
    root = tmp_path / "logs"
    dead, alive = Ledger(tmp_path / "ledger", worker=0), Ledger(tmp_path / "ledger", worker=1)
    append_members(str(root), REL, member("a1\n"), 7, dead)
    crash_mid_append(dead, root, "a2\n")
    append_members(str(root), REL, member("b1\n"), 3, alive)
    # The dead worker's recovery comes after: it must not cut worker 1's member.
    assert committed(dead, root) == 7
    assert committed(alive, root) == 3
    append_members(str(root), REL, member("a2\n"), 8, dead)
    assert gzip.decompress((root / REL).read_bytes()) == b"a1\nb1\na2\n"


def test_a_state_write_torn_by_a_power_cut_leaves_the_one_before(tmp_path: Path) -> None:
    root, ledger = tmp_path / "logs", Ledger(tmp_path / "ledger")
    append_members(str(root), REL, member("1\n"), 4, ledger)
    append_members(str(root), REL, member("2\n"), 9, ledger)
    state = Path(destination(str(tmp_path / "ledger"), REL + SUFFIX))
    data = bytearray(state.read_bytes())
    newest = max((0, SLOT), key=lambda at: int.from_bytes(data[at + 12:at + 20], "big"))
    data[newest + 21] ^= 0xFF  # a byte of its payload (the 20-byte frame header before it)
    state.write_bytes(bytes(data))
    # The newest record (pending cleared, id 9) is unreadable: the one before it says the
    # second append was pending, so its member is cut back and id 4 is what the file holds.
    assert committed(ledger, root) == 4
    assert gzip.decompress((root / REL).read_bytes()) == b"1\n"


def _append_many(ledger_dir: str, root: str, worker: int, count: int) -> None:
    ledger = Ledger(Path(ledger_dir), worker=worker)
    for n in range(count):
        append_members(root, REL, member(f"w{worker}-{n}\n"), n, ledger)


def test_two_processes_appending_to_one_file_never_interleave(tmp_path: Path) -> None:
    root, ledger_dir = tmp_path / "logs", tmp_path / "ledger"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(str(ledger_dir), str(root), w, 300))
               for w in (0, 1)]
    for process in workers:
        process.start()
    for process in workers:
        process.join()
        assert process.exitcode == 0
    lines = gzip.decompress((root / REL).read_bytes()).decode().split()
    assert sorted(lines) == sorted(f"w{w}-{n}" for w in (0, 1) for n in range(300))
    for worker in (0, 1):
        mine = [line for line in lines if line.startswith(f"w{worker}-")]
        assert mine == [f"w{worker}-{n}" for n in range(300)]
        assert committed(Ledger(ledger_dir, worker=worker), root) == 299


def test_sweep_removes_old_settled_states_only(tmp_path: Path) -> None:
    root, ledger = tmp_path / "logs", Ledger(tmp_path / "ledger")
    append_members(str(root), REL, member("1\n"), 1, ledger)
    other = REL.replace("site", "other")
    with ledger.hold(str(root), other) as held:
        assert held is not None
        held.begin(0)  # an append that never finished: kept until its owner recovers
    for rel in (REL, other):
        os.utime(destination(str(tmp_path / "ledger"), rel + SUFFIX), (0, 0))
    assert ledger.sweep(older_than_s=3600) == 1
    assert committed(ledger, root) == -2
    assert not (tmp_path / "ledger" / "c" / "nginx" / "site").exists()
    assert (tmp_path / "ledger" / (other + SUFFIX)).exists()
    assert ledger.sweep(older_than_s=10 ** 12) == 0  # nothing old enough

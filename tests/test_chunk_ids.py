"""Resend key logs on real files: the window, segments that are only appended to and
deleted whole, another worker following them, the legacy log, and the in-memory slices."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mwdlogd.errors import StorageError
from mwdlogd.runtime.dedupe import ChunkMemory, Dedupe
from mwdlogd.storage import framing
from mwdlogd.storage.chunk_ids import (
    LEGACY,
    LEGACY_MAGIC,
    SLICES,
    ChunkIdLog,
    PeerChunkIds,
    forward_key,
)

WINDOW = 800.0  # slices of 100 s


def key(n: int) -> bytes:
    return forward_key("10.0.0.1/engine-01", f"chunk-{n}")


def opened(log: ChunkIdLog, now: float) -> list[tuple[float, bytes]]:
    """What `open` hands over, in order."""
    found: list[tuple[float, bytes]] = []
    assert log.open(now, lambda keys, at: found.extend((at, k) for k in keys)) == len(found)
    return found


def segments(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_reopen_keeps_only_keys_inside_the_window(tmp_path: Path) -> None:
    log = ChunkIdLog(tmp_path / "ids", window_s=WINDOW)
    assert opened(log, 1000) == []
    log.append([key(0)], 1000)
    log.append([key(1)], 1750)
    log.close()
    assert opened(ChunkIdLog(tmp_path / "ids", window_s=WINDOW), 1850) == [(1750, key(1))]
    # the segment that held only the expired key is gone
    assert segments(tmp_path / "ids") == ["000000001750000.ids"]


def test_appends_never_rewrite_at_any_occupancy(tmp_path: Path) -> None:
    """8 MB of live keys (twice the old rewrite threshold): each append adds exactly its
    entry to the same file, and whole expired segments are deleted."""
    log = ChunkIdLog(tmp_path / "ids", window_s=WINDOW, fsync=False)
    opened(log, 0)
    keys_per_step = 6000
    for step in range(100):  # one step every 10 s: 1,000 s, 600,000 keys
        log.append([key(step * keys_per_step + n) for n in range(keys_per_step)], step * 10.0)
    files = segments(tmp_path / "ids")
    assert len(files) <= SLICES + 1
    live_bytes = sum((tmp_path / "ids" / f).stat().st_size for f in files)
    assert live_bytes > 2 * 4 * 1024 * 1024 * 0.95
    active = tmp_path / "ids" / files[-1]
    before = os.stat(active)
    log.append([key(-1)], 995.0)
    after = os.stat(active)
    assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size + 36)
    log.close()
    reopened = ChunkIdLog(tmp_path / "ids", window_s=WINDOW)
    live = opened(reopened, 995.0)
    assert {at for at, _ in live} == {float(t) for t in range(200, 1000, 10)} | {995.0}
    assert len(live) == 80 * keys_per_step + 1


def test_a_legacy_log_moves_into_segments(tmp_path: Path) -> None:
    legacy = [(1000, "10.0.0.1/engine-01\0old\n"), (1700, "10.0.0.1/engine-01\0kept\n")]
    (tmp_path / LEGACY).write_bytes(b"".join(
        framing.frame(LEGACY_MAGIC, at * 1000, text.encode()) for at, text in legacy))
    log = ChunkIdLog(tmp_path / "ids", window_s=WINDOW)
    expected = [(1700.0, forward_key("10.0.0.1/engine-01", "kept\n"))]
    assert opened(log, 1850) == expected
    log.close()
    assert not (tmp_path / LEGACY).exists()
    assert opened(ChunkIdLog(tmp_path / "ids", window_s=WINDOW), 1850) == expected


def test_keys_of_a_failed_append_are_written_by_the_next(tmp_path: Path) -> None:
    """Their batches are acked (the journal holds them), so the keys must reach the log
    before those journal segments go: sync refuses until they have."""
    directory = tmp_path / "ids"
    log = ChunkIdLog(directory, window_s=WINDOW)
    opened(log, 1000)
    directory.rmdir()
    directory.write_bytes(b"")  # no segment can be started
    with pytest.raises(StorageError):
        log.append([key(1)], 1000)
    with pytest.raises(StorageError, match="1 ids not written yet"):
        log.sync()
    directory.unlink()
    directory.mkdir()
    log.append([key(2)], 1001)
    log.sync()
    log.close()
    assert [k for _, k in opened(ChunkIdLog(directory, window_s=WINDOW), 1002)] == \
        [key(1), key(2)]


def test_a_peer_reads_each_entry_once_across_segments_and_restarts(tmp_path: Path) -> None:
    directory = tmp_path / "worker-1"
    peer = PeerChunkIds([directory, tmp_path / "not-yet"])
    assert peer.read_new() == []
    log = ChunkIdLog(directory, window_s=WINDOW)
    opened(log, 1000)
    log.append([key(0), key(1)], 1000)
    assert peer.read_new() == [(1000, [key(0), key(1)])]
    active = directory / segments(directory)[-1]
    with open(active, "ab") as file:  # half an entry: a write in progress
        file.write(b"MWC2\x00\x00")
    assert peer.read_new() == []
    log.close()
    reopened = ChunkIdLog(directory, window_s=WINDOW)  # the worker restarts
    opened(reopened, 1001)
    reopened.append([key(2)], 1002)
    reopened.append([key(3)], 1150)  # a new slice: a new segment
    assert peer.read_new() == [(1002, [key(2)]), (1150, [key(3)])]
    reopened.append([key(4)], 2000)  # the first segments leave the window
    assert peer.read_new() == [(2000, [key(4)])]
    assert peer.read_new() == []


def test_memory_honours_each_callers_window_and_forgets_whole_slices() -> None:
    now = [10_000.0]
    memory = ChunkMemory(WINDOW, clock=lambda: now[0])
    memory.remember([key(0)], 10_000.0)
    long, short = Dedupe(key(0), WINDOW), Dedupe(key(0), 200.0)
    now[0] = 10_150.0
    assert memory.is_durable(short)
    now[0] = 10_350.0  # 350 s later: past a 200 s window and the slice it may add
    assert memory.is_durable(long)
    assert not memory.is_durable(short)
    now[0] = 10_800.0 + 100.0  # past the window by a whole slice
    assert not memory.is_durable(long)
    assert len(memory) == 0

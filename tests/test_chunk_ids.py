"""Chunk id logs on real files: the window, and another worker following a log as it grows
and as it is rewritten."""

from __future__ import annotations

from pathlib import Path

from mwdlogd.storage.chunk_ids import ChunkIdLog, PeerChunkIds


def test_reopen_keeps_only_ids_inside_the_window(tmp_path: Path) -> None:
    log = ChunkIdLog(tmp_path / "ids.log", window_s=100)
    log.open(now=1000)
    log.append(["old"], 1000)
    log.append(["new"], 1090)
    log.close()
    assert ChunkIdLog(tmp_path / "ids.log", window_s=100).open(now=1150) == [(1090, "new")]


def test_a_peer_reads_each_entry_once_even_across_a_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "worker-1.log"
    peer = PeerChunkIds([path, tmp_path / "not-yet.log"])
    assert peer.read_new() == []
    log = ChunkIdLog(path, window_s=3600)
    log.open(now=1000)
    log.append(["a", "b"], 1000)
    assert peer.read_new() == [(1000, "a"), (1000, "b")]
    with open(path, "ab") as file:  # half an entry: a write in progress
        file.write(b"MWC1\x00\x00")
    assert peer.read_new() == []
    log.close()
    reopened = ChunkIdLog(path, window_s=3600)  # the worker restarts: its log is rewritten
    reopened.open(now=1001)
    reopened.append(["c"], 1002)
    assert peer.read_new() == [(1000, "a"), (1000, "b"), (1002, "c")]
    assert peer.read_new() == []

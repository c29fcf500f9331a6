"""kill -9 at random moments under continuous load: every acked record lands exactly once.

A real subprocess server, three client threads posting batches over mTLS and recording
every acked id, and ten SIGKILLs at random instants (flushes included: one variant
flushes every 10 ms in 2 KiB chunks, so kills land inside appends). At the end every
file must read to its end, every acked id must be there exactly once and no id twice.
"""

from __future__ import annotations

import random
import signal
import subprocess
import threading
from collections import Counter
from pathlib import Path

import pytest

from conftest import config_raw
from helpers import client_context, read_tree
from load_client import BATCH, Load
from server_process import ServerProcess, write_config

KILLS = 10


VARIANTS = {
    "default-flush": {"flush_interval": "10s"},
    "tiny-flush-and-chunks": {"flush_interval": "10ms", "chunk_limit": "2KiB"},
}


@pytest.mark.parametrize("run", [1, 2, 3])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_kill_9_loses_and_duplicates_nothing(tmp_path: Path, pki: Path, variant: str,
                                             run: int) -> None:
    config = write_config(tmp_path / "config.toml", config_raw(
        tmp_path, pki, buffer=VARIANTS[variant], server={"shutdown_timeout": "30s"}))
    chaos = random.Random(f"{variant}-{run}")
    load = Load(client_context(pki))
    recovered_lines = []
    try:
        for _ in range(KILLS):
            server = ServerProcess(config)
            recovered_lines.append(server.wait_for(r" recovered "))
            load.serve(int(server.addresses["http"].rpartition(":")[2]))
            load.wait_for_acks(len(load.acked))
            # The kill moment is chosen at random on purpose: this is the chaos, not a wait.
            threading.Event().wait(chaos.uniform(0.0, 0.4))
            server.process.send_signal(signal.SIGKILL)
            load.serve(None)
            assert server.wait() == -signal.SIGKILL
        final = ServerProcess(config)
        recovered_lines.append(final.wait_for(r" recovered "))
        load.serve(int(final.addresses["http"].rpartition(":")[2]))
        load.wait_for_acks(len(load.acked))
    finally:
        load.stop()
    final.signal(signal.SIGTERM)
    assert final.wait() == 0
    final.wait_for("shutdown_complete")

    root = tmp_path / "logs"
    files = sorted(root.rglob("*.log.gz"))
    subprocess.run(["gzip", "-t", *map(str, files)], check=True)  # every member whole
    stored = Counter(record["id"] for records in read_tree(root).values() for record in records)
    assert [i for i, n in stored.items() if n > 1] == []
    assert sorted(load.acked - set(stored)) == []
    assert len(load.acked) > KILLS * BATCH
    assert any("records_replayed=0" not in line for line in recovered_lines)

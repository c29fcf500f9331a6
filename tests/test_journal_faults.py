"""The journal under real kernel faults: the descriptor limit (setrlimit in a child
process), a buffer directory removed with `rm -rf`, and a journal directory the server
may no longer write. Never a crash, never an acked record lost, and back by itself."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import config_raw
from helpers import (
    client_context,
    engine_records,
    get_json,
    ndjson,
    post_sync,
    read_tree,
    tmpfs,
)
from load_client import Load
from server_process import ServerProcess, write_config

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root (setpriv)")
NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
          "--inh-caps=-dac_override,-dac_read_search"]

# Runs in a child: its descriptor limit is lowered and filled, then the journal must switch
# segments. Prints what each step did as JSON.
AT_FD_LIMIT = textwrap.dedent("""
    import json, os, resource, sys
    from pathlib import Path
    from mwdlogd.storage.journal import Journal
    directory = Path(sys.argv[1])
    journal = Journal(directory, segment_bytes=100)
    journal.open()
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    spare = []
    try:
        while True:
            spare.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    steps = {}
    def step(name, call):
        try:
            steps[name] = call()
        except Exception as exc:
            steps[name] = type(exc).__name__ + ": " + str(exc)
    step("append_over_segment_size", lambda: journal.append([b"a" * 200]))
    step("append_again", lambda: journal.append([b"b"]))
    step("release", lambda: journal.release(2, final=True))
    os.close(spare.pop())
    victim = directory.parent / "victim"
    fd = os.open(victim, os.O_WRONLY | os.O_CREAT)
    step("append_with_one_descriptor_free", lambda: journal.append([b"c"]))
    os.close(fd)
    step("victim_bytes", lambda: victim.stat().st_size)
    for fd in spare:
        os.close(fd)
    step("release_when_free", lambda: journal.release(3, final=True))
    step("append_after", lambda: journal.append([b"d"]))
    journal.close()
    step("reopened", lambda: [[i, p.decode()] for i, p in Journal(directory).open()])
    print(json.dumps(steps))
""")


def test_segment_switch_at_the_descriptor_limit_keeps_every_batch(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", AT_FD_LIMIT, str(tmp_path / "journal")],
                          capture_output=True, text=True, timeout=60, check=True)
    steps = json.loads(done.stdout)
    # Written and fsynced, so acked, although the next segment could not be opened.
    assert steps["append_over_segment_size"] == [0]
    assert steps["append_again"] == [1]
    assert steps["release"].startswith("StorageError: start journal segment")
    assert "Too many open files" in steps["release"]
    # No write ever goes to a descriptor number the journal closed (now someone else's).
    assert steps["append_with_one_descriptor_free"] == [2]
    assert steps["victim_bytes"] == 0
    assert steps["release_when_free"] > 0
    assert steps["append_after"] == [3]
    assert steps["reopened"] == [[3, "d"]]


def start(tmp_path: Path, pki: Path, *, prefix: tuple[str, ...] = (),
          **buffer: str) -> ServerProcess:
    raw = config_raw(tmp_path, pki, buffer={"retry_max_interval": "200ms", **buffer})
    config = write_config(tmp_path / "config.toml", raw)
    return ServerProcess(None, argv=[*prefix, sys.executable, "-m", "mwdlogd", "run",
                                     "--config", str(config)])


class Sender:
    """Posts numbered Engine records and remembers which ones were acked."""

    def __init__(self, server: ServerProcess, pki: Path, *, pad: int = 0) -> None:
        self.port = int(server.addresses["http"].rpartition(":")[2])
        self.context = client_context(pki)
        self.pad = "x" * pad
        self.next = 0
        self.acked: set[str] = set()

    def send(self, count: int = 50) -> tuple[int, dict[str, str]]:
        records = engine_records(count, start=self.next)
        for record in records:
            record["pad"] = self.pad
        self.next += count
        status, answer = post_sync(self.port, self.context, ndjson(records))
        if status == 200:
            self.acked.update(r["id"] for r in records)
        return status, answer

    def send_until_acked(self, deadline_s: float = 30) -> None:
        """Retry (as Fluentd does) until one batch is acked; fails at the deadline."""
        stop = time.monotonic() + deadline_s
        while self.send()[0] != 200:
            assert time.monotonic() < stop, "never acked again"


def stored_once(root: Path, acked: set[str]) -> None:
    stored = Counter(r["id"] for records in read_tree(root).values() for r in records)
    assert [i for i, n in stored.items() if n > 1] == []
    assert sorted(acked - set(stored)) == []
    assert acked


def drain(server: ServerProcess) -> None:
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    server.wait_for("shutdown_complete")


def test_buffer_directory_removed_is_refused_written_out_then_resumed(
        tmp_path: Path, pki: Path) -> None:
    """rm -rf of the buffer directory: 503 and a log line instead of acks into a deleted
    file; what it held is written from memory, then the journal starts afresh."""
    server = start(tmp_path, pki, flush_interval="1h")
    try:
        sender = Sender(server, pki)
        assert sender.send()[0] == 200
        shutil.rmtree(tmp_path / "buffer")
        status, answer = sender.send()
        assert (status, answer["error"]) == (503, "journal_failed")
        assert "removed" in answer["detail"]
        server.wait_for(r"journal_failed .*journal segment removed")
        status, health = get_json(server.addresses["health"], "/health")
        assert status == 503 and "journal failing" in health["problem"]
        assert str(tmp_path) not in str(health)  # paths named by their keys (Authorization)
        mark = len(server.lines)
        server.signal(signal.SIGUSR1)
        server.wait_for("flush_done", start=mark)
        sender.send_until_acked()
        server.wait_for("journal_resumed")
        assert get_json(server.addresses["health"], "/health")[0] == 200
        assert sender.send()[0] == 200
        server.process.kill()  # what the new journal holds must survive a crash
        server.wait()
        again = start(tmp_path, pki, flush_interval="1h")
        drain(again)
    finally:
        server.stop()
    stored_once(tmp_path / "logs", sender.acked)


@needs_root
def test_journal_directory_read_only_no_crash_then_recovers(tmp_path: Path, pki: Path) -> None:
    """Segments that cannot be switched or deleted: acks go on in the open segment, health
    says why, and the journal catches up once the directory is writable again. (A
    read-only remount is refused with EBUSY while the segment is open for writing, so
    the directory is made read-only to a server without CAP_DAC_OVERRIDE instead.)"""
    journal = tmp_path / "buffer" / "journal"
    journal.mkdir(parents=True)
    server = start(tmp_path, pki, prefix=tuple(NO_DAC), flush_interval="100ms")
    try:
        journal.chmod(0o555)
        sender = Sender(server, pki, pad=1000)
        for _ in range(25):  # > 1 MiB: the active segment is due to be switched
            assert sender.send()[0] == 200
        server.wait_for(r"journal_failed .*Permission denied")
        status, health = get_json(server.addresses["health"], "/health")
        assert status == 503 and "Permission denied" in health["problem"]
        assert sender.send()[0] == 200
        journal.chmod(0o755)
        server.wait_for("journal_recovered")
        assert get_json(server.addresses["health"], "/health")[0] == 200
        drain(server)
    finally:
        journal.chmod(0o755)
        server.stop()
    stored_once(tmp_path / "logs", sender.acked)
    assert not list(journal.glob("*.wal")) or all(
        p.stat().st_size == 0 for p in journal.glob("*.wal"))


@pytest.fixture
def small_buffer(tmp_path: Path) -> Iterator[Path]:
    """The buffer directory on a 4 MiB tmpfs: the journal fills it within seconds."""
    with tmpfs(tmp_path / "buffer", "4m") as mountpoint:
        yield mountpoint


@needs_root
def test_journal_disk_full_frees_itself_under_steady_retries(
        tmp_path: Path, pki: Path, small_buffer: Path) -> None:
    """Clients that retry at once never leave an idle second, and the active segment never
    reaches the size at which it is released; a failed append releases what is written."""
    server = start(tmp_path, pki, flush_interval="100ms")
    load = Load(client_context(pki), pad=2000)
    try:
        load.serve(int(server.addresses["http"].rpartition(":")[2]))
        server.wait_for(r"journal_failed .*No space left on device")
        load.wait_for_acks(16 * 1024 * 1024 // 1000)  # records of ~1 KB: 4 disks full
        load.stop()
        drain(server)
    finally:
        load.stop()
        server.stop()
    assert load.statuses[503] > 0
    stored_once(tmp_path / "logs", load.acked)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_second_server_on_one_buffer_directory_is_refused(
        tmp_path: Path, pki: Path, workers: str) -> None:
    """It would recover the first one's live journal and store every record twice."""
    first = start(tmp_path, pki, flush_interval="1h")
    try:
        sender = Sender(first, pki)
        assert sender.send()[0] == 200
        second = subprocess.run(
            [sys.executable, "-m", "mwdlogd", "run", "--config", str(tmp_path / "config.toml")],
            capture_output=True, text=True, timeout=30,
            env={**os.environ, "MWDLOGD_SERVER_WORKERS": workers})
        assert second.returncode != 0
        assert f"{tmp_path / 'buffer'}: in use by another mwdlogd (pid {first.process.pid}" \
            in second.stderr
        assert " listening " not in second.stderr and "recovered" not in second.stderr
        assert sender.send()[0] == 200
        drain(first)
    finally:
        first.stop()
    stored_once(tmp_path / "logs", sender.acked)

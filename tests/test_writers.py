"""Router and per-file writers under a virtual clock (autojump): flush triggers, hour close,
retries. The store is an in-memory stand-in for the disk, so the clock may jump freely."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import trio
import trio.testing

from mwdlogd.errors import StorageError
from mwdlogd.model import Destination, Group
from mwdlogd.runtime.batch import FlushAll, Message, Submission
from mwdlogd.runtime.router import Router
from mwdlogd.runtime.tracker import BatchTracker
from mwdlogd.runtime.writer import FLUSH_SPREAD, WriterSettings
from mwdlogd.storage.files import destination
from mwdlogd.storage.hourly import MemberBuilder, append_members
from mwdlogd.storage.ledger import Ledger
from mwdlogd.telemetry import Telemetry

HOUR = 1732500000  # 2024-11-25T02:00Z


class MemoryStore:
    """Holds each append in memory (decompressed); can be told to fail the next N appends.
    Each test file is its own customer's, so files go by the customer's name ("a")."""

    def __init__(self) -> None:
        self.appends: list[tuple[float, str, bytes]] = []
        self.failures = 0
        self.failed: list[tuple[str, bytes, str]] = []

    async def compress(self, builder: MemberBuilder, data: bytes) -> None:
        builder.add(data)

    async def finish(self, builder: MemberBuilder, tail: bytes) -> bytes:
        return builder.finish(tail)

    async def append(self, destination: Destination, members: bytes, max_id: int) -> int:
        await trio.lowlevel.checkpoint()
        path = str(destination.customer)
        if self.failures:
            self.failures -= 1
            raise StorageError(path, "append", "No space left on device")
        self.appends.append((trio.current_time(), path, gzip.decompress(members)))
        return len(members)

    async def fail(self, destination: Destination, members: bytes, max_id: int,
                   error: str) -> Path:
        path = str(destination.customer)
        self.failed.append((path, gzip.decompress(members), error))
        return Path("/failed") / path

    def lines(self, path: str) -> list[bytes]:
        return [line for _, p, data in self.appends if p == path
                for line in data.splitlines()]


class Harness:
    def __init__(self, store: MemoryStore, router: Router, send: trio.MemorySendChannel[Message],
                 tracker: BatchTracker, telemetry: Telemetry, wall: list[float]) -> None:
        self.store, self.router, self.send, self.tracker = store, router, send, tracker
        self.telemetry, self.wall = telemetry, wall

    async def commit(self, customer: str, hour: int, *lines: bytes, tag: str = "t") -> None:
        data = b"".join(line + b"\n" for line in lines)
        batch_id = self.tracker.next_id
        self.tracker.open(batch_id, 1, len(data))
        destination = Destination(customer, "nginx", "www.acme.test", hour)
        await self.send.send(Submission(tag, [Group(destination, data, len(lines))], batch_id))

    async def flush(self) -> None:
        marker = FlushAll()
        await self.send.send(marker)
        await marker.done.wait()


def writer_settings(flush_interval: float = 10.0, chunk_limit: int = 1 << 20,
                    retry_timeout: float = 3600.0, flush_spread: float = 0.0) -> WriterSettings:
    """Flushes exactly on flush_interval unless a test asks for the production spread."""
    return WriterSettings(flush_interval_s=flush_interval, chunk_limit=chunk_limit,
                          retry_max_interval_s=30.0, retry_timeout_s=retry_timeout,
                          flush_spread=flush_spread)


async def start(nursery: trio.Nursery, *, timekey_wait: float = 10.0,
                **settings: float) -> Harness:
    store, telemetry, tracker = MemoryStore(), Telemetry("h"), BatchTracker()
    wall = [HOUR + 600.0 - trio.current_time()]  # wall clock = trio clock + offset
    fixed = writer_settings(**settings)  # type: ignore[arg-type]
    router = Router(store=store, settings=lambda: fixed,
                    timekey_wait_s=lambda: timekey_wait, telemetry=telemetry, tracker=tracker,
                    wall_clock=lambda: trio.current_time() + wall[0])
    send, receive = trio.open_memory_channel[Message](0)
    nursery.start_soon(router.run, receive)
    return Harness(store, router, send, tracker, telemetry, wall)


async def test_flush_after_interval_in_one_member(autojump_clock: trio.testing.MockClock,
                                                  nursery: trio.Nursery) -> None:
    h = await start(nursery, flush_interval=10.0)
    started = trio.current_time()
    await h.commit("a", HOUR, b"1", b"2")
    await h.commit("a", HOUR, b"3")
    await trio.sleep(9.9)
    assert h.store.appends == []
    await trio.sleep(0.2)
    assert [(round(t - started, 3), p, d) for t, p, d in h.store.appends] == [
        (10.0, "a", b"1\n2\n3\n")]


async def test_files_filled_together_flush_spread_out(
        autojump_clock: trio.testing.MockClock, nursery: trio.Nursery) -> None:
    h = await start(nursery, flush_interval=10.0, flush_spread=FLUSH_SPREAD)
    started = trio.current_time()
    for n in range(20):
        await h.commit(f"f{n}", HOUR, b"x")
    await trio.sleep(10.0 * (1 + FLUSH_SPREAD) + 0.1)
    times = sorted(at - started for at, _, _ in h.store.appends)
    assert len(times) == 20
    assert times[0] >= 10.0 and times[-1] <= 10.0 * (1 + FLUSH_SPREAD)
    assert len({round(t, 6) for t in times}) == 20  # no two files flush in the same instant


async def test_chunk_limit_flushes_at_once(autojump_clock: trio.testing.MockClock,
                                           nursery: trio.Nursery) -> None:
    h = await start(nursery, chunk_limit=7)
    await h.commit("a", HOUR, b"12", b"34")
    await trio.testing.wait_all_tasks_blocked()
    assert h.store.appends == []
    await h.commit("a", HOUR, b"5")
    await trio.testing.wait_all_tasks_blocked()
    assert h.store.lines("a") == [b"12", b"34", b"5"]
    assert h.store.appends[0][0] == trio.current_time()


async def test_flush_all_covers_every_file(autojump_clock: trio.testing.MockClock,
                                           nursery: trio.Nursery) -> None:
    h = await start(nursery)
    await h.commit("a", HOUR, b"1")
    await h.commit("b", HOUR, b"2")
    await h.flush()
    assert sorted((p, d) for _, p, d in h.store.appends) == [("a", b"1\n"), ("b", b"2\n")]


async def test_hour_close_flushes_and_retires_the_writer(
        autojump_clock: trio.testing.MockClock, nursery: trio.Nursery) -> None:
    h = await start(nursery, flush_interval=1e6, timekey_wait=10.0)
    await h.commit("a", HOUR, b"1")
    close_at = HOUR + 3600 + 10.0 - h.wall[0]  # trio time at which the hour closes
    await trio.sleep_until(close_at - 0.5)
    assert h.store.appends == [] and h.router.open_files == 1
    await trio.sleep(1.0)
    assert h.store.lines("a") == [b"1"] and h.router.open_files == 0


async def test_late_records_keep_order_across_writers(
        autojump_clock: trio.testing.MockClock, nursery: trio.Nursery) -> None:
    h = await start(nursery, flush_interval=5.0, timekey_wait=1.0)
    old = HOUR - 7200
    for n in range(6):
        await h.commit("old", old, str(n).encode())
        await trio.sleep(0.7 if n % 2 else 3.0)  # some writers retire in between
    await h.flush()
    assert h.store.lines("old") == [b"0", b"1", b"2", b"3", b"4", b"5"]


async def test_failed_writes_retry_with_backoff_then_land(
        autojump_clock: trio.testing.MockClock, nursery: trio.Nursery) -> None:
    h = await start(nursery, flush_interval=1.0)
    h.store.failures = 3
    started = trio.current_time()
    await h.commit("a", HOUR, b"x")
    await trio.sleep(100)
    ((when, _, data),) = h.store.appends
    assert data == b"x\n"
    assert round(when - started, 3) == 1.0 + 1 + 2 + 4  # interval, then backoff 1, 2, 4 s
    metrics = h.telemetry.exposition().decode()
    assert 'fluentd_output_status_retry_count{plugin_id="hourly_files",type="file"} 3.0' in metrics
    assert 'fluentd_output_status_num_records_total{hostname="h",tag="t"} 1.0' in metrics


async def test_close_flushes_every_writer(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        h = await start(nursery, flush_interval=1e6)
        await h.commit("a", HOUR, b"1")
        await h.commit("b", HOUR, b"2")
        await h.send.aclose()
    assert sorted((p, d) for _, p, d in h.store.appends) == [("a", b"1\n"), ("b", b"2\n")]
    assert h.tracker.open_batches == 0 and h.tracker.buffered_bytes == 0


async def test_past_retry_timeout_the_chunk_moves_to_failed(
        autojump_clock: trio.testing.MockClock, nursery: trio.Nursery) -> None:
    h = await start(nursery, flush_interval=1.0, retry_timeout=60.0)
    h.store.failures = 1000
    await h.commit("a", HOUR, b"x", b"y")
    await trio.sleep(200)
    assert h.store.failed == [("a", b"x\ny\n", "append a: No space left on device")]
    assert h.tracker.open_batches == 0
    metrics = h.telemetry.exposition().decode()
    assert "mwdlogd_failed_records_total 2.0" in metrics
    h.store.failures = 0
    await h.commit("a", HOUR, b"z")
    await h.flush()
    assert h.store.lines("a") == [b"z"]


def members(data: bytes) -> bytes:
    return MemberBuilder().finish(data)


def test_append_members_makes_multi_member_gzip(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger")
    rel = "c/nginx/f/2024/11/25/02.log.gz"
    append_members(str(tmp_path), rel, members(b'{"a":1}\n'), 0, ledger)
    append_members(str(tmp_path), rel, members(b'{"a":2}\n'), 3, ledger)
    with ledger.hold(str(tmp_path), rel) as held:
        assert held is not None and held.committed == 3
    data = (tmp_path / "c/nginx/f/2024/11/25/02.log.gz").read_bytes()
    assert gzip.decompress(data) == b'{"a":1}\n{"a":2}\n'
    assert data.count(b"\x1f\x8b\x08") == 2


@pytest.mark.parametrize("compression", ["zlib", "igzip"])
def test_members_of_either_compressor_read_back_with_gzip(tmp_path: Path,
                                                          compression: str) -> None:
    lines = b"".join(b'{"n":%d,"pad":"%s"}\n' % (n, b"x" * (n % 50)) for n in range(5000))
    builder = MemberBuilder(compression)
    builder.add(lines[:100_000])
    member = builder.finish(lines[100_000:])
    rel = "c/nginx/f/2024/11/25/02.log.gz"
    append_members(str(tmp_path), rel, member, 0, Ledger(tmp_path / "ledger"))
    append_members(str(tmp_path), rel, MemberBuilder(compression).finish(b"last\n"), 1,
                   Ledger(tmp_path / "ledger"))
    assert gzip.decompress((tmp_path / rel).read_bytes()) == lines + b"last\n"


def test_append_members_names_the_failing_path(tmp_path: Path) -> None:
    (tmp_path / "c").write_text("a file where a directory should be")
    with pytest.raises(StorageError, match=r"open .*/c/nginx/f/x.log.gz: Not a directory"):
        append_members(str(tmp_path), "c/nginx/f/x.log.gz", members(b"x\n"), 0,
                       Ledger(tmp_path / "ledger"))


@pytest.mark.parametrize("relpath", ["../x.log.gz", "a/../../x.log.gz", "/etc/x"])
def test_destination_refuses_escapes(relpath: str) -> None:
    with pytest.raises(StorageError, match="escapes the storage root"):
        destination("/srv/logs", relpath)




async def test_records_compressed_before_the_flush_are_not_lost(
        autojump_clock: trio.testing.MockClock, nursery: trio.Nursery,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """zlib may return nothing for what it was given so far; the member still holds it."""
    monkeypatch.setattr("mwdlogd.runtime.writer.COMPRESS_BLOCK", 1)
    h = await start(nursery)
    await h.commit("a", HOUR, b"1")
    await h.commit("a", HOUR, b"2")
    await h.flush()
    assert h.store.lines("a") == [b"1", b"2"]

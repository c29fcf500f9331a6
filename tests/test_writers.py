"""Router and per-file writers under a virtual clock (autojump): flush triggers, hour close,
retries. The store is an in-memory stand-in for the disk, so the clock may jump freely."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import trio
import trio.testing

from mwdlogd.errors import StorageError
from mwdlogd.pipeline.normalize import Routed
from mwdlogd.runtime.pipeline import Pipeline, ShuttingDown
from mwdlogd.runtime.router import Router
from mwdlogd.runtime.writer import WriterSettings
from mwdlogd.storage.hourly import append_member, destination
from mwdlogd.telemetry import Telemetry

HOUR = 1732500000  # 2024-11-25T02:00Z


class MemoryStore:
    """Records each append; can be told to fail the next N appends."""

    def __init__(self) -> None:
        self.appends: list[tuple[float, str, bytes]] = []
        self.failures = 0

    async def __call__(self, path: str, data: bytes) -> int:
        await trio.lowlevel.checkpoint()
        if self.failures:
            self.failures -= 1
            raise StorageError(path, "append", "No space left on device")
        self.appends.append((trio.current_time(), path, data))
        return len(data)

    def lines(self, path: str) -> list[bytes]:
        return [line for _, p, data in self.appends if p == path
                for line in data.splitlines()]


class Harness:
    def __init__(self, store: MemoryStore, router: Router, pipeline: Pipeline,
                 telemetry: Telemetry, wall: list[float]) -> None:
        self.store, self.router, self.pipeline = store, router, pipeline
        self.telemetry, self.wall = telemetry, wall

    async def commit(self, path: str, hour: int, *lines: bytes, tag: str = "t") -> None:
        await self.pipeline.commit(tag, [Routed(path, hour, line) for line in lines])


async def start(nursery: trio.Nursery, *, flush_interval: float = 10.0,
                chunk_limit: int = 1 << 20, timekey_wait: float = 10.0) -> Harness:
    store, telemetry, pipeline = MemoryStore(), Telemetry("h"), Pipeline()
    wall = [HOUR + 600.0 - trio.current_time()]  # wall clock = trio clock + offset

    router = Router(store=store, settings=WriterSettings(flush_interval, chunk_limit, 30.0),
                    timekey_wait_s=timekey_wait, telemetry=telemetry,
                    wall_clock=lambda: trio.current_time() + wall[0])
    await nursery.start(router.run, pipeline.receive)
    return Harness(store, router, pipeline, telemetry, wall)


async def test_flush_after_interval_in_one_member(autojump_clock: trio.testing.MockClock,
                                                  nursery: trio.Nursery) -> None:
    h = await start(nursery, flush_interval=10.0)
    started = trio.current_time()
    await h.commit("a", HOUR, b"1", b"2")
    await h.commit("a", HOUR, b"3")
    await trio.sleep(9.9)
    assert h.store.appends == []
    await trio.sleep(0.2)
    assert [(round(t - started, 3), p, d) for t, p, d in h.store.appends] == [(10.0, "a", b"123")]


async def test_chunk_limit_flushes_at_once(autojump_clock: trio.testing.MockClock,
                                           nursery: trio.Nursery) -> None:
    h = await start(nursery, chunk_limit=4)
    await h.commit("a", HOUR, b"12", b"34", b"5")
    await trio.testing.wait_all_tasks_blocked()
    assert h.store.lines("a") == [b"12345"]
    assert h.store.appends[0][0] == trio.current_time()


async def test_flush_all_covers_every_file(autojump_clock: trio.testing.MockClock,
                                           nursery: trio.Nursery) -> None:
    h = await start(nursery)
    await h.commit("a", HOUR, b"1")
    await h.commit("b", HOUR, b"2")
    await h.router.flush_all()
    assert sorted((p, d) for _, p, d in h.store.appends) == [("a", b"1"), ("b", b"2")]


async def test_hour_close_flushes_and_retires_the_writer(
        autojump_clock: trio.testing.MockClock, nursery: trio.Nursery) -> None:
    h = await start(nursery, flush_interval=1e6, timekey_wait=10.0)
    await h.commit("a", HOUR, b"1")
    assert h.router.open_files == 1
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
    await h.router.flush_all()
    assert b"".join(h.store.lines("old")) == b"012345"


async def test_failed_writes_retry_with_backoff_then_land(
        autojump_clock: trio.testing.MockClock, nursery: trio.Nursery) -> None:
    h = await start(nursery, flush_interval=1.0)
    h.store.failures = 3
    started = trio.current_time()
    await h.commit("a", HOUR, b"x")
    await trio.sleep(100)
    ((when, _, data),) = h.store.appends
    assert data == b"x"
    assert round(when - started, 3) == 1.0 + 1 + 2 + 4  # interval, then backoff 1, 2, 4 s
    metrics = h.telemetry.exposition().decode()
    assert 'fluentd_output_status_retry_count{plugin_id="hourly_files",type="file"} 3.0' in metrics
    assert 'fluentd_output_status_num_records_total{hostname="h",tag="t"} 1.0' in metrics


async def test_close_drains_pending_and_refuses_new_batches(
        autojump_clock: trio.testing.MockClock) -> None:
    store, telemetry, pipeline = MemoryStore(), Telemetry("h"), Pipeline()
    router = Router(store=store, settings=WriterSettings(1e6, 1 << 20, 30.0),
                    timekey_wait_s=10, telemetry=telemetry)
    async with trio.open_nursery() as nursery:
        await nursery.start(router.run, pipeline.receive)
        await pipeline.commit("t", [Routed("a", HOUR, b"1"), Routed("b", HOUR, b"2")])
        await pipeline.close()
    assert sorted((p, d) for _, p, d in store.appends) == [("a", b"1"), ("b", b"2")]
    with pytest.raises(ShuttingDown):
        await pipeline.commit("t", [Routed("a", HOUR, b"3")])


def test_append_member_makes_multi_member_gzip(tmp_path: Path) -> None:
    append_member(str(tmp_path), "c/nginx/f/2024/11/25/02.log.gz", b'{"a":1}\n')
    append_member(str(tmp_path), "c/nginx/f/2024/11/25/02.log.gz", b'{"a":2}\n')
    data = (tmp_path / "c/nginx/f/2024/11/25/02.log.gz").read_bytes()
    assert gzip.decompress(data) == b'{"a":1}\n{"a":2}\n'
    assert data.count(b"\x1f\x8b\x08") == 2


def test_append_member_names_the_failing_path(tmp_path: Path) -> None:
    (tmp_path / "c").write_text("a file where a directory should be")
    with pytest.raises(StorageError, match=r"append .*/c/nginx/f/x.log.gz: Not a directory"):
        append_member(str(tmp_path), "c/nginx/f/x.log.gz", b"x\n")


@pytest.mark.parametrize("relpath", ["../x.log.gz", "a/../../x.log.gz", "/etc/x"])
def test_destination_refuses_escapes(relpath: str) -> None:
    with pytest.raises(StorageError, match="escapes the storage root"):
        destination("/srv/logs", relpath)



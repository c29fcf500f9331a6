"""The replay tool against a real server: generated and archived traffic, both protocols,
rate control, and its verification."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import trio

from mwdlogd_replay.connection import Target
from mwdlogd_replay.records import batches, generate, read_archive
from mwdlogd_replay.run import run_replay
from mwdlogd_replay.verify import verify

from conftest import Running, make_config, start_app
from forward_client import KEY
from helpers import TOKEN, client_context


def target(running: Running, pki: Path, protocol: str, **kwargs: object) -> Target:
    host, _, port = getattr(running.addresses, protocol).rpartition(":")
    return Target(protocol, host, int(port), client_context(pki), token=TOKEN,
                  **kwargs)  # type: ignore[arg-type]


def test_generated_traffic_is_reproducible_and_realistic() -> None:
    first = list(batches(generate(7, customers=3, fqdns=2, appsec_share=0.5, now=1e9),
                         size=50, run="a", count=120))
    again = list(batches(generate(7, customers=3, fqdns=2, appsec_share=0.5, now=1e9),
                         size=50, run="a", count=120))
    assert first == again and [len(b) for b in first] == [50, 50, 20]
    records = [r for b in first for r in b]
    assert {r["log_type"] for r in records} == {"nginx", "openappsec"}
    assert len({r["customer_name"] for r in records}) == 3
    assert [r["replay_id"] for r in records] == [f"a-{n}" for n in range(120)]
    sizes = [len(json.dumps(r)) for r in records]
    assert 200 < sum(sizes) / len(sizes) < 450


@pytest.mark.parametrize(("protocol", "options"), [
    ("http", {}),
    ("http", {"gzip": True}),
    ("forward", {"mode": "PackedForward"}),
    ("forward", {"mode": "CompressedPackedForward", "shared_key": KEY}),
    ("forward", {"mode": "Forward"}),
])
async def test_replay_and_verify(nursery: trio.Nursery, tmp_path: Path, pki: Path,
                                 protocol: str, options: dict[str, object]) -> None:
    forward = {"bind": "127.0.0.1", "port": 0, "shared_key": options.get("shared_key", "")}
    running = await start_app(nursery, make_config(tmp_path, pki, forward=forward))
    source = batches(generate(3, customers=4, fqdns=3, appsec_share=0.3), size=200,
                     run="t1", count=3000)
    stats = await run_replay(source, target(running, pki, protocol, **options),
                             connections=3, rate=None, duration=None, progress=False)
    assert (stats.sent, len(stats.acked), dict(stats.errors)) == (3000, 3000, {})
    await running.app.flush("test")
    verdict = verify(running.root, "t1", stats.acked)
    assert verdict.ok and verdict.stored == 3000 and verdict.unacked_stored == 0


async def test_verify_reports_missing_and_duplicated(nursery: trio.Nursery, tmp_path: Path,
                                                     pki: Path) -> None:
    running = await start_app(nursery, make_config(tmp_path, pki))
    source = batches(generate(3, customers=2, fqdns=2, appsec_share=0.3), size=100, run="d",
                     count=300)
    stats = await run_replay(source, target(running, pki, "http"), connections=1, rate=None,
                             duration=None, progress=False)
    again = batches(generate(3, customers=2, fqdns=2, appsec_share=0.3), size=100, run="d",
                    count=100)  # the first 100 once more: duplicates
    await run_replay(again, target(running, pki, "http"), connections=1, rate=None,
                     duration=None, progress=False)
    await running.app.flush("test")
    verdict = verify(running.root, "d", stats.acked | {"d-999"})
    assert verdict.missing == ["d-999"]
    assert verdict.duplicated == sorted(f"d-{n}" for n in range(100))
    assert not verdict.ok


async def test_an_archive_replays_into_another_server(tmp_path: Path, pki: Path) -> None:
    async with trio.open_nursery() as nursery:
        first = await start_app(nursery, make_config(tmp_path / "a", pki))
        source = batches(generate(5, customers=3, fqdns=2, appsec_share=0.4), size=250,
                         run="orig", count=1000)
        await run_replay(source, target(first, pki, "http"), connections=2, rate=None,
                         duration=None, progress=False)
        await first.app.flush("test")
        second = await start_app(nursery, make_config(tmp_path / "b", pki))
        archive = batches(read_archive([first.root]), size=300, run="copy", count=None)
        stats = await run_replay(archive, target(second, pki, "forward"), connections=2,
                                 rate=None, duration=None, progress=False)
        await second.app.flush("test")
        nursery.cancel_scope.cancel()
    assert len(stats.acked) == 1000
    assert verify(second.root, "copy", stats.acked).ok
    copied = {r["replay_id"].split("-")[0] for r in read_archive([second.root])}
    assert copied == {"copy"}  # replay ids are per run


async def test_fixed_rate_paces_the_batches(nursery: trio.Nursery, tmp_path: Path,
                                            pki: Path) -> None:
    running = await start_app(nursery, make_config(tmp_path, pki))
    source = batches(generate(1, customers=1, fqdns=1, appsec_share=0), size=100, run="r",
                     count=1000)
    started = trio.current_time()
    stats = await run_replay(source, target(running, pki, "http"), connections=2, rate=2000,
                             duration=None, progress=False)
    elapsed = trio.current_time() - started
    assert len(stats.acked) == 1000
    assert elapsed >= 0.45  # ten batches of 100 at 2000/s: the last leaves at 0.45 s


async def test_cli_replays_and_verifies(tmp_path: Path, pki: Path) -> None:
    config = make_config(tmp_path, pki, buffer={"flush_interval": "100ms"})
    async with trio.open_nursery() as nursery:
        running = await start_app(nursery, config)
        result = await trio.run_process(
            [sys.executable, "-m", "mwdlogd", "replay", "--target", running.addresses.http,
             "--token", TOKEN, "--cacert", str(pki / "ca.crt"), "--cert",
             str(pki / "engine-01.crt"), "--key", str(pki / "engine-01.key"), "--count",
             "2500", "--batch", "500", "--run", "cli", "--verify", str(running.root),
             # --settle is only the longest wait: --verify polls until the records land
             "--settle", "60"], capture_stdout=True, capture_stderr=True, check=False)
        nursery.cancel_scope.cancel()
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["sent"], summary["acked"]) == (2500, 2500)
    assert summary["verify"]["stored"] == 2500
    assert summary["verify"]["missing"] == summary["verify"]["duplicated"] == 0

"""`mwdlogd replay` as an operator runs it: everything from --config, failures explained in
words (not exception class names), and --verify waiting for the server's flush."""

from __future__ import annotations

import gzip
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import trio

from mwdlogd.config import load_config
from mwdlogd_replay.verify import await_verdict

from conftest import Running, config_raw, start_app
from forward_client import KEY
from helpers import free_port, read_tree
from server_process import write_config


async def mwdlogd_replay(*args: str) -> tuple[int, dict[str, Any] | None, str]:
    """(exit status, the JSON summary if any, stderr without progress lines)."""
    result = await trio.run_process([sys.executable, "-m", "mwdlogd", "replay", *args],
                                    capture_stdout=True, capture_stderr=True, check=False)
    stdout = result.stdout.decode().strip()
    stderr = "\n".join(line for line in result.stderr.decode().splitlines()
                       if not line.startswith("["))
    return result.returncode, json.loads(stdout) if stdout else None, stderr


async def start_from_file(nursery: trio.Nursery, tmp_path: Path, pki: Path,
                          **sections: dict[str, Any]) -> tuple[Running, Path]:
    """A server started from a config file with real ports, as replay --config reads it."""
    raw = config_raw(tmp_path, pki, http={"bind": "127.0.0.1", "port": free_port()},
                     forward={"bind": "127.0.0.1", "port": free_port(),
                              **sections.pop("forward", {})}, **sections)
    path = write_config(tmp_path / "config.toml", raw)
    return await start_app(nursery, load_config(path, required=True, environ={})), path


async def test_config_gives_target_certificates_and_token_and_verify_waits_for_the_flush(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    running, config = await start_from_file(nursery, tmp_path, pki,
                                            buffer={"flush_interval": "2s"})
    code, summary, stderr = await mwdlogd_replay(
        "--config", str(config), "--count", "1500", "--batch", "500", "--run", "op",
        "--verify", "--settle", "30")  # ROOT: the config's storage.root
    assert code == 0, stderr
    assert summary is not None
    assert (summary["sent"], summary["acked"], summary["errors"]) == (1500, 1500, {})
    verdict = summary["verify"]
    assert (verdict["stored"], verdict["missing"], verdict["duplicated"]) == (1500, 0, 0)
    assert 0 < verdict["waited_s"] < 30  # it waited for the flush, and no longer
    assert list(running.root.rglob("*.log.gz"))  # the tree it verified: storage.root
    assert "acked records stored; waiting for the flush" in stderr
    forward_code, forward, _ = await mwdlogd_replay(
        "--config", str(config), "--protocol", "forward", "--count", "300", "--run", "fw")
    assert forward_code == 0 and forward is not None and forward["acked"] == 300


async def test_verify_asks_the_server_to_flush(nursery: trio.Nursery, tmp_path: Path,
                                              pki: Path) -> None:
    """flush_interval 1h: only the flush replay asks for can land the records in time."""
    running, config = await start_from_file(
        nursery, tmp_path, pki, buffer={"flush_interval": "1h"},
        monitor={"bind": "127.0.0.1", "port": free_port()})
    code, summary, stderr = await mwdlogd_replay(
        "--config", str(config), "--count", "700", "--run", "fl", "--verify", "--flush",
        "--settle", "20")
    assert code == 0, stderr
    assert summary is not None and summary["verify"]["stored"] == 700
    assert summary["verify"]["missing"] == 0 and summary["verify"]["waited_s"] < 20
    assert "flushed 127.0.0.1:" in stderr and ": 700 records to " in stderr
    assert sum(len(r) for r in read_tree(running.root).values()) == 700


def test_verify_reads_again_when_it_meets_a_member_being_appended(tmp_path: Path) -> None:
    """The server appends gzip members while verify polls: a torn member is read again."""
    first = gzip.compress(b'{"replay_id": "r-1"}\n')
    second = gzip.compress(b'{"replay_id": "r-2", "pad": "' + b"x" * 2000 + b'"}\n')
    hourly = tmp_path / "acme" / "nginx" / "www" / "2026" / "01" / "01" / "00.log.gz"
    hourly.parent.mkdir(parents=True)
    hourly.write_bytes(first + second[:len(second) // 2])
    finish = threading.Timer(0.3, lambda: hourly.write_bytes(first + second))
    finish.start()
    try:
        verdict, _ = await_verdict(tmp_path, "r", {"r-1", "r-2"}, settle=20, poll=0.1)
    finally:
        finish.join()
    assert verdict.ok and verdict.stored == 2


def test_verify_gives_up_after_settle_and_names_what_is_missing(tmp_path: Path) -> None:
    started = time.monotonic()
    verdict, waited = await_verdict(tmp_path, "r", {"r-1", "r-2"}, settle=1.5, poll=0.5)
    assert verdict.missing == ["r-1", "r-2"] and not verdict.ok
    assert waited >= 1.5 and time.monotonic() - started < 10


async def test_failures_are_explained(nursery: trio.Nursery, tmp_path: Path, pki: Path,
                                      rogue_pki: Path) -> None:
    running, config = await start_from_file(nursery, tmp_path, pki, forward={"shared_key": KEY})
    http, forward = running.addresses.http, running.addresses.forward
    cases = [
        (["--token", "nope"], "401 unknown token: bearer token is not known"),
        (["--protocol", "forward", "--shared-key", "wrong"],
         f"shared key mismatch (the server at {forward} answered: shared_key mismatch)"),
        (["--cacert", str(rogue_pki / "ca.crt")],
         f"the server certificate at {http} is not trusted by --cacert"),
        (["--cert", str(rogue_pki / "engine-01.crt"), "--key",
          str(rogue_pki / "engine-01.key")],
         f"{http} closed the connection before answering (right after the TLS handshake "
         "this is a refused client certificate"),
    ]
    for args, message in cases:
        code, summary, stderr = await mwdlogd_replay("--config", str(config), "--count", "20",
                                                     *args)
        assert code == 1, (args, stderr)
        assert summary is not None and summary["acked"] == 0
        assert any(message in error for error in summary["errors"]), (message, summary)
        assert f"mwdlogd replay: stopping: nothing was acknowledged; {message}" in stderr
    closed = free_port()
    code, summary, stderr = await mwdlogd_replay("--config", str(config), "--count", "20",
                                                 "--target", f"127.0.0.1:{closed}")
    assert code == 1 and summary is not None
    assert f"connection refused by 127.0.0.1:{closed}" in stderr
    missing = tmp_path / "nope" / "engine.crt"
    code, summary, stderr = await mwdlogd_replay("--config", str(config), "--count", "20",
                                                 "--cert", str(missing))
    assert (code, summary) == (2, None)
    assert stderr == f"mwdlogd replay: certificate file not found: {missing} (--cert)"
    code, _, stderr = await mwdlogd_replay("--config", str(tmp_path / "absent.toml"),
                                           "--count", "20")
    assert code == 2 and "config file not found" in stderr
    assert not list(running.root.rglob("*.log.gz"))  # nothing was stored by any of them

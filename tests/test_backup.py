"""`mwdlogd backup` / `mwdlogd restore` as an operator runs them: real processes, real
files, a real running server for the refusal."""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from mwdlogd.certs import init_certs
from mwdlogd.ops.backup import complete_gzip_length

from conftest import config_raw
from helpers import client_context, engine_records, free_port, ids_by_file, ndjson, post
from server_process import ServerProcess, write_config

HOUR_FILE = "acme/nginx/www.acme.com/2026/01/31/23.log.gz"
LIVE_FILE = "acme/nginx/www.acme.com/2026/02/01/00.log.gz"


def members(*lines: str) -> bytes:
    return b"".join(gzip.compress(line.encode() + b"\n") for line in lines)


def make_source(base: Path) -> dict[str, Any]:
    """A server's directory: config with relative paths, certificates, logs, buffer. One
    hourly file ends in half a gzip member, as while a flush is appending."""
    base.mkdir(parents=True, exist_ok=True)
    config = base / "config.toml"
    config.write_text('[server]\nhostname = "box"\n[storage]\nroot = "logs"\n'
                      '[buffer]\npath = "buffer"\n[health]\nbind = "127.0.0.1"\nport = 0\n')
    init_certs(base / "certs", hosts=["localhost"], clients=["engine-01"], days=30)
    complete = members('{"n":1}', '{"n":2}')
    torn = members('{"n":3}')[:-7]  # trailer missing: not a complete member
    files = {
        f"logs/{HOUR_FILE}": members('{"a":1}'),
        f"logs/{LIVE_FILE}": complete + torn,
        "logs/_invalid/2026/02/01/00.log.gz": members('{"invalid_reason":"x"}'),
        "logs/.archive-manifest.jsonl": b'{"event":"upload"}\n',
        "buffer/journal/00000001.wal": os.urandom(3000),
        "buffer/ledger/acme/nginx/www.acme.com/2026/01/31/23.log.gz.state": os.urandom(1024),
    }
    for rel, data in files.items():
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(data)
    return {"config": config, "files": files, "complete": complete, "torn": len(torn)}


def mwdlogd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mwdlogd", *args], capture_output=True,
                          text=True, timeout=120, check=False, cwd=cwd)


def tree(base: Path) -> dict[str, bytes]:
    return {p.relative_to(base).as_posix(): p.read_bytes()
            for p in sorted(base.rglob("*")) if p.is_file()}


def test_round_trip_is_byte_identical_and_cuts_an_unfinished_member(tmp_path: Path) -> None:
    source = make_source(tmp_path / "src")
    out = tmp_path / "b.tar.gz"
    made = mwdlogd("--config", str(source["config"]), "backup", "--out", str(out), "--logs",
                   "--buffer")
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith(f"backup: wrote {out}: 13 files (")
    assert made.stdout.rstrip().endswith("1 hourly file cut at the last complete gzip member "
                                         f"({source['torn']} B still being written left out)")

    target = tmp_path / "dst" / "config.toml"
    restored = mwdlogd("--config", str(target), "restore", str(out))
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout.startswith("restore: 13 files written (")
    expected = tree(tmp_path / "src")
    expected[f"logs/{LIVE_FILE}"] = source["complete"]
    assert tree(tmp_path / "dst") == expected
    assert out.stat().st_mode & 0o777 == 0o600  # it holds private keys and tokens
    key = tmp_path / "dst" / "certs" / "server.key"
    assert key.stat().st_mode & 0o777 == (tmp_path / "src/certs/server.key").stat().st_mode & 0o777

    again = mwdlogd("--config", str(target), "restore", str(out))  # all identical: no-op
    assert again.returncode == 0, again.stderr
    assert "restore: 0 files written (0 B), 13 already identical" in again.stdout


def test_config_and_certificates_only_by_default(tmp_path: Path) -> None:
    source = make_source(tmp_path / "src")
    out = tmp_path / "b.tar.gz"
    assert mwdlogd("--config", str(source["config"]), "backup", "--out", str(out)).returncode == 0
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert names == ["config/config.toml", "tls/0/ca.crt", "tls/0/ca.key", "tls/0/engine-01.crt",
                     "tls/0/engine-01.key", "tls/0/server.crt", "tls/0/server.key",
                     "MANIFEST.json"]
    refused = mwdlogd("--config", str(source["config"]), "backup", "--out", str(out))
    assert refused.returncode == 2 and f"{out} exists; use --force" in refused.stderr


def test_overwrite_refused_without_force(tmp_path: Path) -> None:
    source = make_source(tmp_path / "src")
    out = tmp_path / "b.tar.gz"
    assert mwdlogd("--config", str(source["config"]), "backup", "--out", str(out),
                   "--logs").returncode == 0
    target = tmp_path / "dst" / "config.toml"
    changed = tmp_path / "dst" / "logs" / HOUR_FILE
    changed.parent.mkdir(parents=True)
    changed.write_bytes(b"newer local data")
    refused = mwdlogd("--config", str(target), "restore", str(out))
    assert refused.returncode == 2
    assert f"existing files differ from the backup (1): {changed}; use --force" in refused.stderr
    assert tree(tmp_path / "dst") == {f"logs/{HOUR_FILE}": b"newer local data"}

    forced = mwdlogd("--config", str(target), "restore", str(out), "--force")
    assert forced.returncode == 0, forced.stderr
    assert changed.read_bytes() == source["files"][f"logs/{HOUR_FILE}"]


def hostile(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> None:
    """A backup whose manifest is right but which holds `member`."""
    body = json.dumps({"format": "mwdlogd-backup 1", "tls_dirs": {}, "files": {}}).encode()
    with tarfile.open(path, "w:gz") as tar:
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
        info = tarfile.TarInfo("MANIFEST.json")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize(("member", "reason"), [
    (_member("/etc/cron.d/evil"), "it has an absolute path"),
    (_member("logs/../../evil"), "it has '..' in its path"),
    (_member("logs/a/../../../evil"), "it has '..' in its path"),
    (_member("logs/link", tarfile.SYMTYPE, "/etc/passwd"), "it is a symbolic link"),
    (_member("logs/hard", tarfile.LNKTYPE, "config/config.toml"), "it is a hard link"),
    (_member("logs/tty", tarfile.CHRTYPE), "it is a device file"),
    (_member("logs/fifo", tarfile.FIFOTYPE), "it is a named pipe (FIFO)"),
    (_member("etc/passwd"), "it is not under config/, tls/, logs/ or buffer/"),
])
def test_hostile_archives_are_refused_naming_the_member(tmp_path: Path, member: tarfile.TarInfo,
                                                        reason: str) -> None:
    archive = tmp_path / "evil.tar.gz"
    hostile(archive, member, b"owned\n")
    target = tmp_path / "dst" / "config.toml"
    result = mwdlogd("--config", str(target), "restore", str(archive), "--force")
    assert result.returncode == 2
    assert f"refused member {member.name!r}: {reason}; nothing was restored" in result.stderr
    assert not (tmp_path / "dst").exists()
    assert not (tmp_path / "evil").exists()


def test_a_member_given_twice_is_refused(tmp_path: Path) -> None:
    name = f"logs/{HOUR_FILE}"
    good = members('{"a":1}')
    body = json.dumps({"format": "mwdlogd-backup 1", "tls_dirs": {}, "files": {
        name: {"size": len(good), "sha256": hashlib.sha256(good).hexdigest()}}}).encode()
    archive = tmp_path / "twice.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for data in (b"read first, restored first", good):  # the manifest matches the last
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("MANIFEST.json")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    result = mwdlogd("--config", str(tmp_path / "dst" / "config.toml"), "restore", str(archive))
    assert result.returncode == 2
    assert f"refused member {name!r}: it appears twice" in result.stderr
    assert not (tmp_path / "dst").exists()


def test_a_member_that_fails_its_checksum_is_refused(tmp_path: Path) -> None:
    source = make_source(tmp_path / "src")
    good = tmp_path / "b.tar.gz"
    assert mwdlogd("--config", str(source["config"]), "backup", "--out", str(good),
                   "--logs").returncode == 0
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(good) as src, tarfile.open(bad, "w:gz") as dst:
        for member in src:
            data = src.extractfile(member)
            content = data.read() if data else b""
            if member.name == f"logs/{HOUR_FILE}":
                content = content[:-1] + bytes([content[-1] ^ 1])
            dst.addfile(member, io.BytesIO(content))
    result = mwdlogd("--config", str(tmp_path / "dst" / "config.toml"), "restore", str(bad))
    assert result.returncode == 2
    assert f"member 'logs/{HOUR_FILE}' fails its checksum" in result.stderr
    assert not (tmp_path / "dst").exists()


def test_live_backup_restores_every_record_once_and_refuses_the_live_files(
        tmp_path: Path, pki: Path) -> None:
    raw = config_raw(tmp_path, pki, health={"bind": "127.0.0.1", "port": free_port()},
                     storage={"root": "logs"}, buffer={"path": "buffer"})  # beside the config
    config = write_config(tmp_path / "config.toml", raw)
    sent = (engine_records(30, time=time.time() - 7200)
            + engine_records(20, start=30, customer="beta"))
    server = ServerProcess(config)
    try:
        context = client_context(pki)
        for batch in (sent[:30], sent[30:]):
            reply = trio.run(post, server.addresses["http"], context, "/nginx.access",
                             ndjson(batch))
            assert reply.status == 200
        mark = len(server.lines)
        server.signal(signal.SIGUSR1)
        server.wait_for("flush_done", start=mark)

        out = tmp_path / "live.tar.gz"
        made = mwdlogd("--config", str(config), "backup", "--out", str(out), "--logs",
                       "--buffer")
        assert made.returncode == 0, made.stderr
        assert "the server is running" in made.stderr
        refused = mwdlogd("--config", str(config), "restore", str(out), "--force")
        assert refused.returncode == 2
        lock = tmp_path / "buffer" / ".lock"  # the server holds it (storage/lock.py)
        assert ("refusing to restore logs/buffer into a running server "
                f"({lock} is locked by a running server)") in refused.stderr
        # the same config elsewhere (same ports, other files) is not that server's buffer
        copy = tmp_path / "copy" / "config.toml"
        copied = mwdlogd("--config", str(copy), "restore", str(out))
        assert copied.returncode == 0, copied.stderr
    finally:
        server.stop()
    expected = sorted(r["id"] for r in sent)
    assert sorted(i for ids in ids_by_file(tmp_path / "copy" / "logs").values()
                  for i in ids) == expected
    restored = ServerProcess(copy)  # its recovery finds nothing missing, writes nothing twice
    try:
        restored.wait_for("recovered .*batches_replayed=0")
    finally:
        restored.signal(signal.SIGTERM)
        assert restored.wait() == 0
    assert sorted(i for ids in ids_by_file(tmp_path / "copy" / "logs").values()
                  for i in ids) == expected


def test_restore_refuses_a_locked_buffer(tmp_path: Path) -> None:
    source = make_source(tmp_path / "src")
    out = tmp_path / "b.tar.gz"
    assert mwdlogd("--config", str(source["config"]), "backup", "--out", str(out),
                   "--buffer").returncode == 0
    lock = tmp_path / "src" / "buffer" / ".lock"
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # what a running server holds on its buffer
        refused = mwdlogd("--config", str(source["config"]), "restore", str(out), "--force")
    assert refused.returncode == 2
    assert f"{lock} is locked by a running server" in refused.stderr


def test_complete_gzip_length_stops_at_the_last_whole_member() -> None:
    whole = members(*(f'{{"n":{i}}}' for i in range(50)))
    cuts = [0, 1, 10, len(whole) // 2, len(whole) - 1]
    boundaries = [0]
    for i in range(50):
        boundaries.append(boundaries[-1] + len(gzip.compress(f'{{"n":{i}}}\n'.encode())))
    for cut in cuts:
        expected = max(b for b in boundaries if b <= cut)
        assert complete_gzip_length(io.BytesIO(whole), cut) == expected  # size taken earlier
        assert complete_gzip_length(io.BytesIO(whole[:cut]), len(whole)) == expected
    assert complete_gzip_length(io.BytesIO(whole), len(whole)) == len(whole)
    corrupt = bytearray(whole)
    corrupt[boundaries[3] - 6] ^= 0xFF  # CRC of the third member wrong
    assert complete_gzip_length(io.BytesIO(bytes(corrupt)), len(whole)) == boundaries[2]


def test_restore_does_not_follow_a_symlink_on_disk_out_of_its_target(tmp_path: Path) -> None:
    source = make_source(tmp_path / "src")
    out = tmp_path / "b.tar.gz"
    assert mwdlogd("--config", str(source["config"]), "backup", "--out", str(out),
                   "--logs").returncode == 0
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "dst" / "logs").mkdir(parents=True)
    (tmp_path / "dst" / "logs" / "acme").symlink_to(outside)
    result = mwdlogd("--config", str(tmp_path / "dst" / "config.toml"), "restore", str(out))
    assert result.returncode == 2
    assert "leads outside" in result.stderr and "(a symlink on disk?); refused" in result.stderr
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "dst" / "config.toml").exists()


def test_a_pending_append_in_a_copied_ledger_state_does_not_cut_the_restored_file(
        tmp_path: Path) -> None:
    """The state is copied while an append is pending (size S); the hourly file, copied
    later, already holds that member and more. Restored, the file must keep them all."""
    from mwdlogd.storage.ledger import Ledger

    source = make_source(tmp_path / "src")
    base = tmp_path / "src"
    relpath = HOUR_FILE
    with Ledger(base / "buffer" / "ledger").hold(str(base / "logs"), relpath) as held:
        assert held is not None
        held.begin((base / "logs" / relpath).stat().st_size)  # a flush dies here
    (base / "logs" / relpath).write_bytes(members('{"a":1}', '{"a":2}', '{"a":3}'))
    out = tmp_path / "b.tar.gz"
    made = mwdlogd("--config", str(source["config"]), "backup", "--out", str(out), "--logs",
                   "--buffer")
    assert made.returncode == 0, made.stderr
    target = tmp_path / "dst" / "config.toml"
    restored = mwdlogd("--config", str(target), "restore", str(out))
    assert restored.returncode == 0, restored.stderr
    restored_file = tmp_path / "dst" / "logs" / relpath
    with Ledger(tmp_path / "dst" / "buffer" / "ledger").hold(
            str(tmp_path / "dst" / "logs"), relpath, create=False) as held:
        assert held is not None and held.state.pending is None
    assert gzip.decompress(restored_file.read_bytes()).splitlines() == [
        b'{"a":1}', b'{"a":2}', b'{"a":3}']

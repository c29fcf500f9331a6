"""`mwdlogd archive` against a real S3 API: moto's server on a loopback port, boto3 over
HTTP. Files are made with *fresh* mtimes and old hours in their paths: the age that
counts is the path's hour."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import pty
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mwdlogd.errors import ArchiveBusy
from mwdlogd.ops.archive import (
    MANIFEST_NAME,
    Archiver,
    Digest,
    Manifest,
    S3Store,
    Settings,
    hour_of,
    is_due,
    object_key,
    object_problem,
)
from mwdlogd.storage.ledger import Ledger

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

DAY = 86400
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


class S3:
    """moto's S3 server in this process, on a port of its choosing, and a client for it."""

    def __init__(self) -> None:
        self.server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0,
                                                     verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        self.client = boto3.client("s3", endpoint_url=self.url, **_boto_credentials())

    def objects(self, bucket: str) -> dict[str, bytes]:
        listed = self.client.list_objects_v2(Bucket=bucket).get("Contents", [])
        return {item["Key"]: self.read(bucket, item["Key"]) for item in listed}

    def read(self, bucket: str, key: str) -> bytes:
        """An object's bytes; GLACIER objects are restored first, as an operator would."""
        if self.client.head_object(Bucket=bucket, Key=key).get("StorageClass") == "GLACIER":
            self.client.restore_object(Bucket=bucket, Key=key, RestoreRequest={"Days": 1})
        return bytes(self.client.get_object(Bucket=bucket, Key=key)["Body"].read())

    def stop(self) -> None:
        self.server.stop()


def _boto_credentials() -> dict[str, str]:
    return {"aws_access_key_id": "testing", "aws_secret_access_key": "testing",
            "region_name": "us-east-1"}


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3]:
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    server = S3()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def bucket(s3: S3, request: pytest.FixtureRequest) -> str:
    """A fresh bucket per test (moto's state lives as long as the test process)."""
    name = "mwdlogd-" + request.node.name.replace("_", "-").lower()[:40]
    s3.client.create_bucket(Bucket=name)
    return name


def hour_start(hours_ago: float, now: float | None = None) -> int:
    now = time.time() if now is None else now
    return int((now - hours_ago * 3600) // 3600 * 3600)


def hour_rel(stream: str, start: int) -> str:
    return f"{stream}/{time.strftime('%Y/%m/%d/%H', time.gmtime(start))}.log.gz"


def make_file(root: Path, rel: str, text: str) -> bytes:
    """An hourly file of two gzip members, written now (fresh mtime)."""
    data = b"".join(gzip.compress(f'{{"n":{i},"text":"{text}"}}\n'.encode()) for i in range(2))
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def write_config(tmp_path: Path) -> Path:
    """storage.root and buffer.path as a server leaves them (deletes take its append locks)."""
    (tmp_path / "logs").mkdir(exist_ok=True)
    (tmp_path / "buffer" / "ledger").mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.toml"
    path.write_text('[storage]\nroot = "logs"\n[buffer]\npath = "buffer"\n')
    return path


def run_archive(config: Path, s3: S3, bucket: str, *args: str,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, **CREDENTIALS, "S3_BUCKET": bucket, "S3_ENDPOINT_URL": s3.url,
               **(env or {})}
    return subprocess.run([sys.executable, "-m", "mwdlogd", "--config", str(config), "archive",
                           *args], env=environ, capture_output=True, text=True, timeout=120,
                          check=False)


def in_scan_order(rels: Iterable[str]) -> list[str]:
    return sorted(rels, key=lambda rel: rel.split("/"))


def manifest_events(root: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (root / MANIFEST_NAME).read_text().splitlines()]


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Any]:
    """Files of every age and stream: 100 days (archive + delete), 40 days (archive only),
    5 days (neither), the current hour, in customer, _invalid and _unmatched trees."""
    root = tmp_path / "logs"
    files = {
        "old": hour_rel("acme/nginx/www.acme.com", hour_start(100 * 24)),
        "old_invalid": hour_rel("_invalid", hour_start(100 * 24 + 5)),
        "month": hour_rel("acme/openappsec/www.acme.com", hour_start(40 * 24)),
        "month_unmatched": hour_rel("_unmatched", hour_start(40 * 24 + 1)),
        "recent": hour_rel("acme/nginx/www.acme.com", hour_start(5 * 24)),
        "current": hour_rel("acme/nginx/www.acme.com", hour_start(0)),
    }
    config = write_config(tmp_path)
    data = {name: make_file(root, rel, name) for name, rel in files.items()}
    return {"config": config, "root": root, "files": files, "data": data}


def test_normal_run_uploads_due_hours_and_deletes_only_verified_old_ones(
        s3: S3, bucket: str, tree: dict[str, Any]) -> None:
    files, data, root = tree["files"], tree["data"], tree["root"]
    result = run_archive(tree["config"], s3, bucket)
    assert result.returncode == 0, result.stderr
    archived = ("old", "old_invalid", "month", "month_unmatched")
    total = sum(len(data[n]) for n in archived)
    assert result.stdout.splitlines() == [
        f"archive: uploaded 4 files ({total} B), skipped 0 already archived, failed 0, "
        "deleted 2, 2 not due yet"]
    assert s3.objects(bucket) == {f"archive/{files[n]}": data[n] for n in archived}
    for name in archived:
        head = s3.client.head_object(Bucket=bucket, Key=f"archive/{files[name]}")
        assert head["StorageClass"] == "GLACIER"
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.log.gz")) == sorted(
        files[n] for n in ("month", "month_unmatched", "recent", "current"))
    assert not (root / files["old"]).parent.exists()  # emptied directories are pruned
    ledger = tree["config"].parent / "buffer" / "ledger"
    assert (ledger / (files["old"] + ".state")).exists()  # deleted under the append lock
    events = manifest_events(root)
    assert [(e["event"], e["path"]) for e in events] == (
        [("upload", rel) for rel in in_scan_order(files[n] for n in archived)]
        + [("deleted", rel) for rel in in_scan_order([files["old"], files["old_invalid"]])])


def test_rerun_uploads_nothing_twice(s3: S3, bucket: str, tree: dict[str, Any]) -> None:
    assert run_archive(tree["config"], s3, bucket).returncode == 0
    before = manifest_events(tree["root"])
    modified = {k: s3.client.head_object(Bucket=bucket, Key=k)["ETag"] for k in s3.objects(bucket)}
    again = run_archive(tree["config"], s3, bucket)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[-1] == (
        "archive: uploaded 0 files (0 B), skipped 2 already archived, failed 0, deleted 0, "
        "2 not due yet")
    assert manifest_events(tree["root"]) == before
    assert {k: s3.client.head_object(Bucket=bucket, Key=k)["ETag"]
            for k in s3.objects(bucket)} == modified


def test_flags_override_environment_storage_class_and_prefix(
        s3: S3, bucket: str, tree: dict[str, Any]) -> None:
    result = run_archive(tree["config"], s3, bucket, "--storage-class", "STANDARD_IA",
                         "--prefix", "site-a/", "--archive-days", "50", "--delete-days", "200",
                         env={"S3_STORAGE_CLASS": "DEEP_ARCHIVE", "S3_PREFIX": "nope"})
    assert result.returncode == 0, result.stderr
    files = tree["files"]
    keys = {f"site-a/{files[n]}" for n in ("old", "old_invalid")}
    assert set(s3.objects(bucket)) == keys
    for key in keys:
        assert s3.client.head_object(Bucket=bucket, Key=key)["StorageClass"] == "STANDARD_IA"
    assert (tree["root"] / files["old"]).exists()  # 100 days < DELETE_DAYS 200


def test_dry_run_changes_nothing(s3: S3, bucket: str, tree: dict[str, Any]) -> None:
    files, root = tree["files"], tree["root"]
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    result = run_archive(tree["config"], s3, bucket, "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    uploads = in_scan_order(files[n] for n in ("old", "month", "old_invalid", "month_unmatched"))
    assert [ln.split(" (")[0] for ln in lines[:-1]] == [
        *(f"would upload {rel} -> s3://{bucket}/archive/{rel}" for rel in uploads),
        *(f"would delete {rel}" for rel in in_scan_order([files["old"], files["old_invalid"]]))]
    assert lines[-1].startswith("archive: would upload 4 files")
    assert lines[-1].endswith("failed 0, would delete 2, 2 not due yet")
    assert s3.objects(bucket) == {}
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    assert not (root / MANIFEST_NAME).exists()


def test_current_and_just_closed_hours_are_never_touched(
        s3: S3, bucket: str, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    root = tmp_path / "logs"
    rels = {ago: hour_rel("acme/nginx/a.example", hour_start(ago)) for ago in (0, 1, 3)}
    for ago, rel in rels.items():
        make_file(root, rel, str(ago))
    result = run_archive(config, s3, bucket, "--archive-days", "0", "--delete-days", "0")
    assert result.returncode == 0, result.stderr
    # the hour that ended under an hour ago may still be flushed: kept like the current one
    assert set(s3.objects(bucket)) == {f"archive/{rels[3]}"}
    assert (root / rels[0]).exists() and (root / rels[1]).exists()
    assert not (root / rels[3]).exists()


def test_altered_object_fails_verification_and_is_kept_then_repaired(
        s3: S3, bucket: str, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    root = tmp_path / "logs"
    rel = hour_rel("acme/nginx/www.acme.com", hour_start(60 * 24))
    data = make_file(root, rel, "precious")
    assert run_archive(config, s3, bucket).returncode == 0
    key = f"archive/{rel}"
    s3.client.put_object(Bucket=bucket, Key=key, Body=data[:-1] + b"X")  # same size

    result = run_archive(config, s3, bucket, "--delete-days", "50")
    assert result.returncode == 1
    assert "archive_failed" in result.stderr and "ETag" in result.stderr
    assert result.stdout.splitlines()[-1].endswith("failed 1, deleted 0, 0 not due yet")
    assert (root / rel).read_bytes() == data

    repaired = run_archive(config, s3, bucket, "--delete-days", "50")
    assert repaired.returncode == 0, repaired.stderr
    assert repaired.stdout.splitlines()[-1].startswith("archive: uploaded 1 file ")
    assert s3.objects(bucket) == {key: data}
    assert not (root / rel).exists()


def test_store_stopped_mid_run_deletes_nothing_and_a_rerun_completes(
        s3: S3, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_config(tmp_path)
    root = tmp_path / "logs"
    data = {hour_rel(f"c{i}/nginx/s.example", hour_start(100 * 24)): b"" for i in range(6)}
    for rel in data:
        data[rel] = make_file(root, rel, rel)
    settings = Settings(bucket=bucket, endpoint_url=s3.url, jobs=1)  # "after two": in order

    class StopsAfterTwo(S3Store):
        """The real store; the real server goes away before the third upload."""
        puts = 0

        def put(self, *args: Any, **kwargs: Any) -> None:
            StopsAfterTwo.puts += 1
            if StopsAfterTwo.puts == 3:
                s3.stop()
            super().put(*args, **kwargs)

    manifest = Manifest(root / MANIFEST_NAME, writable=True)
    archiver = Archiver(root, tmp_path / "buffer" / "ledger", settings, StopsAfterTwo(settings),
                        manifest, now=time.time(), out=io.StringIO(), err=io.StringIO())
    summary = archiver.run()
    manifest.close()
    assert (summary.uploaded, summary.failed, summary.deleted) == (2, 4, 0)
    assert {rel: (root / rel).read_bytes() for rel in data} == data  # nothing deleted

    restarted = S3()  # same in-process moto state, new port
    try:
        result = run_archive(config, restarted, bucket)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[-1].startswith(
            "archive: uploaded 4 files")
        assert "skipped 2 already archived, failed 0, deleted 6" in result.stdout
        assert restarted.objects(bucket) == {f"archive/{rel}": d for rel, d in data.items()}
        assert list(root.rglob("*.log.gz")) == []
    finally:
        restarted.stop()


def test_parallel_uploads_keep_the_manifest_in_file_order(
        s3: S3, bucket: str, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    root = tmp_path / "logs"
    data = {hour_rel(f"c{i:02d}/openappsec/s.example", hour_start(35 * 24 + i)): b""
            for i in range(24)}
    for rel in data:
        data[rel] = make_file(root, rel, rel)
    result = run_archive(config, s3, bucket, "--jobs", "8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith("archive: uploaded 24 files")
    assert s3.objects(bucket) == {f"archive/{rel}": d for rel, d in data.items()}
    assert [e["path"] for e in manifest_events(root)] == in_scan_order(data)


def test_a_file_recreated_after_deletion_gets_a_new_key(
        s3: S3, bucket: str, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    root = tmp_path / "logs"
    rel = hour_rel("acme/nginx/www.acme.com", hour_start(100 * 24))
    first = make_file(root, rel, "first")
    assert run_archive(config, s3, bucket).returncode == 0
    late = make_file(root, rel, "late record")  # a late record for that old hour
    assert run_archive(config, s3, bucket).returncode == 0
    stem = f"archive/{rel.removesuffix('.log.gz')}"
    assert s3.objects(bucket) == {f"{stem}.log.gz": first, f"{stem}.1.log.gz": late}


@pytest.mark.parametrize(("args", "env", "message"), [
    ((), {"S3_BUCKET": ""}, "--bucket / S3_BUCKET: required"),
    (("--archive-days", "40", "--delete-days", "30"), {}, "is less than ARCHIVE_DAYS 40"),
    (("--archive-days", "soon"), {}, "ARCHIVE_DAYS: expected a number of days, got 'soon'"),
    (("--storage-class", "COLD"), {}, "'COLD' is not one of STANDARD"),
    ((), {"ARCHIVE_JOBS": "0"}, "--jobs / ARCHIVE_JOBS: expected 1..64 uploads at once, got '0'"),
    (("--bucket", "no-such-bucket"), {}, "404 Not Found (no such bucket)"),
])
def test_bad_settings_exit_2_naming_the_setting(s3: S3, bucket: str, tree: dict[str, Any],
                                                args: tuple[str, ...], env: dict[str, str],
                                                message: str) -> None:
    result = run_archive(tree["config"], s3, bucket, *args, env=env)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert s3.objects(bucket) == {}


def test_unreachable_store_exits_1_and_deletes_nothing(tree: dict[str, Any], s3: S3,
                                                       bucket: str) -> None:
    s3.stop()
    result = run_archive(tree["config"], s3, bucket)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f'archive: stopped before any upload or deletion: bucket s3://{bucket}: Could not '
        f'connect to the endpoint URL: "{s3.url}/{bucket}"']
    assert all((tree["root"] / rel).exists() for rel in tree["files"].values())


def test_rules_hour_from_path_due_and_keys() -> None:
    assert hour_of("acme/nginx/a.b/2026/01/31/23.log.gz") == 1769900400
    assert hour_of("_invalid/2026/13/01/00.log.gz") is None
    assert hour_of("acme/nginx/a.b/2026/01/31/notes.txt") is None
    now = 1769900400 + 3600 + 30 * DAY
    assert is_due(1769900400, 30, now)
    assert not is_due(1769900400, 30, now - 1)
    assert not is_due(int(now) - 1800, 0, now)  # 0 days still leaves recent hours alone
    assert object_key("archive", "x/2026/01/31/23.log.gz", 0) == "archive/x/2026/01/31/23.log.gz"
    assert object_key("", "x/2026/01/31/23.log.gz", 2) == "x/2026/01/31/23.2.log.gz"


def test_object_problem_checks_size_sha256_and_md5_etag() -> None:
    digest = Digest(5, "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae",
                    "acbd18db4cc2f85cedef654fccc4a4d8")
    good = {"ContentLength": 5, "ETag": '"acbd18db4cc2f85cedef654fccc4a4d8"',
            "ChecksumSHA256": digest.sha256_b64}
    assert object_problem(good, digest) is None
    assert "size 6" in str(object_problem({**good, "ContentLength": 6}, digest))
    assert "ETag" in str(object_problem({**good, "ETag": '"' + "0" * 32 + '"'}, digest))
    assert "ChecksumSHA256" in str(object_problem({**good, "ChecksumSHA256": "AAAA"}, digest))
    assert object_problem({"ContentLength": 5, "ETag": '"abc-2"'}, digest) == (
        "the store returned neither ChecksumSHA256 nor an MD5 ETag")


def test_manifest_survives_a_torn_last_line_and_refuses_a_second_run(tmp_path: Path) -> None:
    path = tmp_path / MANIFEST_NAME
    upload = {"event": "upload", "path": "a/2026/01/01/00.log.gz", "bucket": "b",
              "key": "archive/a/2026/01/01/00.log.gz", "size": 3, "sha256": "00", "md5": "11",
              "storage_class": "GLACIER", "mtime_ns": 5}
    path.write_text(json.dumps(upload) + "\n" + '{"event": "upload", "path": "b/20')
    manifest = Manifest(path, writable=True)
    with pytest.raises(ArchiveBusy, match="another `mwdlogd archive` holds"):
        Manifest(path, writable=True)
    manifest.record("deleted", path=upload["path"], bucket="b", key=upload["key"])
    manifest.close()
    reread = Manifest(path, writable=False)
    assert reread.current == {}
    assert reread.generations == {(upload["path"], "b"): 1}
    assert path.read_text().count("\n") == 3


def test_progress_bar_on_a_terminal_only(s3: S3, bucket: str, tree: dict[str, Any]) -> None:
    """stderr on a real pseudo-terminal gets the bar; a pipe (cron) gets none."""
    leader, follower = pty.openpty()
    environ = {**os.environ, **CREDENTIALS, "S3_BUCKET": bucket, "S3_ENDPOINT_URL": s3.url}
    process = subprocess.Popen([sys.executable, "-m", "mwdlogd", "--config", str(tree["config"]),
                                "archive"], env=environ, stdout=subprocess.PIPE, stderr=follower)
    os.close(follower)
    drawn = b""
    with contextlib.suppress(OSError):  # EIO once the process has closed the terminal
        while chunk := os.read(leader, 4096):
            drawn += chunk
    os.close(leader)
    assert process.communicate(timeout=60)[0].decode().startswith("archive: uploaded 4 files")
    assert process.returncode == 0
    frames = [frame.split(b"\x1b[K")[0] for frame in drawn.split(b"\r") if frame.strip()]
    assert frames[0].startswith(b"[#######")
    assert b"] 1/4 uploaded " in frames[0]
    assert b"] 4/4 uploaded " in frames[-1]
    piped = run_archive(tree["config"], s3, bucket)
    assert "[#" not in piped.stderr and "uploaded" not in piped.stderr


def test_only_regular_files_are_archived(s3: S3, bucket: str, tmp_path: Path) -> None:
    """A FIFO or symlink named like an hourly file is not the server's: not read (a FIFO
    would block), not uploaded, not deleted."""
    config = write_config(tmp_path)
    root = tmp_path / "logs"
    old = hour_start(100 * 24)
    fifo = root / hour_rel("acme/nginx/a.example", old)
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    outside = tmp_path / "outside.log.gz"
    outside.write_bytes(gzip.compress(b"not the server's\n"))
    link = root / hour_rel("acme/nginx/b.example", old)
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    result = run_archive(config, s3, bucket)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith("archive: uploaded 0 files")
    assert s3.objects(bucket) == {}
    assert fifo.exists() and link.is_symlink() and outside.exists()


def test_upload_takes_the_append_lock_and_cuts_a_dead_appenders_tail(
        s3: S3, bucket: str, tmp_path: Path) -> None:
    """A flush that died mid-append left a pending mark in the ledger and half a member:
    the archive, like the server's next writer, cuts it back before reading the file."""
    config = write_config(tmp_path)
    root = tmp_path / "logs"
    rel = hour_rel("acme/nginx/www.acme.com", hour_start(40 * 24))
    clean = make_file(root, rel, "whole")
    with Ledger(tmp_path / "buffer" / "ledger").hold(str(root), rel) as held:
        assert held is not None
        held.begin(len(clean))  # "pending: size before", then the appender dies
        with open(root / rel, "ab") as file:
            file.write(gzip.compress(b'{"n":"torn"}\n')[:-5])
    result = run_archive(config, s3, bucket)
    assert result.returncode == 0, result.stderr
    assert "unfinished_append_cut" in result.stderr
    assert s3.objects(bucket) == {f"archive/{rel}": clean}
    assert (root / rel).read_bytes() == clean

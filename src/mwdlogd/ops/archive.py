"""`mwdlogd archive`: copy closed hourly files to S3, then delete old local ones whose copy
is verified.

The age of a file is its hour, read from its path (`.../YYYY/MM/DD/HH.log.gz`), never
its mtime: an hour is due for upload once it ended `archive_days` ago, and never before
it ended `CLOSED_AFTER_S` ago, so the hour being written is not touched whatever the
settings. Every upload is verified against the store (size, SHA-256 checksum, and the
ETag as MD5 for these single-part uploads) and recorded in the manifest
`{storage.root}/.archive-manifest.jsonl`; a local file is deleted only when its hour
ended `delete_days` ago, its bytes still match the recorded upload and the object in S3
still verifies. A run with any failure deletes nothing.

A file that changed after its upload (a late record appended to an old hour) is
uploaded again over the same key (appends only add bytes, so the new object holds the
old one). A file that reappears after its local copy was deleted goes to a new key
(`HH.1.log.gz`, `HH.2.log.gz`, ...) so it never replaces what was archived before.
"""

import argparse
import base64
import calendar
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import stat
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO

import attrs

from mwdlogd import log
from mwdlogd.config import Config
from mwdlogd.errors import ArchiveBusy, ConfigError, MwdlogdError, StoreError
from mwdlogd.ops.progress import Progress, human_bytes, plural
from mwdlogd.storage.files import fsync_dir
from mwdlogd.storage.ledger import Ledger

MANIFEST_NAME = ".archive-manifest.jsonl"
DAY_S = 86400
HOUR_S = 3600
# An hour is closed once timekey_wait (10 s by default) and the last flush are past; one
# hour more than that is a margin no sane config comes near.
CLOSED_AFTER_S = HOUR_S
HOUR_FILE = re.compile(r"(?:^|/)(\d{4})/(\d{2})/(\d{2})/(\d{2})\.log\.gz$")
STORAGE_CLASSES = ("STANDARD", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER",
                   "GLACIER_IR", "DEEP_ARCHIVE", "REDUCED_REDUNDANCY")
EXIT_OK, EXIT_FAILED = 0, 1
# HeadBucket's codes for a bucket that does not exist or is not ours: a setting to fix
BAD_BUCKET = {"404": "no such bucket", "NoSuchBucket": "no such bucket",
              "403": "access denied: check the credentials and the bucket policy",
              "AccessDenied": "access denied: check the credentials and the bucket policy",
              "400": "bad request: check the bucket name and region"}
READ_CHUNK = 1 << 20


class _NotAttempted(Exception):
    """An upload not started because the store became unreachable."""


@attrs.frozen
class Settings:
    bucket: str
    prefix: str = "archive"
    archive_days: float = 30.0
    delete_days: float = 90.0
    storage_class: str = "GLACIER"
    endpoint_url: str | None = None
    dry_run: bool = False
    jobs: int = 4


# flag, environment variable, default
OPTIONS = (("bucket", "S3_BUCKET", None), ("prefix", "S3_PREFIX", "archive"),
           ("archive_days", "ARCHIVE_DAYS", "30"), ("delete_days", "DELETE_DAYS", "90"),
           ("storage_class", "S3_STORAGE_CLASS", "GLACIER"),
           ("endpoint_url", "S3_ENDPOINT_URL", None), ("jobs", "ARCHIVE_JOBS", "4"))
MAX_JOBS = 64


def settings_from(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Flags override the environment, which overrides the defaults; raises ConfigError
    naming the flag and its variable."""
    values: dict[str, str | None] = {}
    for name, env, default in OPTIONS:
        flag = getattr(args, name, None)
        values[name] = flag if flag is not None else environ.get(env) or default
    if not values["bucket"]:
        raise ConfigError("--bucket / S3_BUCKET", "required: the bucket to archive into")
    days = {name: _days(values[name], name) for name in ("archive_days", "delete_days")}
    if days["delete_days"] < days["archive_days"]:
        raise ConfigError("--delete-days / DELETE_DAYS", f"{days['delete_days']:g} is less "
                          f"than ARCHIVE_DAYS {days['archive_days']:g}: files would be deleted "
                          "before they are archived")
    storage_class = (values["storage_class"] or "").upper()
    if storage_class not in STORAGE_CLASSES:
        raise ConfigError("--storage-class / S3_STORAGE_CLASS",
                          f"{values['storage_class']!r} is not one of {', '.join(STORAGE_CLASSES)}")
    return Settings(bucket=str(values["bucket"]), prefix=(values["prefix"] or "").strip("/"),
                    archive_days=days["archive_days"], delete_days=days["delete_days"],
                    storage_class=storage_class, endpoint_url=values["endpoint_url"] or None,
                    dry_run=bool(args.dry_run), jobs=_jobs(values["jobs"]))


def _jobs(text: str | None) -> int:
    try:
        jobs = int(text or "")
    except ValueError:
        jobs = 0
    if not 1 <= jobs <= MAX_JOBS:
        raise ConfigError("--jobs / ARCHIVE_JOBS", f"expected 1..{MAX_JOBS} uploads at once, "
                          f"got {text!r}")
    return jobs


def _days(text: str | None, name: str) -> float:
    env = next(env for option, env, _ in OPTIONS if option == name)
    key = f"--{name.replace('_', '-')} / {env}"
    try:
        value = float(text or "")
    except ValueError:
        raise ConfigError(key, f"expected a number of days, got {text!r}") from None
    if value < 0:
        raise ConfigError(key, f"must be 0 or more, got {value:g}")
    return value


# --- which files, and when -------------------------------------------------------------


@attrs.frozen
class HourFile:
    relpath: str  # under storage.root, with "/"
    hour_start: int  # epoch seconds, from the path


def hour_of(relpath: str) -> int | None:
    """Start of the UTC hour named by an hourly file's path, None for any other file."""
    match = HOUR_FILE.search(relpath)
    if not match:
        return None
    year, month, day, hour = (int(part) for part in match.groups())
    try:
        return calendar.timegm((year, month, day, hour, 0, 0, 0, 0, 0))
    except (ValueError, OverflowError):
        return None


def scan(root: Path) -> list[HourFile]:
    """Every hourly file under `root`, `_invalid` and `_unmatched` included, sorted. Only
    regular files: the server makes no links, FIFOs or hidden entries (the manifest)."""
    found: list[HourFile] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            relpath = os.path.relpath(path, root).replace(os.sep, "/")
            hour = hour_of(relpath)
            if hour is not None and not name.startswith(".") and _regular(path):
                found.append(HourFile(relpath, hour))
    return found


def _regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def is_due(hour_start: int, days: float, now: float) -> bool:
    """The hour ended `days` ago and is closed, whatever `days` is."""
    end = hour_start + HOUR_S
    return end <= now - days * DAY_S and end <= now - CLOSED_AFTER_S


def object_key(prefix: str, relpath: str, generation: int) -> str:
    """Same relative layout under the prefix; a file recreated after its deletion gets a
    new name so it never replaces the archived one."""
    key = f"{prefix}/{relpath}" if prefix else relpath
    if generation:
        key = f"{key.removesuffix('.log.gz')}.{generation}.log.gz"
    return key


@attrs.frozen
class Digest:
    size: int
    sha256: str  # hex
    md5: str  # hex

    @property
    def sha256_b64(self) -> str:
        return base64.b64encode(bytes.fromhex(self.sha256)).decode()


def digest_file(path: Path) -> Digest:
    sha, md5, size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
    with open(path, "rb") as file:
        while chunk := file.read(READ_CHUNK):
            sha.update(chunk)
            md5.update(chunk)
            size += len(chunk)
    return Digest(size, sha.hexdigest(), md5.hexdigest())


# --- the manifest ----------------------------------------------------------------------


@attrs.frozen
class Upload:
    path: str
    bucket: str
    key: str
    size: int
    sha256: str
    md5: str
    storage_class: str
    mtime_ns: int = 0  # of the local file when it was hashed: unchanged files are not re-read

    @property
    def digest(self) -> Digest:
        return Digest(self.size, self.sha256, self.md5)


class Manifest:
    """JSON lines, appended and fsynced one event at a time: `upload` (verified),
    `deleted` (local file removed after its upload verified again) and `invalid` (the
    object no longer matches; the next run uploads again). The last event per (path,
    bucket) wins. The file is flocked for the whole run: two runs cannot interleave."""

    def __init__(self, path: Path, *, writable: bool) -> None:
        self.path = path
        self.current: dict[tuple[str, str], Upload] = {}
        self.generations: dict[tuple[str, str], int] = {}
        self._fd = -1
        if writable:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._fd)
                raise ArchiveBusy(f"another `mwdlogd archive` holds {path}; "
                                  "wait for it to finish") from None
            size = os.fstat(self._fd).st_size
            if size and os.pread(self._fd, 1, size - 1) != b"\n":  # torn by a crash
                os.write(self._fd, b"\n")
        if path.exists():
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    self._apply(line, number)

    def _apply(self, line: str, number: int) -> None:
        try:
            event = json.loads(line)
            ident = (event["path"], event["bucket"])
            if event["event"] == "upload":
                self.current[ident] = Upload(**{f.name: event[f.name]
                                                for f in attrs.fields(Upload) if f.name in event})
            elif event["event"] in ("deleted", "invalid"):
                self.current.pop(ident, None)
                if event["event"] == "deleted":
                    self.generations[ident] = self.generations.get(ident, 0) + 1
        except (ValueError, KeyError, TypeError) as exc:
            if not line.endswith("}"):  # the last line, torn by a crash mid-append
                return
            raise MwdlogdError(f"{self.path}:{number}: unreadable manifest line "
                               f"({exc!r}); fix or remove that line") from None

    def record(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, **fields,
                           "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        self._apply(line, 0)
        if self._fd >= 0:
            os.write(self._fd, (line + "\n").encode())
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# --- the store -------------------------------------------------------------------------


class S3Store:
    """put / verify one object over boto3; every botocore failure becomes a StoreError."""

    def __init__(self, settings: Settings) -> None:
        import boto3  # imported here: the server and other commands do not need it
        from botocore.config import Config as BotoConfig

        self.bucket = settings.bucket
        self._client = boto3.client(
            "s3", endpoint_url=settings.endpoint_url,
            config=BotoConfig(connect_timeout=10, read_timeout=120,
                              max_pool_connections=max(10, settings.jobs),
                              retries={"max_attempts": 3, "mode": "standard"}))

    @contextlib.contextmanager
    def _calls(self, what: str) -> Iterator[None]:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError,
            EndpointConnectionError,
            NoCredentialsError,
        )

        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "?"))
            raise StoreError(f"{what}: {code} {error.get('Message', '')}".strip(),
                             code=code) from exc
        except (EndpointConnectionError, ConnectionError, NoCredentialsError) as exc:
            raise StoreError(f"{what}: {exc}", unreachable=True) from exc
        except BotoCoreError as exc:
            raise StoreError(f"{what}: {exc}") from exc

    def check_bucket(self) -> None:
        with self._calls(f"bucket s3://{self.bucket}"):
            self._client.head_bucket(Bucket=self.bucket)

    def put(self, path: Path, key: str, digest: Digest, storage_class: str) -> None:
        """Upload with the SHA-256 S3 checks on receipt (a body altered on the way or a
        file that grew since it was hashed is refused)."""
        with self._calls(f"upload s3://{self.bucket}/{key}"), open(path, "rb") as body:
            self._client.put_object(
                Bucket=self.bucket, Key=key, Body=body, ContentLength=digest.size,
                ChecksumAlgorithm="SHA256", ChecksumSHA256=digest.sha256_b64,
                StorageClass=storage_class, ContentType="application/gzip",
                Metadata={"sha256": digest.sha256})

    def verify(self, key: str, digest: Digest) -> str | None:
        """What differs between the stored object and `digest`, None when it matches."""
        with self._calls(f"check s3://{self.bucket}/{key}"):
            head = self._client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        return object_problem(head, digest)


def object_problem(head: Mapping[str, Any], digest: Digest) -> str | None:
    """Compare a HeadObject answer with the local bytes: size, then every checksum the
    store gives (ChecksumSHA256; the ETag, which is the MD5 of a single-part upload
    without KMS). None when all match; a store that gives neither cannot be verified."""
    if head.get("ContentLength") != digest.size:
        return f"size {head.get('ContentLength')} in S3, {digest.size} local"
    checked = False
    sha = head.get("ChecksumSHA256")
    if sha:
        if sha != digest.sha256_b64:
            return f"ChecksumSHA256 {sha} in S3, {digest.sha256_b64} local"
        checked = True
    etag = str(head.get("ETag", "")).strip('"')
    if re.fullmatch(r"[0-9a-f]{32}", etag):
        if etag != digest.md5:
            return f"ETag {etag} in S3, MD5 {digest.md5} local"
        checked = True
    return None if checked else "the store returned neither ChecksumSHA256 nor an MD5 ETag"


# --- one run ---------------------------------------------------------------------------


@attrs.define
class Summary:
    uploaded: int = 0
    bytes: int = 0
    skipped: int = 0  # due but already archived, unchanged
    not_due: int = 0
    failed: int = 0
    deleted: int = 0
    dry_run: bool = False

    def line(self) -> str:
        verb = "would upload" if self.dry_run else "uploaded"
        return (f"archive: {verb} {plural(self.uploaded, 'file')} ({human_bytes(self.bytes)}), "
                f"skipped {self.skipped} already archived, failed {self.failed}, "
                f"{'would delete' if self.dry_run else 'deleted'} {self.deleted}, "
                f"{self.not_due} not due yet")


class Archiver:
    """One archive run over `root`. `store` is an S3Store (or anything with its methods);
    `now` is injectable so tests choose the clock."""

    def __init__(self, root: Path, ledger_dir: Path, settings: Settings, store: S3Store,
                 manifest: Manifest, *, now: float, out: TextIO, err: TextIO) -> None:
        self.root = root
        self.ledger_dir = ledger_dir
        self.settings = settings
        self.store = store
        self.manifest = manifest
        self.now = now
        self.out = out
        self.err = err
        self.summary = Summary(dry_run=settings.dry_run)
        self._digests: dict[str, Digest] = {}
        self._mtimes: dict[str, int] = {}

    def run(self) -> Summary:
        files = scan(self.root)
        due = [f for f in files if is_due(f.hour_start, self.settings.archive_days, self.now)]
        self.summary.not_due = len(files) - len(due)
        self._upload_all(due)
        if self.summary.failed:
            log.event(logging.WARNING, "archive_deleting_nothing", failed=self.summary.failed,
                      detail="an upload or check failed; no local file is deleted this run")
        else:
            self._delete_all([f for f in due
                              if is_due(f.hour_start, self.settings.delete_days, self.now)])
        return self.summary

    def _ident(self, file: HourFile) -> tuple[str, str]:
        return (file.relpath, self.settings.bucket)

    def _digest(self, file: HourFile) -> Digest:
        if file.relpath not in self._digests:
            self._mtimes[file.relpath] = os.stat(self.root / file.relpath).st_mtime_ns
            self._digests[file.relpath] = digest_file(self.root / file.relpath)
        return self._digests[file.relpath]

    def _unchanged(self, file: HourFile, recorded: Upload) -> bool:
        """Same bytes as uploaded: same size and mtime as then, or else the same SHA-256."""
        stat = os.stat(self.root / file.relpath)
        if (stat.st_size, stat.st_mtime_ns) == (recorded.size, recorded.mtime_ns):
            return True
        return recorded.digest == self._digest(file)

    def _upload_all(self, due: list[HourFile]) -> None:
        todo = []
        for file in due:
            recorded = self.manifest.current.get(self._ident(file))
            try:
                unchanged = recorded is not None and self._unchanged(file, recorded)
            except OSError as exc:
                self._fail(file, f"cannot read: {exc}")
                continue
            if unchanged:
                self.summary.skipped += 1
            else:
                todo.append(file)
        progress = Progress(self.err, len(todo), "uploaded")
        unreachable = threading.Event()
        not_attempted = 0
        # Uploads run in worker threads; results are taken in file order, so the manifest,
        # the output and the progress bar read the same whatever finishes first.
        with ThreadPoolExecutor(max_workers=self.settings.jobs) as pool:
            futures = [pool.submit(self._send, file, unreachable) for file in todo]
            try:
                for file, future in zip(todo, futures, strict=True):
                    try:
                        digest, key = future.result()
                    except _NotAttempted:
                        not_attempted += 1
                        continue
                    except (MwdlogdError, OSError) as exc:  # StorageError from the ledger too
                        progress.interrupt()
                        self._fail(file, str(exc))
                        if isinstance(exc, StoreError) and exc.unreachable:
                            unreachable.set()
                        progress.step(0)
                        continue
                    self._record(file, digest, key)
                    progress.step(digest.size)
            finally:
                unreachable.set()  # on the way out for any reason: start nothing more
                progress.close()
        if not_attempted:
            self.summary.failed += not_attempted
            log.event(logging.ERROR, "archive_stopped", not_attempted=not_attempted,
                      detail="the store is unreachable; run again later")

    def _send(self, file: HourFile, unreachable: threading.Event) -> tuple[Digest, str]:
        """Worker thread: upload and verify one file (in a dry run, only hash it)."""
        if unreachable.is_set():
            raise _NotAttempted
        key = object_key(self.settings.prefix, file.relpath,
                         self.manifest.generations.get(self._ident(file), 0))
        if self.settings.dry_run:
            return self._digest(file), key
        with self._append_lock(file, create=False):  # a flush in progress finishes first
            self._digests.pop(file.relpath, None)  # hashed again under the lock
            digest = self._digest(file)
            self.store.put(self.root / file.relpath, key, digest, self.settings.storage_class)
            problem = self.store.verify(key, digest)
        if problem:
            raise StoreError(f"uploaded s3://{self.settings.bucket}/{key} does not verify: "
                             f"{problem}")
        return digest, key

    def _record(self, file: HourFile, digest: Digest, key: str) -> None:
        if self.settings.dry_run:
            print(f"would upload {file.relpath} -> s3://{self.settings.bucket}/{key} "
                  f"({human_bytes(digest.size)})", file=self.out)
        else:
            self.manifest.record("upload", **attrs.asdict(Upload(
                file.relpath, self.settings.bucket, key, digest.size, digest.sha256,
                digest.md5, self.settings.storage_class, self._mtimes[file.relpath])))
        self.summary.uploaded += 1
        self.summary.bytes += digest.size

    def _fail(self, file: HourFile, problem: str) -> None:
        self.summary.failed += 1
        log.event(logging.ERROR, "archive_failed", path=file.relpath, problem=problem)

    def _delete_all(self, due: list[HourFile]) -> None:
        for file in due:
            recorded = self.manifest.current.get(self._ident(file))
            if recorded is None:  # only in a dry run: the upload above was not made
                self._would_delete(file)
                continue
            try:
                problem = self.store.verify(recorded.key, recorded.digest)
            except StoreError as exc:
                self._fail(file, str(exc))
                if exc.unreachable:
                    return
                continue
            if problem:
                self._fail(file, f"s3://{recorded.bucket}/{recorded.key} no longer matches "
                           f"the recorded upload ({problem}); kept, uploaded again next run")
                if not self.settings.dry_run:
                    self.manifest.record("invalid", path=file.relpath, bucket=recorded.bucket,
                                         key=recorded.key, problem=problem)
                continue
            if self.settings.dry_run:
                self._would_delete(file)
                continue
            try:
                deleted = self._delete(file, recorded)
            except (OSError, MwdlogdError) as exc:  # StorageError from the append ledger
                self._fail(file, f"cannot delete: {exc}")
                continue
            self.summary.deleted += deleted

    def _would_delete(self, file: HourFile) -> None:
        print(f"would delete {file.relpath}", file=self.out)
        self.summary.deleted += 1

    def _delete(self, file: HourFile, recorded: Upload) -> bool:
        """Unlink under the file's append lock (so no flush appends to the unlinked file),
        after checking the bytes are still the ones uploaded."""
        path = self.root / file.relpath
        with self._append_lock(file, create=True):
            if digest_file(path) != recorded.digest:
                log.event(logging.WARNING, "archive_changed", path=file.relpath,
                          detail="appended to since its upload; uploaded again next run")
                return False
            path.unlink()
            fsync_dir(path.parent)
        self.manifest.record("deleted", path=file.relpath, bucket=recorded.bucket,
                             key=recorded.key)
        _prune_empty(path.parent, self.root)
        return True

    @contextlib.contextmanager
    def _append_lock(self, file: HourFile, *, create: bool) -> Iterator[None]:
        """Hold the file's append lock (the server's ledger flock). To delete, the state
        file is created if missing, so no appender can start; to upload, an existing one
        is enough (an append that starts anyway changes the bytes and fails the checks)."""
        if not self.ledger_dir.is_dir():  # no server has used this buffer: nothing appends
            yield
            return
        with Ledger(self.ledger_dir).hold(str(self.root), file.relpath, create=create):
            yield


def _prune_empty(directory: Path, root: Path) -> None:
    while directory != root and root in directory.parents:
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent


# --- command line ----------------------------------------------------------------------

HELP = """\
Uploads closed hourly files whose hour ended ARCHIVE_DAYS ago to
s3://S3_BUCKET/S3_PREFIX/{same path under storage.root}, verifies each object (size,
SHA-256, MD5 ETag) and records it in {storage.root}/.archive-manifest.jsonl. Then deletes
local files whose hour ended DELETE_DAYS ago, only if their recorded upload still
verifies, and only if nothing failed in this run. A file's age is the hour in its path.
_invalid/ and _unmatched/ are archived like every other tree. Running it again uploads
nothing twice. Flags override the environment. Credentials: the usual AWS variables or
files (AWS_ACCESS_KEY_ID, AWS_PROFILE, instance roles).
Exit status: 0 all done, 1 something failed (details on stderr), 2 bad settings."""


OPTION_HELP = {"bucket": "bucket to archive into", "prefix": "key prefix",
               "archive_days": "upload hours that ended this many days ago",
               "delete_days": "delete local hours that ended this many days ago, once their "
               "upload verifies", "storage_class": f"one of {', '.join(STORAGE_CLASSES)}",
               "endpoint_url": "S3-compatible store (MinIO, Ceph, ...); AWS when unset",
               "jobs": f"uploads at once, 1..{MAX_JOBS}"}


def add_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser("archive", parents=[common], help="upload old hourly files "
                                 "to S3 and delete archived ones past retention (cron)",
                                 description=HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, env, default in OPTIONS:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, metavar=env,
                            help=f"{OPTION_HELP[name]} (env {env}, default {default or 'none'})")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would be uploaded and deleted; change nothing")


def command(args: argparse.Namespace, config: Config) -> int:
    settings = settings_from(args, os.environ)
    root = Path(config.storage.root)
    if not root.is_dir():
        raise ConfigError("storage.root", f"not a directory: {root}")
    try:
        manifest = Manifest(root / MANIFEST_NAME, writable=not settings.dry_run)
    except ArchiveBusy as exc:
        print(f"mwdlogd: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        raise ConfigError("storage.root", f"cannot open the archive manifest "
                          f"{root / MANIFEST_NAME}: {exc.strerror}") \
            from None
    try:
        store = S3Store(settings)
        try:
            store.check_bucket()
        except StoreError as exc:
            if exc.code in BAD_BUCKET:
                raise ConfigError("--bucket / S3_BUCKET", f"{exc} ({BAD_BUCKET[exc.code]})") \
                    from None
            print(f"archive: stopped before any upload or deletion: {exc}")
            return EXIT_FAILED
        archiver = Archiver(root, Path(config.buffer.path) / "ledger", settings, store,
                            manifest, now=time.time(), out=sys.stdout, err=sys.stderr)
        summary = archiver.run()
    finally:
        manifest.close()
    print(summary.line())
    return EXIT_FAILED if summary.failed else EXIT_OK

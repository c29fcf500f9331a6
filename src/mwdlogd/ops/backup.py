"""`mwdlogd backup` / `mwdlogd restore`: config, certificates and optionally the logs tree
and the buffer as one tar.gz with a manifest of SHA-256 checksums.

Members: `config/config.toml` (the config file), `tls/N/NAME` (every file in the
directory of each configured TLS file), `logs/REL` (under storage.root), `buffer/REL`
(under buffer.path), and `MANIFEST.json` last (sizes, checksums, and which config key
each `tls/N` directory belongs to). Restore maps them back through the config it
restores (or the one it is given): relative paths land relative to the config file,
as the server would find them.

A backup of a running server is consistent file by file: an hourly file is copied up
to the end of its last complete gzip member (zlib checks each member's CRC and length),
so a member still being appended is left out rather than copied half; the journal,
ledger and chunk-id files carry their own checksummed framing, and the server's
recovery drops a torn tail of those. The buffer is copied before the logs: whatever is
in the copied journal but not yet in a file is then either replayed at restore or
already in the later copy of the file (at worst written twice, never lost). Ledger
states are copied without an unfinished append's "pending" mark: the hourly file's copy
already ends at a complete member, and cutting it back to the older size would drop
members appended after the state was copied. For an exact pair of buffer and logs, stop
the server first.
"""

import argparse
import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import socket
import sys
import tarfile
import time
import tomllib
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any

import attrs

from mwdlogd.config import (
    Config,
    apply_env_overrides,
    load_config,
    resolve_paths,
    structure_config,
    validate,
)
from mwdlogd.errors import BackupError, ConfigError
from mwdlogd.ops.progress import Progress, human_bytes, plural
from mwdlogd.storage import ledger
from mwdlogd.storage.files import storage_id

FORMAT = "mwdlogd-backup 1"
MANIFEST = "MANIFEST.json"
CONFIG_MEMBER = "config/config.toml"
TLS_KEYS = ("tls.cert", "tls.key", "tls.ca")
LOCK_NAME = ".lock"  # the running server's exclusive flock on its buffer directory
READ_CHUNK = 1 << 20
HEALTH_TIMEOUT_S = 2.0
OUT_LIMIT = 4 << 20  # bound on inflated bytes held while checking members
TAR_LEVEL = 1  # the logs are gzip already: level 1 saves CPU for a few % of size


# --- consistency of live files ---------------------------------------------------------


def complete_gzip_length(file: IO[bytes], size: int) -> int:
    """Bytes of the file's first `size` that end with its last complete gzip member: zlib
    checks each member's trailer (CRC-32 and length), so a member being appended, or
    a torn one, ends the count. Reads from the start; leaves the position anywhere."""
    good = 0
    pos = 0  # file offset of `data`
    inflater = zlib.decompressobj(31)
    file.seek(0)
    while pos < size and (data := file.read(min(READ_CHUNK, size - pos))):
        while data:
            try:
                inflater.decompress(data, OUT_LIMIT)
            except zlib.error:
                return good
            if inflater.eof:
                good = pos + len(data) - len(inflater.unused_data)
                data, pos = inflater.unused_data, good
                inflater = zlib.decompressobj(31)
            else:
                pos += len(data) - len(inflater.unconsumed_tail)
                data = inflater.unconsumed_tail
    return good


class _Hashing:
    """A reader that hashes what tarfile copies out of it."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self.sha256.update(data)
        return data


# --- backup ----------------------------------------------------------------------------


@attrs.frozen
class Source:
    member: str
    path: Path
    gzip_members: bool  # an hourly file: copy whole members only
    ledger_state: bool = False  # an append ledger state: copy it settled (without_pending)


def _tree(prefix: str, root: Path, *, skip: frozenset[Path]) -> Iterator[Source]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path in skip or not path.is_file() or path.is_symlink():
                continue
            rel = path.relative_to(root).as_posix()
            yield Source(f"{prefix}/{rel}", path, name.endswith(".log.gz"),
                         prefix == "buffer" and rel.startswith("ledger/")
                         and name.endswith(ledger.SUFFIX))


def plan_backup(config: Config, config_file: Path | None, *, logs: bool, buffer: bool,
                out: Path) -> tuple[list[Source], dict[str, str]]:
    """What goes in, in order (config, certificates, buffer, logs), and which config key
    each `tls/N` directory stands for."""
    sources = [Source(CONFIG_MEMBER, config_file, False)] if config_file else []
    tls_dirs: dict[str, str] = {}
    seen: dict[Path, str] = {}
    for key in TLS_KEYS:
        directory = Path(getattr(config.tls, key.split(".")[1])).parent
        if directory in seen or not directory.is_dir():
            continue
        seen[directory] = prefix = f"tls/{len(seen)}"
        tls_dirs[prefix] = key
        sources += [Source(f"{prefix}/{p.name}", p, False) for p in sorted(directory.iterdir())
                    if p.is_file() and not p.is_symlink()]
    skip = frozenset({out.resolve(), Path(config.buffer.path).resolve() / LOCK_NAME})
    if buffer:
        sources += _tree("buffer", Path(config.buffer.path).resolve(), skip=skip)
    if logs:
        sources += _tree("logs", Path(config.storage.root).resolve(), skip=skip)
    return sources, tls_dirs


@attrs.define
class BackupSummary:
    files: int = 0
    bytes: int = 0
    cut_files: int = 0
    cut_bytes: int = 0
    vanished: int = 0


def write_backup(out: Path, sources: list[Source], tls_dirs: dict[str, str],
                 progress: Progress) -> BackupSummary:
    """Write the tar.gz to `out` through a temporary file renamed at the end."""
    summary = BackupSummary()
    temp = out.with_name(f".{out.name}.partial")
    try:
        # 0600 from the start: the archive holds private keys and the config's tokens
        with open(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as raw:
            _write_tar(raw, sources, tls_dirs, progress, summary)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(temp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
    return summary


def _write_tar(raw: IO[bytes], sources: list[Source], tls_dirs: dict[str, str],
               progress: Progress, summary: BackupSummary) -> None:
    files: dict[str, dict[str, Any]] = {}
    with tarfile.open(fileobj=raw, mode="w:gz", compresslevel=TAR_LEVEL,
                      format=tarfile.PAX_FORMAT) as tar:
        for source in sources:
            entry = _add(tar, source, summary)
            if entry is not None:
                files[source.member] = entry
                progress.step(entry["size"])
        manifest = json.dumps({"format": FORMAT, "created_at": _now(),
                               "hostname": socket.gethostname(), "tls_dirs": tls_dirs,
                               "files": files}, indent=1).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size, info.mtime, info.mode = len(manifest), int(time.time()), 0o600
        tar.addfile(info, io.BytesIO(manifest))


def _add(tar: tarfile.TarFile, source: Source, summary: BackupSummary) -> dict[str, Any] | None:
    try:
        file = open(source.path, "rb")  # noqa: SIM115 (closed below; may not exist any more)
    except FileNotFoundError:  # a journal segment deleted once written out, say
        summary.vanished += 1
        return None
    except OSError as exc:
        raise BackupError(f"cannot read {source.path}: {exc.strerror}") from exc
    with file:
        stat = os.fstat(file.fileno())
        size = stat.st_size
        if source.gzip_members:
            size = complete_gzip_length(file, stat.st_size)
            file.seek(0)
            if size < stat.st_size:
                summary.cut_files += 1
                summary.cut_bytes += stat.st_size - size
        content: IO[bytes] = file
        if source.ledger_state:
            settled = ledger.without_pending(file.read())
            content, size = io.BytesIO(settled), len(settled)
        info = tarfile.TarInfo(source.member)
        info.size, info.mtime, info.mode = size, int(stat.st_mtime), stat.st_mode & 0o777
        reader = _Hashing(content)
        try:
            tar.addfile(info, reader)
        except OSError as exc:  # tarfile: "unexpected end of data"
            raise BackupError(f"{source.path} shrank while it was copied ({exc}); the "
                              "server cut back an unfinished append: run the backup again") \
                from exc
    summary.files += 1
    summary.bytes += size
    return {"size": size, "sha256": reader.sha256.hexdigest()}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --- restore: checking the archive -----------------------------------------------------


def check_member(member: tarfile.TarInfo) -> str | None:
    """Why a member must not be restored, None when it is a plain file or directory with
    a safe relative name under one of the backup's top directories."""
    name = member.name
    kind = ("a symbolic link" if member.issym() else "a hard link" if member.islnk()
            else "a device file" if member.ischr() or member.isblk()
            else "a named pipe (FIFO)" if member.isfifo() else None)
    if kind:
        return f"is {kind}"
    if not (member.isfile() or member.isdir()):
        return "is not a regular file or directory"
    if name.startswith("/") or PurePosixPath(name).is_absolute():
        return "has an absolute path"
    parts = PurePosixPath(name).parts
    if ".." in parts or "\\" in name or "\x00" in name:
        return "has '..' in its path"
    if not parts or (parts[0] not in ("config", "tls", "logs", "buffer") and name != MANIFEST):
        return "is not under config/, tls/, logs/ or buffer/"
    return None


@attrs.frozen
class Checked:
    manifest: dict[str, Any]
    config_text: str | None


def check_archive(path: Path) -> Checked:
    """Read the whole archive once: every member safe, every file's SHA-256 and size as
    the manifest says, nothing missing or extra. Raises BackupError naming the member."""
    digests: dict[str, tuple[int, str]] = {}
    manifest: dict[str, Any] | None = None
    config_bytes: bytes | None = None
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                problem = check_member(member)
                if problem:
                    raise BackupError(f"{path}: refused member {member.name!r}: it {problem}; "
                                      "nothing was restored")
                if member.isdir():
                    continue
                if member.name in digests:
                    raise BackupError(f"{path}: refused member {member.name!r}: it appears "
                                      "twice; nothing was restored")
                data = tar.extractfile(member)
                assert data is not None  # a regular file
                if member.name == MANIFEST:
                    manifest = json.loads(data.read())
                    continue
                sha = hashlib.sha256()
                while chunk := data.read(READ_CHUNK):
                    sha.update(chunk)
                    if member.name == CONFIG_MEMBER:
                        config_bytes = (config_bytes or b"") + chunk
                digests[member.name] = (member.size, sha.hexdigest())
    except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as exc:
        raise BackupError(f"{path}: not a readable backup ({exc})") from exc
    if manifest is None or manifest.get("format") != FORMAT:
        raise BackupError(f"{path}: no {MANIFEST} of format {FORMAT!r}: not an mwdlogd backup")
    _compare(path, manifest, digests)
    try:
        config_text = None if config_bytes is None else config_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BackupError(f"{path}: {CONFIG_MEMBER} is not UTF-8 text") from exc
    return Checked(manifest, config_text)


def _compare(path: Path, manifest: dict[str, Any], digests: dict[str, tuple[int, str]]) -> None:
    listed = manifest.get("files", {})
    for name in sorted(set(listed) | set(digests)):
        if name not in digests:
            raise BackupError(f"{path}: member {name!r} is in the manifest but not the archive")
        if name not in listed:
            raise BackupError(f"{path}: member {name!r} is not in the manifest")
        size, sha = digests[name]
        if (size, sha) != (listed[name]["size"], listed[name]["sha256"]):
            raise BackupError(f"{path}: member {name!r} fails its checksum (manifest sha256 "
                              f"{listed[name]['sha256']}, archive {sha}); nothing was restored")


# --- restore: where things go ----------------------------------------------------------


def config_from_text(text: str, config_file: Path) -> Config:
    """The restored config as the server will read it at `config_file`."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(CONFIG_MEMBER, f"not valid TOML: {exc}") from None
    apply_env_overrides(raw, os.environ)
    config = structure_config(raw)
    validate(config)
    return resolve_paths(config, config_file.resolve().parent)


def targets(manifest: dict[str, Any], config: Config, config_file: Path) -> dict[str, Path]:
    """Each file member's destination; raises BackupError for a member whose destination
    would leave its directory (through a symlink already on disk, say)."""
    roots = {"logs": Path(config.storage.root), "buffer": Path(config.buffer.path)}
    for prefix, key in manifest.get("tls_dirs", {}).items():
        if key not in TLS_KEYS:
            raise BackupError(f"{MANIFEST}: {prefix} names {key!r}, not a TLS key")
        roots[prefix] = Path(getattr(config.tls, key.split(".")[1])).parent
    result: dict[str, Path] = {}
    for name in manifest["files"]:
        if name == CONFIG_MEMBER:
            result[name] = config_file
            continue
        top, _, rel = name.partition("/")
        if top == "tls":
            number, _, rel = rel.partition("/")
            top = f"tls/{number}"
        if top not in roots or not rel:
            raise BackupError(f"member {name!r}: no destination for {top!r}")
        root = roots[top].resolve()
        target = root / rel
        real_parent = Path(os.path.realpath(target.parent))
        if real_parent != root and root not in real_parent.parents:
            raise BackupError(f"member {name!r}: {target.parent} leads outside {root} "
                              "(a symlink on disk?); refused")
        if target.is_symlink():
            raise BackupError(f"member {name!r}: {target} is a symlink; refused")
        result[name] = target
    return result


def live_server(config: Config) -> str | None:
    """How a server using these files shows it is running, None if none does: its
    buffer lock is held, or the config's health port answers for the same storage.root
    (its `storage_id`, a digest of the path: a server on another directory with the same
    ports is not this one)."""
    lock = Path(config.buffer.path) / LOCK_NAME
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(lock, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return f"{lock} is locked by a running server"
        finally:
            os.close(fd)
    host = "127.0.0.1" if config.health.bind in ("0.0.0.0", "::") else config.health.bind
    if not config.health.port:
        return None
    url = f"http://{host}:{config.health.port}/health"
    try:
        with urllib.request.urlopen(url, timeout=HEALTH_TIMEOUT_S) as reply:
            answer = reply.read()
    except urllib.error.HTTPError as exc:  # 503: running, but unhealthy
        answer = exc.read()
    except OSError:
        return None  # nothing listens there
    try:
        served = json.loads(answer)["storage_id"]
    except (ValueError, KeyError, TypeError):
        return f"{url} answers, but not as mwdlogd; assuming a server uses these files"
    if served == storage_id(config.storage.root):
        return f"{url} answers for storage_root {config.storage.root}"
    return None  # another server, on other files


@attrs.define
class RestoreSummary:
    written: int = 0
    bytes: int = 0
    unchanged: int = 0


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(READ_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def conflicts(manifest: dict[str, Any], where: dict[str, Path]) -> tuple[list[Path], set[str]]:
    """Existing destinations that differ from the backup, and members already in place."""
    differ, same = [], set()
    for name, target in where.items():
        if target.exists():
            if target.is_file() and _sha256(target) == manifest["files"][name]["sha256"]:
                same.add(name)
            else:
                differ.append(target)
    return differ, same


def extract(path: Path, manifest: dict[str, Any], where: dict[str, Path], skip: set[str],
            progress: Progress) -> RestoreSummary:
    """Second read: each file to a temporary name beside its target, checked, fsynced,
    renamed over it."""
    summary = RestoreSummary(unchanged=len(skip))
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            if member.name not in where or member.name in skip:
                continue
            data = tar.extractfile(member)
            assert data is not None
            target = where[member.name]
            target.parent.mkdir(parents=True, exist_ok=True)
            temp = target.with_name(f".{target.name}.restoring")
            try:
                _write_checked(data, temp, manifest["files"][member.name]["sha256"])
                os.chmod(temp, member.mode & 0o777)
                os.utime(temp, (member.mtime, member.mtime))
                os.replace(temp, target)
            except BaseException:
                temp.unlink(missing_ok=True)
                raise
            summary.written += 1
            summary.bytes += member.size
            progress.step(member.size)
    return summary


def _write_checked(data: IO[bytes], temp: Path, sha256: str) -> None:
    sha = hashlib.sha256()
    with open(temp, "wb") as out:
        while chunk := data.read(READ_CHUNK):
            sha.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if sha.hexdigest() != sha256:
        raise BackupError(f"{temp.name.removesuffix('.restoring')[1:]} changed between the "
                          "check and the restore: the archive is being modified")


# --- command line ----------------------------------------------------------------------

BACKUP_HELP = """\
Writes FILE (tar.gz): the config file, every file in the directories of tls.cert,
tls.key and tls.ca, and with --logs the storage.root tree, with --buffer the buffer
directory, plus MANIFEST.json with each file's SHA-256. Safe while the server runs:
hourly files are copied up to their last complete gzip member. For an exact pair of
buffer and logs, stop the server first. Exit 0 written, 2 refused or failed."""

RESTORE_HELP = """\
Checks every member of FILE against its SHA-256 first and refuses absolute paths, '..',
links and device files, then restores: config/config.toml to --config (default
./config.toml), certificates, logs and buffer to where that config puts them. Refuses
to replace a different existing file without --force (identical files are left alone)
and to restore logs or buffer while a server runs on them. Exit 0 restored,
2 refused."""


def add_parsers(commands: Any, common: argparse.ArgumentParser) -> None:
    backup = commands.add_parser("backup", parents=[common], description=BACKUP_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 help="write config, certificates (and logs, buffer) to a "
                                 "tar.gz with checksums")
    backup.add_argument("--out", required=True, metavar="FILE", help="archive to write")
    backup.add_argument("--logs", action="store_true", help="include storage.root")
    backup.add_argument("--buffer", action="store_true", help="include buffer.path")
    backup.add_argument("--force", action="store_true", help="overwrite FILE")
    restore = commands.add_parser("restore", parents=[common], description=RESTORE_HELP,
                                  formatter_class=argparse.RawDescriptionHelpFormatter,
                                  help="check and restore a backup made by `mwdlogd backup`")
    restore.add_argument("file", metavar="FILE", help="archive written by `mwdlogd backup`")
    restore.add_argument("--force", action="store_true",
                         help="replace existing files that differ from the backup")


def backup_command(args: argparse.Namespace, config_file: tuple[Path, bool]) -> int:
    path, required = config_file
    config = load_config(path, required=required)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise BackupError(f"{out} exists; use --force to overwrite")
    if args.buffer and live_server(config):
        print("mwdlogd: warning: the server is running; the buffer copy is consistent per "
              "file but may repeat records at restore (stop the server for an exact copy)",
              file=sys.stderr)
    sources, tls_dirs = plan_backup(config, path if path.exists() else None,
                                    logs=args.logs, buffer=args.buffer, out=out)
    progress = Progress(sys.stderr, len(sources), "files")
    try:
        summary = write_backup(out, sources, tls_dirs, progress)
    except OSError as exc:
        raise BackupError(f"writing {out}: {exc}; no backup was written") from exc
    finally:
        progress.close()
    cut = (f", {plural(summary.cut_files, 'hourly file')} cut at the last complete gzip member "
           f"({human_bytes(summary.cut_bytes)} still being written left out)"
           if summary.cut_files else "")
    gone = (f", {plural(summary.vanished, 'file')} gone before it was read (journal segments "
            "written out meanwhile)" if summary.vanished else "")
    print(f"backup: wrote {out}: {plural(summary.files, 'file')} "
          f"({human_bytes(summary.bytes)}){cut}{gone}")
    return 0


def restore_command(args: argparse.Namespace, config_file: tuple[Path, bool]) -> int:
    archive = Path(args.file)
    target_config, required = config_file
    checked = check_archive(archive)
    if checked.config_text is not None:
        config = config_from_text(checked.config_text, target_config)
    else:
        config = load_config(target_config, required=required)
    where = targets(checked.manifest, config, target_config)
    data_members = [n for n in where if n.startswith(("logs/", "buffer/"))]
    live = live_server(config) if data_members else None
    if live:
        raise BackupError(f"refusing to restore logs/buffer into a running server ({live}); "
                          "stop it first (SIGTERM drains)")
    differ, same = conflicts(checked.manifest, where)
    if differ and not args.force:
        shown = ", ".join(str(p) for p in differ[:5])
        more = f" and {len(differ) - 5} more" if len(differ) > 5 else ""
        raise BackupError(f"existing files differ from the backup ({len(differ)}): "
                          f"{shown}{more}; use --force to replace them")
    progress = Progress(sys.stderr, len(where) - len(same), "files")
    try:
        summary = extract(archive, checked.manifest, where, same, progress)
    except OSError as exc:
        raise BackupError(f"restoring from {archive}: {exc}; files restored before it stay, "
                          "run the restore again with --force once fixed") from exc
    finally:
        progress.close()
    print(f"restore: {plural(summary.written, 'file')} written ({human_bytes(summary.bytes)}), "
          f"{summary.unchanged} already identical; config {target_config}, "
          f"logs {config.storage.root}, buffer {config.buffer.path}")
    return 0

"""The append ledger: what makes appends to hourly files exactly-once across crashes and
across worker processes that share the files.

Every hourly file has a small state file, `{ledger}/{relpath}.state`, which is also the
file's lock (flock): an appender holds it from before it looks at the file's size until
its member is fsynced. The state is one record: the size the file had before an
unfinished append (or none), and per worker the highest journal batch id wholly in the
file. Before a member is appended the state says "pending: size before" and is fsynced;
after the member is fsynced it says "not pending, worker w holds up to id" without an
fsync of its own: if that write is lost, the member is cut off again and the worker's
journal writes it again — the same bytes, once. Both facts are one record, so they can
never disagree.

Whoever takes the lock and finds a pending state knows that appender died mid-append
(a live one would still hold the lock) and cuts the file back first: another worker at
run time, or the dead worker itself at its recovery. The record is written alternately
into two slots with a sequence number, so a write torn by a power cut leaves the one
before it readable.

Blocking: call it from worker threads.
"""

import contextlib
import errno
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import msgpack

from mwdlogd import log
from mwdlogd.errors import StorageError
from mwdlogd.storage import framing
from mwdlogd.storage.files import destination, fsync_dir

MAGIC = b"MWL1"
SLOT = 512
SUFFIX = ".state"
NONE = -1


@attrs.define
class FileState:
    pending: int | None = None  # size before an append that has not finished
    committed: dict[int, int] = attrs.field(factory=dict)  # worker -> highest batch id
    seq: int = 0


class Held:
    """One hourly file's state, locked: `begin` before appending, `done` after. `file` is
    the hourly file's absolute path, resolved (and checked to stay under the root) once."""

    def __init__(self, ledger: "Ledger", fd: int, relpath: str, file: str,
                 state: FileState) -> None:
        self._ledger = ledger
        self._fd = fd
        self.relpath = relpath
        self.file = file
        self.state = state

    @property
    def committed(self) -> int:
        """Highest batch id of this worker wholly in the file (-1 if none)."""
        return self.state.committed.get(self._ledger.worker, NONE)

    def begin(self, size_before: int) -> None:
        self.state.pending = size_before
        self._write(sync=True)

    def done(self, max_id: int, *, sync: bool = False) -> None:
        """The member is in the file (or, for failed/, accounted for elsewhere)."""
        worker = self._ledger.worker
        self.state.pending = None
        self.state.committed[worker] = max(max_id, self.committed)
        self._write(sync=sync)

    def cut_back(self) -> None:
        """The last appender died mid-append: remove what it left."""
        assert self.state.pending is not None
        cut = truncate_to(self.file, self.state.pending)
        if cut:  # nothing to cut after a failed append that already cut itself back
            log.event(logging.WARNING, "unfinished_append_cut", path=self.relpath,
                      bytes_cut=cut, detail="an append was interrupted; the journal that "
                      "owns it writes it again")
        self.state.pending = None
        self._write(sync=False)

    def _write(self, *, sync: bool) -> None:
        self.state.seq += 1
        payload = msgpack.packb([self.state.pending, self.state.committed])
        record = framing.frame(MAGIC, self.state.seq, payload)
        try:
            os.pwrite(self._fd, record, (self.state.seq % 2) * SLOT)
            if sync and self._ledger.fsync:
                os.fdatasync(self._fd)
        except OSError as exc:
            raise StorageError(self.relpath, "write append ledger",
                               exc.strerror or str(exc)) from exc


class Ledger:
    def __init__(self, directory: Path, *, worker: int = 0, fsync: bool = True) -> None:
        self.directory = directory
        self.worker = worker
        self.fsync = fsync

    @contextlib.contextmanager
    def hold(self, root: str, relpath: str, *, create: bool = True) -> Iterator[Held | None]:
        """Lock `relpath`'s state, cutting back what a dead appender left; None when the file
        has no state and `create` is False."""
        file = destination(root, relpath)
        state_path = destination(str(self.directory), relpath + SUFFIX)
        fd = self._open_locked(state_path, create)
        if fd < 0:
            yield None
            return
        try:
            held = Held(self, fd, relpath, file, _read_state(fd, state_path))
            if held.state.pending is not None:
                held.cut_back()
            yield held
        finally:
            os.close(fd)

    def _open_locked(self, state_path: str, create: bool) -> int:
        """Open and flock the state file; reopens if a sweep unlinked it meanwhile."""
        while True:
            try:
                fd = _create(state_path) if create else os.open(state_path, os.O_RDWR)
            except FileNotFoundError:
                return -1
            except OSError as exc:
                raise StorageError(state_path, "open append ledger",
                                   exc.strerror or str(exc)) from exc
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.stat(state_path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def sweep(self, older_than_s: float, now: float | None = None) -> int:
        """Delete state files untouched for `older_than_s` (their hours are long written);
        returns how many went."""
        horizon = (now if now is not None else time.time()) - older_than_s
        removed = 0
        for dirpath, _, names in os.walk(self.directory, topdown=False):
            for name in names:
                path = os.path.join(dirpath, name)
                with contextlib.suppress(FileNotFoundError):
                    if name.endswith(SUFFIX) and os.stat(path).st_mtime < horizon:
                        removed += _remove_if_settled(path)
            if dirpath != str(self.directory):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)  # only succeeds when empty
        return removed


def _create(state_path: str) -> int:
    try:
        return os.open(state_path, os.O_RDWR)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(state_path), exist_ok=True)
    fd = os.open(state_path, os.O_RDWR | os.O_CREAT, 0o600)
    fsync_dir(Path(state_path).parent)  # the state must not vanish after a power cut
    return fd


def _read_state(fd: int, state_path: str) -> FileState:
    try:
        data = os.pread(fd, 2 * SLOT, 0)
    except OSError as exc:
        raise StorageError(state_path, "read append ledger", exc.strerror or str(exc)) from exc
    return _parse_state(data)


def _parse_state(data: bytes) -> FileState:
    best = FileState()
    for offset in (0, SLOT):
        records, _ = framing.scan(MAGIC, data[offset:offset + SLOT])
        if records and records[0][0] > best.seq:
            pending, committed = msgpack.unpackb(records[0][1], strict_map_key=False)
            best = FileState(pending, {int(w): int(i) for w, i in committed.items()},
                             records[0][0])
    return best


def without_pending(data: bytes) -> bytes:
    """A state file's bytes with an unfinished append forgotten.

    For copies (backups) whose hourly file was taken up to a complete member: cutting
    that copy back to the size before the unfinished append would drop members appended
    after the state was copied, whose batches the copied journal may no longer hold."""
    state = _parse_state(data)
    if state.pending is None:
        return data
    seq = state.seq + 1
    record = framing.frame(MAGIC, seq, msgpack.packb([None, state.committed]))
    slots = bytearray(data.ljust(2 * SLOT, b"\0"))
    slots[(seq % 2) * SLOT:(seq % 2) * SLOT + SLOT] = record.ljust(SLOT, b"\0")
    return bytes(slots)


def _remove_if_settled(path: str) -> int:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _read_state(fd, path).pending is not None:
            return 0
        os.unlink(path)
        return 1
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.ENOENT):
            return 0
        raise
    finally:
        os.close(fd)


def truncate_to(path: str, size: int) -> int:
    """Cut a file back to `size` (an unfinished append); bytes removed."""
    try:
        current = os.path.getsize(path)
    except FileNotFoundError:
        return 0
    if current <= size:
        return 0
    try:
        with open(path, "r+b") as file:
            file.truncate(size)
            file.flush()
            os.fsync(file.fileno())
    except OSError as exc:
        raise StorageError(path, "cut back unfinished append", exc.strerror or str(exc)) from exc
    return current - size

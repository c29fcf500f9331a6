"""The commit stage: batches are journaled and fsynced together, then acked, then routed.

`commit` is what ingest awaits: it returns once the batch is durable in the journal
(DESIGN §4), or raises Overloaded / ShuttingDown / JournalFailed without keeping
anything. One task (`run`) owns the journal; batches that arrive during an fsync share
the next one (group commit).
"""

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import msgpack
import trio
from prometheus_client import Histogram

from mwdlogd import log
from mwdlogd.errors import (
    JournalFailed,
    MwdlogdError,
    Overloaded,
    Refused,
    ShuttingDown,
    StorageError,
)
from mwdlogd.pipeline.normalize import Routed
from mwdlogd.runtime.channels import Wake, receive_until
from mwdlogd.runtime.dedupe import ChunkMemory, Dedupe
from mwdlogd.runtime.tracker import BatchTracker
from mwdlogd.storage.chunk_ids import ChunkIdLog, PeerChunkIds, legacy_key
from mwdlogd.storage.journal import Journal
from mwdlogd.storage.ledger import NONE, Ledger
from mwdlogd.storage.spool import PieceMeta, SpoolSet, read_pieces, remove_unnamed, spool_path

# Batches waiting for the journal; they share one fsync, so this bounds a group's size.
PIPELINE_QUEUE = 64
# While idle, written-out journal segments are deleted this often.
RELEASE_EVERY_S = 1.0
# A file's ledger state is kept this long after its last append (DESIGN: late records).
LEDGER_KEEP_S = 7 * 24 * 3600.0


@attrs.frozen
class Group:
    """A batch's records for one hourly file, as newline-terminated JSON lines."""

    path: str
    hour: int
    data: bytes
    count: int


@attrs.define
class Submission:
    """A batch. A streamed request's batch holds no groups itself: its records are the
    pieces of a spool file, one journal id each (`batch_id` is the last of them)."""

    tag: str
    groups: list[Group]
    batch_id: int = -1
    dedupe_key: bytes | None = None  # a resend key (storage.chunk_ids.dedupe_key)
    error: Refused | None = None
    done: trio.Event = attrs.field(factory=trio.Event)
    spool: str | None = None  # the spool file's name
    pieces: list[PieceMeta] = attrs.field(factory=list)
    skip: dict[str, int] = attrs.field(factory=dict)  # replay: path -> ids its file holds

    @property
    def count(self) -> int:
        return sum(g.count for g in self.groups) + sum(p.count for p in self.pieces)

    @property
    def size(self) -> int:
        """Bytes of records: what the batch counts against buffer.total_limit."""
        return sum(len(g.data) for g in self.groups) + sum(p.size for p in self.pieces)

    @property
    def span(self) -> int:
        """Journal ids the batch takes."""
        return len(self.pieces) if self.spool is not None else 1

    @property
    def first_id(self) -> int:
        return self.batch_id - self.span + 1

    def track(self, tracker: BatchTracker) -> None:
        """Open the batch's ids (a piece whose groups are all in their files is not)."""
        if self.spool is None:
            tracker.open(self.batch_id, len(self.groups), self.size)
            return
        for index, piece in enumerate(self.pieces):
            if piece.groups:
                tracker.open(self.first_id + index, piece.groups, piece.size)

    def payload(self) -> bytes:
        groups = [[g.path, g.hour, g.count, g.data] for g in self.groups]
        fields = [self.tag, groups, self.dedupe_key]
        if self.spool is not None:  # other batches stay readable by earlier versions
            fields += [self.spool, [[p.groups, p.size, p.count] for p in self.pieces]]
        return bytes(msgpack.packb(fields, unicode_errors="surrogateescape"))

    @classmethod
    def from_payload(cls, batch_id: int, payload: bytes) -> "Submission":
        tag, groups, dedupe_key, *streamed = msgpack.unpackb(
            payload, unicode_errors="surrogateescape")
        kept = [Group(path, hour, data, count) for path, hour, count, data in groups]
        if isinstance(dedupe_key, str):  # journaled by a version that kept ids as text
            dedupe_key = legacy_key(dedupe_key)
        spool, pieces = streamed or (None, [])
        return cls(tag, kept, batch_id, dedupe_key, spool=spool,
                   pieces=[PieceMeta(*p) for p in pieces])


@attrs.frozen
class Committed:
    records: int
    duplicate: bool  # a resend of a batch already durable: acked, not stored


@attrs.define
class FlushAll:
    """Travels behind earlier batches; the router flushes every file when it arrives and
    fills in what that flush wrote."""

    done: trio.Event = attrs.field(factory=trio.Event)
    records: int = 0
    files: int = 0
    failed_files: int = 0  # appends that failed (kept for their retry)


Message = Submission | FlushAll


def group_routed(tag: str, routed: Iterable[Routed]) -> Submission:
    by_path: dict[str, tuple[int, list[bytes]]] = {}
    for record in routed:
        by_path.setdefault(record.path, (record.hour, []))[1].append(record.line)
    groups = [Group(path, hour, b"".join(lines), len(lines))
              for path, (hour, lines) in by_path.items()]
    return Submission(tag, groups)


class Pipeline:
    def __init__(self, *, journal: Journal, ledger: Ledger, chunk_ids: ChunkIdLog,
                 memory: ChunkMemory, tracker: BatchTracker, total_limit: Callable[[], int],
                 limiter: trio.CapacityLimiter, fsync_seconds: Histogram,
                 peers: PeerChunkIds | None = None, spool_dir: Path | None = None) -> None:
        self._journal = journal
        self.spools = SpoolSet(spool_dir or journal.directory.parent / "spool")
        self._ledger = ledger
        self._chunk_ids = chunk_ids
        self._memory = memory
        self._peers = peers
        self._peer_limiter = trio.CapacityLimiter(1)  # read_new updates its offsets
        self._tracker = tracker
        self._total_limit = total_limit
        self._limiter = limiter
        self._send, self._receive = trio.open_memory_channel[Message](PIPELINE_QUEUE)
        self._replay: list[Submission] = []
        self._room = trio.Event()
        self._stopping = False
        self.waiting_for_room = 0  # batches held back (forward connections not being read)
        self.journal_problem: str | None = None  # why the journal is failing, for /health
        self.journal_refusing = False  # ... and whether batches are refused for it
        self._refused_bytes = 0  # the last batch refused for room, until one fits
        self._fsync_seconds = fsync_seconds
        tracker.on_release = lambda: self._room.set()

    @property
    def overloaded(self) -> bool:
        return self._tracker.buffered_bytes >= self._total_limit()

    @property
    def refusing(self) -> bool:
        """Batches are being refused for room: the buffer is full, or the last refused
        batch would still not fit (for /health)."""
        return self.overloaded or (
            self._tracker.buffered_bytes + self._refused_bytes > self._total_limit())

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def buffered_bytes(self) -> int:
        return self._tracker.buffered_bytes

    async def commit(self, tag: str, routed: Iterable[Routed], *, dedupe: Dedupe | None = None,
                     room_wait_s: float = 0.0) -> Committed:
        """Durable once this returns (the ack point). Raises Refused without keeping
        anything. While the buffer is full this waits up to `room_wait_s` (math.inf:
        as long as it takes) for room before refusing; a `dedupe` key already durable
        makes this a duplicate that is not stored."""
        return await self.commit_submission(group_routed(tag, routed), dedupe=dedupe,
                                            room_wait_s=room_wait_s)

    async def commit_submission(self, submission: Submission, *, dedupe: Dedupe | None = None,
                                room_wait_s: float = 0.0) -> Committed:
        """`commit` of a batch already made (a streamed request's, naming its sealed spool
        file: the caller deletes the file unless this returns as not a duplicate)."""
        room_deadline = trio.current_time() + room_wait_s
        if dedupe is None:
            return await self._commit(submission, room_deadline)
        if self._peers is not None and not self._memory.is_durable(dedupe):
            for at, keys in await trio.to_thread.run_sync(self._peers.read_new,
                                                          limiter=self._peer_limiter):
                self._memory.remember(keys, at)
        while not self._memory.is_durable(dedupe):
            first_copy = self._memory.in_flight(dedupe.key)
            if first_copy is None:
                break
            await first_copy.wait()
        else:
            return Committed(0, True)
        self._memory.begin(dedupe.key)
        durable = False
        try:
            submission.dedupe_key = dedupe.key
            committed = await self._commit(submission, room_deadline)
            durable = True
            return committed
        finally:
            self._memory.finish(dedupe.key, durable)

    async def wait_for_room(self, size: int, deadline: float) -> bool:
        """Whether `size` more bytes (at most the whole buffer) fit, waiting for room
        until `deadline` (trio time). False when they do not by then, or when shutdown
        begins."""
        while self._tracker.buffered_bytes + min(size, self._total_limit()) \
                > self._total_limit():
            if self._stopping or trio.current_time() >= deadline:
                self._refused_bytes = 0 if self._stopping else min(size, self._total_limit())
                return False
            if self._room.is_set():  # waiters share one event, renewed once it has fired
                self._room = trio.Event()
            self.waiting_for_room += 1
            try:
                with trio.move_on_at(deadline):
                    await self._room.wait()
            finally:
                self.waiting_for_room -= 1
        return True

    async def _commit(self, submission: Submission, room_deadline: float) -> Committed:
        if submission.size > self._total_limit():
            raise Overloaded(f"batch of {submission.size} bytes can never fit "
                             f"buffer.total_limit={self._total_limit()}")
        if not await self.wait_for_room(submission.size, room_deadline):
            if self._stopping:
                raise ShuttingDown("server is shutting down")
            raise Overloaded(f"buffer holds {self._tracker.buffered_bytes} bytes; "
                             f"buffer.total_limit={self._total_limit()}")
        try:
            await self._send.send(submission)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise ShuttingDown("server is shutting down") from None
        self._refused_bytes = 0
        await submission.done.wait()
        if submission.error is not None:
            raise submission.error
        return Committed(submission.count, False)

    async def flush(self) -> FlushAll:
        """Returns once everything acked before the call has been tried in its file, with
        the counts of that flush."""
        marker = FlushAll()
        try:
            await self._send.send(marker)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return marker  # shutting down: the drain flushes everything anyway
        await marker.done.wait()
        return marker

    def limit_changed(self) -> None:
        """buffer.total_limit was reloaded: batches waiting for room look again."""
        self._room.set()

    def stop_waiting(self) -> None:
        """Shutdown begins: commits waiting for buffer room give up (nothing was kept)."""
        self._stopping = True
        self._room.set()

    async def close(self) -> None:
        """Stop accepting; `run` journals what it has, then closes the router's channel."""
        await self._send.aclose()

    async def recover(self, root: str) -> None:
        """Cut files back to before unfinished appends; queue what the journal still owes."""
        replay, report = await trio.to_thread.run_sync(
            _recover, self._journal, self._ledger, self._chunk_ids, self._memory, root,
            self.spools, limiter=self._limiter)
        for submission in replay:
            submission.track(self._tracker)
        self._tracker.next_id = self._journal.next_id
        self._replay = replay
        log.event(logging.INFO, "recovered", **report)

    async def run(self, router: trio.MemorySendChannel[Message], *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with router, self._receive:
            for submission in self._replay:
                await router.send(submission)
            self._replay = []
            task_status.started()
            while True:
                first = await receive_until(self._receive,
                                            trio.current_time() + RELEASE_EVERY_S)
                if first is Wake.CLOSED:
                    break
                group = [] if first is Wake.TIMEOUT else [first, *self._drain_nowait()]
                for message in await self._journal_step(group):
                    await router.send(message)

    def _drain_nowait(self) -> list[Message]:
        group = []
        while True:
            try:
                group.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return group

    async def _journal_step(self, group: list[Message]) -> list[Message]:
        """Append + one fsync for the group's batches, release written-out segments; returns
        what goes on to the router, in arrival order."""
        batches = [m for m in group if isinstance(m, Submission)]
        payloads = [s.payload() for s in batches]
        spans = [s.span for s in batches]
        watermark = self._tracker.watermark()
        keys = [s.dedupe_key for s in batches if s.dedupe_key is not None]
        started = trio.current_time()
        try:
            ids, problem = await trio.to_thread.run_sync(
                _append_and_release, self._journal, self._chunk_ids, self.spools, payloads,
                spans, keys, watermark, limiter=self._limiter)
        except MwdlogdError as exc:
            self._journal_health(str(exc), refused=len(batches))
            for submission in batches:
                submission.error = JournalFailed(f"journal write failed: {exc}")
                submission.done.set()
            return [m for m in group if isinstance(m, FlushAll)]
        self._journal_health(problem, refused=0)
        if payloads:
            self._fsync_seconds.observe(trio.current_time() - started)
        for submission, batch_id in zip(batches, ids, strict=True):
            submission.batch_id = batch_id
            submission.track(self._tracker)
            if submission.spool is not None:
                self.spools.last_ids[submission.spool] = batch_id
            submission.done.set()
        return group

    def _journal_health(self, problem: str | None, *, refused: int) -> None:
        """Log when the journal starts or stops failing (not once per batch or tick)."""
        if problem is not None and self.journal_problem is None:
            log.event(logging.ERROR, "journal_failed", error=problem, batches_refused=refused,
                      detail="retried with every batch and every second; batches are "
                             "refused (503 journal_failed) while they cannot be appended")
        elif problem is None and self.journal_problem is not None:
            log.event(logging.WARNING, "journal_recovered", was=self.journal_problem)
        self.journal_problem = problem
        self.journal_refusing = problem is not None and (
            refused > 0 or self._journal.lost is not None)

    async def release(self) -> None:
        """Delete journal segments that are wholly written (after the final flush)."""
        try:
            _, problem = await trio.to_thread.run_sync(
                _append_and_release, self._journal, self._chunk_ids, self.spools, [], [], [],
                self._tracker.watermark(), True, limiter=self._limiter)
        except MwdlogdError as exc:
            problem = str(exc)
        if problem is not None:
            log.event(logging.WARNING, "journal_release_failed", error=problem,
                      detail="written-out segments stay; the next start skips their batches")


def _append_and_release(journal: Journal, chunk_ids: ChunkIdLog, spools: SpoolSet,
                        payloads: list[bytes], spans: list[int], keys: list[bytes],
                        watermark: int, final: bool = False) -> tuple[list[int], str | None]:
    """The batches' ids (raises StorageError when they were not journaled), and what else
    is failing: segments that could not be deleted or chunk ids not logged.

    Written-out segments go first, and when an append fails, even a small active one is
    released before one more try: a full disk is freed by the batches that fill it."""
    problem = None
    try:
        _release(journal, chunk_ids, spools, watermark, final)
    except StorageError as exc:
        problem = str(exc)
    ids = []
    if payloads:
        try:
            ids = journal.append(payloads, spans)
        except StorageError:
            if not journal.releasable(watermark, final=True):
                raise
            _release(journal, chunk_ids, spools, watermark, final=True)
            ids = journal.append(payloads, spans)
    try:
        chunk_ids.append(keys, time.time())
    except StorageError as exc:  # the journal holds the keys too: recovery finds them
        problem = str(exc)
    return ids, problem or journal.release_problem


def _release(journal: Journal, chunk_ids: ChunkIdLog, spools: SpoolSet, watermark: int,
             final: bool) -> None:
    if journal.releasable(watermark, final=final) or journal.lost:
        chunk_ids.sync()  # the ids must be on disk before the batches holding them go
        journal.release(watermark, final=final)
    spools.remove_below(min(journal.oldest_id, watermark))
    journal.check()


def _recover(journal: Journal, ledger: Ledger, chunk_ids: ChunkIdLog, memory: ChunkMemory,
             root: str, spools: SpoolSet | None = None
             ) -> tuple[list[Submission], dict[str, Any]]:
    """The journal's batches minus what their files already hold (per the ledger, which
    also cuts back unfinished appends as each file is looked at); the resend keys still
    in the window go to `memory` (nothing else uses it before recovery ends). A key found
    only in the journal (the process died before its chunk id log entry reached the
    disk) is logged again, so it outlives the journal segment."""
    now = time.time()
    spools = spools or SpoolSet(journal.directory.parent / "spool")
    keys = chunk_ids.open(now, memory.remember)
    committed: dict[str, int] = {}

    def holds(path: str) -> int:
        if path not in committed:
            with ledger.hold(root, path, create=False) as held:
                committed[path] = held.committed if held is not None else NONE
        return committed[path]

    replay, records, journal_keys, duplicates = [], 0, [], 0
    seen: set[bytes] = set()
    for batch_id, payload in journal.open():
        submission = Submission.from_payload(batch_id, payload)
        if submission.dedupe_key is not None:
            if submission.dedupe_key in seen:  # a resend journaled again: one copy only
                duplicates += 1
                continue
            seen.add(submission.dedupe_key)
            journal_keys.append(submission.dedupe_key)
        if submission.spool is not None:
            spools.last_ids[submission.spool] = batch_id
            _recover_spooled(submission, spools, holds)
        submission.groups = [g for g in submission.groups if batch_id > holds(g.path)]
        if submission.groups or any(p.groups for p in submission.pieces):
            replay.append(submission)
            records += submission.count
    orphans = remove_unnamed(spools.directory, set(spools.last_ids))
    memory.remember(journal_keys, now)
    chunk_ids.append(journal_keys, now)
    swept = ledger.sweep(LEDGER_KEEP_S)
    return replay, {"files_checked": len(committed), "ledger_states_swept": swept,
                    "batches_replayed": len(replay), "records_replayed": records,
                    "duplicate_batches_skipped": duplicates,
                    "uncommitted_spool_files_removed": orphans,
                    "chunk_ids_remembered": keys + len(journal_keys)}


def _recover_spooled(submission: Submission, spools: SpoolSet,
                     holds: Callable[[str], int]) -> None:
    """Count what of each piece its files do not hold yet (the router skips the rest)."""
    pieces = []
    path = spool_path(spools.directory, submission.spool or "")
    try:
        for index, groups in enumerate(read_pieces(path)):
            batch_id = submission.first_id + index
            left = [g for g in groups if batch_id > holds(g[0])]
            pieces.append(PieceMeta(len(left), sum(len(g[3]) for g in left),
                                    sum(g[2] for g in left)))
            for group_path, *_ in groups:
                submission.skip.setdefault(group_path, holds(group_path))
    except StorageError as exc:
        log.event(logging.ERROR, "spool_lost", error=str(exc), batch_id=submission.batch_id,
                  records=submission.count, detail="a committed streamed request's spool "
                  "file is missing or damaged; its records not yet in their files are lost")
        pieces = []
    submission.pieces = pieces + [PieceMeta(0, 0, 0)] * (len(submission.pieces) - len(pieces))

"""The group commit: batches are journaled and fsynced together, then acked, then routed.

`commit` is what ingest awaits: it returns once the batch is durable in the journal
(DESIGN §4), or raises Overloaded / ShuttingDown / JournalFailed without keeping
anything. One task (`run`) owns the journal; batches that arrive during an fsync share
the next one.
"""

import logging
import time
from collections.abc import Callable
from pathlib import Path

import trio

from mwdlogd import log
from mwdlogd.errors import JournalFailed, MwdlogdError, ShuttingDown, StorageError
from mwdlogd.runtime.admission import Admission
from mwdlogd.runtime.batch import Committed, FlushAll, Message, Submission
from mwdlogd.runtime.channels import Wake, receive_until
from mwdlogd.runtime.dedupe import Dedupe, Resends
from mwdlogd.runtime.recovery import recover
from mwdlogd.runtime.tracker import BatchTracker
from mwdlogd.storage.chunk_ids import ChunkIdLog
from mwdlogd.storage.journal import Journal
from mwdlogd.storage.ledger import Ledger
from mwdlogd.storage.spool import SpoolSet

# Batches waiting for the journal; they share one fsync, so this bounds a group's size.
COMMIT_QUEUE = 64
# While idle, written-out journal segments are deleted this often.
RELEASE_EVERY_S = 1.0


class Committer:
    """Owns the journal. `journal_synced(seconds)` is told the time of each group's
    append + fsync (telemetry's event)."""

    def __init__(self, *, journal: Journal, ledger: Ledger, chunk_ids: ChunkIdLog,
                 resends: Resends, admission: Admission, tracker: BatchTracker,
                 limiter: trio.CapacityLimiter, journal_synced: Callable[[float], None],
                 spool_dir: Path | None = None) -> None:
        self._journal = journal
        self.spools = SpoolSet(spool_dir or journal.directory.parent / "spool")
        self._ledger = ledger
        self._chunk_ids = chunk_ids
        self._resends = resends
        self._admission = admission
        self._tracker = tracker
        self._limiter = limiter
        self._journal_synced = journal_synced
        self._send, self._receive = trio.open_memory_channel[Message](COMMIT_QUEUE)
        self._replay: list[Submission] = []
        self.journal_problem: str | None = None  # why the journal is failing, for /health
        self.journal_refusing = False  # ... and whether batches are refused for it

    @property
    def queued(self) -> int:
        """Batches handed over and not yet taken by the commit task."""
        return self._send.statistics().current_buffer_used

    async def commit(self, submission: Submission, *, dedupe: Dedupe | None = None,
                     room_wait_s: float = 0.0) -> Committed:
        """Durable once this returns (the ack point). Raises Refused without keeping
        anything. While the buffer is full this waits up to `room_wait_s` (math.inf:
        as long as it takes) for room before refusing; a `dedupe` key already durable
        makes this a duplicate that is not stored. A streamed request's batch names its
        sealed spool file: the caller may delete the file only while the batch is not
        `enqueued` or has an `error` (a cancelled wait may still be journaled)."""
        room_deadline = trio.current_time() + room_wait_s
        if dedupe is None:
            return await self._commit(submission, room_deadline)
        async with self._resends.claim(dedupe) as claim:
            if claim.duplicate:
                return Committed(0, True)
            submission.dedupe_key = dedupe.key
            committed = await self._commit(submission, room_deadline)
            claim.durable = True
            return committed

    async def _commit(self, submission: Submission, room_deadline: float) -> Committed:
        await self._admission.admit(submission.size, room_deadline)
        try:
            await self._send.send(submission)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise ShuttingDown("server is shutting down") from None
        submission.enqueued = True
        self._admission.admitted()
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

    def close(self) -> None:
        """Stop accepting; `run` journals what it has, then closes the router's channel.
        Synchronous: no checkpoint between the accept plane's end and the shielded flush."""
        self._send.close()

    async def recover(self, root: str) -> None:
        """Cut files back to before unfinished appends; queue what the journal still owes."""
        replay, report = await trio.to_thread.run_sync(
            recover, self._journal, self._ledger, self._chunk_ids, self._resends.memory, root,
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
            self._journal_synced(trio.current_time() - started)
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

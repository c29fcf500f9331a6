"""The commit stage: batches are journaled and fsynced together, then acked, then routed.

`commit` is what ingest awaits: it returns once the batch is durable in the journal
(DESIGN §4), or raises Overloaded / ShuttingDown / JournalFailed without keeping
anything. One task (`run`) owns the journal; batches that arrive during an fsync share
the next one (group commit).
"""

import logging
from collections.abc import Iterable
from typing import Any

import attrs
import msgpack
import trio

from mwdlogd import log
from mwdlogd.errors import MwdlogdError
from mwdlogd.pipeline.normalize import Routed
from mwdlogd.runtime.channels import Wake, receive_until
from mwdlogd.runtime.tracker import BatchTracker
from mwdlogd.storage.hourly import truncate_to
from mwdlogd.storage.intents import IntentLog
from mwdlogd.storage.journal import Journal

# Batches waiting for the journal; they share one fsync, so this bounds a group's size.
PIPELINE_QUEUE = 64
# While idle, written-out journal segments are deleted this often.
RELEASE_EVERY_S = 1.0


class Refused(MwdlogdError):
    """The batch was not kept; the client may retry later (HTTP 503)."""

    reason = "refused"


class ShuttingDown(Refused):
    reason = "shutting_down"


class Overloaded(Refused):
    reason = "buffer_full"


class JournalFailed(Refused):
    reason = "journal_failed"


@attrs.frozen
class Group:
    """A batch's records for one hourly file, as newline-terminated JSON lines."""

    path: str
    hour: int
    data: bytes
    count: int


@attrs.define
class Submission:
    tag: str
    groups: list[Group]
    size: int
    batch_id: int = -1
    error: Refused | None = None
    done: trio.Event = attrs.field(factory=trio.Event)

    @property
    def count(self) -> int:
        return sum(g.count for g in self.groups)

    def payload(self) -> bytes:
        return bytes(msgpack.packb([self.tag, [[g.path, g.hour, g.count, g.data]
                                         for g in self.groups]]))

    @classmethod
    def from_payload(cls, batch_id: int, payload: bytes) -> "Submission":
        tag, groups = msgpack.unpackb(payload)
        kept = [Group(path, hour, data, count) for path, hour, count, data in groups]
        return cls(tag, kept, sum(len(g.data) for g in kept), batch_id)


@attrs.frozen
class FlushAll:
    """Travels behind earlier batches; the router flushes every file when it arrives."""

    done: trio.Event = attrs.field(factory=trio.Event)


Message = Submission | FlushAll


def group_routed(tag: str, routed: Iterable[Routed]) -> Submission:
    by_path: dict[str, tuple[int, list[bytes]]] = {}
    for record in routed:
        by_path.setdefault(record.path, (record.hour, []))[1].append(record.line)
    groups = [Group(path, hour, b"".join(lines), len(lines))
              for path, (hour, lines) in by_path.items()]
    return Submission(tag, groups, sum(len(g.data) for g in groups))


class Pipeline:
    def __init__(self, *, journal: Journal, intents: IntentLog, tracker: BatchTracker,
                 total_limit: int, limiter: trio.CapacityLimiter) -> None:
        self._journal = journal
        self._intents = intents
        self._tracker = tracker
        self._total_limit = total_limit
        self._limiter = limiter
        self._send, self._receive = trio.open_memory_channel[Message](PIPELINE_QUEUE)
        self._replay: list[Submission] = []

    @property
    def overloaded(self) -> bool:
        return self._tracker.buffered_bytes >= self._total_limit

    @property
    def buffered_bytes(self) -> int:
        return self._tracker.buffered_bytes

    async def commit(self, tag: str, routed: Iterable[Routed]) -> int:
        """Durable once this returns (the ack point); the batch's record count."""
        submission = group_routed(tag, routed)
        if self._tracker.buffered_bytes + submission.size > self._total_limit:
            raise Overloaded(f"buffer holds {self._tracker.buffered_bytes} bytes; "
                             f"buffer.total_limit={self._total_limit}")
        try:
            await self._send.send(submission)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise ShuttingDown("server is shutting down") from None
        await submission.done.wait()
        if submission.error is not None:
            raise submission.error
        return submission.count

    async def flush(self) -> None:
        """Returns once everything acked before the call has been tried in its file."""
        marker = FlushAll()
        try:
            await self._send.send(marker)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return  # shutting down: the drain flushes everything anyway
        await marker.done.wait()

    async def close(self) -> None:
        """Stop accepting; `run` journals what it has, then closes the router's channel."""
        await self._send.aclose()

    async def recover(self, root: str) -> None:
        """Cut files back to before unfinished appends; queue what the journal still owes."""
        replay, report = await trio.to_thread.run_sync(
            _recover, self._journal, self._intents, root, limiter=self._limiter)
        for submission in replay:
            self._tracker.open(submission.batch_id, len(submission.groups), submission.size)
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
        watermark = self._tracker.watermark()
        try:
            ids = await trio.to_thread.run_sync(_append_and_release, self._journal,
                                                self._intents, payloads, watermark,
                                                limiter=self._limiter)
        except MwdlogdError as exc:
            log.event(logging.ERROR, "journal_append_failed", error=str(exc),
                      batches=len(batches))
            for submission in batches:
                submission.error = JournalFailed(f"journal write failed: {exc}")
                submission.done.set()
            return [m for m in group if isinstance(m, FlushAll)]
        for submission, batch_id in zip(batches, ids, strict=True):
            submission.batch_id = batch_id
            self._tracker.open(batch_id, len(submission.groups), submission.size)
            submission.done.set()
        return group

    async def release(self) -> None:
        """Delete journal segments that are wholly written (after the final flush)."""
        await trio.to_thread.run_sync(_append_and_release, self._journal, self._intents, [],
                                      self._tracker.watermark(), True, limiter=self._limiter)


def _append_and_release(journal: Journal, intents: IntentLog, payloads: list[bytes],
                        watermark: int, final: bool = False) -> list[int]:
    ids = journal.append(payloads) if payloads else []
    journal.release(watermark, final=final)
    intents.forget_below(watermark)
    return ids


def _recover(journal: Journal, intents: IntentLog, root: str
             ) -> tuple[list[Submission], dict[str, Any]]:
    unfinished = intents.open()
    cut = sum(truncate_to(root, path, size) for path, (size, _) in unfinished.items())
    intents.settle()
    replay, records = [], 0
    for batch_id, payload in journal.open(min_next_id=intents.max_id + 1):
        submission = Submission.from_payload(batch_id, payload)
        submission.groups = [g for g in submission.groups
                             if batch_id > intents.committed(g.path)]
        if submission.groups:
            submission.size = sum(len(g.data) for g in submission.groups)
            replay.append(submission)
            records += submission.count
    return replay, {"files_cut_back": len(unfinished), "bytes_cut": cut,
                    "batches_replayed": len(replay), "records_replayed": records}

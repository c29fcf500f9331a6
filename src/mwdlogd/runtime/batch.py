"""The batch types that travel from ingest through the journal to the router, and the
journal record codec (`Submission.payload` / `from_payload`: the on-disk format that
recovery reads back, also from journals written by earlier versions). A batch's records
are `model.Group`s, one per Destination; only the codec turns those into paths."""

from collections.abc import Iterable

import attrs
import msgpack
import trio

from mwdlogd.errors import Refused
from mwdlogd.model import Destination, Group
from mwdlogd.pipeline.normalize import Routed
from mwdlogd.runtime.tracker import BatchTracker
from mwdlogd.storage.chunk_ids import legacy_key
from mwdlogd.storage.spool import PieceMeta, group_fields, group_from_fields


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
    # Handed to the commit task: from here it is journaled unless `error` says otherwise,
    # even when its sender is cancelled while waiting (a streamed one's spool must stay).
    enqueued: bool = False
    spool: str | None = None  # the spool file's name
    pieces: list[PieceMeta] = attrs.field(factory=list)
    # replay: the ids each file holds already
    skip: dict[Destination, int] = attrs.field(factory=dict)

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
        groups = [group_fields(g) for g in self.groups]
        fields = [self.tag, groups, self.dedupe_key]
        if self.spool is not None:  # other batches stay readable by earlier versions
            fields += [self.spool, [[p.groups, p.size, p.count] for p in self.pieces]]
        return bytes(msgpack.packb(fields, unicode_errors="surrogateescape"))

    @classmethod
    def from_payload(cls, batch_id: int, payload: bytes) -> "Submission":
        tag, groups, dedupe_key, *streamed = msgpack.unpackb(
            payload, unicode_errors="surrogateescape")
        kept = [group_from_fields(fields) for fields in groups]
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
    by_file: dict[Destination, list[bytes]] = {}
    for destination, line in routed:
        by_file.setdefault(destination, []).append(line)
    groups = [Group(destination, b"".join(lines), len(lines))
              for destination, lines in by_file.items()]
    return Submission(tag, groups)

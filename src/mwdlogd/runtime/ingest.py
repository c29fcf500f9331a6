"""The ingest use case both servers call: normalise, admit, dedupe, commit, report.

A server is an adapter between a stream and a protocol core (h11 + RequestReader,
ForwardConnection); what happens to the records it has read is here, once: the
normalising context, the memory budget for what they decode to, room in the buffer,
the resend key, the commit that is the ack point, and one telemetry event for the
outcome. Refusals are raised as IngestError (status, fixed reason code, detail), which
the HTTP server answers and the forward server reports before closing the connection;
`forward` lets BudgetExceeded through, as the forward server's own reading raises it
and reports both the same way.
"""

import math
import time
from collections.abc import AsyncIterator, Iterator

import attrs
import trio

from mwdlogd import codec
from mwdlogd.errors import (
    BudgetExceeded,
    IngestError,
    Refused,
    ShuttingDown,
    TooDeep,
)
from mwdlogd.live import Live
from mwdlogd.model import Peer
from mwdlogd.pipeline.normalize import Context, Routed, normalize_batch
from mwdlogd.proto.auth import Identity
from mwdlogd.proto.forward import Entries
from mwdlogd.proto.ingest import Accepted, RequestReader
from mwdlogd.proto.streamed import Slicer, slicer_for
from mwdlogd.runtime.admission import Admission
from mwdlogd.runtime.batch import Committed, Submission, group_routed
from mwdlogd.runtime.budget import (
    INLINE_BYTES,
    INLINE_ENTRIES,
    OBJECT_BYTES,
    Budget,
    Lease,
    decode_off_loop,
    decoded_cost,
)
from mwdlogd.runtime.commit import Committer
from mwdlogd.runtime.dedupe import Dedupe
from mwdlogd.storage.chunk_ids import dedupe_key, forward_key
from mwdlogd.storage.spool import SpoolWriter
from mwdlogd.telemetry import Telemetry

TOO_DEEP = f"a record nests deeper than {codec.MAX_DEPTH} levels"


@attrs.frozen
class Outcome:
    """An acked request: its records, and whether it was a resend not stored again."""

    records: int
    duplicate: bool


class Ingest:
    """`budget` is the process's memory allowance (servers charge what they read to it
    too); `decoder` runs large decodes off the event loop, one at a time."""

    def __init__(self, *, live: Live, committer: Committer, admission: Admission,
                 telemetry: Telemetry, budget: Budget, decoder: trio.CapacityLimiter) -> None:
        self._live = live
        self._committer = committer
        self._admission = admission
        self._telemetry = telemetry
        self.budget = budget
        self.decoder = decoder

    def _context(self, tag: str, received_at: float, default_time: float | None) -> Context:
        return Context(tag, received_at, default_time or received_at,
                       self._live.config.server.hostname)

    async def _commit(self, submission: Submission, dedupe: Dedupe | None,
                      room_wait_s: float) -> tuple[Committed, float]:
        """The commit and how long it took; Refused becomes a 503."""
        started = trio.current_time()
        try:
            committed = await self._committer.commit(
                submission, dedupe=dedupe, room_wait_s=room_wait_s)
        except Refused as exc:
            raise IngestError(503, exc.reason, str(exc)) from None
        return committed, trio.current_time() - started

    # --- forward ---------------------------------------------------------------------

    async def forward(self, event: Entries, *, wire_bytes: int, peer: Peer, identity: str,
                      client: Identity) -> Committed:
        """Stores one forward message's entries (durable when this returns). A record
        for a customer `client` may not write refuses the whole message (403
        forbidden_customer: the connection closes without an ack, so the sender's retry
        cannot succeed until its configuration changes). Waits for buffer room as long
        as it takes: the connection is not read meanwhile."""
        forbidden = client.first_forbidden(record for _, record in event.entries)
        if forbidden is not None:
            index, customer = forbidden
            raise IngestError(403, "forbidden_customer", client.refusal(
                f"entry {index}", customer) + "; message not acked, connection closed")
        received_at = time.time()
        if event.invalid_utf8:
            self._telemetry.invalid_utf8_kept("forward", peer, event.tag, event.invalid_utf8)
        ctx = self._context(event.tag, received_at, None)
        window = self._live.config.forward.dedupe_window
        dedupe = (Dedupe(forward_key(identity, event.chunk), window)
                  if event.chunk is not None and window else None)
        with self.budget.lease() as records:
            await records.grow(decoded_cost(len(event.entries), wire_bytes),
                               "decoded forward entries")
            try:
                routed = await decode_off_loop(lambda: normalize_batch(
                    ((record, at, None) for at, record in event.entries), ctx),
                    inline=len(event.entries) <= INLINE_ENTRIES, limiter=self.decoder)
            except TooDeep:
                raise IngestError(400, "too_deep", f"tag {event.tag}: {TOO_DEEP}") from None
            committed, latency_s = await self._commit(group_routed(event.tag, routed), dedupe,
                                                      math.inf)
        self._telemetry.forward_accepted(event.tag, committed.records, committed.duplicate,
                                         latency_s)
        return committed

    # --- HTTP ------------------------------------------------------------------------

    async def hold_while_full(self, size: int, deadline: float) -> None:
        """While the buffer has no room for about `size` bytes, the caller leaves the
        request body unread (the client waits, as TCP backpressure makes forward clients
        wait) until there is room or `deadline`, else 503."""
        if not await self._admission.wait_for_room(size, deadline):
            if self._admission.stopping:
                raise IngestError(503, ShuttingDown.reason, "server is shutting down; "
                                  "nothing of this request was kept, retry")
            raise IngestError(503, "buffer_full", f"buffer holds "
                              f"{self._admission.buffered_bytes} bytes, no room for "
                              f"{size} more within buffer.total_limit for "
                              f"http.full_wait={self._live.config.http.full_wait}s; "
                              f"retry later")

    async def http(self, reader: RequestReader, lease: Lease, *, peer: Peer,
                   received_at: float, room_deadline: float) -> Outcome:
        """Stores a request whose body `reader` holds whole (`lease` holds its bytes);
        durable when this returns. A gzip ndjson body that inflates past
        http.body_size_limit is streamed instead (`http_streamed`)."""
        http = self._live.config.http
        try:
            try:
                accepted, routed = await self._decode(reader, lease, received_at,
                                                      room_deadline)
            except IngestError as exc:
                if exc.error != "body_too_large" or not reader.gzip or not reader.stream_limit:
                    raise
                lease.shrink_to(reader.received)
                return await self.http_streamed(reader, reader.pieces(), peer=peer,
                                                received_at=received_at)
        except TooDeep:
            raise IngestError(400, "too_deep", TOO_DEEP) from None
        except BudgetExceeded as exc:
            raise IngestError(413, "memory_budget", str(exc)) from None
        if accepted.invalid_utf8:
            self._telemetry.invalid_utf8_kept("http", peer, accepted.tag, accepted.invalid_utf8)
        committed, latency_s = await self._commit(
            group_routed(accepted.tag, routed),
            _http_dedupe(http.dedupe_window, accepted.identity.name, peer.subject,
                         accepted.digest),
            max(0.0, room_deadline - trio.current_time()))
        return self._http_accepted(accepted.tag, len(routed), committed, latency_s)

    def _http_accepted(self, tag: str, records: int, committed: Committed,
                       latency_s: float) -> Outcome:
        self._telemetry.http_accepted(tag, records, latency_s, committed.duplicate)
        return Outcome(records, committed.duplicate)

    async def http_streamed(self, reader: RequestReader, body: AsyncIterator[bytes], *,
                            peer: Peer, received_at: float) -> Outcome:
        """A large body: each slice is decoded, normalised and spooled as it
        arrives; the spool file is committed (one journal record naming it) once the
        whole body is in it and fsynced. Anything short of that deletes the file before
        this returns or raises, so a refused request keeps nothing."""
        http = self._live.config.http
        spool = await trio.to_thread.run_sync(SpoolWriter, self._committer.spools.directory)
        submission = Submission(reader.tag, [], spool=spool.name)
        try:
            invalid = await self._spool_body(body, reader, spool, received_at)
            if invalid:
                self._telemetry.invalid_utf8_kept("http", peer, reader.tag, invalid)
            await trio.to_thread.run_sync(spool.seal, self._live.config.buffer.fsync)
            submission.pieces = spool.pieces
            committed, latency_s = await self._commit(
                submission, _http_dedupe(http.dedupe_window, reader.identity.name,
                                         peer.subject, reader.digest), http.full_wait)
        except TooDeep:
            raise IngestError(400, "too_deep", TOO_DEEP) from None
        except BudgetExceeded as exc:
            raise IngestError(413, "memory_budget", str(exc)) from None
        finally:
            # Kept once handed to the commit task, even when this wait is cancelled
            # (shutdown): the journal may name the file. A duplicate was never handed.
            keep = submission.enqueued and submission.error is None
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(spool.close if keep else spool.discard)
        return self._http_accepted(reader.tag, submission.count, committed, latency_s)

    async def _spool_body(self, body: AsyncIterator[bytes], reader: RequestReader,
                          spool: SpoolWriter, received_at: float) -> int:
        """Spool each slice of the body; the records kept with invalid UTF-8."""
        http = self._live.config.http
        slicer = slicer_for(reader.content_type, gzip=reader.gzip,
                            limit=http.stream_body_limit, line_limit=http.body_size_limit)
        records = invalid = 0
        with self.budget.lease() as lease:
            async for data in body:
                for_slices = slicer.feed(data)
                while (piece := await self._next_slice(slicer, for_slices)) is not None:
                    count, bad = await self._spool_slice(reader, piece, spool, lease,
                                                         received_at)
                    records, invalid = records + count, invalid + bad
            last = slicer.end()
            while (piece := await self._next_slice(slicer, last)) is not None:
                count, bad = await self._spool_slice(reader, piece, spool, lease, received_at)
                records, invalid = records + count, invalid + bad
        if not records:
            raise IngestError(400, "empty_body", "request body is empty")
        return invalid

    async def _next_slice(self, slicer: Slicer, slices: Iterator[bytes]) -> bytes | None:
        """The next slice cut (None: no more), off the event loop when the slicer may
        take long (a JSON array nested deeper than one regex match)."""
        if slicer.on_loop:
            return next(slices, None)
        return await trio.to_thread.run_sync(lambda: next(slices, None), limiter=self.decoder)

    async def _spool_slice(self, reader: RequestReader, piece: bytes, spool: SpoolWriter,
                           lease: Lease, received_at: float) -> tuple[int, int]:
        """Decode, normalise and spool one slice under the memory budget; its records
        and those of them with invalid UTF-8."""
        deadline = trio.current_time() + self._live.config.http.full_wait
        await self._reserve(lease, decoded_cost(reader.records_at_most(piece), len(piece)),
                            "decoded slice", deadline)

        def work() -> tuple[int, int]:
            accepted = reader.decode(piece)
            routed = normalize_batch(accepted.with_text(), self._context(
                accepted.tag, received_at, accepted.default_time))
            groups = group_routed(accepted.tag, routed).groups
            spool.add(groups)
            return len(routed), accepted.invalid_utf8

        try:
            return await trio.to_thread.run_sync(work, limiter=self.decoder)
        finally:
            lease.shrink_to(0)

    async def _decode(self, reader: RequestReader, lease: Lease, received_at: float,
                      deadline: float) -> tuple[Accepted, list[Routed]]:
        """Gunzip, decode and normalise under the memory budget, off the event loop when
        large; the lease ends up holding the body and the records' estimated size."""
        raw = reader.received
        if reader.gzip:
            await self._reserve(lease, reader.limit, "gunzip output", deadline)
        else:
            await self._reserve(lease, raw, "request body copy", deadline)
        body = await decode_off_loop(reader.inflate, inline=not reader.gzip,
                                     limiter=self.decoder)
        lease.shrink_to(raw + len(body))
        await self._reserve(lease, decoded_cost(reader.records_at_most(body), len(body))
                            + reader.built_at_once(body) * OBJECT_BYTES, "decoded records",
                            deadline)

        def decode() -> tuple[Accepted, list[Routed]]:
            accepted = reader.decode(body)
            ctx = self._context(accepted.tag, received_at, accepted.default_time)
            return accepted, normalize_batch(accepted.with_text(), ctx)

        accepted, routed = await decode_off_loop(decode, inline=len(body) <= INLINE_BYTES,
                                                 limiter=self.decoder)
        lease.shrink_to(raw + decoded_cost(len(routed), len(body)))
        return accepted, routed

    async def _reserve(self, lease: Lease, size: int, what: str, deadline: float) -> None:
        """Take `size` of the budget, waiting for room until `deadline` (http.full_wait
        after the request began), else 503 (retry later); BudgetExceeded (413) when it
        could never fit."""
        with trio.move_on_at(deadline):
            await lease.grow(size, what)
            return
        raise IngestError(503, "memory_budget",
                          f"{what} needs {size} bytes but server.memory_limit="
                          f"{self.budget.limit} is in use by other requests "
                          f"({self.budget.used} bytes); retry later")


def _http_dedupe(window_s: float, identity: str, client: str, digest: bytes) -> Dedupe | None:
    """Who sent which bytes: a resend of them within http.dedupe_window is not stored
    again. None when the window is 0 (off)."""
    if not window_s:
        return None
    return Dedupe(dedupe_key(b"http", identity.encode(), client.encode(), digest), window_s)

"""The ingest use case without sockets: Ingest over a real journal and committer, with
the batches the router would get read straight from the committer's channel.

What both servers rely on is checked once here: the exact records of a batch reach the
router after the journal took them, a resend is acked without being stored again, and
a refusal (a customer the client may not write, a batch the buffer can never hold)
keeps nothing."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import attrs
import h11
import pytest
import trio
import trio.testing

from mwdlogd.errors import IngestError
from mwdlogd.live import Live, Settings, authorizer
from mwdlogd.model import Peer
from mwdlogd.proto.auth import FailureThrottle, Identity
from mwdlogd.proto.forward import Entries
from mwdlogd.proto.ingest import RequestReader
from mwdlogd.runtime.admission import Admission
from mwdlogd.runtime.batch import Committed, Message, Submission
from mwdlogd.runtime.budget import Budget
from mwdlogd.runtime.commit import Committer
from mwdlogd.runtime.dedupe import ChunkMemory, Resends
from mwdlogd.runtime.ingest import Ingest, Outcome
from mwdlogd.runtime.tracker import BatchTracker
from mwdlogd.storage.chunk_ids import CHUNK_IDS, ChunkIdLog
from mwdlogd.storage.journal import Journal
from mwdlogd.storage.ledger import Ledger
from mwdlogd.telemetry import Telemetry

from conftest import make_config
from helpers import engine_records, ndjson

ENGINE = Identity("engine-01")
ACME_ONLY = Identity("acme-only", frozenset({"acme"}))
PEER = Peer("10.0.0.5", 50122)  # a client without a certificate


@attrs.frozen
class Plane:
    ingest: Ingest
    committer: Committer
    journal: Journal
    routed: trio.MemoryReceiveChannel[Message]  # what the router would get
    telemetry: Telemetry


async def plane(nursery: trio.Nursery, tmp_path: Path, pki: Path, *, commit: bool = True,
                **sections: dict[str, Any]) -> Plane:
    """`commit=False`: the commit task does not run, so batches wait once handed over."""
    config = make_config(tmp_path, pki, **sections)
    telemetry = Telemetry("testhost")
    live = Live(Settings(config, authorizer(config, FailureThrottle(), telemetry.auth_event),
                         None))
    buffer = Path(config.buffer.path)
    journal = Journal(buffer / "journal", fsync=False)
    tracker = BatchTracker()
    admission = Admission(tracker, lambda: live.config.buffer.total_limit)
    committer = Committer(journal=journal, ledger=Ledger(buffer / "ledger", fsync=False),
                          chunk_ids=ChunkIdLog(buffer / CHUNK_IDS, window_s=3600, fsync=False),
                          resends=Resends(ChunkMemory(3600)), admission=admission,
                          tracker=tracker, limiter=trio.CapacityLimiter(1),
                          journal_synced=telemetry.journal_synced)
    await committer.recover(config.storage.root)
    to_router, routed = trio.open_memory_channel[Message](math.inf)
    if commit:
        await nursery.start(committer.run, to_router)
    ingest = Ingest(live=live, committer=committer, admission=admission, telemetry=telemetry,
                    budget=Budget(config.server.memory_limit),
                    decoder=trio.CapacityLimiter(1))
    return Plane(ingest, committer, journal, routed, telemetry)


def routed_ids(plane: Plane) -> list[str]:
    """The ids of every record handed on to the router so far."""
    ids: list[str] = []
    while True:
        try:
            message = plane.routed.receive_nowait()
        except trio.WouldBlock:
            return ids
        assert isinstance(message, Submission)
        ids += [json.loads(line)["id"] for group in message.groups
                for line in group.data.splitlines()]


def entries(records: list[dict[str, Any]], chunk: str | None) -> Entries:
    return Entries("nginx.access", [(time.time(), r) for r in records], chunk)


def http_reader(body: bytes) -> RequestReader:
    request = h11.Request(method="POST", target="/nginx.access", headers=[
        ("host", "mwdlogd"), ("content-type", "application/x-ndjson"),
        ("content-length", str(len(body)))])
    reader = RequestReader(request, authenticate=lambda _: ENGINE, body_limit=1024 * 1024)
    reader.receive_data(body)
    return reader


async def send_http(plane: Plane, body: bytes) -> Outcome:
    with plane.ingest.budget.lease() as lease:
        return await plane.ingest.http(http_reader(body), lease, peer=PEER,
                                       received_at=time.time(),
                                       room_deadline=trio.current_time())


async def test_forward_entries_reach_the_router_once_and_a_resend_is_only_acked(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    p = await plane(nursery, tmp_path, pki)
    message = entries(engine_records(3), chunk="c1")
    first = await p.ingest.forward(message, wire_bytes=300, peer=PEER, identity="engine",
                                   client=ENGINE)
    assert first == Committed(3, False)
    assert routed_ids(p) == ["r0", "r1", "r2"]
    again = await p.ingest.forward(message, wire_bytes=300, peer=PEER, identity="engine",
                                   client=ENGINE)
    assert again == Committed(0, True)
    assert routed_ids(p) == []
    assert p.telemetry.inputs["forward"].emit_records == 3
    assert p.telemetry.duplicate_chunks._value.get() == 1


async def test_a_forbidden_customer_refuses_the_whole_message_and_keeps_nothing(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    p = await plane(nursery, tmp_path, pki)
    records = engine_records(2) + engine_records(1, start=2, customer="globex")
    with pytest.raises(IngestError) as refused:
        await p.ingest.forward(entries(records, chunk="c1"), wire_bytes=300, peer=PEER,
                               identity="engine", client=ACME_ONLY)
    assert (refused.value.status, refused.value.error) == (403, "forbidden_customer")
    assert "entry 2" in refused.value.detail
    assert routed_ids(p) == []
    assert p.journal.next_id == 0


async def test_an_http_body_is_stored_once_and_its_resend_answered_as_duplicate(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    p = await plane(nursery, tmp_path, pki)
    body = ndjson(engine_records(4))
    assert await send_http(p, body) == Outcome(4, False)
    assert routed_ids(p) == ["r0", "r1", "r2", "r3"]
    assert await send_http(p, body) == Outcome(4, True)
    assert routed_ids(p) == []
    assert p.telemetry.duplicate_requests._value.get() == 1


async def test_a_batch_the_buffer_can_never_hold_is_refused_and_keeps_nothing(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    p = await plane(nursery, tmp_path, pki, buffer={"total_limit": "1KiB"})
    with pytest.raises(IngestError) as refused:
        await send_http(p, ndjson(engine_records(50)))
    assert (refused.value.status, refused.value.error) == (503, "buffer_full")
    assert routed_ids(p) == []
    assert p.journal.next_id == 0


async def test_a_streamed_request_cancelled_once_handed_over_keeps_its_spool_file(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    """Shutdown may cancel a streamed request while its batch waits for the journal: the
    batch can still be journaled, naming the spool file, so the file must stay (deleting
    it lost the records while a resend was answered as a duplicate)."""
    p = await plane(nursery, tmp_path, pki, commit=False)
    spools = p.committer.spools.directory
    reader = http_reader(ndjson(engine_records(5)))
    with trio.CancelScope() as scope:
        async def cancel_once_handed_over() -> None:
            while not p.committer.queued:  # spool writes run in threads: look again
                await trio.testing.wait_all_tasks_blocked(cushion=0.01)
            scope.cancel()

        nursery.start_soon(cancel_once_handed_over)
        await p.ingest.http_streamed(reader, reader.pieces(), peer=PEER,
                                     received_at=time.time())
    assert scope.cancelled_caught
    assert len([f for f in spools.iterdir() if f.is_file()]) == 1

"""Recovery at start-up, as plain blocking functions over the journal, the append ledger
and the chunk id log (no Trio: the server runs `recover` in a worker thread, and
tests/test_recovery_model.py drives it through crashes at every write)."""

import logging
import time
from collections.abc import Callable
from typing import Any

from mwdlogd import log
from mwdlogd.errors import StorageError
from mwdlogd.model import Destination
from mwdlogd.runtime.batch import Submission
from mwdlogd.runtime.dedupe import ChunkMemory
from mwdlogd.storage.chunk_ids import ChunkIdLog
from mwdlogd.storage.journal import Journal
from mwdlogd.storage.ledger import NONE, Ledger
from mwdlogd.storage.spool import PieceMeta, SpoolSet, read_pieces, remove_unnamed, spool_path

# A file's ledger state is kept this long after its last append (DESIGN: late records).
LEDGER_KEEP_S = 7 * 24 * 3600.0


def recover(journal: Journal, ledger: Ledger, chunk_ids: ChunkIdLog, memory: ChunkMemory,
            root: str, spools: SpoolSet | None = None
            ) -> tuple[list[Submission], dict[str, Any]]:
    """The journal's batches minus what their files already hold (per the ledger, which
    also cuts back unfinished appends as each file is looked at), and a report for the
    log; the resend keys still in the window go to `memory` (nothing else uses it before
    recovery ends). A key found only in the journal (the process died before its chunk
    id log entry reached the disk) is logged again, so it outlives the journal segment."""
    now = time.time()
    spools = spools or SpoolSet(journal.directory.parent / "spool")
    keys = chunk_ids.open(now, memory.remember)
    committed: dict[Destination, int] = {}

    def holds(destination: Destination) -> int:
        if destination not in committed:
            with ledger.hold(root, destination.path, create=False) as held:
                committed[destination] = held.committed if held is not None else NONE
        return committed[destination]

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
            recover_spooled(submission, spools, holds)
        submission.groups = [g for g in submission.groups
                             if batch_id > holds(g.destination)]
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


def recover_spooled(submission: Submission, spools: SpoolSet,
                    holds: Callable[[Destination], int]) -> None:
    """Count what of each piece its files do not hold yet (the router skips the rest)."""
    pieces = []
    path = spool_path(spools.directory, submission.spool or "")
    try:
        for index, groups in enumerate(read_pieces(path)):
            batch_id = submission.first_id + index
            left = [g for g in groups if batch_id > holds(g.destination)]
            pieces.append(PieceMeta(len(left), sum(len(g.data) for g in left),
                                    sum(g.count for g in left)))
            for group in groups:
                submission.skip.setdefault(group.destination, holds(group.destination))
    except StorageError as exc:
        log.event(logging.ERROR, "spool_lost", error=str(exc), batch_id=submission.batch_id,
                  records=submission.count, detail="a committed streamed request's spool "
                  "file is missing or damaged; its records not yet in their files are lost")
        pieces = []
    submission.pieces = pieces + [PieceMeta(0, 0, 0)] * (len(submission.pieces) - len(pieces))

"""A stateful model of the durable core: journal + append ledger + hourly files + recovery.

Hypothesis drives the real storage code (Journal, Ledger, append_members, MemberBuilder and
the server's own recovery) through sequences of accepts, flushes, journal releases and
crashes. A crash is a process death at any write, fsync or truncate of that code: the
call writes some prefix of its bytes (or nothing) and the process is gone; what reached
the file stays (a kill -9 keeps the page cache). After every recovery the model checks
what the server promises: each acked batch ends in its file exactly once, a batch whose
append never returned is there at most once, nothing else is there.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mwdlogd.model import Destination, Group
from mwdlogd.runtime.batch import Submission
from mwdlogd.runtime.dedupe import ChunkMemory
from mwdlogd.runtime.recovery import recover
from mwdlogd.storage import files, hourly, journal, ledger
from mwdlogd.storage.chunk_ids import ChunkIdLog
from mwdlogd.storage.hourly import MemberBuilder, append_members
from mwdlogd.storage.journal import Journal
from mwdlogd.storage.ledger import Ledger

PATHS = ["acme/nginx/a.test/2024/01/01/00.log.gz", "acme/openappsec/b.test/2024/01/01/00.log.gz"]
HOUR = 1704067200


class Crash(BaseException):
    """The process died here (not an OSError: no handler of the code may see it)."""


class CrashingOs(SimpleNamespace):
    """`os` for the storage modules, dying at the `countdown`-th durable-state call."""

    INTERCEPTED = ("write", "pwrite", "fsync", "fdatasync", "ftruncate", "truncate")

    def __init__(self) -> None:
        super().__init__()
        self.countdown = -1  # off
        self.prefix = 0.0  # share of a dying write's bytes that reach the file

    def __getattr__(self, name: str) -> Any:
        real = getattr(os, name)
        if name not in self.INTERCEPTED:
            return real
        return lambda *args: self._call(name, real, *args)

    def _call(self, name: str, real: Any, *args: Any) -> Any:
        if self.countdown > 0:
            self.countdown -= 1
            if self.countdown == 0:
                self.countdown = -1
                if name in ("write", "pwrite"):
                    data = bytes(args[1])
                    cut = data[:int(len(data) * self.prefix)]
                    if cut:
                        real(args[0], cut, *args[2:])
                raise Crash(name)
        return real(*args)


class DurableCore(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="mwdlogd-model-"))
        self.root = str(self.dir / "logs")
        self.os = CrashingOs()
        self.originals = [(m, m.os) for m in (journal, ledger, hourly, files)]
        for module, _ in self.originals:
            module.os = self.os
        self.acked: set[str] = set()  # lines of batches whose append returned
        self.unsure: set[str] = set()  # lines of batches whose append died
        self.next_line = 0
        self.crashes = 0
        self.start()

    def teardown(self) -> None:
        self.os.countdown = -1
        self._close()
        for module, real in self.originals:
            module.os = real
        shutil.rmtree(self.dir, ignore_errors=True)

    def _close(self) -> None:
        self.journal.close()
        self.chunk_ids.close()

    def start(self) -> None:
        """Recovery exactly as the server runs it; a crash inside it just starts it again."""
        while True:
            self.journal = Journal(self.dir / "journal", segment_bytes=600)
            self.ledger = Ledger(self.dir / "ledger")
            self.chunk_ids = ChunkIdLog(self.dir / "chunk-ids", window_s=3600)
            try:
                replay, _ = recover(self.journal, self.ledger, self.chunk_ids,
                                    ChunkMemory(3600), self.root)
            except Crash:
                self._close()
                self.crashes += 1
                continue
            break
        self.pending: dict[str, list[tuple[int, bytes]]] = {path: [] for path in PATHS}
        for submission in replay:
            for group in submission.groups:
                self.pending[group.destination.path].append((submission.batch_id, group.data))

    def _crash(self) -> None:
        self.crashes += 1
        self._close()
        self.start()

    @rule(counts=st.lists(st.integers(0, 3), min_size=len(PATHS), max_size=len(PATHS)),
          die_at=st.integers(0, 4), prefix=st.floats(0, 1))
    def accept(self, counts: list[int], die_at: int, prefix: float) -> None:
        groups, lines = [], []
        for path, count in zip(PATHS, counts, strict=True):
            mine = [f'{{"n":{self.next_line + k}}}\n' for k in range(count)]
            self.next_line += count
            if mine:
                groups.append(Group(Destination.from_path(path, HOUR), "".join(mine).encode(),
                                    count))
                lines += [line.strip() for line in mine]
        if not groups:
            return
        self.os.countdown, self.os.prefix = die_at, prefix
        try:
            (batch_id,) = self.journal.append([Submission("t", groups).payload()])
        except Crash:
            self.unsure.update(lines)
            self._crash()
            return
        self.os.countdown = -1
        self.acked.update(lines)
        for group in groups:
            self.pending[group.destination.path].append((batch_id, group.data))

    @precondition(lambda self: any(self.pending.values()))
    @rule(which=st.integers(0, len(PATHS) - 1), die_at=st.integers(0, 8),
          prefix=st.floats(0, 1))
    def flush(self, which: int, die_at: int, prefix: float) -> None:
        """What a writer does: every pending batch of one file as one member."""
        path = PATHS[which]
        batches = self.pending[path]
        if not batches:
            return
        member = MemberBuilder()
        for _, data in batches:
            member.add(data)
        self.os.countdown, self.os.prefix = die_at, prefix
        try:
            append_members(self.root, path, member.finish(), batches[-1][0], self.ledger)
        except Crash:
            self._crash()
            return
        self.os.countdown = -1
        self.pending[path] = []

    @rule()
    def release(self) -> None:
        """Delete the journal segments every file has written (the tracker's watermark)."""
        oldest = [batches[0][0] for batches in self.pending.values() if batches]
        self.journal.release(min(oldest, default=self.journal.next_id))

    @rule()
    def crash(self) -> None:
        self._crash()

    @rule()
    def settle(self) -> None:
        """Every pending file written, no crash: now the files must be exactly right."""
        for which, path in enumerate(PATHS):
            if self.pending[path]:
                self.flush(which, 0, 0.0)
        self.check_files()

    @invariant()
    def files_are_exact_whenever_nothing_is_pending(self) -> None:
        if not any(self.pending.values()):
            self.check_files()

    def check_files(self) -> None:
        stored: Counter[str] = Counter()
        for path in PATHS:
            full = os.path.join(self.root, path)
            if os.path.exists(full):
                with open(full, "rb") as file:
                    stored.update(gzip.decompress(file.read()).decode().splitlines())
        assert not (self.acked - set(stored)), "acked records lost"
        assert all(n == 1 for n in stored.values()), "records stored twice"
        assert set(stored) <= self.acked | self.unsure, "records nobody sent"


DurableCore.TestCase.settings = settings(max_examples=60, stateful_step_count=40,
                                         deadline=None)
test_durable_core_model = DurableCore.TestCase

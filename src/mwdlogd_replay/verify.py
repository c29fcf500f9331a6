"""What landed: reads a server's hourly files and compares this run's `replay_id`s with the
acked ones — missing (acked, not stored) and duplicated (stored twice) records."""

import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import attrs

from mwdlogd_replay.records import read_archive

VERIFY_POLL_S = 1.0


@attrs.frozen
class Verdict:
    stored: int
    missing: list[str]  # acked but not stored
    duplicated: list[str]  # stored more than once
    unacked_stored: int  # stored once without an ack (allowed: the ack may have been lost)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.duplicated


def verify(root: Path, run: str, acked: set[str]) -> Verdict:
    """Read every hourly file under `root` and compare this run's replay_ids with `acked`."""
    prefix = f"{run}-"
    stored: Counter[str] = Counter()
    for record in read_archive([root]):
        replay_id = record.get("replay_id")
        if isinstance(replay_id, str) and replay_id.startswith(prefix):
            stored[replay_id] += 1
    return Verdict(sum(stored.values()), sorted(acked - stored.keys()),
                   sorted(i for i, n in stored.items() if n > 1), len(stored.keys() - acked))


def await_verdict(root: Path, run: str, acked: set[str], *, settle: float,
                  poll: float = VERIFY_POLL_S) -> tuple[Verdict, float]:
    """Verify until every acked record is stored or `settle` seconds pass: the server
    writes records at its flush, seconds after the ack. Returns the verdict and the wait."""
    started = time.monotonic()
    while True:
        try:
            verdict = verify(root, run, acked)
        except (EOFError, ValueError, OSError, zlib.error) as exc:
            if time.monotonic() - started >= settle:
                raise
            # a gzip member being appended right now reads as truncated: read again
            print(f"verify: a file is being written ({exc}); reading again", file=sys.stderr)
        else:
            waited = time.monotonic() - started
            if not verdict.missing or waited >= settle:
                return verdict, waited
            print(f"verify: {len(acked) - len(verdict.missing):,} of {len(acked):,} acked "
                  f"records stored; waiting for the flush ({waited:.0f} of {settle:g} s)",
                  file=sys.stderr, flush=True)
        time.sleep(min(poll, max(settle - (time.monotonic() - started), 0.0)))



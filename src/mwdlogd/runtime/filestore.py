"""The writers' view of the disk: blocking storage functions run in worker threads."""

from pathlib import Path

import trio

from mwdlogd.model import Destination
from mwdlogd.storage.failed import move_to_failed
from mwdlogd.storage.hourly import MemberBuilder, append_members
from mwdlogd.storage.ledger import Ledger


class FileStore:
    """Hourly-file appends, compression and the failed/ area, behind one thread limiter.

    Calls are not abandoned on cancel (a write never outlives its task).
    """

    def __init__(self, *, root: str, failed_dir: Path, ledger: Ledger,
                 limiter: trio.CapacityLimiter) -> None:
        self.root = root
        self._failed_dir = failed_dir
        self._ledger = ledger
        self._limiter = limiter

    async def compress(self, builder: MemberBuilder, data: bytes) -> None:
        await trio.to_thread.run_sync(builder.add, data, limiter=self._limiter)

    async def finish(self, builder: MemberBuilder, tail: bytes) -> bytes:
        return await trio.to_thread.run_sync(builder.finish, tail, limiter=self._limiter)

    async def append(self, destination: Destination, members: bytes, max_id: int) -> int:
        return await trio.to_thread.run_sync(append_members, self.root, destination.path,
                                             members, max_id, self._ledger,
                                             limiter=self._limiter)

    async def fail(self, destination: Destination, members: bytes, max_id: int,
                   error: str) -> Path:
        return await trio.to_thread.run_sync(move_to_failed, self._failed_dir,
                                             destination.path,
                                             members, max_id, error, self._ledger, self.root,
                                             limiter=self._limiter)

"""The hand-off between ingest and storage, and the point where a batch may be acked."""

import attrs
import trio

from mwdlogd.pipeline.normalize import Routed

# Batches in flight between connection handlers and the router; small, as trio advises.
PIPELINE_QUEUE = 8


class ShuttingDown(Exception):
    """The pipeline no longer accepts batches."""


@attrs.define
class Submission:
    """A batch and its one-shot outcome, set by the router once the batch is safe."""

    tag: str
    routed: list[Routed]
    done: trio.Event = attrs.field(factory=trio.Event)


class Pipeline:
    """Ingest calls `commit`; it returns when the batch may be acknowledged.

    Today that is once every record is queued at its file's writer. The write-ahead
    journal (durable before ack) slots in here without the servers changing.
    """

    def __init__(self) -> None:
        self._send, self.receive = trio.open_memory_channel[Submission](PIPELINE_QUEUE)

    async def commit(self, tag: str, routed: list[Routed]) -> None:
        submission = Submission(tag, routed)
        try:
            await self._send.send(submission)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise ShuttingDown from None
        await submission.done.wait()

    async def close(self) -> None:
        """Stop accepting; the router finishes what it has and closes the writers."""
        await self._send.aclose()

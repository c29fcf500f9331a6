"""Which journal batches are not yet wholly in their hourly files, and how many bytes."""

import heapq
from collections.abc import Callable, Iterable


class BatchTracker:
    """Counts each open batch's unwritten groups; the watermark is the oldest open batch.

    Every journal segment below the watermark may be deleted, and the bytes of open
    batches are what `buffer.total_limit` bounds.
    """

    def __init__(self) -> None:
        self._open: dict[int, list[int]] = {}  # batch id -> [groups left, bytes]
        self._heap: list[int] = []
        self.buffered_bytes = 0
        self.next_id = 0
        self.on_release: Callable[[], None] = lambda: None  # told when bytes are freed

    def open(self, batch_id: int, groups: int, size: int) -> None:
        self._open[batch_id] = [groups, size]
        heapq.heappush(self._heap, batch_id)
        self.buffered_bytes += size
        self.next_id = max(self.next_id, batch_id + 1)

    def written(self, batch_ids: Iterable[int]) -> None:
        """One call per flushed member: each id once per group of it in the member."""
        for batch_id in batch_ids:
            entry = self._open[batch_id]
            entry[0] -= 1
            if entry[0] == 0:
                self.buffered_bytes -= entry[1]
                del self._open[batch_id]
                self.on_release()

    @property
    def open_batches(self) -> int:
        return len(self._open)

    def watermark(self) -> int:
        while self._heap and self._heap[0] not in self._open:
            heapq.heappop(self._heap)
        return self._heap[0] if self._heap else self.next_id

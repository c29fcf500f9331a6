"""A one-line progress bar for long operator commands, drawn only on a terminal."""

from typing import TextIO


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


class Progress:
    """Redraws `[#####.....] done/total label` in place on `stream` when it is a terminal;
    silent otherwise (cron mail and pipes get only the summary line)."""

    WIDTH = 30

    def __init__(self, stream: TextIO, total: int, what: str) -> None:
        self._stream = stream
        self._total = total
        self._what = what
        self._live = stream.isatty() and total > 0
        self._done = 0
        self._bytes = 0

    def step(self, size: int) -> None:
        self._done += 1
        self._bytes += size
        if self._live:
            filled = self.WIDTH * self._done // self._total
            self._stream.write(f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] "
                               f"{self._done}/{self._total} {self._what} "
                               f"{human_bytes(self._bytes)}\x1b[K")
            self._stream.flush()

    def interrupt(self) -> None:
        """End the bar's line so a log line can follow; the next step draws it again."""
        if self._live and self._done:
            self._stream.write("\n")
            self._stream.flush()

    def close(self) -> None:
        if self._live and self._done:
            self._stream.write("\n")
            self._stream.flush()

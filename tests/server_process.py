"""Run `python -m mwdlogd` as a real subprocess and follow its log lines (no sleeps:
readers wait on a condition that each new stderr line signals)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w

STARTUP_TIMEOUT_S = 30.0


class ServerProcess:
    def __init__(self, config_path: Path | None, *, cwd: Path | None = None,
                 env: dict[str, str] | None = None, argv: list[str] | None = None,
                 starting: Callable[[subprocess.Popen[str]], None] | None = None) -> None:
        """Runs `mwdlogd run --config config_path`, or `argv` when given; `starting` is
        called with the process before it listens."""
        self.lines: list[str] = []
        self._changed = threading.Condition()
        argv = argv or [sys.executable, "-m", "mwdlogd", "run", "--config", str(config_path)]
        self.process = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **(env or {})},
                                        stderr=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if starting is not None:
            starting(self.process)
        listening = self.wait_for(r" listening ")
        self.addresses = dict(re.findall(r"(\w+)=(\S+)", listening))

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.lines.append("<EOF>")
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = STARTUP_TIMEOUT_S, start: int = 0) -> str:
        """The first log line from index `start` matching `pattern`; fails on EOF or timeout."""
        regex = re.compile(pattern)

        def found() -> str | None:
            for line in self.lines[start:]:
                if regex.search(line):
                    return line
            return "<EOF>" if "<EOF>" in self.lines else None

        with self._changed:
            line = self._changed.wait_for(found, timeout)
        if line is None or line == "<EOF>":
            raise AssertionError(f"no log line matching {pattern!r}; log:\n" +
                                 "\n".join(self.lines))
        return line

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 60) -> int:
        code = self.process.wait(timeout)
        self._reader.join(timeout)
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.wait()


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(tomli_w.dumps(raw))
    return path

"""The real Engine forwarders as test peers: Fluentd 1.18 (source releases run on Debian's
Ruby) and Fluent Bit 4.2.8 (a prebuilt binary), from the `shared/peers` directory beside
the repository clone (CI has it there; `REAL_PEERS_DIR` points elsewhere).

Each is unpacked once into pytest's cache directory. When the directory is absent the
tests that need them skip, saying why.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[2]
# Beside the clone (CI), or beside the directory of worktrees (a worktree of a clone).
PEERS_DIR = Path(os.environ.get("REAL_PEERS_DIR")
                 or next((path for path in (_REPO.parent / "shared" / "peers",
                                            _REPO.parent.parent / "shared" / "peers")
                          if path.exists()), _REPO.parent / "shared" / "peers"))
FLUENTD_ARCHIVES = ("fluentd-1.18.0", "serverengine-2.4.0")
FLUENT_BIT = "fluent-bit-4.2.8-linux-x86_64.gz"
START_TIMEOUT_S = 60.0


def _need(path: Path, what: str) -> None:
    if not path.exists():
        pytest.skip(f"{what}: {path} is absent (the shared/ directory beside the repository "
                    f"clone, or set REAL_PEERS_DIR); real-forwarder tests skipped")


def _need_ruby() -> None:
    if shutil.which("ruby") is None:
        if os.environ.get("CI"):
            pytest.fail("ruby is not installed: tools/test.sh installs Fluentd's Debian packages")
        pytest.skip("Fluentd needs Debian's ruby and its gems: run tools/test.sh")


def fluentd_command(cache: Path) -> tuple[list[str], dict[str, str]]:
    """argv prefix and environment that run Fluentd 1.18 (`--no-supervisor`: one process,
    so a test's kill reaches the whole of it)."""
    for name in FLUENTD_ARCHIVES:
        _need(PEERS_DIR / "fluentd" / f"{name}.tar.gz", "Fluentd test peer")
    _need_ruby()
    home = cache / "fluentd"
    if not (home / "unpacked").exists():
        home.mkdir(parents=True, exist_ok=True)
        for name in FLUENTD_ARCHIVES:
            with tarfile.open(PEERS_DIR / "fluentd" / f"{name}.tar.gz") as archive:
                archive.extractall(home, filter="data")
        (home / "unpacked").touch()
    lib = ":".join(str(home / name / "lib") for name in FLUENTD_ARCHIVES)
    return (["ruby", str(home / "fluentd-1.18.0" / "bin" / "fluentd"), "--no-supervisor"],
            {"RUBYLIB": lib})


def fluent_bit_binary(cache: Path) -> Path:
    """The Fluent Bit 4.2.8 executable, gunzipped once."""
    archive = PEERS_DIR / "fluent-bit" / FLUENT_BIT
    _need(archive, "Fluent Bit test peer")
    binary = cache / "fluent-bit" / "fluent-bit"
    if not binary.exists():
        binary.parent.mkdir(parents=True, exist_ok=True)
        partial = binary.with_suffix(".partial")
        with gzip.open(archive) as source, partial.open("wb") as target:
            shutil.copyfileobj(source, target)
        partial.chmod(0o755)
        partial.rename(binary)
    return binary


class Peer:
    """A forwarder process whose combined output is followed line by line."""

    def __init__(self, argv: list[str], *, env: dict[str, str], cwd: Path, log: Path,
                 ready: str) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._log = log.open("w")
        self.process = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **env},
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, errors="replace")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_for(ready)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._log.write(line)
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.lines.append("<EOF>")
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT_S) -> str:
        regex = re.compile(pattern)

        def found() -> str | None:
            for line in self.lines:
                if regex.search(line) or line == "<EOF>":
                    return line
            return None

        with self._changed:
            line = self._changed.wait_for(found, timeout)
        if line is None or line == "<EOF>":
            raise AssertionError(f"forwarder: no line matching {pattern!r}; output:\n"
                                 + "\n".join(self.lines[-60:]))
        return line

    def wait_for_more(self, pattern: str, seen: int, timeout: float = START_TIMEOUT_S) -> None:
        """Until more than `seen` lines match `pattern`."""
        with self._changed:
            done = self._changed.wait_for(
                lambda: len(self._matching(pattern)) > seen or "<EOF>" in self.lines, timeout)
        if not done or "<EOF>" in self.lines:
            raise AssertionError(f"forwarder: no new line matching {pattern!r}; output:\n"
                                 + "\n".join(self.lines[-60:]))

    def matching(self, pattern: str) -> list[str]:
        with self._changed:
            return self._matching(pattern)

    def _matching(self, pattern: str) -> list[str]:
        regex = re.compile(pattern)
        return [line for line in self.lines if regex.search(line)]

    def stop(self) -> None:
        """SIGTERM (forwarders flush their buffers), SIGKILL after 20 s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(10)
        self._log.close()


def start_fluentd(cache: Path, config: str, workdir: Path) -> Peer:
    argv, env = fluentd_command(cache)
    path = workdir / "fluent.conf"
    path.write_text(config)
    return Peer([*argv, "-c", str(path)], env=env, cwd=workdir, log=workdir / "fluentd.out",
                ready=r"fluentd worker is now running")


def start_fluent_bit(cache: Path, config: str, workdir: Path, *, yaml: bool = False) -> Peer:
    binary = fluent_bit_binary(cache)
    path = workdir / ("fluent-bit.yaml" if yaml else "fluent-bit.conf")
    path.write_text(config)
    return Peer([str(binary), "-c", str(path)], env={}, cwd=workdir,
                log=workdir / "fluent-bit.out", ready=r"\[(sp|engine)\] .*started")

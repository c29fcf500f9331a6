"""`server.workers > 1`: bind the shared sockets once, run one worker process per slot,
and keep them running.

Every worker accepts from the same HTTPS, forward and health sockets, so the kernel
hands each new connection to whichever worker is free. A worker that dies is started
again (its own recovery replays its journal; the append ledger lets it share files with
the workers still running). A worker that dies before it ever became ready is a start-up
error (bad storage, bad certificate): the others are stopped and `run` exits non-zero.
SIGTERM/SIGINT drain every worker; SIGUSR1 is passed on to all of them.
"""

import logging
import os
import signal
import socket
import sys

import trio

from mwdlogd import log
from mwdlogd.config import Config
from mwdlogd.errors import MwdlogdError
from mwdlogd.servers.balance import ABSENT, board_size, set_counts
from mwdlogd.servers.listen import bind_shared
from mwdlogd.worker import SHARED_SOCKETS

RESTART_DELAY_S = 1.0
EXIT_WORKER_FAILED = 1


class StartupFailed(MwdlogdError):
    """A shared port could not be bound; no worker was started."""


class Supervisor:
    def __init__(self, config: Config, config_file: str, *, config_required: bool) -> None:
        self._config = config
        self._worker_argv = [sys.executable, "-m", "mwdlogd.worker", "--config", config_file]
        if not config_required:
            self._worker_argv.append("--config-optional")
        self._processes: dict[int, trio.Process] = {}
        self._side: dict[int, tuple[str, str]] = {}  # index -> (metrics, monitor) address
        self._load_board = -1  # memfd of the connection counts (servers/balance.py)
        self._stopping = False
        self._failed = False

    async def run(self) -> int:
        sockets = self._bind()
        lifeline_read, lifeline_write = os.pipe()  # workers see EOF if this process dies
        os.set_inheritable(lifeline_read, True)
        count = self._config.server.workers
        self._load_board = os.memfd_create("mwdlogd-connections")
        os.ftruncate(self._load_board, board_size(count))
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._watch_signals)
                async with trio.open_nursery() as workers:
                    ready = [trio.Event() for _ in range(count)]
                    for index in range(count):
                        workers.start_soon(self._keep_running, index, sockets, lifeline_read,
                                           ready[index])
                    for event in ready:
                        await event.wait()
                    if not self._failed:
                        self._log_listening(sockets)
                nursery.cancel_scope.cancel()
        finally:
            os.close(lifeline_write)
            os.close(lifeline_read)
            os.close(self._load_board)
            for sock in sockets.values():
                sock.close()
        return EXIT_WORKER_FAILED if self._failed else 0

    def _bind(self) -> dict[str, socket.socket]:
        sockets = {}
        for name in SHARED_SOCKETS:
            section = getattr(self._config, name)
            try:
                sockets[name] = bind_shared(section.bind, section.port)
            except OSError as exc:
                raise StartupFailed(f"{name}.port: cannot listen on {section.bind}:"
                                    f"{section.port}: {exc.strerror or exc}") from exc
        return sockets

    def _log_listening(self, sockets: dict[str, socket.socket]) -> None:
        count = self._config.server.workers
        addresses = {name: "{}:{}".format(*sock.getsockname()[:2])
                     for name, sock in sockets.items()}
        side = {section: ",".join(self._side[i][n] for i in range(count))
                for n, section in enumerate(("metrics", "monitor"))}
        log.event(logging.INFO, "listening", **addresses, **side,
                  storage=self._config.storage.root, workers=count)

    async def _keep_running(self, index: int, sockets: dict[str, socket.socket],
                            lifeline: int, ready: trio.Event) -> None:
        """Start worker `index`, and again whenever it dies (`ready` is set once it served)."""
        fds = ",".join(f"{name}={sock.fileno()}" for name, sock in sockets.items())
        try:
            while not self._stopping:
                code = await self._run_once(index, fds, [s.fileno() for s in sockets.values()],
                                            lifeline, ready)
                if self._stopping:
                    self._failed = self._failed or code != 0
                    return
                if not ready.is_set():
                    log.event(logging.ERROR, "worker_failed_to_start", index=index,
                              exit_code=code, detail="stopping the other workers")
                    self._failed = True
                    self._stop_all()
                    return
                log.event(logging.ERROR, "worker_died", index=index, exit_code=code,
                          detail=f"restarting in {RESTART_DELAY_S:g}s; its journal is recovered")
                await trio.sleep(RESTART_DELAY_S)
        finally:
            ready.set()

    async def _run_once(self, index: int, fds: str, socket_fds: list[int], lifeline: int,
                        ready: trio.Event) -> int:
        ready_read, ready_write = os.pipe()
        argv = [*self._worker_argv, "--index", str(index), "--sockets", fds,
                "--ready-fd", str(ready_write), "--lifeline-fd", str(lifeline),
                "--load-fd", str(self._load_board)]
        set_counts(self._load_board, index, self._config.server.workers, 0)
        try:
            process = await trio.lowlevel.open_process(
                argv, pass_fds=[*socket_fds, ready_write, lifeline, self._load_board])
        finally:
            os.close(ready_write)
        self._processes[index] = process
        log.event(logging.INFO, "worker_started", index=index, pid=process.pid)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._await_ready, index, ready_read, ready)
            code = await process.wait()
            nursery.cancel_scope.cancel()
        del self._processes[index]
        # gone: nobody defers to it until it is started again (with 0 connections)
        set_counts(self._load_board, index, self._config.server.workers, ABSENT)
        return code

    async def _watch_signals(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGUSR1:
                    self._send_all(signal.SIGUSR1)
                    continue
                log.event(logging.INFO, "signal", name=signal.Signals(signum).name,
                          detail="draining every worker")
                self._stop_all()
                return

    async def _await_ready(self, index: int, fd: int, ready: trio.Event) -> None:
        """The worker writes `metrics_address monitor_address` once it serves."""
        async with trio.lowlevel.FdStream(fd) as stream:
            line = await stream.receive_some()
        if line:
            metrics, monitor = line.decode().split()
            self._side[index] = (metrics, monitor)
            ready.set()

    def _stop_all(self) -> None:
        self._stopping = True
        self._send_all(signal.SIGTERM)

    def _send_all(self, signum: int) -> None:
        for process in self._processes.values():
            if process.returncode is None:
                process.send_signal(signum)

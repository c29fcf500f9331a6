"""`server.workers > 1`: bind the shared sockets once, run one worker process per slot,
and keep them running.

Every worker accepts from the same HTTPS, forward and health sockets, so the kernel
hands each new connection to whichever worker is free. A worker that dies is started
again (its own recovery replays its journal; the append ledger lets it share files with
the workers still running). A worker that dies before it ever became ready is a start-up
error (bad storage, bad certificate): the others are stopped and `run` exits non-zero.
SIGTERM/SIGINT drain every worker; SIGUSR1 (flush) and SIGHUP (reload) are passed on
to all of them.

`metrics.port` is served here: the sum of every worker's /metrics (metrics_sum.py), so
one scrape sees the whole server; each worker's own series are at `/metrics?worker=N`.
"""

import functools
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from urllib.parse import parse_qs

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import GaugeMetricFamily

from mwdlogd import log
from mwdlogd.config import Config
from mwdlogd.metrics_sum import WorkerTotals, sum_families
from mwdlogd.servers.balance import ABSENT, board_size, set_counts
from mwdlogd.servers.http_io import Response, json_response
from mwdlogd.servers.listen import address_of, bind_listeners, tcp_listener
from mwdlogd.servers.plain_http import not_found, run_plain_http
from mwdlogd.signals import server_signals
from mwdlogd.storage.lock import lock_buffer
from mwdlogd.telemetry import Telemetry
from mwdlogd.worker import SHARED_SOCKETS

RESTART_DELAY_S = 1.0
EXIT_WORKER_FAILED = 1
# A worker's /metrics must answer within this; Prometheus' default scrape timeout is 10 s.
SCRAPE_TIMEOUT_S = 5.0
MAX_EXPOSITION_BYTES = 64 * 1024 * 1024


class Supervisor:
    def __init__(self, config: Config, config_file: str, *, config_required: bool) -> None:
        self._config = config
        self._worker_argv = [sys.executable, "-m", "mwdlogd.worker", "--config", config_file]
        if not config_required:
            self._worker_argv.append("--config-optional")
        self._processes: dict[int, trio.Process] = {}
        self._starts: dict[int, int] = {}  # index -> how often it was started
        self._totals = WorkerTotals()
        self._summing = trio.Lock()  # scrapes update _totals in the order they were taken
        self._side: dict[int, tuple[str, str]] = {}  # index -> (metrics, monitor) address
        self._load_board = -1  # memfd of the connection counts (servers/balance.py)
        self._stopping = False
        self._failed = False

    async def run(self) -> int:
        lock = lock_buffer(Path(self._config.buffer.path))  # for the workers' areas too
        try:
            return await self._run()
        finally:
            os.close(lock)

    async def _run(self) -> int:
        sockets = bind_listeners(self._config, (*SHARED_SOCKETS, "metrics"))
        metrics = sockets.pop("metrics")
        lifeline_read, lifeline_write = os.pipe()  # workers see EOF if this process dies
        os.set_inheritable(lifeline_read, True)
        count = self._config.server.workers
        self._load_board = os.memfd_create("mwdlogd-connections")
        os.ftruncate(self._load_board, board_size(count))
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._watch_signals)
                await nursery.start(functools.partial(
                    run_plain_http, tcp_listener(metrics), self._metrics, protocol="metrics",
                    telemetry=Telemetry(self._config.server.hostname)))
                async with trio.open_nursery() as workers:
                    ready = [trio.Event() for _ in range(count)]
                    for index in range(count):
                        workers.start_soon(self._keep_running, index, sockets, lifeline_read,
                                           ready[index])
                    for event in ready:
                        await event.wait()
                    if not self._failed:
                        self._log_listening(sockets, metrics)
                nursery.cancel_scope.cancel()
        finally:
            os.close(lifeline_write)
            os.close(lifeline_read)
            os.close(self._load_board)
            for sock in [*sockets.values(), metrics]:
                sock.close()
        return EXIT_WORKER_FAILED if self._failed else 0

    def _log_listening(self, sockets: dict[str, socket.socket], metrics: socket.socket) -> None:
        count = self._config.server.workers
        addresses = {name: address_of(sock) for name, sock in sockets.items()}
        side = {section: ",".join(self._side[i][n] for i in range(count))
                for n, section in enumerate(("worker_metrics", "monitor"))}
        log.event(logging.INFO, "listening", **addresses, metrics=address_of(metrics), **side,
                  storage=self._config.storage.root, workers=count)

    async def _metrics(self, request: h11.Request) -> Response:
        """The sum over the workers, or `?worker=N`: that worker's own exposition."""
        path, _, query = request.target.decode("latin-1").partition("?")
        if path != "/metrics":
            return not_found(request, "/metrics")
        count = self._config.server.workers
        wanted = parse_qs(query).get("worker", [""])[-1]
        if wanted:
            if not (wanted.isdigit() and int(wanted) < count):
                return json_response(404, {"error": "not_found",
                                           "detail": f"worker must be 0..{count - 1}"})
            text = await self._scrape(int(wanted))
            if text is None:
                return json_response(503, {"error": "unavailable",
                                           "detail": f"worker {wanted} did not answer"})
            return Response(200, text.encode(), CONTENT_TYPE_LATEST.encode())
        texts: list[tuple[int, str | None]] = [(0, None)] * count

        async def scrape(index: int) -> None:
            start = self._starts.get(index, 0)
            texts[index] = start, await self._scrape(index)

        async with self._summing, trio.open_nursery() as nursery:
            for index in range(count):
                nursery.start_soon(scrape, index)
        up = GaugeMetricFamily("mwdlogd_worker_up", "1 when the worker's metrics are in this "
                               "sum (0: restarting or not answering: its last scrape counts)",
                               labels=["worker"])
        parts = []
        for index, (start, text) in enumerate(texts):
            up.add_metric([str(index)], 0.0 if text is None else 1.0)
            families = self._totals.update(index, start, text)
            if families is not None:
                parts.append(families)
        body = sum_families(parts, [up])
        return Response(200, body, CONTENT_TYPE_LATEST.encode())

    async def _scrape(self, index: int) -> str | None:
        side = self._side.get(index)
        if side is None or index not in self._processes:
            return None
        with trio.move_on_after(SCRAPE_TIMEOUT_S):
            return await _fetch_metrics(side[0])
        return None

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
        self._starts[index] = self._starts.get(index, 0) + 1
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
        with server_signals() as signals:
            task_status.started()
            async for signum in signals:
                if signum in (signal.SIGUSR1, signal.SIGHUP):
                    log.event(logging.INFO, "signal", name=signal.Signals(signum).name,
                              detail="passed on to every worker")
                    self._send_all(signum)
                    continue
                log.event(logging.INFO, "signal", name=signal.Signals(signum).name,
                          detail="draining every worker")
                self._stop_all()
                return

    async def _await_ready(self, index: int, fd: int, ready: trio.Event) -> None:
        """The worker writes `metrics_address monitor_address` once it serves (again after
        each restart: its private metrics port changes)."""
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


async def _fetch_metrics(address: str) -> str | None:
    """GET /metrics from a worker's private port; None if it does not answer 200."""
    host, _, port = address.rpartition(":")
    try:
        stream = await trio.open_tcp_stream(host, int(port))
    except OSError:
        return None
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        data = conn.send(h11.Request(method="GET", target="/metrics",
                                     headers=[("host", address), ("connection", "close")]))
        body = bytearray()
        try:
            await stream.send_all(data + (conn.send(h11.EndOfMessage()) or b""))
            status = 0
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(65536)))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > MAX_EXPOSITION_BYTES:
                        return None
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
        except (trio.BrokenResourceError, h11.ProtocolError):
            return None
    return body.decode() if status == 200 else None

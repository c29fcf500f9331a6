"""The main nursery: start order, readiness line, signals, and the phased shutdown."""

import logging
import signal
from collections.abc import Callable

import attrs
import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST

from mwdlogd import log
from mwdlogd.config import DEV_TOKEN, Config
from mwdlogd.errors import StorageError
from mwdlogd.proto.auth import Credential, TokenTable
from mwdlogd.runtime.pipeline import Pipeline
from mwdlogd.runtime.router import Router
from mwdlogd.runtime.writer import WriterSettings
from mwdlogd.servers.http_io import Response, json_response
from mwdlogd.servers.https import HttpsIngestServer, IngestSettings
from mwdlogd.servers.plain_http import not_found, run_plain_http
from mwdlogd.servers.tls import server_context
from mwdlogd.storage.hourly import append_member, check_writable
from mwdlogd.telemetry import Telemetry

# Hourly-file appends in flight at once; each is a blocking compress + write + fsync.
FILE_IO_THREADS = 4


@attrs.frozen
class Addresses:
    http: str
    health: str
    metrics: str


def token_table(config: Config) -> TokenTable:
    return TokenTable([Credential(t.name, t.token.encode(), frozenset(t.customers))
                       for t in config.auth.tokens])


class App:
    """One server instance. `run` reports its Addresses once every listener is up."""

    def __init__(self, config: Config, *, handle_signals: bool = False,
                 wall_clock: Callable[[], float] | None = None) -> None:
        self.config = config
        self.telemetry = Telemetry(config.server.hostname)
        self.pipeline = Pipeline()
        self._limiter = trio.CapacityLimiter(FILE_IO_THREADS)
        writer_settings = WriterSettings(config.buffer.flush_interval, config.buffer.chunk_limit,
                                         config.buffer.retry_max_interval)
        extra = {"wall_clock": wall_clock} if wall_clock else {}
        self.router = Router(store=self._store, settings=writer_settings,
                             timekey_wait_s=config.buffer.timekey_wait,
                             telemetry=self.telemetry, **extra)
        self._handle_signals = handle_signals
        self._stop = trio.Event()
        self._router_done = trio.Event()
        self._https_done = trio.Event()
        self.stopped = trio.Event()
        self.https: HttpsIngestServer | None = None

    async def _store(self, relpath: str, data: bytes) -> int:
        return await trio.to_thread.run_sync(append_member, self.config.storage.root, relpath,
                                             data, limiter=self._limiter)

    def request_stop(self) -> None:
        """Begin the drain: stop accepting, finish requests, flush, then `run` returns."""
        self._stop.set()

    async def flush(self, reason: str) -> None:
        await self.router.flush_all()
        log.event(logging.INFO, "flush_done", reason=reason)

    async def run(self, *, task_status: trio.TaskStatus[Addresses] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        problem = await trio.to_thread.run_sync(check_writable, self.config.storage.root)
        if problem:
            raise StorageError(self.config.storage.root, "open storage.root", problem)
        if any(t.token == DEV_TOKEN for t in self.config.auth.tokens):
            log.event(logging.WARNING, "DEV_TOKEN_IN_USE",
                      detail="auth.tokens holds the development token; replace it before "
                             "exposing this server")
        context = server_context(self.config.tls)
        self.https = HttpsIngestServer(
            settings=IngestSettings(self.config.http, self.config.server.hostname),
            ssl_context=context, tokens=token_table(self.config), pipeline=self.pipeline,
            telemetry=self.telemetry)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._run_router)
            addresses = Addresses(
                http=await nursery.start(self._run_https),
                health=await nursery.start(run_plain_http, self.config.health.bind,
                                           self.config.health.port, self._health),
                metrics=await nursery.start(run_plain_http, self.config.metrics.bind,
                                            self.config.metrics.port, self._metrics))
            if self._handle_signals:
                await nursery.start(self._watch_signals)
            log.event(logging.INFO, "listening", http=addresses.http, health=addresses.health,
                      metrics=addresses.metrics, storage=self.config.storage.root)
            task_status.started(addresses)
            await self._stop.wait()
            await self._drain()
            nursery.cancel_scope.cancel()
        self.stopped.set()

    async def _run_router(self) -> None:
        try:
            await self.router.run(self.pipeline.receive)
        finally:
            self._router_done.set()

    async def _drain(self) -> None:
        timeout = self.config.server.shutdown_timeout
        log.event(logging.INFO, "shutdown_started", timeout_s=timeout,
                  open_files=self.router.open_files)
        with trio.move_on_after(timeout) as scope:
            assert self.https is not None
            self.https.stop_accepting()
            await self._https_done.wait()
            await self.pipeline.close()
            await self._router_done.wait()
        if scope.cancelled_caught:
            log.event(logging.ERROR, "shutdown_timeout", timeout_s=timeout,
                      detail="pending records could not all be written in time")
        else:
            log.event(logging.INFO, "shutdown_complete")

    async def _run_https(self, *, task_status: trio.TaskStatus[str]) -> None:
        """The https task returns once its last connection closed after stop_accepting."""
        assert self.https is not None
        try:
            await self.https.run(task_status=task_status)
        finally:
            self._https_done.set()

    async def _watch_signals(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as signals:
            task_status.started()
            async with trio.open_nursery() as nursery:
                async for signum in signals:
                    if signum == signal.SIGUSR1:
                        nursery.start_soon(self.flush, "SIGUSR1")
                    else:
                        log.event(logging.INFO, "signal", name=signal.Signals(signum).name)
                        self.request_stop()

    async def _health(self, request: h11.Request) -> Response:
        if request.target.split(b"?")[0] != b"/health":
            return not_found(request, "/health")
        problem = await trio.to_thread.run_sync(check_writable, self.config.storage.root)
        if self._stop.is_set():
            problem = "shutting down"
        status = {"status": "ok" if not problem else "unavailable",
                  "storage_root": self.config.storage.root,
                  "open_files": self.router.open_files}
        if problem:
            status["problem"] = problem
        return json_response(503 if problem else 200, status)

    async def _metrics(self, request: h11.Request) -> Response:
        if request.target.split(b"?")[0] != b"/metrics":
            return not_found(request, "/metrics")
        return Response(200, self.telemetry.exposition(), CONTENT_TYPE_LATEST.encode())


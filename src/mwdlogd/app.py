"""The main nursery: start order, readiness line, signals, reload, and the phased shutdown."""

import gc
import logging
import mmap
import os
import signal
import socket
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path

import attrs
import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST

from mwdlogd import log
from mwdlogd.certs import served_certificate
from mwdlogd.config import Config, check_tls_files
from mwdlogd.errors import MwdlogdError, StorageError
from mwdlogd.live import Live, Settings, authorizer, merge_reload
from mwdlogd.proto.auth import FailureThrottle
from mwdlogd.runtime.admission import Admission
from mwdlogd.runtime.batch import FlushAll, Message
from mwdlogd.runtime.budget import Budget
from mwdlogd.runtime.commit import Committer
from mwdlogd.runtime.dedupe import ChunkMemory, Resends
from mwdlogd.runtime.filestore import FileStore
from mwdlogd.runtime.ingest import Ingest
from mwdlogd.runtime.router import Router
from mwdlogd.runtime.tail import TailHub
from mwdlogd.runtime.tracker import BatchTracker
from mwdlogd.runtime.writer import WriterSettings
from mwdlogd.servers import monitor_agent
from mwdlogd.servers.acceptor import ConnectionLimits
from mwdlogd.servers.balance import Balance
from mwdlogd.servers.forward import ForwardServer
from mwdlogd.servers.http_io import Response, json_response
from mwdlogd.servers.https import HttpsIngestServer
from mwdlogd.servers.listen import StreamListener, bind_listeners, stream_listeners
from mwdlogd.servers.monitor import MonitorServer
from mwdlogd.servers.plain_http import Handler, not_found, run_plain_http
from mwdlogd.servers.tls import server_context
from mwdlogd.signals import server_signals
from mwdlogd.startup import Risk, certificate_warnings
from mwdlogd.storage.chunk_ids import CHUNK_IDS, ChunkIdLog, PeerChunkIds
from mwdlogd.storage.files import storage_id
from mwdlogd.storage.hourly import check_writable
from mwdlogd.storage.journal import Journal
from mwdlogd.storage.ledger import Ledger
from mwdlogd.storage.lock import lock_buffer
from mwdlogd.telemetry import BufferView, Telemetry

# Hourly-file appends in flight at once; each is a blocking compress + write + fsync.
FILE_IO_THREADS = 4
# Journaled batches waiting for the router; small: backpressure reaches the journal task.
ROUTER_QUEUE = 16
LISTENERS = ("http", "forward", "health", "metrics", "monitor")


@attrs.frozen
class Addresses:
    http: str
    forward: str
    health: str
    metrics: str
    monitor: str


@attrs.frozen
class WorkerSlot:
    """What a worker process gets from the supervisor (see mwdlogd.worker)."""

    index: int
    sockets: dict[str, socket.socket]  # "http", "forward", "health": bound once, shared
    ledger_dir: Path  # shared by every worker
    peer_chunk_ids: tuple[Path, ...]  # the other workers' chunk id logs
    load_board: mmap.mmap  # every worker's connection counts (servers/balance.py)


@attrs.define
class Drain:
    """One shutdown, from `shutdown_started` to the line that says how it ended."""

    timeout_s: float
    deadline: float  # trio time by which in-flight requests and the final flush are done
    records_before: int
    members_before: int
    flushed: bool = False  # the storage plane ran dry before the deadline


def writer_settings(config: Config) -> WriterSettings:
    buffer = config.buffer
    return WriterSettings(flush_interval_s=buffer.flush_interval,
                          chunk_limit=buffer.chunk_limit,
                          retry_max_interval_s=buffer.retry_max_interval,
                          retry_timeout_s=buffer.retry_timeout,
                          compression=config.storage.compression)


class App:
    """One server instance. `run` reports its Addresses once every listener is up.

    `loader` reads the config file again for a reload (SIGHUP); without one (tests that
    build a Config in memory) a reload is refused. `listeners`, one per name of LISTENERS,
    replace binding the config's addresses (tests hand memory listeners: plain streams,
    no TLS)."""

    def __init__(self, config: Config, *, handle_signals: bool = False,
                 wall_clock: Callable[[], float] | None = None,
                 slot: WorkerSlot | None = None,
                 loader: Callable[[], Config] | None = None,
                 listeners: Mapping[str, StreamListener] | None = None) -> None:
        self.telemetry = Telemetry(config.server.hostname)
        self.live = Live(Settings(config, authorizer(config, FailureThrottle(),
                                                     self.telemetry.auth_event), None))
        self._loader = loader
        self._slot = slot
        buffer = Path(config.buffer.path)
        ledger = Ledger(slot.ledger_dir if slot else buffer / "ledger",
                        worker=slot.index if slot else 0, fsync=config.buffer.fsync)
        self.journal = Journal(buffer / "journal", fsync=config.buffer.fsync)
        self.tracker = BatchTracker()
        window = max(config.forward.dedupe_window, config.http.dedupe_window)
        chunk_ids = ChunkIdLog(buffer / CHUNK_IDS, window_s=window, fsync=config.buffer.fsync)
        self.admission = Admission(self.tracker, lambda: self.config.buffer.total_limit)
        self.resends = Resends(ChunkMemory(window),
                               PeerChunkIds(list(slot.peer_chunk_ids)) if slot else None)
        self.committer = Committer(journal=self.journal, ledger=ledger, chunk_ids=chunk_ids,
                                   resends=self.resends, admission=self.admission,
                                   tracker=self.tracker, limiter=trio.CapacityLimiter(1),
                                   journal_synced=self.telemetry.journal_synced,
                                   spool_dir=buffer / "spool")
        store = FileStore(root=config.storage.root, failed_dir=buffer / "failed",
                          ledger=ledger, limiter=trio.CapacityLimiter(FILE_IO_THREADS))
        extra = {"wall_clock": wall_clock} if wall_clock else {}
        self.budget = Budget(config.server.memory_limit)  # one for both ports
        self.telemetry.memory_budget_used = lambda: self.budget.used
        self.ingest = Ingest(live=self.live, committer=self.committer,
                             admission=self.admission, telemetry=self.telemetry,
                             budget=self.budget, decoder=trio.CapacityLimiter(1))
        self.tail = TailHub(self.telemetry)
        self.router = Router(store=store, settings=lambda: writer_settings(self.config),
                             timekey_wait_s=lambda: self.config.buffer.timekey_wait,
                             telemetry=self.telemetry, tracker=self.tracker, tail=self.tail,
                             spool_dir=buffer / "spool", **extra)
        self.telemetry.buffer = BufferView(
            total_bytes=lambda: self.tracker.buffered_bytes,
            stage_bytes=self.router.pending_bytes, queue_length=self.router.pending_files,
            timekeys=self.router.timekeys, journal_bytes=lambda: self.journal.size_bytes,
            waiting_for_room=lambda: self.admission.waiting_for_room,
            limit_bytes=lambda: self.config.buffer.total_limit)
        self._handle_signals = handle_signals
        self._listeners = listeners
        self._stop = trio.Event()
        self.stopped = trio.Event()
        self.https: HttpsIngestServer | None = None
        self.forward: ForwardServer | None = None
        self.limits = ConnectionLimits(lambda: (self.config.server.max_connections,
                                                self.config.server.max_connections_per_address))

    @property
    def config(self) -> Config:
        """The running config (a reload swaps it; restart-only keys keep their values)."""
        return self.live.config

    def request_stop(self) -> None:
        """Begin the drain: stop accepting, finish requests, flush, then `run` returns."""
        self._stop.set()

    async def flush(self, reason: str) -> FlushAll:
        """Write everything acked so far to its file; says how many records and files."""
        done = await self.committer.flush()
        log.event(logging.INFO, "flush_done", reason=reason, records=done.records,
                  files=done.files, failed_files=done.failed_files)
        return done

    async def _flush_for_monitor(self) -> dict[str, int]:
        done = await self.flush("/api/flush")
        return {"records": done.records, "files": done.files,
                "failed_files": done.failed_files,
                "worker": self._slot.index if self._slot else 0}

    async def reload(self) -> bool:
        """Read the config file again and apply what can change live. A file that does
        not load is refused (`reload_failed`, the running config stays); restart-only
        keys that differ are named (`reload_ignored`) and keep their running values."""
        try:
            new, context, warnings, served = await trio.to_thread.run_sync(self._load_again)
        except (MwdlogdError, OSError) as exc:
            log.event(logging.ERROR, "reload_failed", error=str(exc),
                      detail="the running config is kept")
            return False
        merged, changed, ignored = merge_reload(self.config, new)
        self.live.swap(Settings(merged, authorizer(
            merged, self.live.settings.authorizer.failures, self.telemetry.auth_event), context))
        self.admission.limit_changed()
        log.set_level(merged.server.log_level)
        log.event(logging.INFO, "reloaded", changed=",".join(changed) or "nothing",
                  tokens=",".join(t.name for t in merged.auth.tokens), tls="reloaded",
                  **served)
        if ignored:
            log.event(logging.WARNING, "reload_ignored", keys=",".join(ignored),
                      detail="restart to apply")
        for warning in warnings:
            log.event(logging.WARNING, warning.event, key=warning.key, problem=warning.problem)
        return True

    def _load_again(self) -> tuple[Config, ssl.SSLContext, list[Risk], dict[str, str]]:
        """The config file and its TLS files, read and checked, the certificates' expiry
        warnings and the served certificate's log fields (blocking; in a thread)."""
        if self._loader is None:
            raise MwdlogdError("no config file to reload (config given in memory)")
        new = self._loader()
        check_tls_files(new)
        return new, server_context(new.tls), certificate_warnings(new), served_certificate(
            Path(new.tls.cert))

    async def run(self, *, task_status: trio.TaskStatus[Addresses] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Raises StorageError before anything else when another server holds buffer.path
        (a worker's buffer area is held by its supervisor)."""
        lock = -1 if self._slot else lock_buffer(Path(self.config.buffer.path))
        try:
            await self._run(task_status)
        finally:
            if lock >= 0:
                os.close(lock)

    async def _run(self, task_status: trio.TaskStatus[Addresses]) -> None:
        """The nursery tree of DESIGN §5. Side services (health, metrics, monitor,
        signals) live from start to the very end; inside them the storage plane (commit
        task, router, writers) outlives the accept plane (the ingest servers) that feeds
        it. The drain closes the accept plane and lets it finish its requests, closes the
        commit task, then lets the storage plane run dry (the final flush) under a
        shielded deadline, so once the accept plane has finished, cancelling `run` cannot
        cut the flush short (a cancel or crash before that leaves the acked batches to the
        journal's recovery at the next start)."""
        for key, path in (("storage.root", self.config.storage.root),
                          ("buffer.path", self.config.buffer.path)):
            problem = await trio.to_thread.run_sync(check_writable, path)
            if problem:
                raise StorageError(path, f"open {key}", problem)
        self.live.swap(attrs.evolve(self.live.settings, ssl_context=server_context(
            self.config.tls)))
        listeners = await self._listen_and_recover()
        self.https = HttpsIngestServer(live=self.live, listener=listeners["http"],
                                       ingest=self.ingest, telemetry=self.telemetry,
                                       limits=self.limits, balance=self._balance("http"))
        self.forward = ForwardServer(live=self.live, listener=listeners["forward"],
                                     ingest=self.ingest, telemetry=self.telemetry,
                                     limits=self.limits, balance=self._balance("forward"))
        drain: Drain | None = None
        try:
            async with trio.open_nursery() as services:  # health, metrics, monitor, signals
                side = await self._start_services(services, listeners)
                async with trio.open_nursery() as storage:  # commit task, router, writers
                    await storage.start(self._run_storage)
                    async with trio.open_nursery() as accept:  # HTTPS and forward ingest
                        addresses = Addresses(http=await accept.start(self.https.run),
                                              forward=await accept.start(self.forward.run),
                                              **side)
                        self._log_listening(addresses)
                        task_status.started(addresses)
                        await self._stop.wait()
                        drain = self._begin_drain()
                        accept.cancel_scope.deadline = drain.deadline
                    self.committer.close()  # nothing commits any more
                    storage.cancel_scope.shield = True  # the final flush
                    storage.cancel_scope.deadline = drain.deadline
                drain.flushed = not storage.cancel_scope.cancelled_caught
                services.cancel_scope.cancel()
        finally:
            if drain is not None:
                self._end_drain(drain)
            self.stopped.set()

    async def _listen_and_recover(self) -> dict[str, StreamListener]:
        """Bind what is not inherited (ListenFailed names the key), then recover the
        journal, so a taken port fails before a long recovery; the listeners."""
        if self._listeners is not None:
            await self.committer.recover(self.config.storage.root)
            return dict(self._listeners)
        inherited = self._slot.sockets if self._slot else {}
        owned = bind_listeners(self.config, [name for name in LISTENERS if name not in inherited])
        try:
            await self.committer.recover(self.config.storage.root)
        except BaseException:
            for sock in owned.values():
                sock.close()
            raise
        return stream_listeners({**inherited, **owned},
                                forward_tls=self.config.forward.transport == "tls",
                                context=self._ssl_context)

    def _ssl_context(self) -> ssl.SSLContext:
        """The TLS context for the next handshake (a reload swaps it)."""
        context = self.live.settings.ssl_context
        assert context is not None  # loaded in _run before anything listens
        return context

    async def _start_services(self, services: trio.Nursery,
                              listeners: Mapping[str, StreamListener]) -> dict[str, str]:
        """Health, metrics, monitor and the signal handler; the servers' addresses."""
        monitor = MonitorServer(
            listener=listeners["monitor"], tail=self.tail, live=self.live,
            plugins=lambda: monitor_agent.plugins(self.config, self.telemetry),
            flush=self._flush_for_monitor, telemetry=self.telemetry)
        side = {"health": await services.start(self._plain_http, listeners["health"],
                                                self._health, "health"),
                "metrics": await services.start(self._plain_http, listeners["metrics"],
                                                 self._metrics, "metrics"),
                "monitor": await services.start(monitor.run)}
        if self._handle_signals:
            await services.start(self._watch_signals)
        return side

    async def _run_storage(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                           ) -> None:
        """The storage plane: the commit task journals batches (group commit, fsync) and
        passes them to the router, which feeds one writer task per destination. Once
        `committer.close()` the commit task ends the router's channel and the router
        closes every writer, each flushing what it holds; then the journal segments
        written out are deleted."""
        to_router, from_committer = trio.open_memory_channel[Message](ROUTER_QUEUE)
        async with trio.open_nursery() as plane:
            plane.start_soon(self.router.run, from_committer)
            await plane.start(self.committer.run, to_router)
            task_status.started()
        await self.committer.release()

    def _log_listening(self, addresses: Addresses) -> None:
        log.event(logging.INFO, "listening" if self._slot is None else "worker_listening",
                  http=addresses.http, forward=addresses.forward,
                  health=addresses.health, metrics=addresses.metrics,
                  monitor=addresses.monitor, storage=self.config.storage.root)

    def _balance(self, listener: str) -> Balance | None:
        slot = self._slot
        if slot is None:
            return None
        return Balance(slot.load_board, listener, slot.index, self.config.server.workers)

    def _begin_drain(self) -> Drain:
        """Stop accepting: the listeners close, idle connections go, requests in flight
        finish; commits waiting for buffer room give up (nothing of them was kept)."""
        assert self.https is not None and self.forward is not None
        timeout = self.config.server.shutdown_timeout
        log.event(logging.INFO, "shutdown_started", timeout_s=timeout,
                  open_files=self.router.open_files)
        out = self.telemetry.output
        drain = Drain(timeout, trio.current_time() + timeout, out.written_records,
                      out.write_count)
        self.admission.stop_waiting()
        self.https.stop_accepting()
        self.forward.stop_accepting()
        return drain

    def _end_drain(self, drain: Drain) -> None:
        """The drain's outcome line: complete only when the storage plane ran dry and no
        acked batch is left for the next start's recovery."""
        if not drain.flushed or self.tracker.open_batches:
            log.event(logging.WARNING, "shutdown_incomplete", timeout_s=drain.timeout_s,
                      batches_left_in_journal=self.tracker.open_batches,
                      bytes_left_in_journal=self.tracker.buffered_bytes,
                      detail="recovered from the journal at the next start")
        else:
            out = self.telemetry.output
            log.event(logging.INFO, "shutdown_complete",
                      records=out.written_records - drain.records_before,
                      files=out.write_count - drain.members_before)

    async def _watch_signals(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
        with server_signals() as signals:
            task_status.started()
            async with trio.open_nursery() as nursery:
                async for signum in signals:
                    if signum == signal.SIGUSR1:
                        nursery.start_soon(self.flush, "SIGUSR1")
                    elif signum == signal.SIGHUP:
                        log.event(logging.INFO, "signal", name="SIGHUP",
                                  detail="reloading the config file")
                        await self.reload()
                    else:
                        log.event(logging.INFO, "signal", name=signal.Signals(signum).name)
                        self.request_stop()

    async def _plain_http(self, listener: StreamListener, handler: Handler, protocol: str, *,
                          task_status: trio.TaskStatus[str]) -> None:
        await run_plain_http(listener, handler, telemetry=self.telemetry, protocol=protocol,
                             task_status=task_status)

    async def _health(self, request: h11.Request) -> Response:
        """200 only while batches are acked and files are written; else 503 with every
        reason (the container health check and `mwdlogd health` read the status)."""
        if request.target.split(b"?")[0] != b"/health":
            return not_found(request, "/health")
        problems = [self._public(problem) for problem in await self._problems()]
        # Anyone may ask: no paths (storage_id stands for storage.root), limits or names.
        status: dict[str, object] = {"status": "ok" if not problems else "unavailable",
                                     "storage_id": storage_id(self.config.storage.root),
                                     "open_files": self.router.open_files,
                                     "buffered_bytes": self.tracker.buffered_bytes}
        if problems:
            status["problem"] = "; ".join(problems)
            status["problems"] = problems
        return json_response(503 if problems else 200, status)

    def _public(self, problem: str) -> str:
        """A problem as /health may show it: the storage and buffer paths named by their
        keys (the log and `mwdlogd doctor` give them)."""
        for key in ("storage.root", "buffer.path"):
            path = self.config.storage.root if key == "storage.root" else self.config.buffer.path
            for form in {path, os.path.realpath(path)}:
                problem = problem.replace(form, f"{{{key}}}")
        return problem

    async def _problems(self) -> list[str]:
        problems = []
        if self._stop.is_set():
            problems.append("shutting down")
        root = await trio.to_thread.run_sync(check_writable, self.config.storage.root)
        if root:
            problems.append(root)
        if self.committer.journal_problem:
            refusing = (" (new batches refused with 503 journal_failed)"
                        if self.committer.journal_refusing else "")
            problems.append(f"journal failing{refusing}: {self.committer.journal_problem}")
        if self.admission.refusing:
            problems.append(f"buffer full (new batches refused with 503 buffer_full): "
                            f"{self.tracker.buffered_bytes} bytes not yet written, over "
                            f"buffer.total_limit")
        failing = self.router.failing_writes()
        if failing:  # which files (customer and site names) only in the log: write_failed
            problems.append(f"{len(failing)} hourly files failing to write, retrying "
                            f"(write_failed in the log)")
        return problems

    async def _metrics(self, request: h11.Request) -> Response:
        if request.target.split(b"?")[0] != b"/metrics":
            return not_found(request, "/metrics")
        return Response(200, self.telemetry.exposition(), CONTENT_TYPE_LATEST.encode())



# Every batch makes thousands of short-lived dicts; with the default threshold (700) the
# collector runs every few records and its full passes showed as ack latency spikes.
# Nothing here relies on the collector for speed of release (no cycles in the hot path).
GC_THRESHOLDS = (50_000, 20, 100)


def tune_garbage_collector() -> None:
    """For a server process (not for tests sharing one): move what start-up made out of
    the collector's way, and collect less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)

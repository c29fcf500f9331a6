"""One worker process of `server.workers > 1` (started by the supervisor, never by hand).

A worker is a whole server (App) with its own journal, chunk ids and failed/ area
under `{buffer.path}/worker-{index}` (worker 0 keeps `{buffer.path}` itself, so going
from one worker to several keeps the journal), its own monitor port (`monitor.port +
index`), its own /metrics on a private loopback port that the supervisor sums into the
one `metrics.port`, and the shared ingest and health sockets the supervisor bound. The
hourly files are shared through the append ledger in `{buffer.path}/ledger`.
"""

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

import attrs
import trio

from mwdlogd import log
from mwdlogd.app import App, WorkerSlot, tune_garbage_collector
from mwdlogd.config import Config, MetricsConfig, load_config
from mwdlogd.errors import MwdlogdError
from mwdlogd.servers.balance import open_board
from mwdlogd.signals import hold_reloads
from mwdlogd.storage.chunk_ids import CHUNK_IDS

EXIT_FAILED = 2
SHARED_SOCKETS = ("http", "forward", "health")


# Where a worker serves its own /metrics for the supervisor to sum (any free port).
WORKER_METRICS = MetricsConfig("127.0.0.1", 0)


def worker_config(config: Config, index: int) -> Config:
    """The config as worker `index` sees it: its own buffer area and monitor port, and a
    private metrics port."""
    monitor = config.monitor.port + index if config.monitor.port else 0
    return attrs.evolve(
        config,
        buffer=attrs.evolve(config.buffer, path=str(worker_buffer(config, index))),
        metrics=WORKER_METRICS,
        monitor=attrs.evolve(config.monitor, port=monitor))


def worker_buffer(config: Config, index: int) -> Path:
    base = Path(config.buffer.path)
    return base if index == 0 else base / f"worker-{index}"


def orphaned_journals(config: Config) -> dict[int, Path]:
    """Buffer areas, by worker index, of workers beyond `server.workers` whose journals
    still hold batches: starting without them would leave acknowledged records unwritten."""
    found = {}
    for directory in Path(config.buffer.path).glob("worker-*"):
        suffix = directory.name.removeprefix("worker-")
        if suffix.isdigit() and int(suffix) >= config.server.workers and any(
                segment.stat().st_size for segment in directory.glob("journal/*.wal")):
            found[int(suffix)] = directory
    return found


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mwdlogd.worker",
                                     description="one worker of `mwdlogd run` (internal)")
    parser.add_argument("--config", required=True)
    parser.add_argument("--config-optional", action="store_true")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--sockets", required=True, help="name=fd,... (inherited)")
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--lifeline-fd", type=int, required=True)
    parser.add_argument("--load-fd", type=int, required=True, help="connection counts (memfd)")
    return parser


async def _serve(app: App, ready_fd: int, lifeline_fd: int) -> None:
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(app.run)
        os.write(ready_fd, f"{addresses.metrics} {addresses.monitor}\n".encode())
        os.close(ready_fd)
        nursery.start_soon(_watch_supervisor, app, lifeline_fd)
        await app.stopped.wait()
        nursery.cancel_scope.cancel()


async def _watch_supervisor(app: App, lifeline_fd: int) -> None:
    """The supervisor holds the other end: EOF means it is gone, so drain and exit."""
    async with trio.lowlevel.FdStream(lifeline_fd) as lifeline:
        while await lifeline.receive_some():
            pass
    log.event(logging.WARNING, "supervisor_gone", detail="draining this worker")
    app.request_stop()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    hold_reloads()  # until App listens
    log.configure(worker=args.index)
    problem = None
    path, required = Path(args.config), not args.config_optional

    def loader() -> Config:
        return worker_config(load_config(path, required=required), args.index)

    try:
        base = load_config(path, required=required)
        log.set_level(base.server.log_level)
        sockets = {name: socket.socket(fileno=int(fd)) for name, fd in
                   (item.split("=") for item in args.sockets.split(","))}
        peers = tuple(worker_buffer(base, i) / CHUNK_IDS for i in range(base.server.workers)
                      if i != args.index)
        slot = WorkerSlot(args.index, sockets, Path(base.buffer.path) / "ledger", peers,
                          open_board(args.load_fd, base.server.workers))
        app = App(worker_config(base, args.index), handle_signals=True, slot=slot,
                  loader=loader)
        tune_garbage_collector()
        trio.run(_serve, app, args.ready_fd, args.lifeline_fd)
    except* MwdlogdError as group:  # start-up errors come wrapped by the nursery
        problem = group.exceptions[0]
    if problem is not None:
        print(f"mwdlogd worker {args.index}: {problem}", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())

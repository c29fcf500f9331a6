"""`mwdlogd replay` / tools/replay.py: send generated or archived Engine traffic to a log
server (this one or any other speaking the same protocol), at a chosen rate, and verify
what landed.

Sources: generated nginx access records and open-appsec detections over C customers x F
sites (seeded, reproducible), or existing `.log.gz` trees and JSON-lines files. Targets:
HTTPS as Fluentd's out_http sends it (ndjson, optional gzip, bearer token, mTLS) or the
forward protocol as out_forward sends it (mode, TLS or TCP, shared key, acks). Every
record gets a `replay_id` (`<run>-<n>`), so `--verify ROOT` can report missing and
duplicated records exactly.
"""

import argparse
import json
import os
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from mwdlogd_replay.connection import Target
from mwdlogd_replay.records import batches, generate, read_archive
from mwdlogd_replay.run import run_replay
from mwdlogd_replay.verify import await_verdict

DEFAULT_SETTLE_S = 30.0
STORAGE_ROOT = Path("<storage.root>")  # `--verify` without ROOT: the config's


class ReplaySetupError(Exception):
    """The command line or config cannot make a target; the message says which input."""


@attrs.frozen
class ServerDefaults:
    """What a server's config offers for what the command line left open, as plain values:
    the one interface between replay and the server's config (see mwdlogd/replay.py)."""

    http_target: str  # HOST:PORT this machine reaches the listener at
    forward_target: str
    forward_plain: bool  # forward.transport is tcp
    cacert: Path
    client_cert: Path | None  # a NAME.crt with its NAME.key beside the server's
    token: str  # the first of auth.tokens, "" if none
    shared_key: str
    storage_root: Path
    flush: Callable[[str, float], None]  # ask every worker to write what it acked (token, timeout)


ReadDefaults = Callable[[str | None], ServerDefaults]  # --config PATH (None: the default)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mwdlogd replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("source")
    source.add_argument("--from", dest="archive", type=Path, nargs="*", metavar="PATH",
                        help="replay .log.gz trees or JSON-lines files instead of generating")
    source.add_argument("--seed", type=int, default=1)
    source.add_argument("--customers", type=int, default=20)
    source.add_argument("--fqdns", type=int, default=5, help="sites per customer")
    source.add_argument("--appsec-share", type=float, default=0.3,
                        help="share of open-appsec detections among generated records")
    target = parser.add_argument_group(
        "target", "What is not given here comes from --config (as for every mwdlogd command: "
        "default ./config.toml or $MWDLOGD_CONFIG): the http or forward listener's address, "
        "tls.ca, the first NAME.crt/NAME.key beside tls.cert, the first of auth.tokens, "
        "forward.shared_key and forward.transport.")
    target.add_argument("--config", metavar="PATH", help="mwdlogd config to take defaults from")
    target.add_argument("--target", metavar="HOST:PORT",
                        help="server address (default: the config's http or forward listener)")
    target.add_argument("--protocol", choices=["http", "forward"], default="http")
    target.add_argument("--tag", default="nginx.access")
    target.add_argument("--token", default=os.environ.get("MWDLOGD_TOKEN"),
                        help="bearer token (http; default $MWDLOGD_TOKEN, then the config's)")
    target.add_argument("--gzip", action="store_true", help="gzip HTTP bodies")
    target.add_argument("--mode", default="PackedForward", choices=[
        "Message", "Forward", "PackedForward", "CompressedPackedForward"])
    target.add_argument("--shared-key", help="forward shared_key handshake (default: the "
                        "config's forward.shared_key)")
    target.add_argument("--no-ack", action="store_true", help="forward without acks")
    target.add_argument("--plain", action="store_true", help="no TLS (forward transport tcp)")
    target.add_argument("--cacert", type=Path, help="CA of the server certificate")
    target.add_argument("--cert", type=Path, help="client certificate (mTLS)")
    target.add_argument("--key", type=Path, help="client key")
    load = parser.add_argument_group("load")
    load.add_argument("--batch", type=int, default=1000, help="records per request/message")
    load.add_argument("--connections", type=int, default=4)
    load.add_argument("--rate", type=float, help="records/s (default: as fast as acked)")
    load.add_argument("--count", type=int, help="records to send")
    load.add_argument("--duration", type=float, help="seconds to send for")
    load.add_argument("--run", default=f"run{int(time.time())}",
                      help="prefix of the replay_id given to every record")
    load.add_argument("--verify", type=Path, metavar="ROOT", nargs="?", const=STORAGE_ROOT,
                      help="afterwards, read the hourly files under ROOT (default: the "
                           "config's storage.root) until every acked record is there (or "
                           "--settle passes) and report missing and duplicated records")
    load.add_argument("--flush", action="store_true",
                      help="before --verify, ask the server to write what it acknowledged "
                           "(as `mwdlogd flush`: POST /api/flush on every worker's monitor "
                           "port from the config), instead of waiting for its flush_interval")
    load.add_argument("--settle", type=float, default=DEFAULT_SETTLE_S, metavar="SECONDS",
                      help="longest wait for acked records to land (the server writes them "
                           f"every buffer.flush_interval, or at `mwdlogd flush`); default "
                           f"{DEFAULT_SETTLE_S:g}")
    return parser


def _context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The client TLS context; a missing file is named (ssl would say only 'No such file')."""
    if args.plain:
        return None
    for option, path in (("--cacert", args.cacert), ("--cert", args.cert), ("--key", args.key)):
        if path is not None and not Path(path).is_file():
            raise ReplaySetupError(f"certificate file not found: {path} ({option})")
    context = ssl.create_default_context(cafile=str(args.cacert) if args.cacert else None)
    if args.cert:
        try:
            context.load_cert_chain(str(args.cert), str(args.key or args.cert))
        except ssl.SSLError as exc:
            raise ReplaySetupError(f"{args.cert} and {args.key} do not load as a certificate "
                                   f"and its key: {exc.reason}") from None
    return context


def apply_config(args: argparse.Namespace, read_defaults: ReadDefaults | None) -> None:
    """Fill what the command line left open from the server's config (like every mwdlogd
    command); without a config reader, the command line must give it all."""
    wants_tls = not args.plain and (args.cacert is None or args.cert is None)
    needs_token = args.protocol == "http" and args.token is None
    needs_key = args.protocol == "forward" and args.shared_key is None
    needs_root = args.verify == STORAGE_ROOT
    args.flush_with = None
    if args.target is not None and not (wants_tls or needs_token or needs_key or needs_root
                                         or args.flush):
        return
    if read_defaults is None:
        raise ReplaySetupError("no server config to read: give --target, --cacert, --cert, "
                               "--key, --token or --shared-key, and --verify ROOT")
    config = read_defaults(args.config)
    if args.target is None:
        args.target = config.http_target if args.protocol == "http" else config.forward_target
        args.plain = args.plain or (args.protocol == "forward" and config.forward_plain)
    if not args.plain:
        args.cacert = args.cacert or config.cacert
        if args.cert is None and config.client_cert is not None:
            args.cert, args.key = config.client_cert, config.client_cert.with_suffix(".key")
    if args.token is None:
        args.token = config.token
    if args.shared_key is None:
        args.shared_key = config.shared_key
    if needs_root:
        args.verify = config.storage_root
    args.flush_with = config.flush


def main(argv: list[str] | None = None, read_defaults: ReadDefaults | None = None) -> int:
    """The command; `read_defaults` reads a server config for what `argv` leaves open."""
    args = _parser().parse_args(argv)
    if args.count is None and args.duration is None and not args.archive:
        print("mwdlogd replay: give --count or --duration (or --from to replay an archive)",
              file=sys.stderr)
        return 2
    try:
        apply_config(args, read_defaults)
        host, _, port = args.target.rpartition(":")
        if not host or not port.isdigit():
            raise ReplaySetupError(f"--target {args.target!r}: expected HOST:PORT")
        target = Target(args.protocol, host, int(port), _context(args), args.tag,
                        args.token or "", args.gzip, args.mode, args.shared_key or "",
                        not args.no_ack)
    except ReplaySetupError as exc:
        print(f"mwdlogd replay: {exc}", file=sys.stderr)
        return 2
    records = read_archive(args.archive) if args.archive else generate(
        args.seed, customers=args.customers, fqdns=args.fqdns, appsec_share=args.appsec_share)
    source = batches(records, size=1 if args.mode == "Message" and args.protocol == "forward"
                     else args.batch, run=args.run, count=args.count)
    started = time.perf_counter()
    stats = trio.run(lambda: run_replay(source, target, connections=args.connections,
                                        rate=args.rate, duration=args.duration))
    elapsed = time.perf_counter() - started
    summary: dict[str, Any] = {
        "run": args.run, "sent": stats.sent, "acked": len(stats.acked),
        "seconds": round(elapsed, 2), "acked_per_s": round(len(stats.acked) / elapsed),
        "errors": dict(stats.errors), "ack_p50_ms": stats.percentile_ms(0.5),
        "ack_p99_ms": stats.percentile_ms(0.99)}
    code = 0 if not stats.errors and len(stats.acked) == stats.sent else 1
    for error, count in stats.errors.most_common():
        print(f"mwdlogd replay: {count} failed attempts: {error}", file=sys.stderr)
    if args.verify and args.flush_with is not None and args.flush:
        args.flush_with(args.token or "", args.settle or DEFAULT_SETTLE_S)
    if args.verify:
        verdict, waited = await_verdict(args.verify, args.run, stats.acked, settle=args.settle)
        summary["verify"] = {"stored": verdict.stored, "missing": len(verdict.missing),
                             "waited_s": round(waited, 1),
                             "duplicated": len(verdict.duplicated),
                             "stored_without_ack": verdict.unacked_stored,
                             "first_missing": verdict.missing[:5],
                             "first_duplicated": verdict.duplicated[:5]}
        code = code if verdict.ok else 3
    print(json.dumps(summary))
    return code

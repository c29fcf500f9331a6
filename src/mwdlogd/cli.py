"""`mwdlogd` command line: run, check-config, init-config, certs."""

import argparse
import logging
import os
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path

import trio

from mwdlogd import __version__, certs_cli, doctor, log, release_start_up_hold, replay, startup
from mwdlogd.app import App, tune_garbage_collector
from mwdlogd.certs import DEFAULT_DAYS, DEFAULT_HOSTS, init_certs
from mwdlogd.config import (
    Config,
    ListenConfig,
    check_tls_files,
    config_path,
    listen_ports,
    load_config,
    missing_tls_files,
)
from mwdlogd.errors import ConfigError, MwdlogdError
from mwdlogd.flush_client import run_flush
from mwdlogd.init_config import render_default_config
from mwdlogd.ops import archive, backup
from mwdlogd.signals import SERVER_SIGNALS, hold_reloads
from mwdlogd.supervisor import Supervisor
from mwdlogd.tail_client import run_tail, tail_url
from mwdlogd.worker import orphaned_journals, worker_config

DEV_CLIENT = "engine-01"
EXIT_CONFIG = 2

DESCRIPTION = """\
mwdlogd receives Engine logs (Fluentd out_http / Fluent Bit http over HTTPS with mTLS)
and stores them as hourly gzip JSON-lines files:
  {storage.root}/{customer}/{nginx|openappsec}/{fqdn}/YYYY/MM/DD/HH.log.gz

Every subcommand reads --config PATH (default ./config.toml or $MWDLOGD_CONFIG; a
missing default file means built-in defaults). MWDLOGD_<SECTION>_<KEY> variables
override single keys."""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="config file (default ./config.toml or $MWDLOGD_CONFIG)")
    parser = argparse.ArgumentParser(prog="mwdlogd", description=DESCRIPTION, parents=[common],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"mwdlogd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("run", parents=[common], help="run the server (creates dev certs "
                        "under the tls.cert directory if no TLS files exist)",
                        description="Run until SIGTERM/SIGINT (drain: finish requests, flush "
                        "everything, exit 0). SIGUSR1 flushes pending records to their files "
                        "(or use `mwdlogd flush`). SIGHUP reloads the config file: tokens, "
                        "limits, log level and certificates change live; an invalid file is "
                        "refused and the running config kept. "
                        "With server.workers = N > 1 this process supervises N workers that "
                        "share the ports and files (README: Workers); signals go to all.")
    commands.add_parser("check-config", parents=[common],
                        help="validate the config (and that TLS files exist), print a summary")
    init = commands.add_parser("init-config", parents=[common],
                               help="write a commented config file with every default")
    init.add_argument("--output", "-o", default="-", help="file to write (mode 0600, missing "
                      "directories are created), - for stdout (default)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    certs_cli.register(commands, common)
    doctor.register(commands, common)
    health = commands.add_parser(
        "health", parents=[common], help="ask a running server's /health; exit 0 if healthy",
        description="GETs /health on the [health] address (or --server) and prints the "
        "answer. Exit 0 when healthy, 1 when unhealthy or unreachable: for cron and "
        "container health checks.")
    health.add_argument("--server", metavar="HOST:PORT",
                        help="health address (default: [health] bind and port)")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    commands.add_parser("replay", add_help=False,
                        help="send generated or archived traffic to a server and verify it "
                             "(see `mwdlogd replay --help`)")
    tail = commands.add_parser(
        "tail", parents=[common], help="print records live as the server stores them",
        description="Follows /api/tail on the [monitor] port (on every worker's, port + N, "
        "when server.workers > 1). Pretty and coloured on a terminal, raw JSON lines "
        "otherwise. The token is --token, $MWDLOGD_TOKEN, or the first of auth.tokens "
        "in the config not bound to certificate subjects; a token restricted to customers "
        "shows only theirs.")
    tail.add_argument("--customer", help="only this customer_name")
    tail.add_argument("--type", dest="log_type",
                      choices=["nginx", "openappsec", "invalid", "unmatched"],
                      help="only this log type (invalid/unmatched: those streams)")
    tail.add_argument("--fqdn", help="only this site")
    tail.add_argument("--sample", type=float, default=1.0, help="share of records, 0..1")
    tail.add_argument("--token", help="bearer token (default: $MWDLOGD_TOKEN or the config's)")
    tail.add_argument("--server", metavar="HOST:PORT",
                      help="monitor address (default: [monitor] bind and port)")
    tail.add_argument("--count", type=int, help="stop after this many records")
    flush = commands.add_parser(
        "flush", parents=[common], help="write everything acknowledged to the hourly files now",
        description="POSTs /api/flush on the [monitor] port (every worker's, port + N) and "
        "waits until each has written what it had; prints the records and files written as "
        "JSON. Exit 1 if a worker could not be reached or a file could not be written. The "
        "token is --token, $MWDLOGD_TOKEN, or the first of auth.tokens in the config not "
        "bound to certificate subjects.")
    flush.add_argument("--token", help="bearer token (default: $MWDLOGD_TOKEN or the config's)")
    flush.add_argument("--server", metavar="HOST:PORT", action="append",
                       help="monitor address (repeatable; default: [monitor] of every worker)")
    flush.add_argument("--timeout", type=float, default=300.0,
                       help="seconds to wait for each worker's flush (default 300)")
    archive.add_parser(commands, common)
    backup.add_parsers(commands, common)
    return parser


def _load(args: argparse.Namespace) -> Config:
    path, required = config_path(getattr(args, "config", None))
    return load_config(path, required=required)


def _dev_certs_dir(config: Config) -> Path | None:
    """Where `run` creates development certificates: only when none of the configured TLS
    files exist yet and they have the standard names (ca.crt, server.crt, server.key)."""
    tls = config.tls
    directory = Path(tls.cert).parent
    standard = (Path(tls.key) == directory / "server.key" and Path(tls.ca) == directory / "ca.crt"
                and Path(tls.cert).name == "server.crt")
    wanted = [tls.cert, tls.key] + ([tls.ca] if tls.client_auth else [])
    return directory if standard and len(missing_tls_files(config)) == len(wanted) else None


def _ensure_dev_certs(config: Config) -> None:
    """Create dev certificates when none of the configured TLS files exist yet."""
    directory = _dev_certs_dir(config)
    if directory is not None:
        try:
            init_certs(directory, hosts=list(DEFAULT_HOSTS), clients=[DEV_CLIENT],
                       days=DEFAULT_DAYS)
        except OSError as exc:  # e.g. an empty certificate directory mounted read-only
            raise ConfigError("tls.cert", f"no TLS files in {directory}, and development "
                              f"certificates cannot be made there: {exc.strerror}") from None
        log.event(logging.WARNING, "dev_certs_created", dir=directory, client=DEV_CLIENT,
                  detail="self-signed development CA; use your own PKI in production")
    check_tls_files(config)


def _run(args: argparse.Namespace) -> int:
    # Blocked signals are inherited: podman's restart policy starts a container with SIGUSR1
    # blocked, so `kill -USR1 1` would never flush. Unblock every signal the server acts on.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SERVER_SIGNALS - {signal.SIGHUP})
    hold_reloads()  # until the server listens for it
    path, required = config_path(getattr(args, "config", None))
    config = load_config(path, required=required)
    log.set_level(config.server.log_level)
    _ensure_dev_certs(config)
    orphans = orphaned_journals(config)
    if orphans:
        raise ConfigError("server.workers", f"{orphans[min(orphans)]} holds the unwritten "
                          f"journal of a worker beyond server.workers={config.server.workers}; "
                          f"start once with server.workers={max(orphans) + 1} to write it out")
    startup.log_summary(config, path.resolve() if path.exists() else None)
    if config.server.workers > 1:
        return trio.run(Supervisor(config, str(path.resolve()), config_required=required).run)
    tune_garbage_collector()
    trio.run(App(config, handle_signals=True,
                 loader=lambda: load_config(path, required=required)).run)
    return 0


def _check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    dev_certs = _dev_certs_dir(config)
    if dev_certs is None:
        check_tls_files(config)
    ports = " ".join(f"{key}={bind}:{port}" for key, bind, port in listen_ports(config))
    print(f"config OK: {ports} "
          f"storage.root={config.storage.root} compression={config.storage.compression} "
          f"workers={config.server.workers} tokens={len(config.auth.tokens)}")
    for warning in startup.setting_warnings(config):
        print(f"warning: {warning.key}: {warning.problem}")
    if dev_certs is not None:
        config_option = f"--config {args.config} " if getattr(args, "config", None) else ""
        print(f"certificates: none yet in {dev_certs} (tls.cert, tls.key, tls.ca missing); "
              "`mwdlogd run` creates a development CA and certificates there on its first "
              f"start, or create them now: mwdlogd {config_option}certs init --hosts "
              "YOUR.SERVER.NAME")
    return 0


def _init_config(args: argparse.Namespace) -> int:
    text = render_default_config()
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    target = Path(args.output)
    if target.exists() and not args.force:
        print(f"mwdlogd: {target} exists; use --force to overwrite", file=sys.stderr)
        return 1
    if not target.parent.is_dir():
        target.parent.mkdir(parents=True)
        print(f"created directory {target.parent}")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds a token
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        os.fchmod(file.fileno(), 0o600)
        file.write(text)
    print(f"wrote {target} (mode 0600: it holds a token)")
    return 0


def _local_address(listen: ListenConfig) -> str:
    """Where a command on this machine reaches a listener (wildcard binds via loopback)."""
    host = "127.0.0.1" if listen.bind in ("0.0.0.0", "::") else listen.bind
    return f"{host}:{listen.port}"


def _monitor_access(args: argparse.Namespace, servers: list[str]) -> tuple[str, list[str]]:
    """The token and monitor addresses for tail and flush: from the options, else the
    environment and the config (every worker's monitor port)."""
    token = args.token or os.environ.get("MWDLOGD_TOKEN") or ""
    if not (token and servers):  # only then is the config needed
        config = _load(args)
        token = token or next((t.token for t in config.auth.tokens if not t.subjects), "")
        servers = servers or [_local_address(worker_config(config, i).monitor)
                              for i in range(config.server.workers)]
    if not token:
        raise ConfigError("auth.tokens", "no token: pass --token, set MWDLOGD_TOKEN or "
                          "configure auth.tokens")
    return token, servers


def _tail(args: argparse.Namespace) -> int:
    token, servers = _monitor_access(args, [args.server] if args.server else [])
    urls = [tail_url(server, token=token, customer=args.customer, log_type=args.log_type,
                     fqdn=args.fqdn, sample=args.sample) for server in servers]
    return run_tail(urls, limit=args.count)


def _flush(args: argparse.Namespace) -> int:
    token, servers = _monitor_access(args, args.server or [])
    return run_flush(servers, token, args.timeout)


def _health(args: argparse.Namespace) -> int:
    server = args.server or _local_address(_load(args).health)
    try:
        with urllib.request.urlopen(f"http://{server}/health", timeout=args.timeout) as reply:
            print(reply.read().decode().strip())
            return 0
    except urllib.error.HTTPError as exc:
        print(exc.read().decode().strip())
    except OSError as exc:
        print(f"mwdlogd: cannot reach http://{server}/health: {exc}", file=sys.stderr)
    return 1


def _archive(args: argparse.Namespace) -> int:
    return archive.command(args, _load(args))


def _backup(args: argparse.Namespace) -> int:
    return backup.backup_command(args, config_path(getattr(args, "config", None)))


def _restore(args: argparse.Namespace) -> int:
    return backup.restore_command(args, config_path(getattr(args, "config", None)))


COMMANDS = {"run": _run, "check-config": _check_config, "init-config": _init_config,
            "certs": certs_cli.run, "doctor": doctor.run, "tail": _tail, "health": _health,
            "flush": _flush, "archive": _archive, "backup": _backup,
            "restore": _restore}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["replay"]:  # its own parser: `mwdlogd replay --help`
        release_start_up_hold()
        return replay.main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command != "run":
        release_start_up_hold()
    log.configure()
    try:
        return COMMANDS[args.command](args)
    except MwdlogdError as exc:
        print(f"mwdlogd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130

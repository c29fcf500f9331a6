"""`mwdlogd certs init|renew|show|check`: the certificate lifecycle from the command line.

Every action works on the files the config names (tls.cert, tls.key, tls.ca; client
certificates beside tls.cert), or on a plain directory with `--dir`.
"""

import argparse
import sys
from pathlib import Path

from mwdlogd.certs import (
    DEFAULT_DAYS,
    DEFAULT_HOSTS,
    Layout,
    check_client_name,
    days_left,
    describe,
    init_certs,
    renew_client,
    renew_server,
    server_names,
)
from mwdlogd.config import config_path, load_config

DEFAULT_DAYS_LEFT = 90  # the runbook's monthly check: renew when under three months
EXIT_USAGE = 2  # a bad argument, the same code argparse uses for its own (`--days 0`)


def positive_int(text: str) -> int:
    """argparse type: a whole number of days greater than 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of days, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value}")
    return value


def register(commands: "argparse._SubParsersAction[argparse.ArgumentParser]",
             common: argparse.ArgumentParser) -> None:
    certs = commands.add_parser(
        "certs", parents=[common], help="make, renew or check certificates",
        description="Works on the files the config names (tls.cert, tls.key, tls.ca, client "
        "certificates beside tls.cert) or, with --dir, on DIR/ca.crt, DIR/server.crt, ... "
        "Exit 2 on a bad argument (--days 0, --client ../x, an empty --hosts) before anything "
        "is written; 1 when the action fails or finds a problem.")
    actions = certs.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    dir_help = "work on this directory instead of the config's tls paths"
    make = actions.add_parser(
        "init", parents=[common],
        help="create CA, server certificate and Engine client certificates",
        description="Creates what is missing: the CA (tls.ca + its .key), the server pair "
        "(tls.cert/tls.key, SANs from --hosts) and NAME.crt/.key per --client. Existing files "
        "are kept (an existing CA issues the new client certificates); --force replaces "
        "everything. To change the names of an existing server certificate: certs renew --hosts.")
    make.add_argument("--dir", type=Path, help=dir_help)
    make.add_argument("--hosts", help="server names/IPs, comma-separated; the first is the CN "
                      f"(default: {','.join(DEFAULT_HOSTS)})")
    make.add_argument("--client", action="append", default=[], metavar="NAME",
                      help="issue a client certificate NAME.crt (repeatable)")
    make.add_argument("--force", action="store_true", help="replace existing files")
    renew = actions.add_parser(
        "renew", parents=[common], help="re-issue the server certificate from the existing CA",
        description="Re-issues the server certificate and key from the existing CA, keeping "
        "the current certificate's names (SANs) unless --hosts is given; reload the server "
        "(SIGHUP) to use it for new connections. With --client NAME (and no --hosts) only "
        "those client certificates are re-issued.")
    renew.add_argument("--dir", type=Path, help=dir_help)
    renew.add_argument("--hosts", help="new server names/IPs, comma-separated")
    renew.add_argument("--client", action="append", default=[], metavar="NAME",
                       help="re-issue client certificate NAME instead (repeatable)")
    for action in (make, renew):
        action.add_argument("--days", type=positive_int, default=DEFAULT_DAYS,
                            help=f"validity in days (default {DEFAULT_DAYS})")
    show = actions.add_parser("show", parents=[common],
                              help="print subject, issuer, SANs and days to expiry; exit 1 if "
                              "any certificate has expired")
    show.add_argument("--dir", type=Path, help="directory of .crt files (default: the "
                      "config's tls.cert directory)")
    check = actions.add_parser(
        "check", parents=[common], help="days to expiry of every configured certificate; "
        "exit 1 under --days-left (for the monthly cron check)",
        description="Prints days to expiry of tls.cert, tls.ca and every client certificate "
        "beside tls.cert. Exit 0 when all have at least --days-left days, 1 otherwise "
        "(or when one is missing or unreadable).")
    check.add_argument("--dir", type=Path, help=dir_help)
    check.add_argument("--days-left", type=positive_int, default=DEFAULT_DAYS_LEFT,
                       help=f"threshold in days (default {DEFAULT_DAYS_LEFT})")


def _layout(args: argparse.Namespace) -> Layout:
    if args.dir is not None:
        return Layout.in_dir(args.dir)
    path, required = config_path(getattr(args, "config", None))
    tls = load_config(path, required=required).tls
    return Layout.from_paths(cert=tls.cert, key=tls.key, ca=tls.ca, ca_required=tls.client_auth)


def _hosts(text: str) -> list[str]:
    hosts = [h.strip() for h in text.split(",") if h.strip()]
    if not hosts:
        raise ValueError("--hosts needs at least one name")
    return hosts


def _usage_problem(args: argparse.Namespace, layout: Layout) -> str | None:
    """The first bad --hosts or --client value: a usage error, found before any file is
    touched, so it exits like argparse's own errors."""
    try:
        if getattr(args, "hosts", None) is not None:
            _hosts(args.hosts)
        for client in getattr(args, "client", []):
            check_client_name(client, layout)
    except ValueError as exc:
        return str(exc)
    return None


def run(args: argparse.Namespace) -> int:
    try:
        layout = _layout(args)
        if (problem := _usage_problem(args, layout)) is not None:
            print(f"mwdlogd certs {args.certs_command}: {problem}", file=sys.stderr)
            return EXIT_USAGE
        return ACTIONS[args.certs_command](args, layout)
    except (ValueError, OSError) as exc:
        print(f"mwdlogd certs {args.certs_command}: {exc}", file=sys.stderr)
        return 1


def _init(args: argparse.Namespace, layout: Layout) -> int:
    hosts = _hosts(args.hosts) if args.hosts is not None else list(DEFAULT_HOSTS)
    for result in init_certs(hosts=hosts, clients=args.client, days=args.days,
                             force=args.force, layout=layout):
        print(f"{'created' if result.created else 'kept   '} {result.path}")
        if result.path == layout.cert and not result.created and args.hosts is not None:
            kept = server_names(layout.cert)
            if kept != hosts:
                print(f"note: kept the existing server certificate for {','.join(kept)}; "
                      f"--hosts {','.join(hosts)} was not applied. To change its names: "
                      f"mwdlogd certs renew --hosts {','.join(hosts)}")
    return 0


def _renew(args: argparse.Namespace, layout: Layout) -> int:
    hosts = _hosts(args.hosts) if args.hosts is not None else None
    if hosts is not None or not args.client:
        if hosts is None and not layout.cert.is_file():
            raise ValueError(f"{layout.cert} not found: nothing to renew; give --hosts to "
                             "issue it, or run `certs init`")
        names = renew_server(layout, days=args.days, hosts=hosts)
        how = "from --hosts" if hosts else "kept from the previous certificate"
        print(f"renewed {layout.cert} for {','.join(names)} ({how}); {describe(layout.cert)}")
        print("reload the server to use it: kill -HUP <pid> (or restart it)")
    for client in args.client:
        crt = renew_client(layout, client, days=args.days)
        print(f"renewed {crt}; {describe(crt)}")
        print(f"install {crt.name} and {crt.with_suffix('.key').name} on Engine {client}")
    return 0


def _show(args: argparse.Namespace, layout: Layout) -> int:
    crts = sorted({layout.ca, layout.cert, *layout.client_certs()} if args.dir is None
                  else set(layout.clients.glob("*.crt")))
    crts = [c for c in crts if c.is_file()]
    if not crts:
        print(f"mwdlogd: no .crt files in {layout.clients}", file=sys.stderr)
        return 1
    for crt in crts:
        print(describe(crt))
    return 1 if any(days_left(c) < 0 for c in crts) else 0


def _check(args: argparse.Namespace, layout: Layout) -> int:
    wanted = [("tls.cert", layout.cert)]
    if layout.ca_required or layout.ca.exists():
        wanted.append(("tls.ca", layout.ca))
    wanted += [("client", crt) for crt in layout.client_certs()]
    worst = 0
    for role, path in wanted:
        status, finding = _expiry(path, args.days_left, role)
        worst = max(worst, 0 if status == "ok" else 1)
        print(f"{status:<7} {role:<8} {path}: {finding}")
    return worst


def _expiry(path: Path, threshold: int, role: str) -> tuple[str, str]:
    """(status, finding with the fix) for one certificate file."""
    try:
        days = days_left(path)
    except FileNotFoundError:
        return "MISSING", "file not found — create it with `mwdlogd certs init`"
    except ValueError as exc:
        return "FAIL", f"not a PEM certificate ({exc})"
    fix = {"tls.cert": "run `mwdlogd certs renew` and reload the server (SIGHUP)",
           "tls.ca": "issue a new CA (`certs init --force`) and give every Engine the new "
                     "ca.crt and a new client certificate",
           "client": f"run `mwdlogd certs renew --client {path.stem}` and install it on that "
                     "Engine"}[role]
    if days < 0:
        return "EXPIRED", f"expired {-days} days ago — {fix}"
    if days < threshold:
        return "RENEW", f"{days} days left, under {threshold} — {fix}"
    return "ok", f"{days} days left"


ACTIONS = {"init": _init, "renew": _renew, "show": _show, "check": _check}

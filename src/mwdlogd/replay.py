"""`mwdlogd replay`: the replay client (package `mwdlogd_replay`, which knows nothing of the
server) given this server's config for what the command line leaves open."""

import sys
from pathlib import Path

from mwdlogd.certs import Layout
from mwdlogd.config import config_path, load_config
from mwdlogd.errors import MwdlogdError
from mwdlogd.flush_client import flush_one
from mwdlogd.worker import worker_config
from mwdlogd_replay import cli
from mwdlogd_replay.cli import ReplaySetupError, ServerDefaults


def read_defaults(config_arg: str | None) -> ServerDefaults:
    """The config's listeners, TLS files, first token, shared key, storage root and
    workers' monitor ports, as plain values."""
    path, required = config_path(config_arg)
    try:
        config = load_config(path, required=required)
    except MwdlogdError as exc:
        raise ReplaySetupError(str(exc)) from None
    tls = config.tls
    client_cert = next((crt for crt in Layout.from_paths(cert=tls.cert, key=tls.key, ca=tls.ca)
                        .client_certs() if crt.with_suffix(".key").is_file()), None)
    monitors = [_local(worker_config(config, index).monitor.bind,
                       worker_config(config, index).monitor.port)
                for index in range(config.server.workers)]
    return ServerDefaults(
        http_target=_local(config.http.bind, config.http.port),
        forward_target=_local(config.forward.bind, config.forward.port),
        forward_plain=config.forward.transport == "tcp", cacert=Path(tls.ca),
        client_cert=client_cert, token=next((t.token for t in config.auth.tokens), ""),
        shared_key=config.forward.shared_key, storage_root=Path(config.storage.root),
        flush=lambda token, timeout_s: ask_flush(monitors, token, timeout_s))


def _local(bind: str, port: int) -> str:
    """Where this machine reaches a listener (wildcard binds via loopback)."""
    return f"{'127.0.0.1' if bind in ('0.0.0.0', '::') else bind}:{port}"


def ask_flush(monitors: list[str], token: str, timeout_s: float) -> None:
    """Ask every worker to write what it acknowledged now; a failure is reported and the
    verification goes on waiting for the regular flush instead."""
    for server in monitors:
        try:
            answer = flush_one(server, token, timeout_s)
        except OSError as exc:
            print(f"mwdlogd replay: flush at {server} failed: {exc}", file=sys.stderr)
            continue
        print(f"flushed {server}: {answer.get('records', 0):,} records to "
              f"{answer.get('files', 0):,} files", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, read_defaults)

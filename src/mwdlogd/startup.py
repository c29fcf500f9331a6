"""What `mwdlogd run` says before it serves: version, config source, every listener with
its protocol and TLS state, token names (never their values), paths, and a warning for
each insecure or risky setting. The checks are plain functions over the Config, so
`check-config`, start-up and a reload share them."""

import datetime
import logging
from pathlib import Path

import attrs
from cryptography import x509

from mwdlogd import __version__, log
from mwdlogd.config import DEV_TOKEN, Config

# Certificates expiring sooner than this are warned about (at start-up and on reload).
EXPIRY_WARNING_DAYS = 30


@attrs.frozen
class Risk:
    """An insecure or risky setting, logged as a warning naming its key."""

    key: str
    problem: str
    event: str = "config_warning"


def listeners(config: Config) -> list[dict[str, object]]:
    """One entry per listening address: key, address, protocol and its security."""
    tls = config.tls
    client_auth = "required" if tls.client_auth else "off"
    workers = config.server.workers
    monitor = f"{config.monitor.bind}:{config.monitor.port}"
    if workers > 1 and config.monitor.port:
        monitor += f"-{config.monitor.port + workers - 1}"
    forward = config.forward
    forward_security: dict[str, object] = (
        {"tls": f"{tls.min_version}+", "client_auth": client_auth}
        if forward.transport == "tls" else {"tls": "off (plain TCP)"})
    return [
        {"key": "http", "address": f"{config.http.bind}:{config.http.port}",
         "protocol": "https", "tls": f"{tls.min_version}+", "client_auth": client_auth,
         "auth": "bearer token"},
        {"key": "forward", "address": f"{forward.bind}:{forward.port}",
         "protocol": "fluentd-forward", **forward_security,
         "shared_key": "set" if forward.shared_key else "not set",
         "users": len(forward.users)},
        {"key": "health", "address": f"{config.health.bind}:{config.health.port}",
         "protocol": "http", "paths": "/health"},
        {"key": "metrics", "address": f"{config.metrics.bind}:{config.metrics.port}",
         "protocol": "http", "paths": "/metrics"},
        {"key": "monitor", "address": monitor, "protocol": "http",
         "paths": "/api/plugins.json,/api/tail,/api/flush",
         "auth": "bearer token (tail, flush, plugin settings)"},
    ]


def setting_warnings(config: Config) -> list[Risk]:
    """One for each insecure or risky setting."""
    found = []
    tokens = config.auth.tokens
    if not tokens:
        found.append(Risk("auth.tokens", "no tokens: every HTTPS request is refused (401) and "
                      "/api/tail and /api/flush cannot be used"))
    for token in tokens:
        if token.token == DEV_TOKEN:
            found.append(Risk("auth.tokens", f"token {token.name!r} is the development "
                                 "token from the repository's config.toml; replace it",
                                 "DEV_TOKEN_IN_USE"))
    if not config.tls.client_auth:
        found.append(Risk("tls.client_auth", "false: any client that can connect may send (no "
                      "client certificate is asked for)"))
    if config.forward.transport == "tcp":
        shared = "with" if config.forward.shared_key else "without"
        found.append(Risk("forward.transport", f"tcp: forward traffic is plain text, {shared} a "
                      "shared key; only on a trusted network"))
    if not config.buffer.fsync:
        found.append(Risk("buffer.fsync", "false: acknowledged records can be lost in a crash "
                      "or power cut"))
    return found + certificate_warnings(config)


def certificate_warnings(config: Config, now: datetime.datetime | None = None
                         ) -> list[Risk]:
    """One for each certificate that has expired or expires within
    EXPIRY_WARNING_DAYS (the server certificate and, with client_auth, the CA)."""
    now = now or datetime.datetime.now(datetime.UTC)
    wanted = [("tls.cert", config.tls.cert)]
    if config.tls.client_auth:
        wanted.append(("tls.ca", config.tls.ca))
    found = []
    for key, path in wanted:
        try:
            certificates = x509.load_pem_x509_certificates(Path(path).read_bytes())
        except (OSError, ValueError):
            continue  # not loadable: the TLS context reports that, naming the key
        for cert in certificates:
            left = cert.not_valid_after_utc - now
            subject = cert.subject.rfc4514_string()
            if left.total_seconds() <= 0:
                found.append(Risk(key, f"certificate {subject} in {path} expired on "
                                  f"{cert.not_valid_after_utc:%Y-%m-%d}"))
            elif left.days < EXPIRY_WARNING_DAYS:
                found.append(Risk(key, f"certificate {subject} in {path} expires in "
                                  f"{left.days} days ({cert.not_valid_after_utc:%Y-%m-%d})"))
    return found


def log_summary(config: Config, source: Path | None) -> None:
    """The start-up lines: what runs, from which config, where, and what is risky."""
    log.event(logging.INFO, "starting", version=__version__,
              config=str(source) if source else "built-in defaults (no config file)",
              workers=config.server.workers, log_level=config.server.log_level)
    for listener in listeners(config):
        log.event(logging.INFO, "listener", **listener)
    log.event(logging.INFO, "auth", tokens=",".join(t.name for t in config.auth.tokens)
              or "none")
    log.event(logging.INFO, "storage", root=config.storage.root, buffer=config.buffer.path,
              compression=config.storage.compression, fsync=str(config.buffer.fsync).lower())
    for warning in setting_warnings(config):
        log.event(logging.WARNING, warning.event, key=warning.key, problem=warning.problem)

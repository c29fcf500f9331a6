"""The settings SIGHUP may change, in one place, swapped whole.

Components keep the `Live` holder, never a value read from it: they read
`live.settings` each time they start something (a connection, a request, a flush), so
a reload reaches new work at once while work in progress finishes with what it began
with (a TLS connection keeps its certificate, a request its limits).

What cannot change without a restart (ports, binds, paths, worker count, transport)
is kept at its running value by `merge_reload`, which says which keys those were.
"""

import ssl
from typing import Any

import attrs

from mwdlogd.config import Config
from mwdlogd.proto.auth import Authorizer, Credential, FailureThrottle, Report, ThrottleSettings

# Keys read once at start-up (sockets, directories, process layout, metric labels).
RESTART_ONLY = frozenset({
    "server.hostname", "server.workers",
    "http.bind", "http.port", "http.dedupe_window",
    "forward.bind", "forward.port", "forward.transport", "forward.dedupe_window",
    "health.bind", "health.port", "monitor.bind", "monitor.port",
    "metrics.bind", "metrics.port",
    "storage.root", "buffer.path", "buffer.fsync",
})


def authorizer(config: Config, failures: FailureThrottle, report: Report) -> Authorizer:
    """The one authorization model for HTTPS, forward and the monitor port (README,
    Authorization); `failures` carries lockouts over from the previous settings."""
    auth = config.auth
    return Authorizer(
        [Credential(t.name, t.token.encode(), frozenset(t.customers), frozenset(t.subjects))
         for t in auth.tokens],
        clients={c.subject: frozenset(c.customers) for c in auth.clients},
        users={u.username: frozenset(u.customers) for u in config.forward.users},
        throttle=ThrottleSettings(auth.failure_limit, auth.failure_window, auth.lockout),
        failures=failures, report=report)


@attrs.frozen
class Settings:
    """One consistent view: the config and what is derived from it."""

    config: Config
    authorizer: Authorizer
    ssl_context: ssl.SSLContext | None  # None: no TLS file was loaded (forward over tcp only)


class Live:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @property
    def config(self) -> Config:
        return self.settings.config

    def swap(self, settings: Settings) -> None:
        self.settings = settings


def flat(config: Config) -> dict[str, Any]:
    """`section.key` -> value for every key of the config."""
    return {f"{section}.{key}": value
            for section, values in attrs.asdict(config, recurse=False).items()
            for key, value in attrs.asdict(values, recurse=False).items()}


def merge_reload(running: Config, new: Config) -> tuple[Config, list[str], list[str]]:
    """The config to apply, the live keys that change, and the restart-only keys that
    differ (kept at their running value)."""
    old_keys, new_keys = flat(running), flat(new)
    changed = sorted(key for key in new_keys if new_keys[key] != old_keys[key])
    ignored = [key for key in changed if key in RESTART_ONLY]
    kept: dict[str, dict[str, Any]] = {}
    for key in ignored:
        section, name = key.split(".")
        kept.setdefault(section, {})[name] = old_keys[key]
    merged = attrs.evolve(new, **{section: attrs.evolve(getattr(new, section), **values)
                                  for section, values in kept.items()})
    return merged, [key for key in changed if key not in RESTART_ONLY], ignored

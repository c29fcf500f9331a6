"""config.toml schema: attrs classes structured by cattrs, validated once at start-up.

Every key has a default that works for local development. Environment variables
`MWDLOGD_<SECTION>_<KEY>` override keys (values are read as TOML literals, falling back
to plain strings). Errors always name the key: `tls.cert: file not found: certs/x.crt`.
"""

import datetime
import os
import tomllib
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NewType

import attrs
import cattrs
from cattrs.cols import homogenous_tuple_structure_factory
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError
from cattrs.gen import make_dict_structure_fn

from mwdlogd.errors import ConfigError
from mwdlogd.pipeline.paths import safe_customer
from mwdlogd.units import parse_duration, parse_size

Size = NewType("Size", int)
Duration = NewType("Duration", float)

CONFIG_ENV = "MWDLOGD_CONFIG"
DEFAULT_CONFIG_PATH = "config.toml"
ENV_PREFIX = "MWDLOGD_"
MAX_WORKERS = 64
# Shipped in the repository's development config.toml; start-up warns loudly when it is in use.
DEV_TOKEN = "dev-token-CHANGE-ME"
LOG_LEVELS = ("debug", "info", "warning", "error")


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@attrs.frozen
class ServerConfig:
    hostname: str = attrs.field(default="logserver", metadata=_doc(
        "name stored in every record as logserver_hostname and used as the metrics label"))
    workers: int = attrs.field(default=1, metadata=_doc(
        "server processes sharing the ports and the hourly files (one per core)"))
    shutdown_timeout: Duration = attrs.field(default=Duration(30.0), metadata=_doc(
        "SIGTERM/SIGINT: time allowed to finish requests and flush everything"))
    log_level: str = attrs.field(default="info", metadata=_doc(
        "debug, info, warning or error (SIGHUP applies a change)"))
    max_connections: int = attrs.field(default=4000, metadata=_doc(
        "open HTTPS + forward connections per process; more are closed at once (keeps "
        "descriptors for files and the journal)"))
    max_connections_per_address: int = attrs.field(default=500, metadata=_doc(
        "open HTTPS + forward connections from one IP address per process; more are "
        "closed at once (one client cannot take every slot)"))
    memory_limit: Size = attrs.field(default=Size(1024**3), metadata=_doc(
        "memory one server process may hold for requests in flight (bodies, gunzip output, "
        "decoded records, unfinished forward messages); past it reading waits or is "
        "refused (restart to change)"))


@attrs.frozen
class TlsConfig:
    cert: str = attrs.field(default="certs/server.crt", metadata=_doc("server certificate (PEM)"))
    key: str = attrs.field(default="certs/server.key", metadata=_doc("server private key (PEM)"))
    ca: str = attrs.field(default="certs/ca.crt", metadata=_doc(
        "CA that signs Engine client certificates"))
    client_auth: bool = attrs.field(default=True, metadata=_doc(
        "require a client certificate signed by `ca` (mTLS)"))
    min_version: str = attrs.field(default="1.2", metadata=_doc("lowest TLS version: 1.2 or 1.3"))


@attrs.frozen
class HttpConfig:
    bind: str = attrs.field(default="0.0.0.0", metadata=_doc("HTTPS ingest address"))
    port: int = attrs.field(default=8888, metadata=_doc("HTTPS ingest port (0 = pick a free one)"))
    body_size_limit: Size = attrs.field(default=Size(10 * 1024**2), metadata=_doc(
        "largest request body, checked before and after gunzip"))
    idle_timeout: Duration = attrs.field(default=Duration(60.0), metadata=_doc(
        "close a keep-alive connection idle this long"))
    request_timeout: Duration = attrs.field(default=Duration(30.0), metadata=_doc(
        "a request (TLS handshake, head and body) must arrive within this time"))
    dedupe_window: Duration = attrs.field(default=Duration(3600.0), metadata=_doc(
        "a byte-identical request resent by the same client (token + certificate) this long "
        "after it was stored is answered 200 and not stored again; 0 = off"))
    full_wait: Duration = attrs.field(default=Duration(20.0), metadata=_doc(
        "while the buffer is full, hold a request (not reading it) up to this long for room "
        "before answering 503; keep it below the forwarders' response timeout"))
    max_records_per_request: int = attrs.field(default=250_000, metadata=_doc(
        "most records one request may hold (413 past it); Fluentd's 8 MB chunks hold ~100k"))
    stream_body_limit: Size = attrs.field(default=Size(512 * 1024**2), metadata=_doc(
        "largest ndjson, JSON array or msgpack body (on the wire and after gunzip), for "
        "Fluentd chunks up to its "
        "256m default: past body_size_limit it is streamed to {buffer.path}/spool, not "
        "held in memory (max_records_per_request then applies to each 1 MiB slice)"))


@attrs.frozen
class ForwardUser:
    username: str
    password: str = attrs.field(repr=False)
    customers: tuple[str, ...] = ()


@attrs.frozen
class ForwardConfig:
    bind: str = attrs.field(default="0.0.0.0", metadata=_doc("forward ingest address"))
    port: int = attrs.field(default=24224, metadata=_doc("forward ingest port"))
    shared_key: str = attrs.field(default="", metadata=_doc("shared_key handshake; empty = off"))
    self_hostname: str = attrs.field(default="logserver", metadata=_doc(
        "hostname this server gives in PONG"))
    message_size_limit: Size = attrs.field(default=Size(64 * 1024**2), metadata=_doc(
        "largest forward message, checked again after gunzip"))
    transport: str = attrs.field(default="tls", metadata=_doc(
        "tls (with [tls] settings, mTLS by default) or tcp (plain; only on trusted networks)"))
    users: tuple[ForwardUser, ...] = attrs.field(default=(), metadata=_doc(
        "with shared_key: [{ username, password, customers = [] }] required in PING; empty = "
        "no user auth; customers restricts what that user may write (empty = any)"))
    idle_timeout: Duration = attrs.field(default=Duration(300.0), metadata=_doc(
        "close a forward connection idle this long"))
    dedupe_window: Duration = attrs.field(default=Duration(3600.0), metadata=_doc(
        "acked chunk ids remembered this long: a resend within it is acked, not stored; "
        "0 = off"))
    handshake_timeout: Duration = attrs.field(default=Duration(30.0), metadata=_doc(
        "from connect to the end of the handshake (TLS, and PING with shared_key): one "
        "deadline, however slowly the bytes come"))
    send_timeout: Duration = attrs.field(default=Duration(30.0), metadata=_doc(
        "a peer must take a HELO, PONG or ack within this time or is closed (one that "
        "never reads cannot hold its connection; its chunk is deduplicated on resend)"))
    max_records_per_message: int = attrs.field(default=250_000, metadata=_doc(
        "most entries one forward message may hold (connection closed past it)"))


@attrs.frozen
class Token:
    name: str
    token: str = attrs.field(repr=False)
    customers: tuple[str, ...] = ()
    subjects: tuple[str, ...] = ()


@attrs.frozen
class Client:
    subject: str
    customers: tuple[str, ...] = ()


@attrs.frozen
class AuthConfig:
    tokens: tuple[Token, ...] = attrs.field(default=(), metadata=_doc(
        "bearer tokens: [{ name, token, customers = [], subjects = [] }]; empty customers = "
        "any customer; subjects = certificate CNs the token is valid with (empty = any)"))
    clients: tuple[Client, ...] = attrs.field(default=(), metadata=_doc(
        "[[auth.clients]] subject = certificate CN, customers = what it may write (HTTPS "
        "and forward); subjects not listed are not restricted"))
    failure_limit: int = attrs.field(default=5, metadata=_doc(
        "failed authentications from one address within failure_window that lock it out "
        "(0 = never)"))
    failure_window: Duration = attrs.field(default=Duration(10.0), metadata=_doc(
        "window in which failure_limit failures count"))
    lockout: Duration = attrs.field(default=Duration(60.0), metadata=_doc(
        "how long a locked-out address is refused (HTTP 429, forward connection closed)"))


@attrs.frozen
class StorageConfig:
    root: str = attrs.field(default="/var/log/mrwebdefence", metadata=_doc(
        "root of the hourly files tree"))
    compression: str = attrs.field(default="zlib", metadata=_doc(
        "gzip members by 'zlib' (level 6: smaller files) or 'igzip' (ISA-L level 1: about "
        "a tenth of the compression CPU, files a quarter to a half larger)"))


@attrs.frozen
class BufferConfig:
    path: str = attrs.field(default="/var/lib/mwdlogd/buffer", metadata=_doc("buffer directory"))
    total_limit: Size = attrs.field(default=Size(2 * 1024**3), metadata=_doc(
        "buffered bytes above which ingest answers 503"))
    chunk_limit: Size = attrs.field(default=Size(256 * 1024**2), metadata=_doc(
        "flush a destination once this many bytes are pending"))
    flush_interval: Duration = attrs.field(default=Duration(10.0), metadata=_doc(
        "flush pending records this often (plus up to 20% spread)"))
    timekey_wait: Duration = attrs.field(default=Duration(10.0), metadata=_doc(
        "keep an hour's file open this long after the hour ends, for late records"))
    retry_max_interval: Duration = attrs.field(default=Duration(30.0), metadata=_doc(
        "longest wait between retries of a failed write"))
    retry_timeout: Duration = attrs.field(default=Duration(3600.0), metadata=_doc(
        "after this long failing, a chunk moves to {buffer.path}/failed/ (never dropped)"))
    fsync: bool = attrs.field(default=True, metadata=_doc(
        "fsync the journal before acknowledging; false only to measure what durability costs"))


@attrs.frozen
class ListenConfig:
    bind: str = "0.0.0.0"
    port: int = 0


# One class per listener, so a section that sets only its port keeps its own bind (and
# the other way round): `[monitor] port = 24220` still binds 127.0.0.1.
@attrs.frozen
class HealthConfig(ListenConfig):
    bind: str = "0.0.0.0"
    port: int = 8889


@attrs.frozen
class MonitorConfig(ListenConfig):
    bind: str = "127.0.0.1"
    port: int = 24220


@attrs.frozen
class MetricsConfig(ListenConfig):
    bind: str = "0.0.0.0"
    port: int = 24231


@attrs.frozen
class Config:
    server: ServerConfig = attrs.field(factory=ServerConfig)
    tls: TlsConfig = attrs.field(factory=TlsConfig)
    http: HttpConfig = attrs.field(factory=HttpConfig)
    forward: ForwardConfig = attrs.field(factory=ForwardConfig)
    auth: AuthConfig = attrs.field(factory=AuthConfig)
    storage: StorageConfig = attrs.field(factory=StorageConfig)
    buffer: BufferConfig = attrs.field(factory=BufferConfig)
    health: HealthConfig = attrs.field(factory=HealthConfig, metadata=_doc(
        "plain HTTP /health: status only, no paths or limits"))
    monitor: MonitorConfig = attrs.field(factory=MonitorConfig, metadata=_doc(
        "monitor agent API and live tail; keep on loopback"))
    metrics: MetricsConfig = attrs.field(factory=MetricsConfig, metadata=_doc(
        "Prometheus /metrics: counters only, no paths or customer names"))


def _converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True)
    converter.register_structure_hook(Size, lambda value, _: Size(parse_size(value)))
    converter.register_structure_hook(Duration, lambda value, _: Duration(parse_duration(value)))
    converter.register_structure_hook(str, _strict_str)
    converter.register_structure_hook(int, _strict_int)
    converter.register_structure_hook(bool, _strict_bool)
    converter.register_structure_hook_factory(attrs.has, lambda cl: _table_hook(cl, converter))
    converter.register_structure_hook_factory(_is_tuple, lambda t: _array_hook(t, converter))
    return converter


def _is_tuple(target: Any) -> bool:
    return typing.get_origin(target) is tuple


def _kind(value: object) -> str:
    """What a TOML value is, as an operator would say it (never the value: it may be a
    token)."""
    kinds: list[tuple[type | tuple[type, ...], str]] = [
        (bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
        (list, "an array"), (dict, "a table"),
        ((datetime.date, datetime.time), "a date/time")]
    return next((kind for types, kind in kinds if isinstance(value, types)), type(value).__name__)


def _table_shape(cl: type) -> str:
    """`{ name = ..., token = ... }`: the required keys, or the first two when none are."""
    fields = attrs.fields(cl)
    shown = [f"{f.name} = ..." for f in fields if f.default is attrs.NOTHING]
    if not shown:
        shown = [f"{f.name} = ..." for f in fields[:2]] + ["..."]
    return "{ " + ", ".join(shown) + " }"


def _table_hook(cl: type, converter: cattrs.Converter) -> Callable[[Any, type], Any]:
    """An attrs class is structured only from a table; anything else is named as such."""
    structure: Callable[[Any, type], Any] = make_dict_structure_fn(cl, converter)

    def hook(value: Any, target: type) -> Any:
        if not isinstance(value, Mapping):
            raise ValueError(f"expected a table like {_table_shape(cl)}, got {_kind(value)}")
        return structure(value, target)
    return hook


def _array_hook(tuple_type: Any, converter: cattrs.Converter) -> Callable[[Any, type], Any]:
    """A tuple is structured only from an array: `\"acme\"` must not become ('a','c',...)."""
    structure: Callable[[Any, type], Any] = homogenous_tuple_structure_factory(tuple_type,
                                                                               converter)
    item = typing.get_args(tuple_type)[0]
    example = f"[{_table_shape(item)}]" if attrs.has(item) else '["..."]'

    def hook(value: Any, target: type) -> Any:
        if not isinstance(value, list | tuple):
            raise ValueError(f"expected an array like {example}, got {_kind(value)}")
        return structure(value, target)
    return hook


def _strict_str(value: object, _: type) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _strict_int(value: object, _: type) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


def _strict_bool(value: object, _: type) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


CONVERTER = _converter()
SECTIONS: dict[str, Any] = {field.name: field.type for field in attrs.fields(Config)}


def config_path(cli_value: str | None) -> tuple[Path, bool]:
    """The config file to read and whether it was asked for explicitly (then it must exist)."""
    if cli_value:
        return Path(cli_value), True
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]), True
    return Path(DEFAULT_CONFIG_PATH), False


def load_config(path: Path, *, required: bool, environ: Mapping[str, str] | None = None) -> Config:
    """Read, override from the environment, structure and validate; raises ConfigError.

    Relative paths in the file are resolved against the file's directory, so the server
    finds its certificates whatever the working directory is.
    """
    raw: dict[str, Any] = {}
    if path.exists():
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(path), f"not valid TOML: {exc}") from None
    elif required:
        raise ConfigError(str(path), "config file not found")
    apply_env_overrides(raw, os.environ if environ is None else environ)
    config = structure_config(raw)
    validate(config)
    return resolve_paths(config, path.resolve().parent if path.exists() else Path.cwd())


def apply_env_overrides(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    """MWDLOGD_HTTP_PORT=18888 sets raw['http']['port'] = 18888; unknown names are errors."""
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        section, key = _env_target(name)
        raw.setdefault(section, {})[key] = _env_value(value)


def _env_target(name: str) -> tuple[str, str]:
    rest = name[len(ENV_PREFIX):].lower()
    for section, section_type in SECTIONS.items():
        if rest.startswith(section + "_"):
            key = rest[len(section) + 1:]
            if key in {field.name for field in attrs.fields(section_type)}:
                return section, key
    raise ConfigError(name, "environment variable names no known config key "
                      "(expected MWDLOGD_<SECTION>_<KEY>, e.g. MWDLOGD_HTTP_PORT)")


def _env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def structure_config(raw: dict[str, Any]) -> Config:
    try:
        return CONVERTER.structure(raw, Config)
    except ClassValidationError as exc:
        key, problem = _first_problem(exc, [])
        raise ConfigError(key or "config", problem) from None


def _first_problem(exc: BaseException, path: list[str]) -> tuple[str, str]:
    """Walk cattrs' exception groups to the first leaf, keeping the dotted key path."""
    if isinstance(exc, ForbiddenExtraKeysError):
        names = ", ".join(sorted(exc.extra_fields))
        return _dotted(path), f"unknown key(s): {names}"
    if isinstance(exc, BaseExceptionGroup):
        inner = exc.exceptions[0]
        step = _note_step(inner)
        return _first_problem(inner, path + step)
    if isinstance(exc, KeyError):
        return _dotted(path), "required key is missing"
    return _dotted(path), str(exc)


def _dotted(path: list[str]) -> str:
    return ".".join(path).replace(".[", "[")


def _note_step(exc: BaseException) -> list[str]:
    for note in getattr(exc, "__notes__", []):
        name = getattr(note, "name", None)
        index = getattr(note, "index", None)
        if isinstance(name, str):
            return [name]
        if isinstance(index, int):
            return [f"[{index}]"]
    return []


def validate(config: Config) -> None:
    """Checks that cattrs' types cannot express; raises ConfigError naming the key."""
    if not 1 <= config.server.workers <= MAX_WORKERS:
        raise ConfigError("server.workers", f"must be 1..{MAX_WORKERS}, got "
                          f"{config.server.workers}")
    if config.tls.min_version not in ("1.2", "1.3"):
        raise ConfigError("tls.min_version", f"must be '1.2' or '1.3', got "
                          f"{config.tls.min_version!r}")
    for section in ("http", "forward", "health", "monitor", "metrics"):
        port = getattr(config, section).port
        if not 0 <= port <= 65535:
            raise ConfigError(f"{section}.port", f"must be 0..65535, got {port}")
    if config.storage.compression not in ("zlib", "igzip"):
        raise ConfigError("storage.compression", f"must be 'zlib' or 'igzip', got "
                          f"{config.storage.compression!r}")
    if config.forward.transport not in ("tls", "tcp"):
        raise ConfigError("forward.transport", f"must be 'tls' or 'tcp', got "
                          f"{config.forward.transport!r}")
    if config.forward.users and not config.forward.shared_key:
        raise ConfigError("forward.users", "user auth needs forward.shared_key to be set")
    if config.http.body_size_limit <= 0:
        raise ConfigError("http.body_size_limit", "must be greater than 0")
    if config.server.memory_limit < 64 * 1024**2:
        raise ConfigError("server.memory_limit", f"must be at least 64MiB, got "
                          f"{config.server.memory_limit} bytes")
    for key, value in (("http.max_records_per_request", config.http.max_records_per_request),
                       ("forward.max_records_per_message",
                        config.forward.max_records_per_message)):
        if value <= 0:
            raise ConfigError(key, "must be greater than 0")
    if config.buffer.chunk_limit <= 0:
        raise ConfigError("buffer.chunk_limit", "must be greater than 0")
    if not config.server.hostname:
        raise ConfigError("server.hostname", "must not be empty")
    if config.server.log_level not in LOG_LEVELS:
        raise ConfigError("server.log_level", f"must be one of {', '.join(LOG_LEVELS)}, got "
                          f"{config.server.log_level!r}")
    _validate_tokens(config.auth.tokens)
    _validate_ports(config)
    _validate_auth(config)


def listen_ports(config: Config) -> list[tuple[str, str, int]]:
    """(key, bind, port) of every port the server listens on; with workers, the monitor
    port of worker N is `monitor.port+N` (each worker's /metrics is on a private loopback
    port behind the one `metrics.port`)."""
    ports = [(f"{name}.port", getattr(config, name).bind, getattr(config, name).port)
             for name in ("http", "forward", "health", "metrics", "monitor")]
    monitor = config.monitor
    ports += [(f"monitor.port+{n}", monitor.bind, monitor.port + n)
              for n in range(1, config.server.workers) if monitor.port]
    return ports


def _validate_ports(config: Config) -> None:
    """Two listeners on one port would fail at start-up (or worse, with SO_REUSEPORT
    elsewhere, share it): name both keys now."""
    seen: list[tuple[str, str, int]] = []
    for key, bind, port in listen_ports(config):
        if port > 65535:
            raise ConfigError(key, f"{port} is beyond 65535 (server.workers="
                              f"{config.server.workers})")
        for other, other_bind, other_port in seen:
            if port and port == other_port and _overlap(bind, other_bind):
                raise ConfigError(key, f"port {port} is also {other} ({other_bind}:{other_port})")
        seen.append((key, bind, port))


def _overlap(a: str, b: str) -> bool:
    wildcard = ("0.0.0.0", "::", "")
    return a == b or a in wildcard or b in wildcard


def _validate_tokens(tokens: tuple[Token, ...]) -> None:
    seen: set[str] = set()
    for index, token in enumerate(tokens):
        key = f"auth.tokens[{index}]"
        if not token.name:
            raise ConfigError(f"{key}.name", "must not be empty")
        if token.name in seen:
            raise ConfigError(f"{key}.name", f"duplicate token name {token.name!r}")
        if not token.token:
            raise ConfigError(f"{key}.token", "must not be empty")
        seen.add(token.name)


def _validate_auth(config: Config) -> None:
    auth = config.auth
    named: list[tuple[str, tuple[str, ...]]] = [
        (f"auth.tokens[{i}].customers", t.customers) for i, t in enumerate(auth.tokens)]
    named += [(f"auth.clients[{i}].customers", c.customers) for i, c in enumerate(auth.clients)]
    named += [(f"forward.users[{i}].customers", u.customers)
              for i, u in enumerate(config.forward.users)]
    for key, customers in named:
        for index, customer in enumerate(customers):
            if not customer or safe_customer(customer) != customer:
                raise ConfigError(f"{key}[{index}]", f"{customer!r} is not a customer "
                                  "directory name ([A-Za-z0-9_-], at most 200, not _invalid or "
                                  "_unmatched); records are matched on it exactly")
    subjects: set[str] = set()
    for index, client in enumerate(auth.clients):
        if not client.subject:
            raise ConfigError(f"auth.clients[{index}].subject", "must not be empty")
        if client.subject in subjects:
            raise ConfigError(f"auth.clients[{index}].subject",
                              f"duplicate subject {client.subject!r}")
        subjects.add(client.subject)
    for index, token in enumerate(auth.tokens):
        if "" in token.subjects:
            raise ConfigError(f"auth.tokens[{index}].subjects", "must not hold an empty name")
    if auth.failure_limit < 0:
        raise ConfigError("auth.failure_limit", "must be 0 (off) or more")
    for key, value in (("auth.failure_window", auth.failure_window),
                       ("auth.lockout", auth.lockout)):
        if value <= 0:
            raise ConfigError(key, "must be greater than 0")


def resolve_paths(config: Config, base: Path) -> Config:
    def under(value: str) -> str:
        return str(base / value) if not Path(value).is_absolute() else value

    return attrs.evolve(
        config,
        tls=attrs.evolve(config.tls, cert=under(config.tls.cert), key=under(config.tls.key),
                         ca=under(config.tls.ca)),
        storage=attrs.evolve(config.storage, root=under(config.storage.root)),
        buffer=attrs.evolve(config.buffer, path=under(config.buffer.path)),
    )


def missing_tls_files(config: Config) -> list[tuple[str, str]]:
    """(key, path) of each TLS file that does not exist."""
    wanted = [("tls.cert", config.tls.cert), ("tls.key", config.tls.key)]
    if config.tls.client_auth:
        wanted.append(("tls.ca", config.tls.ca))
    return [(key, path) for key, path in wanted if not Path(path).is_file()]


def check_tls_files(config: Config) -> None:
    for key, path in missing_tls_files(config):
        raise ConfigError(key, f"file not found: {path} (point {key} at your file, or create "
                          "a development PKI with `mwdlogd certs init`)")

"""`mwdlogd doctor`: the runbook's four symptoms as checks that name the cause and the fix.

Symptoms: the server does not start (ports in use, certificates), TLS handshake errors
(CA not distributed, expiry, a certificate the running server does not trust), logs not
stored and the buffer growing (storage and buffer writable with free space, journal size
against buffer.total_limit, retries and errors from /metrics, `write_failed` causes from
the log). One line per check, `ok|warn|FAIL  check: finding — fix`; exit 0 when all are
ok, 1 with warnings, 2 with problems.

The parsers (/proc/net/tcp, Prometheus text, log lines) are plain functions over text;
the rest reads this machine's files and talks to the running server, briefly and only
on loopback (or the configured bind address).
"""

import argparse
import datetime
import os
import re
import socket
import ssl
import sys
import tempfile
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from mwdlogd.certs import Layout
from mwdlogd.config import Config, ListenConfig, config_path, listen_ports, load_config
from mwdlogd.errors import ClientRefused
from mwdlogd.telemetry import SLOW_FLUSH_S
from mwdlogd.worker import worker_buffer

OK, WARN, FAIL = "ok", "warn", "FAIL"
EXIT = {OK: 0, WARN: 1, FAIL: 2}
LISTEN_STATE = "0A"
DAYS_WARN = 90  # the runbook's monthly check renews under three months
JOURNAL_WARN_SHARE = 0.5
JOURNAL_FAIL_SHARE = 0.9
MIN_FREE_BYTES = 16 * 1024**2
PROBE_BYTES = 64 * 1024
QUIET_S = 1.0  # a refused client certificate's alert follows the handshake within ms
RETRIES = 'fluentd_output_status_retry_count{plugin_id="hourly_files",type="file"}'
ERRORS = 'fluentd_output_status_num_errors{plugin_id="hourly_files",type="file"}'
SLOW_FLUSHES = 'fluentd_output_status_slow_flush_count{plugin_id="hourly_files",type="file"}'
FAILED_RECORDS = "mwdlogd_failed_records_total"
REJECTED = re.compile(r'^mwdlogd_rejected_requests_total\{protocol="(\w+)",reason="(\w+)"\}$')
CREDENTIAL_REFUSALS = {"http unauthorized", "forward handshake"}
# `time LEVEL event key=value ...`, anywhere in the line (journalctl prefixes its own)
LOG_LINE = re.compile(r"(\S+) +(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) +(\w+) ?(.*)$")
LOGFMT_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')
ERRNO_FIXES = [("No space left", "free space on that filesystem or grow it"),
               ("Disk quota", "raise the quota or free space"),
               ("Permission denied", "give the server's user write access (chown/chmod)"),
               ("Read-only file system", "remount the filesystem read-write"),
               ("Input/output error", "check the disk (dmesg, SMART)")]


@attrs.frozen
class Finding:
    status: str
    check: str
    finding: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.status:<5} {self.check}: {self.finding}" + (
            f" — {self.fix}" if self.fix else "")


# --- ports: who listens where ------------------------------------------------------------

def listening_inodes(table: str) -> dict[int, int]:
    """Port -> socket inode of every LISTEN socket in a /proc/net/tcp{,6} table."""
    found = {}
    for row in table.splitlines()[1:]:
        fields = row.split()
        if len(fields) > 9 and fields[3] == LISTEN_STATE:
            found[int(fields[1].rpartition(":")[2], 16)] = int(fields[9])
    return found


def _socket_owners(inodes: set[int]) -> dict[int, tuple[int, str]]:
    """Socket inode -> (pid, command line) of the process holding it, from /proc/*/fd."""
    owners: dict[int, tuple[int, str]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and int(target[8:-1]) in inodes:
                    command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                        errors="replace").strip()
                    owners.setdefault(int(target[8:-1]), (int(proc.name), command[:100]))
        except OSError:  # the process ended, or it is not ours to read
            continue
    return owners


def port_owners() -> dict[int, tuple[int, str] | None]:
    """Listening port -> (pid, command), None when the owner is not visible to us."""
    inodes: dict[int, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            inodes.update(listening_inodes(Path(table).read_text()))
        except OSError:
            continue
    owners = _socket_owners(set(inodes.values()))
    return {port: owners.get(inode) for port, inode in inodes.items()}


def check_ports(config: Config, owners: dict[int, tuple[int, str] | None]) -> list[Finding]:
    findings = []
    for key, bind, port in listen_ports(config):
        check = f"port {key.removesuffix('.port')} {bind}:{port}"
        if port == 0:
            findings.append(Finding(OK, check, "port 0: a free port is picked at start"))
        elif port not in owners:
            findings.append(Finding(OK, check, "free"))
        elif (owner := owners[port]) is None:
            findings.append(Finding(WARN, check, "in use by a process this user cannot see",
                                    "run doctor as root to name it"))
        elif "mwdlogd" in owner[1]:
            findings.append(Finding(OK, check, f"served by mwdlogd (pid {owner[0]})"))
        else:
            findings.append(Finding(FAIL, check, f"in use by pid {owner[0]} ({owner[1]})",
                                    f"stop that process or set {key.split('+')[0]} to a free "
                                    "port; `mwdlogd run` cannot bind it"))
    return findings


# --- certificates on disk ----------------------------------------------------------------

def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _expiry(check: str, cert: x509.Certificate, fix: str) -> Finding:
    days = (cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)).days
    when = f"{cert.not_valid_after_utc:%Y-%m-%d}"
    if days < 0:
        return Finding(FAIL, check, f"expired on {when}", fix)
    if days < DAYS_WARN:
        return Finding(WARN, check, f"expires on {when}, in {days} days (under {DAYS_WARN})",
                       fix)
    return Finding(OK, check, f"valid until {when} ({days} days)")


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def check_certificates(config: Config) -> list[Finding]:
    tls = config.tls
    layout = Layout.from_paths(cert=tls.cert, key=tls.key, ca=tls.ca,
                               ca_required=tls.client_auth)
    wanted = [("cert", layout.cert), ("key", layout.key)]
    if layout.ca_required or layout.ca.exists():
        wanted.append(("ca", layout.ca))
    missing = [Finding(FAIL, f"tls {key}", f"{path} not found",
                       "create it (`mwdlogd certs init` for a development PKI) or point "
                       f"tls.{key} at your file") for key, path in wanted if not path.is_file()]
    if missing:
        return missing
    try:
        cert = _load_cert(layout.cert)
        key = serialization.load_pem_private_key(layout.key.read_bytes(), password=None)
        ca = _load_cert(layout.ca) if len(wanted) == 3 else None
    except (ValueError, TypeError) as exc:
        return [Finding(FAIL, "tls files", f"cannot read as PEM: {exc}",
                        "check that tls.cert, tls.key and tls.ca are PEM files")]
    findings = [Finding(OK, "tls files", ", ".join(str(path) for _, path in wanted) +
                        " present")]
    if key.public_key() != cert.public_key():
        findings.append(Finding(FAIL, "tls key matches cert", f"{layout.key} is not the key of "
                                f"{layout.cert}", "install the key the certificate was issued "
                                "for, or re-issue both: `mwdlogd certs renew`"))
    else:
        findings.append(Finding(OK, "tls key matches cert", "yes"))
    if ca is not None:
        findings.append(_chain(layout, cert, ca))
    findings.append(_expiry("tls.cert expiry", cert,
                            "`mwdlogd certs renew`, then reload the server (SIGHUP)"))
    return findings + ([] if ca is None else _ca_findings(layout, ca))


def _chain(layout: Layout, cert: x509.Certificate, ca: x509.Certificate) -> Finding:
    if _signed_by(cert, ca):
        return Finding(OK, "tls chain", f"server certificate is signed by {layout.ca}")
    return Finding(WARN, "tls chain", "server certificate is not signed by tls.ca "
                   f"({ca.subject.rfc4514_string()})", "Engines must trust the server "
                   f"certificate's issuer ({cert.issuer.rfc4514_string()}); fine only if you "
                   "use a separate PKI for the server")


def _ca_findings(layout: Layout, ca: x509.Certificate) -> list[Finding]:
    """The CA's expiry, and each client certificate's issuer and expiry."""
    findings = [_expiry("tls.ca expiry", ca, "issue a new CA and distribute it to every "
                        "Engine with new client certificates")]
    for path in layout.client_certs():
        try:
            client = _load_cert(path)
        except ValueError as exc:
            findings.append(Finding(WARN, f"client {path.name}", f"not a PEM certificate: "
                                    f"{exc}", "remove it from the certificate directory"))
            continue
        if not _signed_by(client, ca):
            findings.append(Finding(FAIL, f"client {path.name}", "not signed by tls.ca: the "
                                    "server refuses it", "re-issue it: `mwdlogd certs renew "
                                    f"--client {path.stem}`"))
        findings.append(_expiry(f"client {path.name} expiry", client,
                                f"`mwdlogd certs renew --client {path.stem}` and install it"))
    return findings


# --- the running server ------------------------------------------------------------------

def local_address(listen: ListenConfig) -> tuple[str, int]:
    """Where a command on this machine reaches a listener (wildcard binds via loopback)."""
    return ("127.0.0.1" if listen.bind in ("0.0.0.0", "::") else listen.bind), listen.port


def _get(host: str, port: int, path: str, timeout: float) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=timeout) as reply:
            return int(reply.status), reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def check_health(config: Config, timeout: float) -> tuple[Finding, bool]:
    """The /health answer, and whether a server is running to check further."""
    host, port = local_address(config.health)
    try:
        status, body = _get(host, port, "/health", timeout)
    except OSError as exc:
        return Finding(WARN, "server", f"not running (no answer on {host}:{port}/health: "
                       f"{getattr(exc, 'reason', exc)}); handshake and metrics checks skipped",
                       "start it: `mwdlogd run` (or its service/container)"), False
    if status == 200:
        return Finding(OK, "server", f"running, /health answers {body.strip()}"), True
    return Finding(FAIL, "server", f"unhealthy, /health answers {status} {body.strip()}",
                   "see the storage checks above and the server's log"), True


def _client_pair(layout: Layout, cert: str | None, key: str | None) -> tuple[str, str] | None:
    if cert:
        return cert, key or cert
    for crt in layout.client_certs():
        if crt.with_suffix(".key").is_file():
            return str(crt), str(crt.with_suffix(".key"))
    return None


def _refusal(exc: ssl.SSLError) -> bool:
    """An alert from the server about our client certificate."""
    reason = (exc.reason or str(exc)).upper()
    return any(word in reason for word in ("UNKNOWN_CA", "CERTIFICATE_REQUIRED",
                                           "BAD_CERTIFICATE", "HANDSHAKE_FAILURE"))


def handshake(address: tuple[str, int], context: ssl.SSLContext, *, timeout: float) -> None:
    """A TLS handshake, then a short read: a TLS 1.3 server refuses a client certificate
    only after the handshake, with an alert. Quiet for QUIET_S means accepted (nothing is
    sent, so the server logs nothing). Raises ClientRefused, ssl.SSLError or OSError."""
    try:
        with socket.create_connection(address, timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=None) as conn:
            conn.settimeout(min(timeout, QUIET_S))
            try:
                if not conn.recv(1):
                    raise ClientRefused("it closed the connection right after the handshake")
            except TimeoutError:
                return
    except ssl.SSLError as exc:
        if _refusal(exc):
            raise ClientRefused(exc.reason or str(exc)) from None
        raise


def check_handshakes(config: Config, client: tuple[str, str] | None,
                     timeout: float) -> list[Finding]:
    context = ssl.create_default_context(cafile=config.tls.ca)
    context.check_hostname = False  # the chain is verified; names depend on the Engine's DNS
    who = "no client certificate"
    if client is not None:
        try:
            context.load_cert_chain(*client)
        except (OSError, ssl.SSLError) as exc:
            return [Finding(FAIL, "tls handshake", f"cannot load client certificate "
                            f"{client[0]} with key {client[1]}: {exc}",
                            "give --client-cert and --client-key of one pair")]
        who = f"client certificate {client[0]}"
    targets = [("http", ListenConfig(config.http.bind, config.http.port))]
    if config.forward.transport == "tls":
        targets.append(("forward", ListenConfig(config.forward.bind, config.forward.port)))
    findings = []
    for key, listen in targets:
        address = local_address(listen)
        check = f"tls handshake {key} {address[0]}:{address[1]}"
        try:
            handshake(address, context, timeout=timeout)
        except ssl.SSLCertVerificationError as exc:
            findings.append(Finding(FAIL, check, "the running server's certificate is not "
                                    f"trusted by tls.ca ({exc.verify_message})",
                                    "Engines holding this ca.crt fail the same way: reload "
                                    "(SIGHUP) the server if its certificate was re-issued, or "
                                    "give the Engines the CA that signed it"))
        except ClientRefused as exc:
            fix = ("it is not signed by the CA the running server trusts: re-issue it from "
                   "tls.ca (`mwdlogd certs renew --client NAME`), or reload the server if "
                   "tls.ca changed") if client else (
                   "tls.client_auth requires one: give --client-cert/--client-key")
            findings.append(Finding(FAIL, check, f"the server refused {who} ({exc})", fix))
        except ssl.SSLError as exc:
            findings.append(Finding(FAIL, check, f"TLS error: {exc.reason or exc}",
                                    "compare tls.min_version and the Engine's TLS settings; "
                                    "see tls_handshake_failed in the log"))
        except OSError as exc:
            findings.append(Finding(FAIL, check, f"cannot connect: {exc}",
                                    "check the port checks above and the server's log"))
        else:
            note = "" if client else (" (no client certificate found beside tls.cert: "
                                      "mTLS not exercised; give --client-cert)")
            findings.append(Finding(OK if client or not config.tls.client_auth else WARN,
                                    check, f"handshake completed with tls.ca and {who}{note}"))
    return findings


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> sample name with labels -> value."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                found[name] = float(value)
            except ValueError:
                continue
    return found


def metric_findings(samples: dict[str, float], address: str) -> list[Finding]:
    """What the counters say about storing logs: write retries, failed chunks, refusals."""
    check = f"metrics {address}"
    retries, errors = samples.get(RETRIES, 0.0), samples.get(ERRORS, 0.0)
    failed = samples.get(FAILED_RECORDS, 0.0)
    findings = []
    if failed:
        findings.append(Finding(FAIL, check, f"{failed:.0f} records moved to "
                                "{buffer.path}/failed after buffer.retry_timeout",
                                "fix the write error (storage checks, --log), then re-ingest "
                                "the chunks in failed/ (README: Durability)"))
    if retries or errors:
        findings.append(Finding(WARN, check, f"{retries:.0f} write retries, {errors:.0f} "
                                "failed writes since start", "a write to the hourly files "
                                "failed: see the storage checks and write_failed causes "
                                "(--log FILE)"))
    if slow := samples.get(SLOW_FLUSHES, 0.0):
        findings.append(Finding(WARN, check, f"{slow:.0f} flushes slower than "
                                f"{SLOW_FLUSH_S:g} s since start: the disk is slow",
                                "check the storage disk's I/O (iostat) and what else writes "
                                "to it"))
    rejected = Counter[str]()
    for name, value in samples.items():
        if (match := REJECTED.match(name)) and value:
            rejected[f"{match[1]} {match[2]}"] += int(value)
    if full := rejected.get("http buffer_full"):
        findings.append(Finding(FAIL, check, f"{full} requests refused with 503 buffer_full "
                                "since start: the journal reached buffer.total_limit",
                                "writes to the hourly files fail or lag behind ingest: see "
                                "the storage checks and write_failed causes (--log FILE)"))
    if refused := {k: v for k, v in rejected.items() if k in CREDENTIAL_REFUSALS}:
        findings.append(Finding(WARN, check, "requests refused for their credentials: " +
                                ", ".join(f"{k} {v}" for k, v in sorted(refused.items())),
                                "an Engine sends a token (or shared key) the config does not "
                                "hold: compare it with auth.tokens / forward.shared_key"))
    if forbidden := rejected.get("http forbidden_customer"):
        findings.append(Finding(WARN, check, f"{forbidden} requests refused with 403 "
                                "forbidden_customer since start",
                                "a token restricted by `customers = [...]` was used for another "
                                "customer: check auth.tokens[].customers or the Engine's "
                                "customer_name"))
    for protocol in ("http", "forward"):
        if count := rejected.get(f"{protocol} tls_handshake"):
            findings.append(Finding(WARN, check, f"{count} failed TLS handshakes on {protocol}",
                                    "Engines without tls.ca or with a client certificate not "
                                    "signed by it: see tls_handshake_failed peers (--log)"))
    if not findings:
        findings.append(Finding(OK, check, f"{retries:.0f} write retries, {errors:.0f} errors, "
                                "0 failed records"))
    return findings


def check_metrics(config: Config, timeout: float) -> list[Finding]:
    """The counters of the running server (with workers: the sum the supervisor serves)."""
    host, port = local_address(config.metrics)
    try:
        _, text = _get(host, port, "/metrics", timeout)
    except OSError as exc:
        return [Finding(WARN, f"metrics {host}:{port}", f"unreachable: {exc}",
                        "check metrics.bind/port")]
    return metric_findings(parse_metrics(text), f"{host}:{port}")


# --- storage and buffer ------------------------------------------------------------------

CAP_DAC_OVERRIDE = 1


@attrs.frozen
class Identity:
    """Who a process writes files as: effective uid, groups, and whether it bypasses
    permission bits (CAP_DAC_OVERRIDE, root normally)."""

    pid: int
    uid: int
    gids: frozenset[int]
    dac_override: bool


def parse_status(pid: int, text: str) -> Identity:
    """An Identity from the text of /proc/PID/status."""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    gids = {int(fields["Gid"].split()[1]), *map(int, fields.get("Groups", "").split())}
    return Identity(pid, int(fields["Uid"].split()[1]), frozenset(gids),
                    bool(int(fields["CapEff"], 16) >> CAP_DAC_OVERRIDE & 1))


def writable_by(mode: int, owner: int, group: int, who: Identity) -> bool:
    """Whether `who` may create files in a directory with this mode and ownership."""
    if who.dac_override:
        return True
    shift = 6 if owner == who.uid else 3 if group in who.gids else 0
    return (mode >> shift) & 0o3 == 0o3  # write and search


def server_identity(owners: dict[int, tuple[int, str] | None], config: Config
                    ) -> Identity | None:
    """The running server's identity, from the process that holds its ingest port."""
    owner = owners.get(config.http.port) if config.http.port else None
    if owner is None or "mwdlogd" not in owner[1]:
        return None
    try:
        return parse_status(owner[0], Path(f"/proc/{owner[0]}/status").read_text())
    except (OSError, KeyError, ValueError):
        return None

def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _errno_fix(error: str) -> str:
    return next((fix for text, fix in ERRNO_FIXES if text in error), "see the error")


def check_writable(key: str, path: Path, low_water: int, low_what: str,
                   server: Identity | None = None) -> list[Finding]:
    """Write, fsync and delete a probe file in `path`; free space against `low_water`;
    with the running `server`'s identity, whether its permission bits let it write too."""
    target = path if path.exists() else _existing_ancestor(path)
    check = f"{key} {path}"
    if not target.is_dir():
        return [Finding(FAIL, check, f"{target} is not a directory",
                        f"point {key} at a directory")]
    info = target.stat()
    if server is not None and not writable_by(info.st_mode, info.st_uid, info.st_gid, server):
        fix = (f"chmod u+wx {target}" if info.st_uid == server.uid else
               f"chown -R {server.uid} {target}, or give its group write access")
        return [Finding(FAIL, check, f"the running server (pid {server.pid}, uid {server.uid}) "
                        f"cannot write in {target}: mode {info.st_mode & 0o7777:04o}, owner "
                        f"uid {info.st_uid} gid {info.st_gid}", fix)]
    try:
        with tempfile.NamedTemporaryFile(dir=target, prefix=".doctor-") as probe:
            probe.write(b"\0" * PROBE_BYTES)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        return [Finding(FAIL, check, f"cannot write in {target}: {exc}", _errno_fix(str(exc)))]
    usage = os.statvfs(target)
    free = usage.f_bavail * usage.f_frsize
    created = "" if path.exists() else f" (does not exist yet; created at start in {target})"
    if free < MIN_FREE_BYTES:
        return [Finding(FAIL, check, f"only {_size(free)} free{created}",
                        "free space on that filesystem or grow it")]
    if free < low_water:
        return [Finding(WARN, check, f"{_size(free)} free, less than {low_what} "
                        f"({_size(low_water)}){created}",
                        f"free space or lower {low_what}")]
    return [Finding(OK, check, f"writable, {_size(free)} free{created}")]


def check_journal(config: Config) -> Finding:
    segments = [segment for index in range(config.server.workers)
                for segment in (worker_buffer(config, index) / "journal").glob("*.wal")]
    size = sum(segment.stat().st_size for segment in segments)
    limit = config.buffer.total_limit
    check = "journal size"
    finding = f"{_size(size)} in {len(segments)} segments, buffer.total_limit {_size(limit)}"
    if size >= limit * JOURNAL_FAIL_SHARE:
        return Finding(FAIL, check, finding + f": over {JOURNAL_FAIL_SHARE:.0%}, ingest "
                       "answers 503 buffer_full at the limit",
                       "writes to the hourly files are failing or slower than ingest: see "
                       "the storage checks and write_failed causes")
    if size >= limit * JOURNAL_WARN_SHARE:
        return Finding(WARN, check, finding + f": over {JOURNAL_WARN_SHARE:.0%}",
                       "the buffer is growing: check disk I/O, permissions and write_failed "
                       "causes")
    return Finding(OK, check, finding)


def _size(count: float) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= factor:
            return f"{count / factor:.1f} {unit}"
    return f"{count:.0f} B"


# --- the log -----------------------------------------------------------------------------

def log_events(lines: Iterable[str], names: set[str]) -> Iterator[tuple[str, str, dict[str, str]]]:
    """(timestamp, event, fields) of each mwdlogd log line whose event is in `names`."""
    for line in lines:
        match = LOG_LINE.search(line)
        if match and match[2] in names:
            fields = {key: value.strip('"').replace('\\"', '"')
                      for key, value in LOGFMT_FIELD.findall(match[3])}
            yield match[1], match[2], fields


TLS_FIXES = [
    ("UNKNOWN_CA", "that Engine does not trust the server's certificate: give it tls.ca"),
    ("CERTIFICATE_VERIFY_FAILED", "that Engine's client certificate is not signed by tls.ca "
     "or has expired: re-issue it (`mwdlogd certs renew --client NAME`)"),
    ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "that Engine sends no client certificate: configure "
     "its certificate and key (tls.client_auth requires one)"),
    ("CERTIFICATE_EXPIRED", "a certificate has expired: `mwdlogd certs check`")]


def _tls_fix(error: str) -> str:
    return next((fix for code, fix in TLS_FIXES if code in error),
                "compare the Engine's TLS settings with tls.ca and tls.min_version")


def _times(count: int) -> str:
    return f"{count} time{'' if count == 1 else 's'}"


def log_findings(lines: Iterable[str], source: str) -> list[Finding]:
    causes: Counter[str] = Counter()
    peers: Counter[str] = Counter()
    moved = 0
    latest: dict[str, tuple[str, str]] = {}
    for stamp, name, fields in log_events(lines, {"write_failed", "chunk_moved_to_failed",
                                                  "tls_handshake_failed"}):
        if name == "write_failed":
            causes[fields.get("error", "?")] += 1
            latest[fields.get("error", "?")] = (stamp, fields.get("path", "?"))
        elif name == "chunk_moved_to_failed":
            moved += int(fields.get("records", "0") or 0)
        else:
            host, _, name = fields.get("peer", "?").partition("/")
            peer = host.rpartition(":")[0] + (f" ({name})" if name else "")
            peers[f"{peer}: {fields.get('error', '?')}"] += 1
    findings = [Finding(WARN, f"log {source}", f"write_failed {_times(count)}: {error} "
                        f"(latest {latest[error][0]}, {latest[error][1]})", _errno_fix(error))
                for error, count in causes.most_common(3)]
    if moved:
        findings.append(Finding(FAIL, f"log {source}", f"chunk_moved_to_failed: {moved} records "
                                "in {buffer.path}/failed", "fix the write error, then "
                                "re-ingest them (README: Durability)"))
    findings += [Finding(WARN, f"log {source}", f"tls_handshake_failed {_times(count)} from "
                         f"{peer}", _tls_fix(peer)) for peer, count in peers.most_common(3)]
    return findings or [Finding(OK, f"log {source}", "no write_failed, chunk_moved_to_failed "
                                "or tls_handshake_failed")]


# --- the command -------------------------------------------------------------------------

def register(commands: "argparse._SubParsersAction[argparse.ArgumentParser]",
             common: argparse.ArgumentParser) -> None:
    doctor = commands.add_parser(
        "doctor", parents=[common], help="check ports, certificates, TLS, storage, buffer, "
        "metrics and the log; name each cause and its fix",
        description="One line per check: `ok|warn|FAIL  check: finding — fix`. Exit 0 all ok, "
        "1 warnings, 2 problems. Covers the runbook's four symptoms: does not start, TLS "
        "handshake errors, logs not stored, buffer keeps growing (docs/operations.md).")
    doctor.add_argument("--log", type=Path, metavar="FILE",
                        help="the server's log file (- for stdin, e.g. from journalctl): "
                        "report write_failed causes, chunks moved to failed/ and TLS "
                        "handshake failures found in it")
    doctor.add_argument("--client-cert", metavar="PEM", help="client certificate for the "
                        "handshake check (default: the first NAME.crt with NAME.key beside "
                        "tls.cert)")
    doctor.add_argument("--client-key", metavar="PEM", help="its key")
    doctor.add_argument("--timeout", type=float, default=5.0,
                        help="seconds per network check (default 5)")


def diagnose(config: Config, args: argparse.Namespace) -> list[Finding]:
    owners = port_owners()
    findings = check_ports(config, owners)
    findings += check_certificates(config)
    server_id = server_identity(owners, config)
    findings += check_writable("storage.root", Path(config.storage.root),
                               config.buffer.chunk_limit, "buffer.chunk_limit", server_id)
    findings += check_writable("buffer.path", Path(config.buffer.path),
                               config.buffer.total_limit, "buffer.total_limit", server_id)
    findings.append(check_journal(config))
    if str(args.log) == "-":  # journalctl -u mwdlogd | mwdlogd doctor --log -
        findings += log_findings(sys.stdin, "stdin")
    elif args.log is not None:  # read before our own handshakes can add to it
        try:
            with args.log.open(encoding="utf-8", errors="replace") as lines:
                findings += log_findings(lines, str(args.log))
        except OSError as exc:
            findings.append(Finding(WARN, f"log {args.log}", f"cannot read: {exc}",
                                    "give the path of the server's log file"))
    server, running = check_health(config, args.timeout)
    findings.append(server)
    if running:
        tls = config.tls
        layout = Layout.from_paths(cert=tls.cert, key=tls.key, ca=tls.ca)
        findings += check_metrics(config, args.timeout)  # before our own handshakes count
        if Path(tls.ca).is_file():
            findings += check_handshakes(
                config, _client_pair(layout, args.client_cert, args.client_key), args.timeout)
    return findings


def run(args: argparse.Namespace) -> int:
    path, required = config_path(getattr(args, "config", None))
    findings = diagnose(load_config(path, required=required), args)
    for finding in findings:
        print(finding.line())
    worst = max((EXIT[f.status] for f in findings), default=0)
    counts = Counter(f.status for f in findings)
    print(f"doctor: {counts[OK]} ok, {counts[WARN]} warnings, {counts[FAIL]} problems",
          file=sys.stderr)
    return worst

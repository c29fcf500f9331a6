"""Test clients and readers: real TLS sockets, real files. No server code is reused here."""

from __future__ import annotations

import contextlib
import datetime
import gzip
import http.client
import json
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

TOKEN = "test-token-0123456789"
CAPTURES = Path(__file__).resolve().parent / "captures"  # recorded Fluentd 1.18 wire bytes


@attrs.frozen
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def client_context(pki: Path, name: str | None = "engine-01", *,
                   maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if name is not None:
        context.load_cert_chain(str(pki / f"{name}.crt"), str(pki / f"{name}.key"))
    if maximum is not None:
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = maximum
        context.set_ciphers("ALL:@SECLEVEL=0")
    return context


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


class Connection:
    """One TLS connection that can carry several requests (keep-alive)."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream
        self._buffer = b""

    @classmethod
    async def open(cls, address: str, context: ssl.SSLContext) -> Connection:
        host, port = split_address(address)
        stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=context,
                                                     https_compatible=True)
        return cls(stream)

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def reply(self) -> Reply:
        while b"\r\n\r\n" not in self._buffer:
            await self._fill()
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(self._buffer) < length:
            await self._fill()
        body, self._buffer = self._buffer[:length], self._buffer[length:]
        return Reply(status, headers, body)

    async def _fill(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise EOFError("server closed the connection")
        self._buffer += data

    async def post(self, path: str, body: bytes, *, content_type: str = "application/x-ndjson",
                   token: str | None = TOKEN, headers: dict[str, str] | None = None) -> Reply:
        await self.send_raw(request_bytes(path, body, content_type=content_type, token=token,
                                          headers=headers))
        return await self.reply()

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


def request_bytes(path: str, body: bytes, *, content_type: str | None = "application/x-ndjson",
                  token: str | None = TOKEN, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: localhost", f"Content-Length: {len(body)}"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def post(address: str, context: ssl.SSLContext, path: str, body: bytes,
               **kwargs: Any) -> Reply:
    """One request on a new connection, as Fluentd's out_http does by default."""
    connection = await Connection.open(address, context)
    try:
        return await connection.post(path, body, **kwargs)
    finally:
        await connection.aclose()


async def exchange(address: str, context: ssl.SSLContext, raw: bytes) -> Reply:
    """Send raw request bytes on a new connection and read one reply."""
    connection = await Connection.open(address, context)
    try:
        await connection.send_raw(raw)
        return await connection.reply()
    finally:
        await connection.aclose()


async def http_get(address: str, target: str) -> tuple[int, bytes]:
    """A plain HTTP GET on a new connection: (status, body)."""
    host, port = split_address(address)
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                          .encode())
    reply = b""
    while chunk := await stream.receive_some(65536):
        reply += chunk
    await stream.aclose()
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def ndjson(records: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def engine_records(count: int, *, start: int = 0, customer: str = "acme",
                   fqdn: str = "www.acme.test", log_type: str = "nginx",
                   time: float | None = None) -> list[dict[str, Any]]:
    records = []
    for n in range(start, start + count):
        record: dict[str, Any] = {"id": f"r{n}", "customer_name": customer, "fqdn": fqdn,
                                  "log_type": log_type, "status": 200, "path": f"/p/{n}"}
        if time is not None:
            record["time"] = time
        records.append(record)
    return records


def read_tree(root: Path) -> dict[str, list[dict[str, Any]]]:
    """Every hourly file under root, relative path -> its records, read with gzip to the end."""
    tree = {}
    for path in sorted(root.rglob("*.log.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as file:
            tree[str(path.relative_to(root))] = [json.loads(line) for line in file]
    return tree


def ids_by_file(root: Path) -> dict[str, list[str]]:
    return {path: [r.get("id", r.get("seq")) for r in records]
            for path, records in read_tree(root).items()}


def all_records(root: Path) -> list[dict[str, Any]]:
    return [record for records in read_tree(root).values() for record in records]


class JournalHold:
    """Holds every journal append (so its fsync, so the ack) until `release` is set."""

    def __init__(self, journal: Any) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        real_append = journal.append

        def held_append(payloads: list[bytes], spans: list[int] | None = None) -> list[int]:
            self.entered.set()
            self.release.wait(30)
            return list(real_append(payloads, spans))

        journal.append = held_append

    async def wait_entered(self) -> None:
        await trio.to_thread.run_sync(self.entered.wait, 30)


def free_port(count: int = 1) -> int:
    """A free loopback port whose `count - 1` successors are free too (workers use port + N)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if all(_free(port + n) for n in range(1, count)):
            return port


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def reissue(pki: Path, stem: str, *, days: float, hosts: list[str] | None = None) -> None:
    """Replace `pki/stem.crt` + `.key` by a certificate from pki/ca.* valid for `days`
    (negative: expired that long ago)."""
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    end = now + datetime.timedelta(days=days)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stem)]))
               .issuer_name(ca.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(min(now, end) - datetime.timedelta(days=1))
               .not_valid_after(end))
    if hosts:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), False)
    cert = builder.sign(ca_key, hashes.SHA256())
    (pki / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (pki / f"{stem}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


def post_sync(port: int, context: ssl.SSLContext, body: bytes, *,
              path: str = "/nginx.access", token: str = TOKEN) -> tuple[int, Any]:
    """POST ndjson over mTLS on a new connection: (status, decoded JSON answer)."""
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
    try:
        connection.request("POST", path, body, {"Authorization": f"Bearer {token}",
                                                "Content-Type": "application/x-ndjson"})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def get_json(address: str, path: str) -> tuple[int, Any]:
    """Plain-HTTP GET of a JSON endpoint such as /health: (status, decoded answer)."""
    host, _, port = address.rpartition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


@contextlib.contextmanager
def tmpfs(mountpoint: Path, size: str) -> Iterator[Path]:
    """A real small filesystem at `mountpoint` (needs root): disk-full faults for real."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)],
                   check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)

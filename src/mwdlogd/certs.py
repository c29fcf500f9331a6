"""Development and small-deployment PKI: a CA, the server certificate, Engine client certs.

Uses the `cryptography` package only. Existing files are kept (so a CA can issue more
client certificates later) unless `force` is given. Private keys are written mode 0600.
"""

import datetime
import ipaddress
import os
import re
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mwdlogd.storage.files import fsync_dir

DEFAULT_HOSTS = ("logserver", "localhost", "127.0.0.1", "::1")
DEFAULT_DAYS = 825  # the longest validity Apple/Chrome accept for a server certificate


@attrs.frozen
class CertResult:
    path: Path
    created: bool


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mwdlogd"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _issue(subject: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
           days: int, extensions: list[tuple[x509.ExtensionType, bool]]
           ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(subject))
               .issuer_name(issuer_cert.subject if issuer_cert else _name(subject))
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False))
    if issuer_cert is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False)
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical)
    return builder.sign(issuer_key, hashes.SHA256()), key


def _leaf_usage(purpose: x509.ObjectIdentifier) -> list[tuple[x509.ExtensionType, bool]]:
    return [(x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.KeyUsage(digital_signature=True, key_encipherment=False,
                           content_commitment=False, data_encipherment=False,
                           key_agreement=True, key_cert_sign=False, crl_sign=False,
                           encipher_only=False, decipher_only=False), True),
            (x509.ExtendedKeyUsage([purpose]), False)]


def _ca_usage() -> list[tuple[x509.ExtensionType, bool]]:
    return [(x509.BasicConstraints(ca=True, path_length=0), True),
            (x509.KeyUsage(digital_signature=True, key_encipherment=False,
                           content_commitment=False, data_encipherment=False,
                           key_agreement=False, key_cert_sign=True, crl_sign=True,
                           encipher_only=False, decipher_only=False), True)]


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` whole (a reader never sees half a file), with `mode` from the start;
    on disk before this returns, so a crash right after a renewal cannot leave an empty
    certificate or key."""
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    fsync_dir(path.parent)


def _save(cert_path: Path, key_path: Path,
          pair: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    cert, key = pair
    _write_atomically(key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), 0o600)
    _write_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


@attrs.frozen
class Layout:
    """Where the CA, the server pair and the client certificates live."""

    ca: Path
    ca_key: Path
    cert: Path
    key: Path
    clients: Path  # directory of NAME.crt / NAME.key
    ca_required: bool = True  # tls.client_auth: without it the server needs no CA file

    @classmethod
    def in_dir(cls, directory: Path) -> "Layout":
        return cls(directory / "ca.crt", directory / "ca.key", directory / "server.crt",
                   directory / "server.key", directory)

    @classmethod
    def from_paths(cls, *, cert: str, key: str, ca: str, ca_required: bool = True
                   ) -> "Layout":
        """The config's tls.cert/key/ca; the CA key sits next to the CA (ca.crt -> ca.key)."""
        return cls(Path(ca), Path(ca).with_suffix(".key"), Path(cert), Path(key),
                   Path(cert).parent, ca_required)

    def client(self, name: str) -> tuple[Path, Path]:
        return self.clients / f"{name}.crt", self.clients / f"{name}.key"

    def client_certs(self) -> list[Path]:
        """Every other .crt in the clients directory (the Engines' certificates)."""
        own = {self.ca.resolve(), self.cert.resolve()}
        return sorted(p for p in self.clients.glob("*.crt") if p.resolve() not in own)


CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_client_name(name: str, layout: Layout) -> None:
    """A client name becomes a file name in the clients directory: no separators, no `..`,
    not the CA's or the server's own files."""
    if not CLIENT_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"--client {name!r}: use letters, digits, '.', '_' and '-' only "
                         "(no path separators or '..'; at most 64 characters)")
    crt, key = layout.client(name)
    if crt in (layout.ca, layout.cert) or key in (layout.ca_key, layout.key):
        raise ValueError(f"--client {name!r}: that name is the CA's or the server's own file")


def _load_ca(layout: Layout) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(layout.ca.read_bytes())
    key = serialization.load_pem_private_key(layout.ca_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{layout.ca_key} is not an EC key made by mwdlogd certs")
    return cert, key


def _server_extensions(hosts: list[str]) -> list[tuple[x509.ExtensionType, bool]]:
    return [*_leaf_usage(ExtendedKeyUsageOID.SERVER_AUTH),
            (x509.SubjectAlternativeName([_san(h) for h in hosts]), False)]


def init_certs(directory: Path | None = None, *, hosts: list[str], clients: list[str],
               days: int, force: bool = False, layout: Layout | None = None
               ) -> list[CertResult]:
    """Create what is missing (everything, with `force`); returns each certificate's fate."""
    layout = layout or Layout.in_dir(directory or Path("certs"))
    for client in clients:
        check_client_name(client, layout)
    for path in {layout.ca.parent, layout.cert.parent, layout.key.parent, layout.clients}:
        path.mkdir(parents=True, exist_ok=True)
    results = []
    ca_new = force or not layout.ca.exists() or not layout.ca_key.exists()
    if ca_new:
        _save(layout.ca, layout.ca_key, _issue("mwdlogd dev CA", None, days, _ca_usage()))
    results.append(CertResult(layout.ca, ca_new))
    ca = _load_ca(layout)
    server_new = ca_new or not layout.cert.exists()
    if server_new:
        _save(layout.cert, layout.key, _issue(hosts[0], ca, days, _server_extensions(hosts)))
    results.append(CertResult(layout.cert, server_new))
    for client in clients:
        crt, _ = layout.client(client)
        client_new = ca_new or not crt.exists()
        if client_new:
            _issue_client(layout, ca, client, days)
        results.append(CertResult(crt, client_new))
    return results


def _issue_client(layout: Layout, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
                  name: str, days: int) -> Path:
    crt, key = layout.client(name)
    _save(crt, key, _issue(name, ca, days, _leaf_usage(ExtendedKeyUsageOID.CLIENT_AUTH)))
    return crt


def server_names(path: Path) -> list[str]:
    """The names a server certificate is valid for: its SANs (the CN when it has none)."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return [str(name.value) for name in san]
    except x509.ExtensionNotFound:
        return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def _existing_ca(layout: Layout) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    for needed in (layout.ca, layout.ca_key):
        if not needed.is_file():
            raise FileNotFoundError(f"CA file not found: {needed} (renewing needs the CA the "
                                    "Engines trust; `certs init` creates a new one)")
    return _load_ca(layout)


def renew_server(layout: Layout, *, days: int, hosts: list[str] | None = None) -> list[str]:
    """Re-issue the server certificate (and a new key) from the existing CA; keeps the old
    certificate's names unless `hosts` is given. Returns the names it was issued for."""
    names = hosts or server_names(layout.cert)
    _save(layout.cert, layout.key, _issue(names[0], _existing_ca(layout), days,
                                          _server_extensions(names)))
    return names


def renew_client(layout: Layout, name: str, *, days: int) -> Path:
    """Re-issue client certificate `name` (and a new key) from the existing CA."""
    check_client_name(name, layout)
    return _issue_client(layout, _existing_ca(layout), name, days)


def days_left(path: Path, now: datetime.datetime | None = None) -> int:
    """Whole days until the certificate at `path` expires (negative once it has)."""
    return _days_left(x509.load_pem_x509_certificate(path.read_bytes()), now)


def _days_left(cert: x509.Certificate, now: datetime.datetime | None) -> int:
    return (cert.not_valid_after_utc - (now or datetime.datetime.now(datetime.UTC))).days


def served_certificate(path: Path) -> dict[str, str]:
    """Log fields naming the server certificate a (re)load serves, so the log shows that a
    renewed file was picked up even when no config key changed."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return {"tls_cert_sha256": cert.fingerprint(hashes.SHA256()).hex()[:16],
            "tls_cert_expires": f"{cert.not_valid_after_utc:%Y-%m-%d}"}


def describe(path: Path, now: datetime.datetime | None = None) -> str:
    """`server.crt  CN=logserver  issuer CN=...  expires 2028-... (824 days)  SAN ...`."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    days = _days_left(cert, now)
    subject = cert.subject.rfc4514_string()
    line = (f"{path.name}: subject {subject}; issuer {cert.issuer.rfc4514_string()}; "
            f"expires {cert.not_valid_after_utc:%Y-%m-%d} ({days} days"
            f"{', EXPIRED' if days < 0 else ''})")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        line += "; SAN " + ",".join(str(name.value) for name in san)
    except x509.ExtensionNotFound:
        pass
    return line

"""Development and small-deployment PKI: a CA, the server certificate, Engine client certs.

Uses the `cryptography` package only. Existing files are kept (so a CA can issue more
client certificates later) unless `force` is given. Private keys are written mode 0600.
"""

import datetime
import ipaddress
import os
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("logserver", "localhost", "127.0.0.1", "::1")
DEFAULT_DAYS = 825  # the longest validity Apple/Chrome accept for a server certificate


@attrs.frozen
class CertResult:
    path: Path
    created: bool


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mwdlogd"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


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


def _save(directory: Path, stem: str, pair: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
          ) -> None:
    cert, key = pair
    _write_key(directory / f"{stem}.key", key)
    (directory / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{directory / 'ca.key'} is not an EC key made by mwdlogd certs")
    return cert, key


def init_certs(directory: Path, *, hosts: list[str], clients: list[str], days: int,
               force: bool = False) -> list[CertResult]:
    """Create what is missing (everything, with `force`); returns each certificate's fate."""
    directory.mkdir(parents=True, exist_ok=True)
    results = []
    ca_new = force or not (directory / "ca.crt").exists() or not (directory / "ca.key").exists()
    if ca_new:
        _save(directory, "ca", _issue("mwdlogd dev CA", None, days, _ca_usage()))
    results.append(CertResult(directory / "ca.crt", ca_new))
    ca = _load_ca(directory)
    server_new = ca_new or not (directory / "server.crt").exists()
    if server_new:
        extensions = [*_leaf_usage(ExtendedKeyUsageOID.SERVER_AUTH),
                      (x509.SubjectAlternativeName([_san(h) for h in hosts]), False)]
        _save(directory, "server", _issue(hosts[0], ca, days, extensions))
    results.append(CertResult(directory / "server.crt", server_new))
    for client in clients:
        client_new = ca_new or not (directory / f"{client}.crt").exists()
        if client_new:
            _save(directory, client, _issue(client, ca, days,
                                            _leaf_usage(ExtendedKeyUsageOID.CLIENT_AUTH)))
        results.append(CertResult(directory / f"{client}.crt", client_new))
    return results


def describe(path: Path, now: datetime.datetime | None = None) -> str:
    """`server.crt  CN=logserver  issuer CN=...  expires 2028-... (824 days)  SAN ...`."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    now = now or datetime.datetime.now(datetime.UTC)
    days = (cert.not_valid_after_utc - now).days
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

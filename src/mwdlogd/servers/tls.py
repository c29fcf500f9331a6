"""The server-side TLS context: TLS >= 1.2, AEAD ciphers, client certificates (mTLS)."""

import ssl

import trio

from mwdlogd.config import TlsConfig
from mwdlogd.errors import ConfigError

# TLS 1.2 suites limited to forward-secret AEAD; TLS 1.3 suites are always AEAD.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """Raises ConfigError naming tls.cert / tls.key / tls.ca when a file does not load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_VERSIONS[tls.min_version]
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("tls.cert", f"cannot load {tls.cert} with key {tls.key}: {exc}") from None
    if tls.client_auth:
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            context.load_verify_locations(tls.ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("tls.ca", f"cannot load {tls.ca}: {exc}") from None
    return context


def peer_name(stream: object) -> str:
    """`ip:port`, plus the client certificate's CN when there is one."""
    transport = getattr(stream, "transport_stream", stream)
    try:
        host, port = transport.socket.getpeername()[:2]  # type: ignore[attr-defined]
        name = f"{host}:{port}"
    except (AttributeError, OSError):
        name = "unknown"
    try:
        cert = stream.getpeercert()  # type: ignore[attr-defined]
    except (AttributeError, trio.NeedHandshakeError):
        cert = None
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return f"{name}/{value}"
    return name

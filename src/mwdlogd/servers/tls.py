"""The server-side TLS context: TLS >= 1.2, AEAD ciphers, client certificates (mTLS)."""

import logging
import ssl

import trio

from mwdlogd import log
from mwdlogd.config import TlsConfig
from mwdlogd.errors import ConfigError
from mwdlogd.model import Peer
from mwdlogd.telemetry import Telemetry

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


def peer_of(stream: object) -> Peer:
    """Address, port and client certificate of the other end (the certificate once the
    handshake is done: call again after it)."""
    transport = getattr(stream, "transport_stream", stream)
    try:
        host, port = transport.socket.getpeername()[:2]  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        host, port = "unknown", None
    try:
        cert = stream.getpeercert()  # type: ignore[attr-defined]
    except (AttributeError, ValueError, trio.NeedHandshakeError):
        cert = None  # ssl raises ValueError "handshake not done yet" after a failed one
    subject = [(key, str(value)) for rdn in (cert or {}).get("subject", ())
               for key, value in rdn]
    common_name = next((value for key, value in subject if key == "commonName"), None)
    return Peer(str(host), port, common_name,
                ",".join(f"{key}={value}" for key, value in subject))


async def handshake(stream: trio.abc.Stream, *, protocol: str, peer: Peer, timeout_s: float,
                    telemetry: Telemetry) -> bool:
    """Complete the TLS handshake (plain streams pass). False when it failed: logged and
    counted, except a peer that closes before saying anything (a heartbeat), which is
    normal and logged at debug only."""
    if not isinstance(stream, trio.SSLStream):
        return True
    try:
        with trio.fail_after(timeout_s):
            await stream.do_handshake()
    except (trio.BrokenResourceError, trio.TooSlowError) as exc:
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLEOFError) or (cause is None and
                                                 isinstance(exc, trio.BrokenResourceError)):
            log.event(logging.DEBUG, "closed_before_tls_handshake", protocol=protocol, peer=peer)
        else:
            error = getattr(cause, "reason", None) or str(cause or exc) or type(exc).__name__
            telemetry.tls_handshake_failed(protocol, peer, error)
        return False
    return True

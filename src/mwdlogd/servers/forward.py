"""Forward-protocol ingest (DESIGN §1): TLS or TCP streams around ForwardConnection.

A short loop per connection: HELO first when a shared key is set, answer PING with
PONG, read on NEED_DATA, hand entries to Ingest, write the ack once durable.
Not reading while a batch waits for buffer room is the TCP backpressure of DESIGN §4.
Heartbeat connections (connect and close, or a bare handshake) cost a few objects and
log nothing above debug.
"""

import logging

import trio

from mwdlogd import log
from mwdlogd.errors import AuthFailed, BudgetExceeded, ForwardProtocolError, IngestError
from mwdlogd.live import Live
from mwdlogd.model import Peer
from mwdlogd.proto.auth import Identity
from mwdlogd.proto.forward import NEED_DATA, Entries, ForwardConnection, Pong
from mwdlogd.runtime.budget import decode_off_loop
from mwdlogd.runtime.ingest import Ingest
from mwdlogd.servers.acceptor import Acceptor, ConnectionLimits
from mwdlogd.servers.balance import Balance
from mwdlogd.servers.http_io import RECEIVE_BYTES
from mwdlogd.servers.listen import StreamListener
from mwdlogd.servers.tls import handshake, peer_of
from mwdlogd.telemetry import Telemetry

# Unfinished messages (what idle or slow connections hold) may take at most this part of
# server.memory_limit, so decoding complete requests always has room.
UNREAD_SHARE = 0.5
# Messages are read inline only when tiny (PING, heartbeats): a few hundred bytes of
# gzip can inflate to 100k entries.
INLINE_MESSAGE_BYTES = 256
# PONG failure reasons (in_forward's texts) -> mwdlogd_auth_failures_total's reason.
PONG_FAILURES = {"shared_key mismatch": "shared_key", "username/password mismatch": "user"}


class _Close(Exception):
    """End this connection now (already logged and counted)."""


class ForwardServer:
    """Each connection takes the forward settings (shared key, users, limits) current when
    it opens and keeps them; a reload applies to new connections. `listener` gives TLS
    streams with `forward.transport = "tls"` (servers/listen.py wraps them), else TCP."""

    def __init__(self, *, live: Live, listener: StreamListener, ingest: Ingest,
                 telemetry: Telemetry, limits: ConnectionLimits,
                 balance: Balance | None = None) -> None:
        self._live = live
        self._ingest = ingest
        self._unread = ingest.budget.share(UNREAD_SHARE)
        self._listener = listener
        self._telemetry = telemetry
        self._acceptor = Acceptor("forward", telemetry, limits, balance)

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serves until `stop_accepting()` (which closes the listener), then returns once
        every connection has closed."""
        await self._acceptor.serve([self._listener], self._handle, task_status)

    def stop_accepting(self) -> None:
        self._acceptor.stop()

    async def _handle(self, stream: trio.abc.Stream) -> None:
        """Never raises: an exception reaching serve_listeners would stop the server."""
        self._telemetry.connection_opened("forward")
        peer = peer_of(stream)
        config = self._live.config.forward
        deadline = trio.current_time() + config.handshake_timeout
        try:
            if await handshake(stream, protocol="forward", peer=peer,
                               timeout_s=config.handshake_timeout, telemetry=self._telemetry):
                peer = peer_of(stream)  # with its certificate now
                await self._serve(stream, peer, deadline)
        except (trio.BrokenResourceError, trio.ClosedResourceError, _Close, AuthFailed):
            pass  # AuthFailed: a locked-out address, closed before HELO (counted)
        except ForwardProtocolError as exc:
            self._telemetry.forward_rejected(peer, exc.reason, exc.detail)
        except IngestError as exc:  # refused by ingest: not acked
            self._telemetry.forward_rejected(peer, exc.error, exc.detail)
        except BudgetExceeded as exc:
            self._telemetry.forward_rejected(peer, "memory_budget", str(exc))
        except Exception:
            self._telemetry.handler_failed("forward", peer)
        finally:
            await trio.aclose_forcefully(stream)
            log.event(logging.DEBUG, "forward_connection_closed", peer=peer)

    async def _serve(self, stream: trio.abc.Stream, peer: Peer, deadline: float) -> None:
        """`deadline`: when the handshake must be over (the PING in, with a shared key)."""
        settings = self._live.settings
        config, authorizer = settings.config.forward, settings.authorizer
        shared_key = config.shared_key.encode() or None
        conn = ForwardConnection(max_message_bytes=config.message_size_limit,
                                 shared_key=shared_key, self_hostname=config.self_hostname,
                                 users={u.username: u.password.encode() for u in config.users},
                                 max_records=config.max_records_per_message)
        identity = peer.identity
        send_s = config.send_timeout
        source = peer.host
        client = authorizer.certificate(peer.common_name)
        if shared_key is not None:
            authorizer.admit("forward", source, trio.current_time())
            await self._send(stream, conn.helo(), peer, send_s)
        # The connection's unread bytes, charged twice (ours and msgpack's copy) before and
        # after authentication alike; waiting for room stops reading (TCP backpressure).
        with self._unread.lease() as unread:
            while True:
                event = NEED_DATA if not conn.ready() else await decode_off_loop(
                    conn.next_event, inline=conn.buffered <= INLINE_MESSAGE_BYTES,
                    limiter=self._ingest.decoder)
                unread.shrink_to(2 * conn.buffered)
                if event is NEED_DATA:
                    established = conn.established
                    timeout = (config.idle_timeout if established
                               else deadline - trio.current_time())
                    data = await self._receive(stream, timeout)
                    if data is None and not established:
                        raise ForwardProtocolError(
                            "handshake_timeout", f"no PING within forward.handshake_timeout="
                                                 f"{config.handshake_timeout:g}s")
                    if not data:
                        return
                    await unread.grow(2 * len(data), "unfinished forward message")
                    conn.receive_data(data)
                elif isinstance(event, Pong):
                    # Again at the answer: connections opened before a lockout get no verdict.
                    authorizer.admit("forward", source, trio.current_time())
                    await self._send(stream, event.data, peer, send_s)
                    if not event.ok:
                        self._telemetry.forward_handshake_failed(peer, event.reason,
                                                                 event.client_hostname)
                        authorizer.failed("forward", source, PONG_FAILURES.get(
                            event.reason, "invalid_ping"), event.reason, trio.current_time())
                        return
                    identity = f"{identity}/{event.username or event.client_hostname}"
                    if config.users:
                        client = authorizer.forward_user(client, event.username)
                elif isinstance(event, Entries):
                    await self._store(stream, conn, event, peer, identity, send_s, client)

    async def _receive(self, stream: trio.abc.Stream, timeout_s: float) -> bytes | None:
        """Next bytes; b"" on EOF and when draining, None at the timeout."""
        with self._acceptor.idle(timeout_s):
            return bytes(await stream.receive_some(RECEIVE_BYTES))
        return b"" if self._acceptor.draining else None

    async def _send(self, stream: trio.abc.Stream, data: bytes, peer: Peer,
                    timeout_s: float) -> None:
        """Write within forward.send_timeout (the drain cuts it short too), else close."""
        with self._acceptor.idle(timeout_s):
            await stream.send_all(data)
            return
        if not self._acceptor.draining:
            self._telemetry.forward_rejected(
                peer, "send_timeout", f"peer did not read {len(data)} bytes within "
                                      f"forward.send_timeout={timeout_s:g}s")
        raise _Close

    async def _store(self, stream: trio.abc.Stream, conn: ForwardConnection, event: Entries,
                     peer: Peer, identity: str, send_s: float, client: Identity) -> None:
        """Stores the entries, then acks them (a refusal closes the connection unacked)."""
        await self._ingest.forward(event, wire_bytes=conn.last_message_bytes, peer=peer,
                                   identity=identity, client=client)
        if event.chunk is not None:
            await self._send(stream, conn.ack(event.chunk), peer, send_s)

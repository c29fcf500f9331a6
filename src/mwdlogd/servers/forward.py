"""Forward-protocol ingest (DESIGN §1): TLS or TCP streams around ForwardConnection.

A short loop per connection: HELO first when a shared key is set, answer PING with
PONG, read on NEED_DATA, hand entries to the committer, write the ack once durable.
Not reading while a batch waits for buffer room is the TCP backpressure of DESIGN §4.
Heartbeat connections (connect and close, or a bare handshake) cost a few objects and
log nothing above debug.
"""

import logging
import math
import socket
import ssl
import time
from collections.abc import Callable

import trio

from mwdlogd import codec, log
from mwdlogd.errors import AuthFailed, BudgetExceeded, ForwardProtocolError, Refused, TooDeep
from mwdlogd.live import Live
from mwdlogd.pipeline.normalize import Context, normalize_batch
from mwdlogd.proto.auth import Identity
from mwdlogd.proto.forward import NEED_DATA, Entries, ForwardConnection, Pong
from mwdlogd.runtime.budget import (
    INLINE_ENTRIES,
    Budget,
    decode_off_loop,
    decoded_cost,
)
from mwdlogd.runtime.commit import Committer
from mwdlogd.runtime.dedupe import Dedupe
from mwdlogd.servers.acceptor import Acceptor, ConnectionLimits
from mwdlogd.servers.balance import Balance
from mwdlogd.servers.http_io import RECEIVE_BYTES
from mwdlogd.servers.listen import stream_listeners
from mwdlogd.servers.tls import handshake, peer_host, peer_name, peer_subject
from mwdlogd.storage.chunk_ids import forward_key
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
    """Each connection takes the forward settings (shared key, users, limits) and TLS
    context current when it opens and keeps them; a reload applies to new connections."""

    def __init__(self, *, live: Live, sock: socket.socket, committer: Committer,
                 telemetry: Telemetry, limits: ConnectionLimits,
                 balance: Balance | None = None, budget: Budget | None = None,
                 decoder: trio.CapacityLimiter | None = None) -> None:
        self._live = live
        self._budget = budget or Budget(live.config.server.memory_limit)
        self._decoder = decoder or trio.CapacityLimiter(1)
        self._unread = self._budget.share(UNREAD_SHARE)
        self._sock = sock
        self._committer = committer
        self._telemetry = telemetry
        self._acceptor = Acceptor("forward", telemetry, limits, balance)

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serves until `stop_accepting()`, then returns once every connection has closed."""
        tls = self._live.config.forward.transport == "tls"  # restart-only
        context: Callable[[], ssl.SSLContext] | None = self._ssl_context if tls else None
        await self._acceptor.serve(stream_listeners(self._sock, context), self._handle,
                                   task_status)

    def _ssl_context(self) -> ssl.SSLContext:
        context = self._live.settings.ssl_context
        assert context is not None
        return context

    def stop_accepting(self) -> None:
        self._acceptor.stop()

    async def _handle(self, stream: trio.abc.Stream) -> None:
        """Never raises: an exception reaching serve_listeners would stop the server."""
        self._telemetry.connection_opened("forward")
        peer = peer_name(stream)
        config = self._live.config.forward
        deadline = trio.current_time() + config.handshake_timeout
        try:
            if await handshake(stream, protocol="forward", peer=peer,
                               timeout_s=config.handshake_timeout, telemetry=self._telemetry):
                peer = peer_name(stream)
                await self._serve(stream, peer, deadline)
        except (trio.BrokenResourceError, trio.ClosedResourceError, _Close, AuthFailed):
            pass  # AuthFailed: a locked-out address, closed before HELO (counted)
        except ForwardProtocolError as exc:
            self._telemetry.forward_rejected(peer, exc.reason, exc.detail)
        except BudgetExceeded as exc:
            self._telemetry.forward_rejected(peer, "memory_budget", str(exc))
        except Exception:
            self._telemetry.handler_failed("forward", peer)
        finally:
            await trio.aclose_forcefully(stream)
            log.event(logging.DEBUG, "forward_connection_closed", peer=peer)

    async def _serve(self, stream: trio.abc.Stream, peer: str, deadline: float) -> None:
        """`deadline`: when the handshake must be over (the PING in, with a shared key)."""
        settings = self._live.settings
        config, authorizer = settings.config.forward, settings.authorizer
        shared_key = config.shared_key.encode() or None
        conn = ForwardConnection(max_message_bytes=config.message_size_limit,
                                 shared_key=shared_key, self_hostname=config.self_hostname,
                                 users={u.username: u.password.encode() for u in config.users},
                                 max_records=config.max_records_per_message)
        identity = peer.rpartition(":")[0] if "/" not in peer else peer.split("/", 1)[1]
        send_s = config.send_timeout
        source = peer_host(stream)
        client = authorizer.certificate(peer_subject(stream))
        if shared_key is not None:
            authorizer.admit("forward", source, trio.current_time())
            await self._send(stream, conn.helo(), peer, send_s)
        # The connection's unread bytes, charged twice (ours and msgpack's copy) before and
        # after authentication alike; waiting for room stops reading (TCP backpressure).
        with self._unread.lease() as unread:
            while True:
                event = NEED_DATA if not conn.ready() else await decode_off_loop(
                    conn.next_event, inline=conn.buffered <= INLINE_MESSAGE_BYTES,
                    limiter=self._decoder)
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

    async def _send(self, stream: trio.abc.Stream, data: bytes, peer: str,
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
                     peer: str, identity: str, send_s: float, client: Identity) -> None:
        """Stores and acks the entries; a record for a customer `client` may not write
        closes the connection without an ack, so nothing of the message is kept and the
        sender's retry cannot succeed until its configuration changes."""
        forbidden = client.first_forbidden(record for _, record in event.entries)
        if forbidden is not None:
            index, customer = forbidden
            self._telemetry.forward_rejected(peer, "forbidden_customer", client.refusal(
                f"entry {index}", customer) + "; message not acked, connection closed")
            raise _Close
        received_at = time.time()
        if event.invalid_utf8:
            self._telemetry.invalid_utf8_kept("forward", peer, event.tag, event.invalid_utf8)
        ctx = Context(event.tag, received_at, received_at, self._live.config.server.hostname)
        window = self._live.config.forward.dedupe_window
        dedupe = (Dedupe(forward_key(identity, event.chunk), window)
                  if event.chunk is not None and window else None)
        size = conn.last_message_bytes
        with self._budget.lease() as records:
            await records.grow(decoded_cost(len(event.entries), size), "decoded forward entries")
            try:
                routed = await decode_off_loop(lambda: normalize_batch(
                    ((record, at, None) for at, record in event.entries), ctx),
                    inline=len(event.entries) <= INLINE_ENTRIES, limiter=self._decoder)
            except TooDeep:
                raise ForwardProtocolError("too_deep", f"tag {event.tag}: a record nests deeper "
                                                       f"than {codec.MAX_DEPTH} levels") from None
            started = trio.current_time()
            try:
                committed = await self._committer.commit(event.tag, routed, dedupe=dedupe,
                                                         room_wait_s=math.inf)
            except Refused as exc:
                self._telemetry.forward_rejected(peer, exc.reason, str(exc))
                raise _Close from exc
        self._telemetry.forward_accepted(event.tag, committed.records, committed.duplicate,
                                         trio.current_time() - started)
        if event.chunk is not None:
            await self._send(stream, conn.ack(event.chunk), peer, send_s)

"""HTTPS ingest (DESIGN §1): TLS + h11 around the sans-IO RequestReader; what a request
holds goes to Ingest (runtime/ingest.py), whose outcome or refusal is the answer.

Each connection is one task in this server's handler nursery. `stop_accepting()` closes
the listeners and idle keep-alive connections; requests in flight finish and are
answered, then their connections close. `run` returns when the last one has.
"""

import logging
import time
from collections.abc import AsyncIterator

import h11
import trio

from mwdlogd import log
from mwdlogd.config import HttpConfig
from mwdlogd.errors import BudgetExceeded, IngestError
from mwdlogd.live import Live
from mwdlogd.model import Peer
from mwdlogd.proto.auth import Authorizer, Identity
from mwdlogd.proto.ingest import Authenticate, RequestReader
from mwdlogd.runtime.budget import Lease
from mwdlogd.runtime.ingest import Ingest
from mwdlogd.servers.acceptor import Acceptor, ConnectionLimits
from mwdlogd.servers.balance import Balance
from mwdlogd.servers.http_io import (
    RECEIVE_BYTES,
    Response,
    json_response,
    new_connection,
    read_event,
    reusable,
    send_response,
)
from mwdlogd.servers.listen import StreamListener
from mwdlogd.servers.tls import handshake, peer_of
from mwdlogd.telemetry import Telemetry

# After refusing a body we did not read, keep reading (and discarding) briefly so the
# client sees our answer instead of a reset.
LINGER_S = 1.0
RETRY_AFTER_S = b"5"


class HttpsIngestServer:
    """Limits and tokens are read from `live` for each connection and request, so a
    reload applies to the next ones. `listener` gives TLS streams (servers/listen.py
    wraps each with the TLS context current at its accept), or plain ones in tests."""

    def __init__(self, *, live: Live, listener: StreamListener, ingest: Ingest,
                 telemetry: Telemetry, limits: ConnectionLimits,
                 balance: Balance | None = None) -> None:
        self._live = live
        self._listener = listener
        self._ingest = ingest
        self._telemetry = telemetry
        self._acceptor = Acceptor("http", telemetry, limits, balance)

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serves until `stop_accepting()` (which closes the listener), then returns once
        every connection has closed."""
        await self._acceptor.serve([self._listener], self._handle, task_status)

    def stop_accepting(self) -> None:
        self._acceptor.stop()

    @property
    def draining(self) -> bool:
        return self._acceptor.draining

    async def _handle(self, stream: trio.abc.Stream) -> None:
        """Never raises: an exception reaching serve_listeners would stop the server."""
        self._telemetry.connection_opened("http")
        peer = peer_of(stream)
        try:
            if await handshake(stream, protocol="http", peer=peer,
                               timeout_s=self._live.config.http.request_timeout,
                               telemetry=self._telemetry):
                peer = peer_of(stream)  # with its certificate now
                await self._serve_connection(stream, peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.event(logging.DEBUG, "connection_lost", peer=peer)
        except Exception:
            self._telemetry.handler_failed("http", peer)
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve_connection(self, stream: trio.abc.Stream,
                                peer: Peer) -> None:
        conn = new_connection()
        while not self.draining:
            request = await self._next_request(conn, stream, peer)
            if request is None:
                return
            answered = await self._serve_request(conn, stream, request, peer)
            if not answered or not reusable(conn):
                return
            conn.start_next_cycle()

    def _timed_out(self) -> IngestError:
        return IngestError(408, "request_timeout", f"request not received within "
                                                   f"http.request_timeout="
                                                   f"{self._live.config.http.request_timeout}s")

    async def _next_request(self, conn: h11.Connection, stream: trio.abc.Stream,
                            peer: Peer) -> h11.Request | None:
        """The next request head, or None on EOF, idle timeout or drain. The idle timeout
        runs until the head's first byte, http.request_timeout from then on (a head
        dripped byte by byte gets 408)."""
        config = self._live.config.http
        try:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                with self._acceptor.idle(config.idle_timeout):
                    conn.receive_data(bytes(await stream.receive_some(RECEIVE_BYTES)))
                if conn.their_state is h11.IDLE and not conn.trailing_data[0]:
                    return None  # idle timeout, drain
                with trio.move_on_after(config.request_timeout):
                    event = await read_event(conn, stream)
                if event is h11.NEED_DATA:
                    await self._refuse(conn, stream, peer, self._timed_out())
                    return None
        except h11.RemoteProtocolError as exc:
            await self._refuse(conn, stream, peer, IngestError(
                exc.error_status_hint, "bad_http", str(exc)))
            return None
        return event if isinstance(event, h11.Request) else None

    async def _serve_request(self, conn: h11.Connection, stream: trio.abc.Stream,
                             request: h11.Request, peer: Peer) -> bool:
        """Read, judge, commit and answer one request; False when the answer could not be
        sent (the connection is done). `http.request_timeout` bounds reading the body and
        sending the answer, never the wait for the journal: a request that has arrived
        whole is answered by its commit's outcome."""
        received_at = time.time()
        settings = self._live.settings
        http = settings.config.http
        room_deadline = trio.current_time() + http.full_wait
        with self._ingest.budget.lease() as lease:
            try:
                reader = RequestReader(request, body_limit=http.body_size_limit,
                                       authenticate=self._authenticate(peer,
                                                                       settings.authorizer),
                                       max_records=http.max_records_per_request,
                                       stream_limit=http.stream_body_limit)
                await self._ingest.hold_while_full(_declared_length(request), room_deadline)
                if reader.streamed:
                    outcome = await self._ingest.http_streamed(
                        reader, self._live_body(http, conn, stream, reader), peer=peer,
                        received_at=received_at)
                else:
                    await self._read_body(http, conn, stream, reader, lease)
                    outcome = await self._ingest.http(reader, lease, peer=peer,
                                                      received_at=received_at,
                                                      room_deadline=room_deadline)
            except BudgetExceeded as exc:
                return await self._refuse(conn, stream, peer,
                                          IngestError(413, "memory_budget", str(exc)))
            except IngestError as exc:
                return await self._refuse(conn, stream, peer, exc)
            except h11.RemoteProtocolError as exc:
                return await self._refuse(conn, stream, peer, IngestError(
                    exc.error_status_hint, "bad_http", str(exc)))
        answer = {"records": outcome.records, **({"duplicate": True} if outcome.duplicate else {})}
        return await self._send(conn, stream, json_response(200, answer), close=self.draining)

    async def _live_body(self, http: HttpConfig, conn: h11.Connection,
                         stream: trio.abc.Stream,
                         reader: RequestReader) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (counted and hashed by `reader`).
        `http.request_timeout` bounds each wait for more, not the whole body (256 MiB
        takes a while on a slow link)."""
        while True:
            event = None
            with trio.move_on_after(http.request_timeout):
                event = await read_event(conn, stream)
            if isinstance(event, h11.EndOfMessage):
                return
            if not isinstance(event, h11.Data):
                raise IngestError(408, "request_timeout", f"no body bytes for "
                                  f"http.request_timeout={http.request_timeout}s")
            reader.receive_data(event.data)
            yield event.data

    async def _read_body(self, http: HttpConfig, conn: h11.Connection,
                         stream: trio.abc.Stream,
                         reader: RequestReader, lease: Lease) -> None:
        with trio.move_on_after(http.request_timeout):
            while isinstance(event := await read_event(conn, stream), h11.Data):
                await lease.grow(len(event.data), "request body")  # waiting stops reading
                reader.receive_data(event.data)
            return
        raise IngestError(408, "request_timeout", f"request not received within "
                          f"http.request_timeout={http.request_timeout}s")

    async def _send(self, conn: h11.Connection, stream: trio.abc.Stream,
                    response: Response, *, close: bool) -> bool:
        """Send an answer within http.request_timeout; False when the client did not take it."""
        with trio.move_on_after(self._live.config.http.request_timeout):
            await send_response(conn, stream, response, close=close)
            return True
        return False

    @staticmethod
    def _authenticate(peer: Peer, authorizer: Authorizer) -> Authenticate:
        def authenticate(authorization: bytes | None) -> Identity:
            return authorizer.token(authorization, protocol="http", source=peer.host,
                                    now=trio.current_time(), subject=peer.common_name)
        return authenticate

    async def _refuse(self, conn: h11.Connection, stream: trio.abc.Stream,
                      peer: Peer, error: IngestError) -> bool:
        """Answer with the error as JSON; close when the body was not read in full."""
        self._telemetry.http_rejected(peer, error.status, error.error, error.detail)
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return False
        retry_after = str(error.retry_after_s).encode() if error.retry_after_s else \
            RETRY_AFTER_S if error.status == 503 else None
        headers = ((b"retry-after", retry_after),) if retry_after else ()
        body_unread = conn.their_state is not h11.DONE
        sent = await self._send(conn, stream, json_response(
            error.status, {"error": error.error, "detail": error.detail}, headers),
            close=body_unread or self.draining)
        if body_unread and sent:
            await _linger(stream)
        return sent


def _declared_length(request: h11.Request) -> int:
    """The body size the client declared (1 when chunked): the room a request waits for
    before its body is read."""
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)
    return 1


async def _linger(stream: trio.abc.Stream) -> None:
    with trio.move_on_after(LINGER_S):
        try:
            while await stream.receive_some(64 * 1024):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

